"""kaviz.methods.cfl: the CFL block, the method's loss terms, frozen teachers, label-free training,
spatial matching, the torchvision path, KD vs CFL runs, the feature/common spaces and the data."""
from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from kaviz import data, losses, models
from kaviz.features import OUTPUT, LayerError
from kaviz.methods import cfl
from kaviz.methods.kd import concat_logits
from kaviz.train import fit


# ------------------------------------------------------------------------------------------ helpers
def conv_net(k, c=8, stride=1, name_bn=True):
    """A tiny conv classifier with a batch-norm (so eval vs train mode matters); layer 'relu' is
    its last conv stage ((c, 8/stride, 8/stride) on 8×8 images)."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, c, 3, stride, 1), bn=nn.BatchNorm2d(c), relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(c, k)))


def tiny_union(n_a=24, n_b=16, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = data.ImageDataset((torch.rand(n_a, 3, size, size, generator=g) * 255).to(torch.uint8), torch.arange(n_a) % 3,
                          classes=["a0", "a1", "a2"], name="a")
    b = data.ImageDataset((torch.rand(n_b, 3, size, size, generator=g) * 255).to(torch.uint8), torch.arange(n_b) % 2,
                          classes=["b0", "b1"], name="b")
    return data.union([a, b])


def batch_of(ds, n=None):
    n = len(ds) if n is None else n
    return torch.stack([ds.get_image(i) for i in range(n)])


class LabelsRaise(torch.utils.data.Dataset):
    """Images whose labels raise when anything touches them."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def get_image(self, i):
        return self.images[i]

    def __getitem__(self, i):
        raise AssertionError("the labels were read (dataset[i] returns (image, label))")

    @property
    def targets(self):
        raise AssertionError("the labels were read (dataset.targets)")

    def get_target(self, i):
        raise AssertionError("the labels were read (dataset.get_target)")


# -------------------------------------------------------------------------------------------- block
def test_block_parameter_count_matches_the_reference():
    block = cfl.CFLBlock(512, [512, 512], 128)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(block) == 3_162_112
    assert count(block.align_s) + count(block.align_t) == 393_216
    assert count(block.extractor) == 1_064_960
    assert count(block.decoders) == 1_703_936
    # no batch-norm and no bias anywhere in the block
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert all(getattr(m, "bias", None) is None for m in block.modules() if isinstance(m, nn.Conv2d))


def test_block_shapes_and_errors():
    block = cfl.CFLBlock(6, [4, 10], hidden=5)
    f_s, f_t = torch.randn(3, 6, 4, 4), [torch.randn(3, 4, 4, 4), torch.randn(3, 10, 4, 4)]
    h_s, h_t, rec = block(f_s, f_t)
    assert h_s.shape == (3, 5, 4, 4) and [h.shape for h in h_t] == [(3, 5, 4, 4)] * 2
    assert [r.shape for r in rec] == [f.shape for f in f_t]
    with pytest.raises(ValueError, match="expects 4 channels"):
        block(f_s, [torch.randn(3, 5, 4, 4), f_t[1]])
    with pytest.raises(ValueError, match="match_spatial"):
        block(f_s, [torch.randn(3, 4, 2, 2), f_t[1]])
    with pytest.raises(ValueError, match="2 teachers"):
        block(f_s, f_t[:1])
    with pytest.raises(ValueError, match="CFLBlockFC"):
        block(torch.randn(3, 6), f_t)
    with pytest.raises(ValueError, match="teacher_channels"):
        cfl.CFLBlock(6, 4)
    with pytest.raises(ValueError, match="student_channels"):
        cfl.CFLBlock(0, [4])
    with pytest.raises(ValueError, match="hidden"):
        cfl.CFLBlock(6, [4], hidden=0)


def test_fc_block_shapes_and_errors():
    block = cfl.CFLBlockFC(6, [4, 10], hidden=5)
    h_s, h_t, rec = block(torch.randn(3, 6), [torch.randn(3, 4), torch.randn(3, 10)])
    assert h_s.shape == (3, 5) and [r.shape for r in rec] == [(3, 4), (3, 10)]
    with pytest.raises(ValueError, match="CFLBlock"):
        block(torch.randn(3, 6, 2, 2), [torch.randn(3, 4), torch.randn(3, 10)])
    with pytest.raises(ValueError, match="2 teachers"):
        block(torch.randn(3, 6), [torch.randn(3, 4)])


