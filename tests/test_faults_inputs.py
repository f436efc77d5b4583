"""Bad inputs, as a careless or hostile user gives them (issue 14; issue 13 item 1).

Each test names the defect it guards against; each one failed on main before its fix.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2 as T2

from kaviz.data import has_random_transform, is_random

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ is_random (13.1)
def _pixels_change(transform, x, tries=12) -> bool:
    """Ground truth: two calls on the same input differ (seeded, a few tries). Python's ``random``
    is seeded too: torchvision v1's RandomChoice / RandomOrder draw from it, and unseeded they made
    the same choice on all calls about once in 64 runs."""
    random.seed(0)
    torch.manual_seed(0)
    first = transform(x.clone())
    return any(not torch.equal(transform(x.clone()), first) for _ in range(tries))


RANDOM = {
    "v1 RandomResizedCrop": T1.RandomResizedCrop(16, antialias=True),
    "v1 RandomHorizontalFlip": T1.RandomHorizontalFlip(),
    "v1 ColorJitter": T1.ColorJitter(0.4, 0.4, 0.4, 0.1),
    "v2 ColorJitter": T2.ColorJitter(brightness=0.4),
    "v1 GaussianBlur": T1.GaussianBlur(3),
    "v2 GaussianBlur": T2.GaussianBlur(3),
    "v2 GaussianNoise": T2.GaussianNoise(),
    "v1 RandomErasing": T1.RandomErasing(p=1.0),
    "v2 RandomErasing": T2.RandomErasing(p=0.5),
    "v1 RandAugment": T1.RandAugment(),
    "v2 RandAugment": T2.RandAugment(),
    "v2 TrivialAugmentWide": T2.TrivialAugmentWide(),
    "v1 TrivialAugmentWide": T1.TrivialAugmentWide(),
    "v2 AugMix": T2.AugMix(),
    "v1 AutoAugment": T1.AutoAugment(),
    "v2 AutoAugment": T2.AutoAugment(),
    "v2 RandomRotation": T2.RandomRotation(30),
    "v2 RandomAffine": T2.RandomAffine(10, translate=(0.1, 0.1)),
    "v2 RandomPerspective": T2.RandomPerspective(),
    "v2 RandomGrayscale": T2.RandomGrayscale(0.5),
    "v2 RandomCrop": T2.RandomCrop(12),
    "v2 RandomPhotometricDistort": T2.RandomPhotometricDistort(p=1.0),
    "v2 RandomChannelPermutation": T2.RandomChannelPermutation(),
    "v2 ElasticTransform": T2.ElasticTransform(sigma=1.0),
    "v1 Compose([ColorJitter])": T1.Compose([T1.ColorJitter(0.5)]),
    "v2 Compose([Resize, ColorJitter, Normalize])": T2.Compose(
        [T2.Resize(16, antialias=True), T2.ColorJitter(0.5), T2.Normalize([0.5] * 3, [0.2] * 3)]),
    "v2 RandomApply(p=.5)": T2.RandomApply([T2.Normalize([0.5] * 3, [0.2] * 3)], p=0.5),
    "v1 RandomApply(p=.5)": T1.RandomApply([T1.Normalize([0.5] * 3, [0.2] * 3)], p=0.5),
    "v2 RandomApply(p=1, [jitter])": T2.RandomApply([T2.ColorJitter(0.5)], p=1.0),
    "v2 RandomChoice": T2.RandomChoice([T2.Resize(16, antialias=True), T2.CenterCrop(12)]),
    "v1 RandomChoice": T1.RandomChoice([T1.Resize(16, antialias=True), T1.CenterCrop(12)]),
    "v2 RandomOrder": T2.RandomOrder([T2.Normalize([0.5] * 3, [0.2] * 3), T2.Resize(16, antialias=True)]),
    "v1 RandomOrder": T1.RandomOrder([T1.Normalize([0.5] * 3, [0.2] * 3), T1.Resize(16, antialias=True)]),
    "nested": T2.Compose([T2.Resize(16, antialias=True), T2.Compose([T2.CenterCrop(14),
                                                                      T2.RandomApply([T2.GaussianBlur(3)], p=1.0)])]),
    "nn.Sequential": torch.nn.Sequential(T1.CenterCrop(14), T1.RandomHorizontalFlip()),
}
DETERMINISTIC = {
    "None": None,
    "v1 Resize": T1.Resize(16, antialias=True),
    "v2 Resize": T2.Resize(16, antialias=True),
    "v1 Normalize": T1.Normalize([0.5] * 3, [0.2] * 3),
    "v2 Normalize": T2.Normalize([0.5] * 3, [0.2] * 3),
    "v2 ToDtype": T2.ToDtype(torch.float32),
    "v1 CenterCrop": T1.CenterCrop(12),
    "v2 CenterCrop": T2.CenterCrop(12),
    "v2 Compose of deterministic steps": T2.Compose([T2.Resize(16, antialias=True), T2.CenterCrop(14),
                                                   T2.ToDtype(torch.float32), T2.Normalize([0.5] * 3, [0.2] * 3)]),
    "v1 Compose of deterministic steps": T1.Compose([T1.Resize(16, antialias=True), T1.CenterCrop(14),
                                                   T1.Normalize([0.5] * 3, [0.2] * 3)]),
    "v2 GaussianBlur with one sigma": T2.GaussianBlur(3, sigma=1.0),
    "v2 ColorJitter() (identity)": T2.ColorJitter(),
    "v2 RandomApply(p=0)": T2.RandomApply([T2.ColorJitter(0.5)], p=0.0),
    "v2 RandomApply(p=1, [Normalize])": T2.RandomApply([T2.Normalize([0.5] * 3, [0.2] * 3)], p=1.0),
    "v2 RandomHorizontalFlip(p=1)": T2.RandomHorizontalFlip(p=1.0),
    "v2 RandomChoice of one": T2.RandomChoice([T2.CenterCrop(12)]),
}


@pytest.mark.parametrize("name", list(RANDOM))
def test_is_random_true_for_augmentations(name):
    # Defect (13.1): lshfm took "Random" not in repr(t) as deterministic, so ColorJitter, RandAugment,
    # TrivialAugmentWide, GaussianBlur, ... let cache_teacher="auto" cache one augmented view.
    t = RANDOM[name]
    assert is_random(t) is True
    x = (torch.rand(3, 20, 20) * 255).to(torch.uint8) if "Augment" in name or "AugMix" in name \
        else torch.rand(3, 20, 20)
    assert _pixels_change(t, x), f"control: {name} should change pixels between calls"


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_is_random_false_for_fixed_transforms(name):
    # Defect (13.1): sbm took getattr(t, "train", False) (a bound method on every v2 transform) as
    # "random", so Resize and Normalize were refused for precomputation.
    t = DETERMINISTIC[name]
    assert is_random(t) is False
    if t is not None:
        assert not _pixels_change(t, torch.rand(3, 20, 20))


def test_is_random_unknown_callables_and_declared():
    assert is_random(lambda x: x) is True
    assert is_random(T1.Lambda(lambda x: x)) is True
    assert is_random(T2.Lambda(lambda x: x)) is True
    assert is_random(T2.Compose([T2.Resize(8), T2.Lambda(lambda x: x)])) is True

    class Fixed:
        is_random = False

        def __call__(self, x):
            return x * 2

    assert is_random(Fixed()) is False
    assert is_random(T2.Compose([T2.Resize(8), Fixed()])) is False


def test_is_random_joint_transform_and_loader_defaults():
    from kaviz.data.real import JointTransform, ResizeCover, default_transform

    assert is_random(JointTransform(16, train=True)) is True
    assert is_random(JointTransform(16, train=False)) is False
    assert is_random(JointTransform(16, train=True, hflip=False)) is True  # the crop is drawn
    assert is_random(default_transform(16, train=True)) is True
    assert is_random(default_transform(16, train=False)) is False
    assert is_random(ResizeCover(16)) is False
    img = torch.rand(3, 24, 30)
    assert not _pixels_change(JointTransform(16, train=False, normalize=False), img)
    assert _pixels_change(JointTransform(16, train=True, normalize=False), img)


def test_has_random_transform_looks_through_wrappers():
    from kaviz.data import ImageDataset, Unlabeled, union

    imgs = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    plain = ImageDataset(imgs, torch.arange(6) % 2, classes=["a", "b"], name="a")
    aug = ImageDataset(imgs, torch.arange(6) % 2, classes=["a", "b"], name="b",
                       transform=T2.RandomHorizontalFlip())
    assert not has_random_transform(plain)
    assert has_random_transform(aug)
    assert has_random_transform(Unlabeled(aug))
    assert has_random_transform(torch.utils.data.Subset(aug, [0, 1]))
    assert has_random_transform(union([plain, aug]))
    assert not has_random_transform(union([plain, plain.subset([0, 1, 2])], names=["p", "q"]))
    assert not has_random_transform(None)


# ------------------------------------------------------------ is_random in every cache decision
def _tiny_union(n_a=12, n_b=8, size=8, transform=None):
    from kaviz import data

    g = torch.Generator().manual_seed(0)
    a = data.ImageDataset((torch.rand(n_a, 3, size, size, generator=g) * 255).to(torch.uint8), torch.arange(n_a) % 3,
                          classes=["a0", "a1", "a2"], name="a", transform=transform)
    b = data.ImageDataset((torch.rand(n_b, 3, size, size, generator=g) * 255).to(torch.uint8), torch.arange(n_b) % 2,
                          classes=["b0", "b1"], name="b", transform=transform)
    return data.union([a, b])


def _conv_net(k, c=4, stride=1):
    from collections import OrderedDict

    from torch import nn

    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, c, 3, stride, 1), bn=nn.BatchNorm2d(c), relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(c, k)))


def test_lshfm_auto_cache_refuses_colorjitter_data():
    # Defect (13.1): "Random" not in repr(ColorJitter(...)) -> cached one augmented view silently.
    from kaviz.data import scenes
    from kaviz.methods import lshfm

    ds = scenes(n=6, size=16, max_objects=1, seed=0)
    teacher = lshfm_teacher()
    for t in (T2.ColorJitter(0.4), T2.Compose([T2.GaussianBlur(3)]), T2.RandAugment(), T2.TrivialAugmentWide()):
        aug = ds.with_transform(t)
        assert lshfm.teacher_outputs(aug, teacher) is aug, t
    fixed = ds.with_transform(T2.Normalize([0.5] * 3, [0.2] * 3))
    assert isinstance(lshfm.teacher_outputs(fixed, teacher), lshfm.TeacherOutputs)
    with pytest.warns(UserWarning, match="cache_teacher=True on data with a random transform"):
        lshfm.teachers.forced_cache(ds.with_transform(T2.ColorJitter(0.4)), teacher)


def lshfm_teacher():
    from collections import OrderedDict

    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3, 2, 1), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                     flat=nn.Flatten(), fc=nn.Linear(4, 20))).eval()


def test_sbm_precompute_accepts_resize_and_normalize():
    # Defect (13.1): getattr(v2.Resize(...), "train", False) is a bound method, so sbm took every v2
    # transform as random and refused to precompute on deterministic data.
    from kaviz import models
    from kaviz.data import scenes
    from kaviz.methods import sbm

    ds = scenes(n=4, size=16, max_objects=1, seed=3)
    teachers = {"seg": models.build("segnet_small", 11, widths=(4, 8, 8)).eval(),
                "depth": models.build("segnet_small", 1, widths=(4, 8, 8)).eval()}
    method = sbm.SBM(sbm.SBMStudent(teachers, {"seg": "dec1", "depth": "dec1"}), teachers)
    fixed = ds.with_transform(T2.Compose([T2.Resize(16, antialias=True), T2.Normalize([0.5] * 3, [0.2] * 3)]))
    pre = method.precompute(fixed)
    assert len(pre) == 4 and set(pre.outputs) == {"seg", "depth"}
    with pytest.raises(ValueError, match="random transform"):
        method.precompute(ds.with_transform(T2.ColorJitter(0.4)))


def test_cfl_cache_teachers_defaults_to_is_random(monkeypatch):
    # Defect (13.1): cfl trusted a caller flag (default False: never cached; True: cached augmented
    # views silently). Now "auto" decides with has_random_transform; True still forces (with a warning).
    from kaviz.methods import cfl

    calls = []
    real = cfl.precompute_teachers

    def spy(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(cfl.runs, "precompute_teachers", spy)
    teachers = [_conv_net(3), _conv_net(2, stride=2)]
    kw = dict(seeds=[0], methods=["KD"], epochs=1, lr=1e-2, hidden=4, batch_size=8, progress=False)
    fixed, aug = _tiny_union(), _tiny_union(transform=T2.ColorJitter(0.4))
    cfl.run_students(lambda: _conv_net(5, stride=2), teachers, "relu", ["relu", "relu"], fixed, fixed, None, **kw)
    assert len(calls) == 1
    cfl.run_students(lambda: _conv_net(5, stride=2), teachers, "relu", ["relu", "relu"], aug, fixed, None, **kw)
    assert len(calls) == 1  # augmented: teachers run live
    with pytest.warns(UserWarning, match="random transform"):
        cfl.run_students(lambda: _conv_net(5, stride=2), teachers, "relu", ["relu", "relu"], aug, fixed, None,
                         cache_teachers=True, **kw)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="cache_teachers must be True, False or 'auto'"):
        cfl.run_students(lambda: _conv_net(5, stride=2), teachers, "relu", ["relu", "relu"], fixed, fixed, None,
                         cache_teachers="yes", **kw)


# ------------------------------------------------------------- teachers vs the union (14.5)
def test_kd_checks_teacher_class_counts_at_construction():
    # Defect (14.5): teachers in the wrong order (2 + 3 for a 3 + 2 union) trained to the end
    # without validation data; the error came, if at all, after the first epoch.
    from kaviz.methods import kd

    u = _tiny_union()
    wrong = [_conv_net(2), _conv_net(3)]
    with pytest.raises(ValueError, match=r"teacher 1 has 2 outputs but source 1 \('a'\) has 3 classes "
                                         r"\(union labels 0..2\); teacher 2 has 3 outputs but source 2 \('b'\) "
                                         r"has 2 classes \(union labels 3..4\)"):
        kd.MultiTeacherKD(_conv_net(5), wrong, union=u)
    with pytest.raises(ValueError, match=r"teacher 1 has 2 outputs"):
        kd.distill(_conv_net(5), wrong, u, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"1 teacher\(s\) for a union of 2 sources \['a', 'b'\]"):
        kd.MultiTeacherKD(_conv_net(5), [_conv_net(5)], union=u)
    with pytest.raises(ValueError, match=r"the student has 4 outputs but the union has 5 classes \(3 \+ 2\)"):
        kd.MultiTeacherKD(_conv_net(4), [_conv_net(3), _conv_net(2)], union=u)
    kd.MultiTeacherKD(_conv_net(5), [_conv_net(3), _conv_net(2)], union=u)  # matching: accepted
    kd.MultiTeacherKD(_conv_net(5), wrong)  # no union given: not checked (API unchanged)


def test_cfl_checks_teacher_class_counts_at_construction():
    from kaviz.data import Unlabeled
    from kaviz.methods import cfl

    u = _tiny_union()
    wrong = [_conv_net(2), _conv_net(3)]
    x = torch.stack([u.get_image(i) for i in range(2)])
    with pytest.raises(ValueError, match=r"CommonFeatureLearning: the teachers do not match .*teacher 1 has 2 outputs"):
        cfl.CommonFeatureLearning(_conv_net(5), wrong, "relu", ["relu", "relu"], example=x, hidden=4,
                                  union=Unlabeled(u))
    with pytest.raises(ValueError, match=r"teacher 1 has 2 outputs but source 1 \('a'\) has 3 classes"):
        cfl.amalgamate(_conv_net(5), wrong, "relu", ["relu", "relu"], u, u, hidden=4, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"KDBaseline: the teachers do not match"):
        cfl.run_students(lambda: _conv_net(5), wrong, "relu", ["relu", "relu"], u, None, None, seeds=[0],
                         methods=["KD"], epochs=1, hidden=4, progress=False)
    cached = cfl.precompute_teachers([_conv_net(3), _conv_net(2)], ["relu", "relu"], u)
    with pytest.raises(ValueError, match=r"teacher 2 has 3 outputs"):  # found inside TeacherOutputs too
        cfl.KDBaseline(_conv_net(5), [_conv_net(3), _conv_net(3)], union=cached)


# ------------------------------------------------------------------------ widgets jam (14.7)
def _explorer(images):
    import pandas as pd

    from kaviz.widgets import EmbeddingExplorer

    calls = []

    def compute(model, layer, method, params):
        calls.append(layer)
        if layer == "broken":
            raise RuntimeError("hook never fired for layer 'broken'")
        rng = np.random.default_rng(len(calls))
        return pd.DataFrame({"x": rng.normal(size=12), "y": rng.normal(size=12), "source": ["s"] * 12,
                             "label": np.arange(12) % 3, "index": np.arange(12)})

    ex = EmbeddingExplorer(compute, models=["m"], layers=["l1", "l2", "broken"], methods=["pca"],
                           titles=["a", "b"], images=images)
    return ex, calls


def test_explorer_selection_without_images_does_not_jam(capsys):
    # Defect (14.7): select() stored the selection before the image error, then every layer
    # change raised from recompute() (and the status stayed at "computing ...").
    imgs = (np.random.default_rng(0).random((4, 8, 8, 3)) * 255).astype(np.uint8)  # only 4 of 12
    ex, calls = _explorer(imgs)
    ex.select([1, 2])
    assert ex.selection == [1, 2]
    with pytest.raises(IndexError, match=r"sample indices \[9\] are outside the images array \(N=4\)"):
        ex.select([2, 9])
    assert ex.selection == [1, 2]                      # unchanged: not stored before the error
    ex.layer_dd.value = "l2"                           # a callback: must work, not raise
    assert calls[-1] == "l2" and "computing" not in ex.status.value and "points" in ex.status.value
    assert ex.selection == [1, 2]
    ex.layer_dd.value = "broken"
    assert "RuntimeError" in ex.status.value
    ex.layer_dd.value = "l1"                           # a layer change after an error still works:
    assert calls[-1] == "broken" and "points" in ex.status.value  # l1 was drawn before, so from memory
    assert "RuntimeError" not in ex.status.value
    assert ex.recompute(force=True) is True and calls[-1] == "l1"  # and computed afresh when forced
    assert capsys.readouterr() == ("", "")


def test_explorer_recompute_never_raises_even_when_reselect_fails():
    # Defect (14.7): a stored selection whose images fail made recompute() raise.
    calls = {"n": 0}

    def images(i):
        if calls["n"]:
            raise OSError(f"image {i} is gone")
        return np.zeros((4, 4, 3), np.uint8)

    ex, computed = _explorer(images)
    ex.select([3])
    calls["n"] = 1
    assert ex.recompute() is True                      # maps drawn; the selection is dropped
    assert ex.selection is None and "selection cleared" in ex.status.value and "image 3 is gone" in ex.status.value

    def boom(*a, **k):
        raise RuntimeError("drawing failed")

    ex._check_result = boom                            # any failure inside, not only compute's
    assert ex.recompute(force=True) is False
    assert "drawing failed" in ex.status.value and "computing" not in ex.status.value
    del ex._check_result                               # the real one again
    ex._bind = boom                                    # a failure after the maps are computed
    assert ex.recompute() is False and "while drawing the maps" in ex.status.value
    n = len(computed)
    assert ex.recompute() is False and len(computed) == n  # and on the path that redraws from memory
    assert "drawing failed" in ex.status.value and "computing" not in ex.status.value


def test_linked_controls_drops_stale_figure_and_refuses_out_of_range():
    # Defect (14.7): a figure stayed on screen when fn switched to a non-figure output (which was
    # then not shown at all); update(channel=99) on range(64) was silently clamped to 63.
    import pandas as pd
    import plotly.graph_objects as go

    from kaviz.widgets import linked_controls

    def draw(kind, channel):
        if kind == "figure":
            return go.Figure(go.Bar(y=[channel, 1]))
        return pd.DataFrame({"channel": [channel]})

    lc = linked_controls(draw, kind=["figure", "table"], channel=range(64))
    assert lc.figure is not None and lc.figure in lc.widget.children
    lc.update(kind="table")
    assert lc.figure is None
    assert not any(type(c).__name__ == "FigureWidget" for c in lc.widget.children)
    assert lc.output in lc.widget.children and lc.output.outputs
    lc.update(kind="figure", channel=5)
    assert lc.figure in lc.widget.children and lc.output not in lc.widget.children
    assert list(lc.figure.data[0].y) == [5, 1]
    with pytest.raises(ValueError, match=r"control 'channel': 99 is outside its range \[0, 63\]"):
        lc.update(channel=99)
    assert lc.values["channel"] == 5                  # nothing half-applied
    with pytest.raises(ValueError, match=r"outside its range"):
        lc.update(kind="table", channel=-1)
    assert lc.values == {"kind": "figure", "channel": 5}
    with pytest.raises(ValueError, match=r"control 'kind': 'chart' is not one of its options \('figure', 'table'\)"):
        lc.update(channel=7, kind="chart")
    assert lc.values == {"kind": "figure", "channel": 5}


# ----------------------------------------------------------------- real-format loaders (14.10/12/14)
def _fixtures():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import fixtures_real

    return fixtures_real


def _edit_line(path, n, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[n - 1] = text
    path.write_text("".join(lines))


def test_truncated_jpeg_error_names_the_file(tmp_path):
    # Defect (14.10): PIL's "image file is truncated" came mid-training without the file's path.
    from kaviz.data import real
    from kaviz.data.real import DatasetFormatError

    fx = _fixtures()
    root = tmp_path / "CUB_200_2011"
    made = fx.make_cub(root)
    victim = root / "images" / made["train"][1][0]
    victim.write_bytes(victim.read_bytes()[:200])
    ds = real.cub200(root, "train", image_size=8)
    ds[0]  # an intact image still loads
    with pytest.raises(DatasetFormatError, match=r"(?s)" + str(victim).replace("\\", "\\\\") +
                       r": cannot read this image .*truncated or corrupt"):
        ds[1]
    with pytest.raises(OSError, match=str(victim.name)):  # still an OSError for existing handlers
        torch.utils.data.DataLoader(ds, batch_size=4).__iter__().__next__()
    victim.write_bytes(b"not an image at all")
    with pytest.raises(DatasetFormatError, match=r"cannot read this image \(UnidentifiedImageError"):
        ds.image_array(1)


@pytest.mark.parametrize("entry", ["../../x.png", "/etc/passwd", "a/../../x.png"])
def test_cub_path_escape_refused_with_line(tmp_path, entry):
    # Defect (14.12): a CUB images.txt line "../../x.png" was read from outside the dataset folder.
    from kaviz.data import real
    from kaviz.data.real import DatasetFormatError

    fx = _fixtures()
    root = tmp_path / "CUB_200_2011"
    fx.make_cub(root)
    _edit_line(root / "images.txt", 2, f"2 {entry}\n")
    with pytest.raises(DatasetFormatError, match=r"images.txt is malformed at line 2: the file name "
                                                 + f"'{entry}'".replace(".", r"\.") + " leaves the dataset folder"):
        real.cub200(root, "train", check_images=False)


def test_path_escape_refused_in_every_loader(tmp_path):
    import json

    from kaviz.data import real
    from kaviz.data.real import DatasetFormatError

    fx = _fixtures()
    dogs = tmp_path / "dogs"
    fx.make_dogs(dogs, lists="txt")
    _edit_line(dogs / "train_list.txt", 3, "n02085620-Chihuahua/../../../secret.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"train_list.txt is malformed at line 3: .*leaves the dataset"):
        real.stanford_dogs(dogs, "train", check_images=False)
    dogs_mat = tmp_path / "dogs_mat"
    fx.make_dogs(dogs_mat, lists="mat")
    from scipy.io import savemat

    fl = np.empty((1, 1), dtype=object)
    fl[0, 0] = np.array(["../n02085620-Chihuahua/x.jpg"])
    savemat(dogs_mat / "test_list.mat", {"file_list": fl, "labels": np.array([[1]])})
    with pytest.raises(DatasetFormatError, match=r"test_list.mat is malformed: the file name '\.\./n02085620"):
        real.stanford_dogs(dogs_mat, "test", check_images=False)

    voc = tmp_path / "voc"
    fx.make_voc(voc)
    _edit_line(voc / "ImageSets" / "Main" / "val.txt", 1, "../../000003\n")
    with pytest.raises(DatasetFormatError, match=r"ImageSets/Main/val.txt is malformed at line 1: the file name "
                                                 r"'\.\./\.\./000003' leaves"):
        real.voc2007(voc, "val", check_images=False)

    coco = tmp_path / "coco"
    fx.make_coco(coco)
    f = coco / "annotations" / "instances_val2014.json"
    d = json.loads(f.read_text())
    d["images"][0]["file_name"] = "../../../etc/hosts"
    f.write_text(json.dumps(d))
    with pytest.raises(DatasetFormatError, match=r"instances_val2014.json \(image id 42\) is malformed: the file "
                                                 r"name '\.\./\.\./\.\./etc/hosts' leaves"):
        real.coco2014_multilabel(coco, "val", check_images=False)

    celeba = tmp_path / "celeba"
    fx.make_celeba(celeba)
    attr = celeba / "list_attr_celeba.txt"
    _edit_line(attr, 3, attr.read_text().splitlines()[2].replace("000001.jpg", "../000001.jpg") + "\n")
    part = celeba / "list_eval_partition.txt"
    part.write_text(part.read_text().replace("000001.jpg", "../000001.jpg"))
    with pytest.raises(DatasetFormatError, match=r"list_attr_celeba.txt is malformed at line 3: the file name "
                                                 r"'\.\./000001.jpg' leaves"):
        real.celeba(celeba, "train", check_images=False)


def test_malformed_index_files_say_malformed_and_the_line(tmp_path):
    # Defect (14.14): a malformed file gave "<dataset> not found at ..." (it was found).
    from kaviz.data import real
    from kaviz.data.real import DatasetFormatError

    fx = _fixtures()
    root = tmp_path / "CUB_200_2011"
    fx.make_cub(root)
    good = (root / "image_class_labels.txt").read_text()
    _edit_line(root / "image_class_labels.txt", 5, "5\n")
    with pytest.raises(DatasetFormatError, match=r"image_class_labels.txt is malformed at line 5: '5' has 1 fields, "
                                                 "expected 2") as e:
        real.cub200(root, "train", check_images=False)
    assert "not found" not in str(e.value)
    (root / "image_class_labels.txt").write_text(good)
    _edit_line(root / "image_class_labels.txt", 4, "4 three\n")
    with pytest.raises(DatasetFormatError, match=r"image_class_labels.txt is malformed at line 4: field 2 of "
                                                 "'4 three' is not an integer"):
        real.cub200(root, "train", check_images=False)
    _edit_line(root / "image_class_labels.txt", 4, "4 9\n")
    with pytest.raises(DatasetFormatError, match=r"line 4: image 4 has class id 9, outside 1..3"):
        real.cub200(root, "train", check_images=False)
    (root / "image_class_labels.txt").write_text(good)
    _edit_line(root / "train_test_split.txt", 7, "7 yes\n")
    with pytest.raises(DatasetFormatError, match=r"train_test_split.txt is malformed at line 7"):
        real.cub200(root, "train", check_images=False)


def test_truncated_celeba_partition_line_is_named(tmp_path):
    # Defect (14.14): a truncated list_eval_partition.txt line gave "dictionary update sequence element".
    from kaviz.data import real
    from kaviz.data.real import DatasetFormatError

    fx = _fixtures()
    root = tmp_path / "celeba"
    fx.make_celeba(root, nested=True)
    part = root / "Eval" / "list_eval_partition.txt"
    _edit_line(part, 4, "000004.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"Eval/list_eval_partition.txt is malformed at line 4: "
                                                 r"'000004.jpg' is not '<image> <0\|1\|2>' \(a truncated line\?\)"):
        real.celeba(root, "train")
    _edit_line(part, 4, "000004.jpg 1\n")
    attr = root / "Anno" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines(keepends=True)
    _edit_line(attr, 5, lines[4][:30] + "\n")
    with pytest.raises(DatasetFormatError, match=r"list_attr_celeba.txt is malformed at line 5: the line for "
                                                 "000003.jpg does not hold 40 values"):
        real.celeba(root, "train")


def test_corrupt_dogs_mat_gives_a_teaching_error(tmp_path):
    # Defect (14.14): a corrupt .mat raised scipy's IndexError.
    from kaviz.data import real
    from kaviz.data.real import DatasetFormatError

    fx = _fixtures()
    root = tmp_path / "dogs"
    fx.make_dogs(root, lists="mat")
    mat = root / "train_list.mat"
    mat.write_bytes(mat.read_bytes()[:150])
    with pytest.raises(DatasetFormatError, match=r"(?s)train_list.mat is malformed: not a Stanford Dogs list: it "
                                                 r"could not be read as a MATLAB file .*Re-extract lists.tar, or put "
                                                 r"train_list.txt"):
        real.stanford_dogs(root, "train")
    mat.write_bytes(b"MATLAB 5.0 garbage" * 3)
    with pytest.raises(DatasetFormatError, match=r"could not be read as a MATLAB file"):
        real.stanford_dogs(root, "train")


def test_voc_annotation_without_objects_is_skipped_with_a_warning(tmp_path):
    # Defect (14.14): an annotation without <object> became an all-zero label row silently.
    from kaviz.data import real
    from kaviz.data.real import DatasetFormatError

    fx = _fixtures()
    root = tmp_path / "voc"
    fx.make_voc(root)
    (root / "Annotations" / "000002.xml").write_text("<annotation><filename>000002.jpg</filename></annotation>")
    with pytest.warns(UserWarning, match=r"1 annotation\(s\) hold no <object> and are left out "
                                         r"\(e\.g\. Annotations/000002\.xml\)"):
        ds = real.voc2007(root, "trainval")
    assert len(ds) == 2 and ds.files == ["JPEGImages/000001.jpg", "JPEGImages/000003.jpg"]
    assert (ds.targets["labels"].sum(1) > 0).all()
    with pytest.raises(DatasetFormatError, match="every listed annotation holds no <object>"):
        (root / "ImageSets" / "Main" / "train.txt").write_text("000002\n")
        real.voc2007(root, "train")


# ---------------------------------------------------------------------------------- dtype (14.13)
def test_lsh_loss_fit_bias_uses_the_module_dtype():
    # Defect (14.13): fit_bias cast the teacher features to float32 whatever the module's dtype, so
    # a .double() loss failed ("expected m1 and m2 to have the same dtype").
    from kaviz.methods.lshfm import LSHLoss

    torch.manual_seed(0)
    f_t = torch.randn(32, 6, dtype=torch.float64)
    lsh64 = LSHLoss(6, 8, std=1.0).double().fit_bias(f_t)
    assert lsh64.bias.dtype == torch.float64
    proj = f_t @ lsh64.weight.T
    assert torch.equal(lsh64.bias, -proj.median(0).values)  # fitted in float64, no float32 round trip
    f_s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    out = lsh64(f_s, f_t[:4])
    assert out["lsh"].dtype == torch.float64
    out["lsh"].backward()
    assert f_s.grad is not None
    # float32 features into a float64 loss (and the reverse) also work
    lsh64(f_s.float().detach().requires_grad_(), f_t[:4].float())
    lsh32 = LSHLoss(6, 8, std=1.0).fit_bias(f_t)
    assert lsh32.bias.dtype == torch.float32
    assert lsh32(f_s.detach(), f_t[:4])["lsh"].dtype == torch.float32


def test_recombination_combine_and_prune_on_float64_teachers():
    # Defect (14.13): batch norms were built without the teachers' dtype, so combine()/prune() on
    # float64 networks failed.
    from kaviz import models
    from kaviz.methods import recombination as R

    torch.manual_seed(0)
    T = {"reconstruction": models.build("segnet_small", 3, output="sigmoid", widths=(4, 6, 8)).double().eval(),
         "segmentation": models.build("segnet_small", 5, widths=(4, 6, 8)).double().eval()}
    net = R.combine(T)
    assert {p.dtype for p in net.state_dict().values() if p.is_floating_point()} == {torch.float64}
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    out = net.eval()(x)
    assert all(v.dtype == torch.float64 for v in out.values())
    R.prune(net, 0.25)
    assert {p.dtype for p in net.state_dict().values() if p.is_floating_point()} == {torch.float64}
    net(x)
    mixed = {**T, "segmentation": T["segmentation"].float()}
    with pytest.raises(ValueError, match="the teachers hold different dtypes"):
        R.combine(mixed)


# --------------------------------------------------------------------- smaller input faults (14.14)
def test_build_none_name_lists_valid_names_and_accepts_numpy_ints():
    # Defect (14.14): build(None, 3) failed inside difflib; build(name, np.int64(3)) was refused.
    import json

    from kaviz import models

    with pytest.raises(TypeError, match=r"name must be an architecture name \(a str\), got None .*"
                                        r"kaviz's own: \[.*'cifar_resnet8'.*available\(\)"):
        models.build(None, 3)
    with pytest.raises(TypeError, match=r"got 3 \(int\)"):
        models.build(3, 3)
    m = models.build("cifar_resnet8", np.int64(3))
    assert m.kaviz_spec["num_classes"] == 3 and type(m.kaviz_spec["num_classes"]) is int
    json.dumps(m.kaviz_spec)  # a NumPy int would not serialise into cache keys
    assert models.build("cifar_resnet8", torch.tensor(4)).kaviz_spec["num_classes"] == 4
    for bad in (3.0, True, 0, np.int64(-1), "3"):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            models.build("cifar_resnet8", bad)


def test_image_dataset_refuses_channels_last_arrays():
    # Defect (14.14): (N, H, W, 3) was taken as channels-first: images of H channels, 3 pixels wide.
    from kaviz.data import ImageDataset

    hwc = np.zeros((5, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match=r"shape \(5, 16, 16, 3\), which looks channels-last .*"
                                         r"np.moveaxis\(images, -1, 1\)"):
        ImageDataset(hwc, np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="looks channels-last"):
        ImageDataset(torch.zeros(5, 32, 32, 1, dtype=torch.uint8), torch.zeros(5, dtype=torch.long))
    ds = ImageDataset(np.moveaxis(hwc, -1, 1), np.zeros(5, np.int64))  # the suggested fix works
    assert ds[0][0].shape == (3, 16, 16)
    assert ImageDataset(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))[0][0].shape \
        == (1, 8, 8)
    assert ImageDataset(torch.zeros(2, 3, 32, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))[0][0].shape \
        == (3, 32, 4)  # channels-first with 4 columns: fine


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])
def test_embed_of_constant_features_is_a_clear_error(method):
    # Defect (14.14): t-SNE of constant features failed inside quality() with "Input X contains NaN";
    # UMAP drew noise and PCA a single point, both with a trustworthiness that looked fine.
    from kaviz.embed import embed

    with pytest.raises(ValueError, match=r"the features the map is fitted on \('features'\) are constant: all 30 "
                                         r"rows are the same vector"):
        embed(np.ones((30, 6), np.float32), method=method, cache=False)
    with pytest.raises(ValueError, match=r"\('b'\) are constant"):
        embed({"a": np.random.default_rng(0).normal(size=(30, 6)), "b": np.zeros((30, 6))}, method=method,
              mode="reference", reference="b", cache=False)


def test_embed_of_few_distinct_points_still_works():
    from kaviz.embed import embed

    x = np.zeros((30, 6))
    x[:15] = 1.0  # two distinct vectors: a defined map, not an error
    df = embed(x, method="pca", cache=False)
    assert np.isfinite(df[["x", "y"]].to_numpy()).all()


def test_check_teachers_leaves_the_rng_stream_alone():
    # the check reads one image; under a random transform that must not change what a seeded run draws next
    from kaviz.methods import kd

    u = _tiny_union(transform=T2.RandomHorizontalFlip())
    teachers = [_conv_net(3), _conv_net(2)]
    torch.manual_seed(0)
    kd.check_teachers(teachers, u)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_truncated_dense_map_error_names_the_file(tmp_path):
    from kaviz.data import real
    from kaviz.data.real import DatasetFormatError

    fx = _fixtures()
    fx.make_nyu(tmp_path / "nyu")
    depth = tmp_path / "nyu" / "train" / "depth" / "5.npy"
    depth.write_bytes(depth.read_bytes()[:100])
    ds = real.nyuv2(tmp_path / "nyu", "train", image_size=8, augment=False)
    with pytest.raises(DatasetFormatError, match=r"5\.npy: cannot read this map"):
        ds[1]
    seg = tmp_path / "nyu" / "train" / "seg13" / "10.png"
    seg.write_bytes(seg.read_bytes()[:60])
    with pytest.raises(DatasetFormatError, match=r"10\.png: cannot read this map"):
        ds[2]