def test_match_spatial_pools_to_the_smaller_grid():
    a, b, v = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4), torch.randn(2, 7)
    pa, pb, pv = cfl.match_spatial([a, b, v])
    assert pa.shape == (2, 3, 4, 4) and pb is b and pv is v
    torch.testing.assert_close(pa, nn.functional.avg_pool2d(a, 2))
    # non-divisible sizes and different heights/widths: each axis to its minimum
    c, d = torch.randn(1, 2, 7, 5), torch.randn(1, 2, 3, 9)
    assert [t.shape[2:] for t in cfl.match_spatial([c, d])] == [(3, 5), (3, 5)]


def test_mmd_properties_used_by_cfl():
    # SPEC §0.3: zero on identical batches; ~2·|S_small|/N (about 0.18 at N=64) for independent
    # unit vectors in high dimension; paired (nearly identical) features give far less
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 512, generator=g), torch.randn(64, 512, generator=g)
    assert losses.mmd(x, x).item() == 0.0
    independent = losses.mmd(x, y).item()
    assert 0.15 < independent < 0.21
    assert losses.mmd(x, x + 1e-3 * torch.randn(64, 512, generator=g)).item() < 0.1 * independent


# ------------------------------------------------------------------------------------------- method
def make_method(**kw):
    torch.manual_seed(0)
    u = tiny_union()
    teachers = [conv_net(3, 8), conv_net(2, 6, stride=2)]  # 8×8 and 4×4 feature maps
    student = conv_net(5, 4, stride=2)
    method = cfl.CommonFeatureLearning(student, teachers, "relu", ["relu", "relu"], example=batch_of(u, 2),
                                       hidden=4, **kw)
    return u, teachers, student, method


def test_method_terms_spatial_mismatch_and_block_choice():
    u, teachers, student, method = make_method()
    assert isinstance(method.block, cfl.CFLBlock)
    assert (method.block.student_channels, method.block.teacher_channels) == (4, [8, 6])
    x = batch_of(u, 6)
    e = method.encode(x)
    # teacher 1's 8×8 map is pooled to the student's 4×4 grid; the codes share it
    assert e["f_t"][0].shape == (6, 8, 4, 4) and e["h_s"].shape == e["h_t"][0].shape == (6, 4, 4, 4)
    terms = method(x)
    assert set(terms) == {"kd", "mmd", "recon"} and all(v.dim() == 0 for v in terms.values())
    assert method.loss_weights == {"kd": 1.0, "mmd": 10.0, "recon": 10.0}
    kd = losses.soft_cross_entropy(student(x), concat_logits(method.teachers, x))
    torch.testing.assert_close(terms["kd"], kd)
    # a (labels) second element is ignored
    torch.testing.assert_close(method((x, torch.zeros(6)))["recon"], terms["recon"])
    # the fully-connected variant on the pooled vectors that feed fc
    fc = cfl.CommonFeatureLearning(student, teachers, "fc:in", ["fc:in", "fc:in"], example=x, hidden=3)
    assert isinstance(fc.block, cfl.CFLBlockFC) and fc.block.teacher_channels == [8, 6]
    assert set(fc(x)) == {"kd", "mmd", "recon"}


def test_mmd_term_is_zero_when_student_equals_teacher_and_alignments_agree():
    torch.manual_seed(0)
    teacher = conv_net(3, 5).eval()
    student = copy.deepcopy(teacher)
    method = cfl.CommonFeatureLearning(student, [teacher], "relu", ["relu"], example=torch.rand(2, 3, 8, 8), hidden=4)
    method.block.align_s.load_state_dict(method.block.align_t[0].state_dict())
    method.eval()
    terms = method(torch.rand(8, 3, 8, 8))
    assert terms["mmd"].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(terms["kd"]) and terms["recon"].item() > 0
    # ... and differs from 0 once the student's alignment differs
    nn.init.normal_(method.block.align_s[0].weight)
    assert method(torch.rand(8, 3, 8, 8))["mmd"].item() > 1e-3


def test_param_groups_separate_learning_rates():
    u, teachers, student, method = make_method(head_lr_mult=10.0, block_lr_mult=5.0)
    groups = {g["name"]: g for g in method.param_groups(1e-3)}
    assert groups["backbone"]["lr"] == 1e-3 and groups["head"]["lr"] == pytest.approx(1e-2)
    assert groups["block"]["lr"] == pytest.approx(5e-3)
    ids = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [id(p) for p in method.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(set(ids)) == len(ids)
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in student.fc.parameters()}
    kd_groups = {g["name"]: g for g in cfl.KDBaseline(student, teachers, head_lr_mult=10.0).param_groups(1e-3)}
    assert set(kd_groups) == {"backbone", "head"} and kd_groups["head"]["lr"] == pytest.approx(1e-2)


def test_bad_inputs_raise_helpful_errors():
    u = tiny_union()
    x = batch_of(u, 2)
    t = [conv_net(3), conv_net(2)]
    with pytest.raises(ValueError, match="one layer name per teacher"):
        cfl.CommonFeatureLearning(conv_net(5), t, "relu", ["relu"], example=x)
    with pytest.raises(LayerError, match="Closest valid names"):
        cfl.CommonFeatureLearning(conv_net(5), t, "reluu", ["relu", "relu"], example=x)
    with pytest.raises(ValueError, match="num_classes=5"):
        cfl.CommonFeatureLearning(conv_net(4), t, "relu", ["relu", "relu"], example=x)
    with pytest.raises(ValueError, match="conv maps"):
        cfl.CommonFeatureLearning(conv_net(5), t, "relu", ["fc:in", "relu"], example=x)
    with pytest.raises(ValueError, match="example="):
        cfl.CommonFeatureLearning(conv_net(5), t, "relu", ["relu", "relu"])
    with pytest.raises(ValueError, match="head"):
        cfl.CommonFeatureLearning(conv_net(5), t, "relu", ["relu", "relu"], example=x, head="classifier")
    with pytest.raises(ValueError, match="unknown loss terms"):
        cfl.CommonFeatureLearning(conv_net(5), t, "relu", ["relu", "relu"], example=x, weights={"mdm": 1})
    with pytest.raises(ValueError, match="temperature"):
        cfl.CommonFeatureLearning(conv_net(5), t, "relu", ["relu", "relu"], example=x, T=0)
    with pytest.raises(ValueError, match="block_lr_mult"):
        cfl.CommonFeatureLearning(conv_net(5), t, "relu", ["relu", "relu"], example=x, block_lr_mult=0)
    with pytest.raises(ValueError, match="at least one teacher"):
        cfl.CommonFeatureLearning(conv_net(5), [], "relu", [], example=x)


# ---------------------------------------------------------------------------- training properties
def test_teachers_stay_frozen_during_amalgamation():
    torch.manual_seed(0)
    u = tiny_union()
    teachers = [conv_net(3, 8), conv_net(2, 6, stride=2)]
    before = [copy.deepcopy(t.state_dict()) for t in teachers]
    modes, grad_modes = [], []

    def record(module, inputs, output):
        modes.append(module.training)
        grad_modes.append(torch.is_grad_enabled())

    hooks = [t.bn.register_forward_hook(record) for t in teachers]
    student = conv_net(5, 4, stride=2)
    method, hist = cfl.amalgamate(student, teachers, "relu", ["relu", "relu"], u, u, hidden=4, epochs=2, lr=1e-2,
                                  batch_size=8)
    for h in hooks:
        h.remove()
    assert modes and not any(modes) and not any(grad_modes)  # eval mode, no graph, at every call
    for t, b in zip(teachers, before):
        assert all(torch.equal(v, b[k]) for k, v in t.state_dict().items())  # incl. BN running stats
        assert all(not p.requires_grad and p.grad is None for p in t.parameters())
    assert len(hist) == 2 and hist.attrs["monitor"] == "val/task_agnostic"


def test_labels_are_never_read_during_amalgamation():
    torch.manual_seed(0)
    images = torch.rand(20, 3, 8, 8)
    teachers = [conv_net(3, 8), conv_net(2, 6, stride=2)]
    method, hist = cfl.amalgamate(conv_net(5, 4, stride=2), teachers, "relu", ["relu", "relu"], LabelsRaise(images),
                                  hidden=4, epochs=1, batch_size=8)
    assert np.isfinite(hist["train/loss"]).all()
    cached = cfl.precompute_teachers(teachers, ["relu", "relu"], LabelsRaise(images))
    method, hist = cfl.amalgamate(conv_net(5, 4, stride=2), teachers, "relu", ["relu", "relu"], cached,
                                  hidden=4, epochs=1, batch_size=8)
    assert np.isfinite(hist["train/loss"]).all()


def test_cached_teacher_outputs_give_the_same_losses():
    u, teachers, student, method = make_method()
    cached = cfl.precompute_teachers(teachers, ["relu", "relu"], u, batch_size=7)
    assert len(cached) == len(u) and sum(cached.outputs[f"t{k}"][OUTPUT].shape[1] for k in range(2)) == 5
    loader = torch.utils.data.DataLoader(cached, batch_size=10)
    batch = next(iter(loader))
    x = batch[0]
    torch.testing.assert_close(x, batch_of(u, 10))
    live, pre = method(x), method(batch)
    for k in live:
        torch.testing.assert_close(pre[k], live[k], rtol=1e-5, atol=1e-6)
    kd = cfl.KDBaseline(student, teachers)
    torch.testing.assert_close(kd(batch)["kd"], kd(x)["kd"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one layer per teacher"):
        cfl.precompute_teachers(teachers, ["relu"], u)


def test_tiny_end_to_end_run_learns_the_teachers_targets():
    torch.manual_seed(0)
    u = tiny_union(n_a=48, n_b=32)
    teachers = [conv_net(3, 8), conv_net(2, 6, stride=2)]
    student = conv_net(5, 8, stride=2)
    x = batch_of(u)
    target = concat_logits(teachers, x).argmax(1)
    method, hist = cfl.amalgamate(student, teachers, "relu", ["relu", "relu"], u, u, hidden=8, epochs=12, lr=1e-2,
                                  head_lr_mult=1.0, block_lr_mult=1.0, schedule=None, batch_size=16)
    for term in ("kd", "mmd", "recon"):
        assert f"train/{term}" in hist and f"val/{term}" in hist
    first, last = hist.iloc[0], hist.iloc[-1]
    assert last["train/loss"] < first["train/loss"]
    # the common-space term dominates the weighted sum (λ = 10) and falls most
    assert last["train/mmd"] < 0.5 * first["train/mmd"] and last["train/kd"] < first["train/kd"]
    assert {"val/task_agnostic", "val/task_aware"} <= set(hist.columns)
    with torch.no_grad():
        agree = (method.student.eval()(x).argmax(1) == target).float().mean().item()
    assert agree > 0.6  # it imitates the concatenated teachers (chance ≈ 1/5)


def test_torchvision_teachers_and_students_one_step():
    """The paper's setting in miniature: ResNet-18 and ResNet-34 teachers, ResNet-50 and
    DenseNet-121 students (a fresh comprehensive head), layer4 / features, 32×32 random images."""
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    teachers = [models.build("resnet18", 3), models.build("resnet34", 2)]
    for arch, layer in (("resnet50", "layer4"), ("densenet121", "features")):
        student = models.build(arch, 5)
        method = cfl.CommonFeatureLearning(student, teachers, layer, ["layer4", "layer4"], example=images)
        chans = 2048 if arch == "resnet50" else 1024
        assert (method.block.student_channels, method.block.teacher_channels) == (chans, [512, 512])
        groups = {g["name"]: g for g in method.param_groups(1e-4)}
        head = student.fc if arch == "resnet50" else student.classifier
        assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in head.parameters()}
        w0 = head.weight.detach().clone()
        hist = fit(method, data.Unlabeled(LabelsRaise(images)), epochs=1, batch_size=4, lr=1e-4)
        assert np.isfinite(hist["train/loss"]).all() and not torch.equal(head.weight, w0)


# ------------------------------------------------------------------------------- KD vs CFL, spaces
@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    u = tiny_union(n_a=24, n_b=16)
    teachers = [conv_net(3, 4), conv_net(2, 4, stride=2)]
    out = cfl.run_students(lambda: conv_net(5, 4, stride=2), teachers, "relu", ["relu", "relu"], u, u, u,
                           seeds=[0, 1], epochs=2, lr=1e-2, hidden=4, batch_size=8, cache_teachers=True)
    return u, teachers, out


def test_run_students_same_budget_and_tables(runs):
    u, teachers, out = runs
    assert [(r.method, r.seed) for r in out] == [("KD", 0), ("CFL", 0), ("KD", 1), ("CFL", 1)]
    assert all(len(r.history) == 2 and r.history.attrs["monitor"] == "val/task_agnostic" for r in out)
    assert out[0].cfl is None and isinstance(out[1].cfl, cfl.CommonFeatureLearning)
    assert "train/mmd" in out[1].history and "train/mmd" not in out[0].history
    per = cfl.per_seed_table(out)
    assert len(per) == 4 and per["test task-agnostic"].between(0, 1).all()
    table = cfl.results_table(out)
    assert list(table["method"]) == ["KD", "CFL"] and (table["seeds"] == 2).all()
    kd_rows = per[per.method == "KD"]["test task-agnostic"]
    assert table.loc[0, "test task-agnostic"] == f"{kd_rows.mean():.3f} ± {kd_rows.std(ddof=1):.3f}"
    num = cfl.results_table(out, as_text=False)
    assert num.loc[0, "test task-agnostic mean"] == pytest.approx(kd_rows.mean())
    assert num.loc[0, "test task-agnostic std"] == pytest.approx(kd_rows.std(ddof=1))
    # initial() rebuilds the method as it was before training: KD and CFL students of a seed start equal
    kd0, cfl0 = out[0].initial(), out[1].initial()
    assert isinstance(kd0, cfl.KDBaseline) and isinstance(cfl0, cfl.CommonFeatureLearning)
    assert all(torch.equal(p, q) for p, q in zip(kd0.student.state_dict().values(), cfl0.student.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(cfl0.student.state_dict().values(),
                                                     out[1].student.state_dict().values()))
    tagged = cfl.run_students(lambda: conv_net(5, 4, stride=2), teachers, "relu", ["relu", "relu"], u, u, u, seeds=[0],
                              methods=["CFL"], epochs=1, hidden=4, batch_size=8, tag=" (ablation)")
    assert tagged[0].method == "CFL (ablation)" and tagged[0].name.startswith("CFL (ablation) · ")
    with pytest.raises(ValueError, match="'KD' and/or 'CFL'"):
        cfl.run_students("x", teachers, "relu", ["relu", "relu"], u, u, u, methods=["FitNet"])


def test_run_students_is_deterministic_per_seed():
    torch.manual_seed(0)
    u = tiny_union(n_a=12, n_b=8)
    teachers = [conv_net(3, 4), conv_net(2, 4, stride=2)]
    kw = dict(seeds=[3], methods=["CFL"], epochs=1, lr=1e-2, hidden=4, batch_size=8)
    a = cfl.run_students(lambda: conv_net(5, 4, stride=2), teachers, "relu", ["relu", "relu"], u, u, u, **kw)[0]
    b = cfl.run_students(lambda: conv_net(5, 4, stride=2), teachers, "relu", ["relu", "relu"], u, u, u, **kw)[0]
    assert all(torch.equal(p, q) for p, q in zip(a.student.state_dict().values(), b.student.state_dict().values()))


def test_without_the_mmd_term_the_cfl_student_trains_exactly_like_kd():
    # the student receives gradients only from kd and mmd (recon reaches the block alone), and KD
    # and CFL students start from the same weights: with mmd weight 0 the runs must coincide
    torch.manual_seed(0)
    u = tiny_union(n_a=12, n_b=8)
    teachers = [conv_net(3, 4), conv_net(2, 4, stride=2)]
    out = cfl.run_students(lambda: conv_net(5, 4, stride=2), teachers, "relu", ["relu", "relu"], u, u, u, seeds=[0],
                           epochs=2, lr=1e-2, hidden=4, batch_size=8, weights={"kd": 1, "mmd": 0, "recon": 10},
                           cache_teachers=True)
    kd_run, cfl_run = out
    assert all(torch.equal(p, q) for p, q in zip(kd_run.student.state_dict().values(),
                                                 cfl_run.student.state_dict().values()))
    assert cfl_run.history["train/recon"].iloc[-1] != 0


def test_term_gradients_per_group_and_no_side_effects():
    u, teachers, student, method = make_method()
    x = batch_of(u, 8)
    method.eval()
    bn = student.bn.running_mean.clone()
    g = cfl.term_gradients(method, x)
    assert list(g["term"]) == ["kd", "mmd", "recon"] and {"backbone", "head", "block"} <= set(g.columns)
    rows = g.set_index("term")
    assert rows.loc["recon", "backbone"] == 0 and rows.loc["recon", "head"] == 0  # recon reaches the block only
    assert rows.loc["kd", "block"] == 0 and rows.loc["mmd", "head"] == 0
    assert rows.loc["mmd", "backbone"] > 0 and rows.loc["kd", "head"] > 0
    assert rows.loc["mmd", "weight"] == 10.0
    assert torch.equal(student.bn.running_mean, bn) and not method.training  # buffers and mode restored
    assert all(p.grad is None for p in method.parameters())


def test_train_teachers_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("KAVIZ_DATA", str(tmp_path))
    d = cfl.load_data("embedded", n_shapes=60, image_size=16)
    specs = {"shapes": dict(arch="vgg8_small", layer="features", arch_kwargs={"width": 1}, epochs=1),
             "digits": dict(arch="cifar_resnet8", layer="layer3", arch_kwargs={"width": 2}, epochs=1)}
    teachers, layers, hist = cfl.train_teachers(specs, d)
    assert layers == ["features", "layer3"] and list(hist) == ["shapes", "digits"]
    assert [t.fc.out_features for t in teachers] == [10, 10]
    _, _, again = cfl.train_teachers(specs, d)
    assert again["shapes"].attrs["cached"]
    with pytest.raises(ValueError, match="union's order"):
        cfl.train_teachers({"digits": specs["digits"], "shapes": specs["shapes"]}, d)
    with pytest.raises(ValueError, match="lacks"):
        cfl.train_teachers({"shapes": {"arch": "vgg8_small"}, "digits": specs["digits"]}, d)


def test_spaces_feature_and_common_maps(runs):
    u, teachers, out = runs
    idx = cfl.pick_per_class(u, 3, seed=0)
    assert len(idx) == 15 and (np.bincount(u.targets[idx].numpy()) == 3).all()
    spaces = cfl.Spaces({"KD": out[0], "CFL": out[1]}, teachers, u, idx,
                        {"relu": ["relu", "relu"], "conv": ["conv", "conv"]})
    feat = spaces.feature_space("CFL", "relu")
    assert list(feat) == ["student", "teacher: a", "teacher: b"] and feat["student"].shape == (15, 4)
    common = spaces.common_space("CFL")
    assert list(common) == ["student", "teacher: a", "teacher: b"] and common["student"].shape == (15, 4)
    kd_common = spaces.common_space("KD")
    assert list(kd_common) == ["student", "teachers (concatenated)"]
    np.testing.assert_allclose(kd_common["student"].sum(1), 1, rtol=1e-5)
    df_f, df_c = spaces.compute("CFL", "relu", "pca", {})
    assert len(df_f) == 45 and set(df_c["source"]) == set(common) and (df_f["index"].unique() == idx).all()
    r = spaces.pairing("CFL")
    assert set(r) == {"feature space", "common space"} and all(np.isfinite(v) for v in r.values())
    table = spaces.pairing_table("relu")
    assert list(table["model"]) == ["KD", "CFL"]
    assert list(table["second panel"]) == ["output space (softmax)", "common space h"]
    assert table.loc[1, "second-panel ratio"] == pytest.approx(r["common space"])
    # a student layer whose channel count differs from the teachers': the student's map alone
    tiny = cfl.Spaces({"CFL": out[1]}, teachers, u, idx, {"relu": ["relu", "relu"], "conv": ["bn", "conv"]})
    assert list(tiny.feature_space("CFL", "conv")) == ["student", "teacher: a", "teacher: b"]
    with pytest.raises(ValueError, match="unknown layer"):
        spaces.feature_space("CFL", "fc")
    with pytest.raises(ValueError, match="one layer per teacher"):
        cfl.Spaces({"CFL": out[1]}, teachers, u, idx, {"relu": ["relu"]})


def test_spaces_drive_the_embedding_explorer(runs):
    from kaviz.widgets import EmbeddingExplorer

    u, teachers, out = runs
    idx = cfl.pick_per_class(u, 2, seed=1)
    spaces = cfl.Spaces({"CFL": out[1], "KD": out[0]}, teachers, u, idx,
                        {"relu": ["relu", "relu"], "conv": ["conv", "conv"]})
    ex = EmbeddingExplorer(spaces.compute, models=spaces.models, layers=list(spaces.layers), methods=("pca", "tsne"),
                           images=u.image_array, class_names=u.classes)
    assert ex.status.value and not ex.status.value.startswith("⚠") and len(ex.results) == 2
    assert set(ex.results[1]["source"]) == {"student", "teacher: a", "teacher: b"}
    ex.select([int(idx[0])])
    ex.model_dd.value = "KD"  # recomputes: the KD student's second panel is its output space
    assert set(ex.results[1]["source"]) == {"student", "teachers (concatenated)"} and ex.selection == [int(idx[0])]
    ex.layer_dd.value = "conv"
    assert not ex.status.value.startswith(
        "⚠") and set(ex.results[0]["source"]) == {"student", "teacher: a", "teacher: b"}


def test_paired_distance_ratio():
    g = np.random.default_rng(0)
    a = g.normal(size=(50, 16))
    assert cfl.paired_distance_ratio({"a": a, "b": a}) == 0.0
    assert cfl.paired_distance_ratio({"a": a, "b": g.normal(size=(50, 16))}) == pytest.approx(1.0, abs=0.1)
    assert cfl.paired_distance_ratio({"a": a, "b": a + 0.1 * g.normal(size=(50, 16)), "c": 3 * a}) < 0.2
    with pytest.raises(ValueError, match="two sources"):
        cfl.paired_distance_ratio({"a": a})
    with pytest.raises(ValueError, match="same rows"):
        cfl.paired_distance_ratio({"a": a, "b": a[:10]})


# -------------------------------------------------------------------------------------------- data
def test_load_data_embedded_is_a_disjoint_union_per_split():
    d = cfl.load_data("embedded", n_shapes=200)
    assert list(d.sources) == ["shapes", "digits"]
    assert d.train.num_classes == 20 and d.train.sources == ["shapes", "digits"]
    assert len(d.train) + len(d.val) + len(d.test) == 200 + 1797
    assert d.train.get_image(0).shape == (3, 32, 32)
    assert d.sources["shapes"].test.fingerprint != d.sources["shapes"].train.fingerprint
    with pytest.raises(ValueError, match="cub_dogs"):
        cfl.load_data("cifar")


def test_load_data_cub_dogs_on_fixture_trees(tmp_path):
    from fixtures_real import make_cub, make_dogs

    make_cub(tmp_path / "CUB_200_2011")
    make_dogs(tmp_path / "dogs")
    d = cfl.load_data("cub_dogs", cub_root=tmp_path / "CUB_200_2011", dogs_root=tmp_path / "dogs", image_size=16,
                      val=0.25)
    cub = d.sources["cub"]
    assert d.train.sources == ["cub", "dogs"]
    assert d.train.num_classes == cub.train.num_classes + d.sources["dogs"].train.num_classes
    # the validation part comes from the official training split, without augmentation
    assert not cub.val.augment and cub.train.augment and len(cub.val) > 0
    assert set(cub.val.files).isdisjoint(cub.train.files)
    with pytest.raises(TypeError, match="root=None"):
        cfl.load_data("cub_dogs", cub_root=None, dogs_root=tmp_path / "dogs")


# ------------------------------------------------------------ reference-recipe options (issue 15)
def test_per_architecture_learning_rates():
    assert cfl.runs.lr_for(1e-3, "resnet50") == 1e-3
    assert cfl.runs.lr_for({"resnet50": 2e-5, "densenet121": 2e-4}, "densenet121") == 2e-4
    with pytest.raises(ValueError, match="no entry for the student architecture 'resnet34'"):
        cfl.runs.lr_for({"resnet50": 2e-5}, "resnet34")
    with pytest.raises(ValueError, match="not an architecture name"):
        cfl.runs.lr_for({"resnet50": 2e-5}, None)
    torch.manual_seed(0)
    u = tiny_union(n_a=12, n_b=8)
    teachers = [conv_net(3, 4), conv_net(2, 4, stride=2)]
    kw = dict(seeds=[0], methods=["KD"], epochs=1, batch_size=8, arch_kwargs={"width": 4})
    run = lambda lr: cfl.run_students("cifar_resnet8", teachers, "layer3", ["relu", "relu"], u, u, u, lr=lr,  # noqa: E731
                                      **kw)[0].student.state_dict()
    by_dict, by_number = run({"cifar_resnet8": 1e-2, "resnet50": 0.0}), run(1e-2)
    assert all(torch.equal(p, q) for p, q in zip(by_dict.values(), by_number.values()))
    other = run({"cifar_resnet8": 1e-3})  # control: the dict's value is the one used
    assert not all(torch.equal(p, q) for p, q in zip(other.values(), by_number.values()))
    with pytest.raises(ValueError, match="student is a callable"):
        cfl.run_students(lambda: conv_net(5, 4), teachers, "relu", ["relu", "relu"], u, u, u, lr={"x": 1.0},
                         seeds=[0], epochs=1)


def test_post_relu_tap_reads_densenet_features_after_the_inplace_relu():
    import torchvision

    torch.set_num_threads(1)

    def tiny_densenet(k):
        return torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2,
                                           num_classes=k).eval()

    torch.manual_seed(0)
    teachers = [tiny_densenet(3), tiny_densenet(2)]
    student = tiny_densenet(5)
    x = torch.rand(4, 3, 32, 32)
    after = cfl.CommonFeatureLearning(student, teachers, "features:relu", ["features:relu", "features:relu"],
                                      example=x[:2], hidden=4)
    before = cfl.CommonFeatureLearning(student, teachers, "features", ["features", "features"], example=x[:2], hidden=4)
    with torch.no_grad():
        e_after, e_before = after.encode(x), before.encode(x)
    # control: the plain tap reads norm5's output, before DenseNet's functional in-place ReLU
    assert (e_before["f_s"] < 0).float().mean() > 0.2
    assert (e_after["f_s"] >= 0).all() and all((f >= 0).all() for f in e_after["f_t"])
    torch.testing.assert_close(e_after["f_s"], torch.relu(e_before["f_s"]))
    # exactly what the network pools: the mean of the post-ReLU map is the classifier's input
    from kaviz.features import FeatureTap

    with torch.no_grad(), FeatureTap(student, "classifier:in") as tap:
        student(x)
    torch.testing.assert_close(e_after["f_s"].mean((2, 3)), tap["classifier:in"])
    # the cached teacher path reads the same post-ReLU maps
    cached = cfl.precompute_teachers(teachers, ["features:relu", "features:relu"], [(xi, 0) for xi in x])
    batch = next(iter(torch.utils.data.DataLoader(cached, batch_size=4)))
    _, f_ts = after.cached_outputs(batch)
    for f, g in zip(f_ts, e_after["f_t"]):
        torch.testing.assert_close(f, g)
    # gradients reach the student through the ReLU
    after.train()
    sum(after(x).values()).backward()
    assert student.features.conv0.weight.grad is not None


def test_step_schedule_decays_at_the_given_epoch():
    def lrs(schedule, epochs=4):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, unit = schedule(opt, epochs, 3)
        assert unit == "epoch"
        out = []
        for _ in range(epochs):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs(cfl.runs.step_schedule(2)) == pytest.approx([1.0, 1.0, 0.1, 0.1])  # as schedule="step" at 4 epochs
    assert lrs(cfl.runs.step_schedule(1)) == pytest.approx([1.0, 0.1, 0.1, 0.1])  # one epoch earlier
    with pytest.raises(ValueError, match="decay_epoch"):
        cfl.runs.step_schedule(-1)
