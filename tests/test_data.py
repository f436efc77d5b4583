"""kaviz.data: the synthetic generator, digits, ImageDataset, union, splits, fingerprints, loaders."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import kaviz.data as D
from kaviz.data import synthetic as syn
from kaviz.data.core import ImageDataset


@pytest.fixture(scope="module")
def shapes_ds():
    return D.shapes(n=1000, seed=0, size=32)


@pytest.fixture(scope="module")
def scenes_ds():
    return D.scenes(n=300, seed=0, size=48, max_objects=4)


@pytest.fixture(scope="module")
def scene_render():
    return D.render_scenes(range(200), seed=3, size=48, n_objects=(2, 4), return_footprints=True)


@pytest.fixture(scope="module")
def digits_ds():
    return D.digits(size=32, seed=0)


# --- generator: determinism ----------------------------------------------------------------------

@pytest.mark.parametrize("n_objects,size", [((1, 1), 32), ((1, 4), 48)])
def test_image_i_is_the_same_whatever_the_batch(monkeypatch, n_objects, size):
    picked = [37, 5, 0, 199, 5]
    whole = D.render_scenes(range(200), seed=7, size=size, n_objects=n_objects)
    part = D.render_scenes(picked, seed=7, size=size, n_objects=n_objects)
    # force tiny chunks: chunk boundaries must not change a pixel either
    monkeypatch.setattr(syn, "_CHUNK_PIXELS", 16 * size * size)
    chunked = D.render_scenes(range(200), seed=7, size=size, n_objects=n_objects)
    for key in ("image", "mask", "depth", "instance", "kind", "x", "radius", "difficult"):
        np.testing.assert_array_equal(part[key], whole[key][picked], err_msg=key)
        np.testing.assert_array_equal(chunked[key], whole[key], err_msg=key)
    assert part["image"].shape == (5, size, size, 3)


def test_seed_changes_the_images():
    a = D.render_scenes(range(20), seed=0)["image"]
    b = D.render_scenes(range(20), seed=1)["image"]
    assert (a != b).any(axis=(1, 2, 3)).all()
    assert not np.array_equal(a[0], a[1])


def test_shapes_and_attributes_share_images_and_builds_repeat(shapes_ds):
    again = D.shapes(n=1000, seed=0, size=32)
    assert torch.equal(again.images, shapes_ds.images) and torch.equal(again.targets, shapes_ds.targets)
    attrs = D.shape_attributes(n=1000, seed=0, size=32)
    assert torch.equal(attrs.images, shapes_ds.images)
    # the first 100 of a larger run are the same images
    assert torch.equal(D.shapes(n=100, seed=0, size=32).images, shapes_ds.images[:100])


# --- generator: contents -------------------------------------------------------------------------

def test_shapes_dtypes_ranges_and_items(shapes_ds):
    ds = shapes_ds
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (1000, 3, 32, 32)
    assert ds.targets.dtype == torch.int64 and ds.targets.shape == (1000,)
    assert ds.classes == D.SHAPES and ds.num_classes == len(D.SHAPES) >= 8
    assert ds.name == "shapes" and ds.info["task"] == "classification"
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and y.ndim == 0 and int(y) == int(ds.targets[3])
    assert torch.equal(x, ds.images[3].float() / 255)
    assert ds.image_array(3).shape == (32, 32, 3) and ds.image_array(3).dtype == np.uint8
    assert len(ds.meta) == 1000 and (ds.meta["shape"] == [D.SHAPES[k] for k in ds.targets]).all()
    # images use the whole intensity range, not a sliver of it
    assert ds.images.float().std() > 20


def test_every_class_present_and_roughly_balanced(shapes_ds):
    counts = np.bincount(shapes_ds.targets.numpy(), minlength=len(D.SHAPES))
    expected = len(shapes_ds) / len(D.SHAPES)
    assert counts.min() > 0.65 * expected and counts.max() < 1.35 * expected, counts


def test_nuisances_vary_independently_of_the_class(shapes_ds):
    meta = shapes_ds.meta
    for col, values in (("colour", D.COLOURS), ("texture", D.TEXTURES), ("background", D.BACKGROUNDS)):
        assert set(meta[col]) == set(values), col
    # colour must not give the class away: every shape comes in at least 6 of the 8 colours
    per_shape = meta.groupby("shape")["colour"].nunique()
    assert per_shape.min() >= 6, per_shape
    assert meta["radius"].max() > 1.5 * meta["radius"].min()


def test_attributes_are_binary_and_balanced():
    ds = D.shape_attributes(n=1000, seed=1)
    assert ds.targets.dtype == torch.int64 and ds.targets.shape == (1000, len(D.ATTRIBUTES))
    assert len(D.ATTRIBUTES) >= 6 and ds.classes == D.ATTRIBUTES
    assert set(ds.targets.unique().tolist()) == {0, 1}
    rates = ds.targets.float().mean(0)
    assert ((rates > 0.25) & (rates < 0.75)).all(), dict(zip(ds.classes, rates.tolist()))
    meta = ds.meta
    assert (meta["warm_colour"] == meta["colour"].isin(["red", "orange", "yellow", "pink"])).all()
    assert (meta["round"] == meta["shape"].isin(["circle", "ring", "ellipse", "crescent"])).all()
    assert (meta["on_left"] == (meta["x"] < 16)).all()
    # attributes are not copies of each other; only round/pointy exclude each other by design
    corr = np.corrcoef(ds.targets.numpy().T.astype(float)) - np.eye(len(D.ATTRIBUTES))
    r, p = D.ATTRIBUTES.index("round"), D.ATTRIBUTES.index("pointy")
    assert not (meta["round"] & meta["pointy"]).any()
    corr[r, p] = corr[p, r] = 0
    assert np.abs(corr).max() < 0.2


def test_scenes_targets(scenes_ds):
    ds = scenes_ds
    t = ds.targets
    K = len(D.SHAPES)
    assert set(t) == {"labels", "difficult", "mask", "depth"}
    assert t["labels"].dtype == torch.float32 and t["labels"].shape == (300, K)
    assert t["difficult"].dtype == torch.bool and t["difficult"].shape == (300, K)
    assert t["mask"].dtype == torch.int64 and t["mask"].shape == (300, 48, 48)
    assert t["depth"].dtype == torch.float32 and t["depth"].shape == (300, 48, 48)
    assert ds.classes == D.SHAPES and ds.info["mask_classes"][0] == "background"
    n_labels = t["labels"].sum(1)
    assert n_labels.min() >= 1 and n_labels.max() <= 4 and n_labels.float().mean() > 1.5
    assert not (t["difficult"] & (t["labels"] == 0)).any()  # only present classes can be difficult
    # the mask shows exactly the labelled classes that are visible
    for i in range(0, 300, 17):
        shown = set(t["mask"][i].unique().tolist()) - {0}
        labelled = {k + 1 for k in torch.nonzero(t["labels"][i]).reshape(-1).tolist()}
        assert shown <= labelled
        assert labelled - shown <= {k + 1 for k in torch.nonzero(t["difficult"][i]).reshape(-1).tolist()}
    x, target = ds[5]
    assert x.shape == (3, 48, 48) and set(target) == set(t)
    assert torch.equal(target["mask"], t["mask"][5])
    objects = ds.info["objects"]
    assert len(objects) == ds.meta["n_objects"].sum() >= int(n_labels.sum())


def test_mask_and_depth_are_consistent(scene_render):
    r = scene_render
    bg = syn.background_depth(r["horizon"], 48)[:, :, None]  # (n, H, 1)
    background = r["mask"] == 0
    assert background.any() and (~background).any()
    # mask == 0 exactly where the depth is the background's
    np.testing.assert_array_equal(background, np.isclose(r["depth"], bg))
    assert (r["depth"][~background] <= syn.OBJECT_DEPTH[1]).all()
    assert (r["depth"] >= syn.OBJECT_DEPTH[0]).all() and (r["depth"] <= syn.BACKGROUND_DEPTH[1]).all()
    # the visible instance is the nearest object covering the pixel, and mask/depth follow it
    fp = r["footprints"]  # (n, M, H, W)
    z = np.where(r["present"], r["z"], np.inf)[:, :, None, None]
    nearest = np.where(fp.any(1), np.argmin(np.where(fp, z, np.inf), axis=1), -1)
    np.testing.assert_array_equal(r["instance"], nearest)
    assert (fp.sum(1) >= 2).sum() > 100  # the test data really has occlusions
    inst = r["instance"]
    n_idx = np.arange(len(inst))[:, None, None]
    on = inst >= 0
    kind_at = r["kind"][n_idx, np.maximum(inst, 0)]
    np.testing.assert_array_equal(r["mask"][on], kind_at[on] + 1)
    z_at = r["z"][n_idx, np.maximum(inst, 0)]
    np.testing.assert_allclose(r["depth"][on], z_at[on].astype(np.float32))


def test_painted_pixels_follow_the_mask():
    # without anti-aliasing and noise, every pixel of a solid object shows exactly its colour,
    # also where it occludes another: the mask and the painting agree pixel for pixel
    r = D.render_scenes(range(120), seed=5, size=48, n_objects=(2, 4), noise=0.0, antialias=False)
    inst = r["instance"]
    n_idx = np.arange(len(inst))[:, None, None]
    solid = (inst >= 0) & (r["texture"][n_idx, np.maximum(inst, 0)] == 0)
    assert solid.sum() > 10000
    expected = np.round(r["rgb"][n_idx, np.maximum(inst, 0)] * 255)
    assert np.abs(r["image"].astype(float) - expected)[solid].max() <= 1.0
    # with anti-aliasing only edge pixels blend: deep inside objects nothing changes
    aa = D.render_scenes(range(120), seed=5, size=48, n_objects=(2, 4), noise=0.0)
    np.testing.assert_array_equal(aa["mask"], r["mask"])
    changed = (aa["image"] != r["image"]).any(-1)
    assert changed.any() and changed.mean() < 0.1


def test_difficult_flags(scene_render):
    r = scene_render
    tiny = r["footprint"] < syn.TINY_FRACTION * 48 * 48
    hidden = r["visible_fraction"] < syn.VISIBLE_FRACTION
    np.testing.assert_array_equal(r["difficult"], r["present"] & (tiny | hidden))
    assert (r["difficult"] & tiny & ~hidden).any() and (r["difficult"] & hidden & ~tiny).any()
    assert 0.01 < r["difficult"][r["present"]].mean() < 0.3
    # visible pixel counts: never more than the footprint, all of it for the nearest object, and
    # together exactly the non-background pixels
    assert (r["visible"] <= r["footprint"]).all()
    nearest = r["order"][np.arange(len(r["order"])), r["n_objects"] - 1]
    rows = np.arange(len(nearest))
    np.testing.assert_array_equal(r["visible"][rows, nearest], r["footprint"][rows, nearest])
    np.testing.assert_array_equal(r["visible"].sum(1), (r["mask"] > 0).sum((1, 2)))


def test_dataset_difficult_means_every_instance_is_difficult():
    ds = D.scenes(n=200, seed=2, size=48)
    r = D.render_scenes(range(200), seed=2, size=48, n_objects=(1, 4))
    for i in range(200):
        for k in range(len(D.SHAPES)):
            inst = r["present"][i] & (r["kind"][i] == k)
            assert bool(ds.targets["labels"][i, k]) == bool(inst.any())
            assert bool(ds.targets["difficult"][i, k]) == bool(inst.any() and r["difficult"][i][inst].all())


def test_render_speed_is_reasonable():
    # the real benchmark is bench/bench_data.py; this only catches an accidental Python loop
    import time

    t = time.perf_counter()
    D.render_scenes(1000, seed=0, size=32)
    assert time.perf_counter() - t < 2.0


# --- digits --------------------------------------------------------------------------------------

def test_digits_match_the_synthetic_format(digits_ds, shapes_ds):
    ds = digits_ds
    assert ds.images.shape == (1797, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.images.shape[1:] == shapes_ds.images.shape[1:]
    assert ds.classes == [str(k) for k in range(10)] and ds.name == "digits"
    assert np.bincount(ds.targets.numpy()).min() >= 170
    assert not torch.equal(ds.images[:, 0], ds.images[:, 2])  # coloured
    grey = D.digits(size=32, colour=False)
    assert torch.equal(grey.images[:, 0], grey.images[:, 1]) and torch.equal(grey.images[:, 0], grey.images[:, 2])
    assert torch.equal(grey.targets, ds.targets) and grey.fingerprint != ds.fingerprint
    # smooth upsampling: many grey levels (the originals have 17) and small steps between pixels
    g = grey.images[:, 0].float()
    assert len(g.unique()) > 100 and g.max() > 200
    assert (g[:, :, 1:] - g[:, :, :-1]).abs().max() < 0.5 * 255
    assert torch.equal(D.digits(size=32, seed=0).images, ds.images)
    assert not torch.equal(D.digits(size=32, seed=1).images, ds.images)
    assert D.digits(size=16).images.shape == (1797, 3, 16, 16)


# --- ImageDataset --------------------------------------------------------------------------------

def test_subset_and_with_transform(shapes_ds):
    sub = shapes_ds.subset([5, 2, 9])
    assert len(sub) == 3 and sub.name == "shapes" and sub.classes == shapes_ds.classes
    assert torch.equal(sub.images[1], shapes_ds.images[2]) and int(sub.targets[2]) == int(shapes_ds.targets[9])
    assert list(sub.meta["index"]) == [5, 2, 9]
    assert len(shapes_ds.subset(slice(0, 10))) == 10
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[[1, 3]] = True
    assert shapes_ds.subset(mask).fingerprint == shapes_ds.subset([1, 3]).fingerprint
    assert shapes_ds.subset([-1]).fingerprint == shapes_ds.subset([999]).fingerprint

    flip = torch.nn.Identity()
    t = shapes_ds.with_transform(lambda x: 1 - x)
    assert torch.allclose(t[0][0], 1 - shapes_ds[0][0]) and torch.allclose(t.get_image(0), 1 - shapes_ds[0][0])
    assert t.subset([0])[0][0].allclose(1 - shapes_ds[0][0])
    assert shapes_ds.with_transform(flip).fingerprint != shapes_ds.fingerprint
    assert shapes_ds.with_transform(flip).with_transform(None).fingerprint == shapes_ds.fingerprint
    assert (shapes_ds.with_transform(flip).subset([4, 1]).fingerprint
            == shapes_ds.subset([4, 1]).with_transform(flip).fingerprint)


def test_fingerprints(shapes_ds):
    fp = shapes_ds.fingerprint
    assert isinstance(fp, str) and len(fp) == 32 and int(fp, 16) >= 0
    assert D.fingerprint(shapes_ds) == fp
    assert D.shapes(n=1000, seed=0).fingerprint == fp
    assert len({fp, D.shapes(n=1000, seed=1).fingerprint, D.shapes(n=999, seed=0).fingerprint,
                D.shapes(n=1000, seed=0, size=24).fingerprint,
                D.shape_attributes(n=1000, seed=0).fingerprint}) == 5
    a, b = shapes_ds.subset([1, 2, 3]), shapes_ds.subset([1, 2, 3])
    assert a.fingerprint == b.fingerprint != fp
    assert shapes_ds.subset([1, 2, 4]).fingerprint != a.fingerprint
    assert shapes_ds.subset([3, 2, 1]).fingerprint != a.fingerprint  # order matters for batches
    # content hashes for plain data
    x = torch.arange(12).reshape(3, 4)
    assert D.fingerprint(x) == D.fingerprint(x.clone())
    assert D.fingerprint(x) != D.fingerprint(x.float())
    assert D.fingerprint(x) != D.fingerprint(x.reshape(4, 3))
    assert D.fingerprint(x.numpy()) == D.fingerprint(np.arange(12).reshape(3, 4))
    assert D.fingerprint({"a": x, "b": [1, "s"]}) == D.fingerprint({"b": [1, "s"], "a": x.clone()})
    # datasets without an explicit fingerprint hash their content
    imgs = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    c1 = ImageDataset(imgs, torch.tensor([0, 1, 0, 1]), classes=["a", "b"])
    c2 = ImageDataset(imgs.clone(), torch.tensor([0, 1, 0, 1]), classes=["a", "b"])
    c3 = ImageDataset(imgs, torch.tensor([0, 1, 1, 1]), classes=["a", "b"])
    assert c1.fingerprint == c2.fingerprint != c3.fingerprint
    with pytest.raises(TypeError, match="fingerprint"):
        D.fingerprint(object())
    with pytest.raises(TypeError, match="fingerprint"):
        D.fingerprint(torch.utils.data.TensorDataset(x))


def test_image_dataset_rejects_bad_input():
    imgs = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        ImageDataset(imgs.float(), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ImageDataset(imgs[0], torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="first dimension N = 4"):
        ImageDataset(imgs, torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"first dimension N = 4"):
        ImageDataset(imgs, {"mask": torch.zeros(3, 8, 8)})
    with pytest.raises(ValueError, match="class ids must lie in"):
        ImageDataset(imgs, torch.tensor([0, 1, 2, 3]), classes=["a", "b"])
    with pytest.raises(TypeError, match="callable"):
        ImageDataset(imgs, torch.zeros(4, dtype=torch.int64), transform="flip")
    ds = ImageDataset(imgs, torch.tensor([0, 1, 0, 1], dtype=torch.uint8), classes=["a", "b"])
    assert ds.targets.dtype == torch.int64  # small int types are widened (SPEC §0.1)
    with pytest.raises(IndexError, match="out of range"):
        ds[4]
    with pytest.raises(IndexError, match="indices must lie in"):
        ds.subset([0, 4])
    with pytest.raises(TypeError, match="integers"):
        ds.subset([0.5])


class _ExplodingTargets:
    def __getitem__(self, i):
        raise AssertionError("Unlabeled read a target")

    def __len__(self):
        return 4


def test_unlabeled_never_touches_targets(shapes_ds):
    ds = shapes_ds.subset(range(4))
    ds.targets = _ExplodingTargets()
    with pytest.raises(AssertionError, match="read a target"):
        ds[0]
    u = D.Unlabeled(ds)
    assert len(u) == 4 and torch.equal(u[2], shapes_ds[2][0])
    batch = next(iter(D.loader(u, batch_size=4)))
    assert batch.shape == (4, 3, 32, 32)
    assert u.fingerprint != ds.fingerprint and u.fingerprint == D.Unlabeled(ds).fingerprint
    assert u.image_array(1).shape == (32, 32, 3)


# --- union ---------------------------------------------------------------------------------------

def test_union_offsets_origin_and_slices(shapes_ds, digits_ds):
    a, b = shapes_ds.subset(range(50)), digits_ds.subset(range(30))
    u = D.union([a, b])
    assert u.sources == ["shapes", "digits"] and u.offsets == [0, 10] and u.class_counts == [10, 10]
    assert u.num_classes == 20 and len(u) == 80
    assert u.classes[0] == "shapes/circle" and u.classes[13] == "digits/3"
    assert u.slices == [slice(0, 10), slice(10, 20)]
    assert u.targets.dtype == torch.int64 and u.origin.dtype == torch.int64
    assert u.origin.tolist() == [0] * 50 + [1] * 30
    assert u.local_index.tolist() == list(range(50)) + list(range(30))
    assert torch.equal(u.targets[:50], a.targets) and torch.equal(u.targets[50:], b.targets + 10)
    for i in (3, 60):
        x, y = u[i]
        src, j = int(u.origin[i]), int(u.local_index[i])
        assert y.dtype == torch.int64 and y.ndim == 0
        assert int(y) == int([a, b][src].targets[j]) + u.offsets[src]
        assert torch.equal(x, [a, b][src][j][0])
        assert (u.slices[src].start <= int(y) < u.slices[src].stop)
        assert np.array_equal(u.image_array(i), [a, b][src].image_array(j))
    sub = u.subset([60, 2])
    assert sub.targets.tolist() == [int(u.targets[60]), int(u.targets[2])]
    assert sub.origin.tolist() == [1, 0] and sub.offsets == u.offsets and sub.classes == u.classes
    assert sub.fingerprint != u.fingerprint and u.subset([60, 2]).fingerprint == sub.fingerprint
    assert D.union([a, b]).fingerprint == u.fingerprint != D.union([b, a]).fingerprint
    assert list(u.meta["source"][:1]) == ["shapes"]
    # offset labels are never squeezed into a small integer type (SPEC §0.1: uint8 aliases >= 256)
    big = ImageDataset(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 299]),
                       classes=[str(k) for k in range(300)], name="big")
    ub = D.union([big, a])
    assert int(ub[1][1]) == 299 and ub.offsets == [0, 300] and int(ub.targets[-1]) >= 300


def test_union_rejects_mismatches(shapes_ds, scenes_ds):
    with pytest.raises(ValueError, match="one shape"):
        D.union([shapes_ds, D.digits(size=16)])
    with pytest.raises(ValueError, match="names="):
        D.union([shapes_ds, shapes_ds.subset([0])])
    assert D.union([shapes_ds, shapes_ds.subset([0])], names=["a", "b"]).num_classes == 20
    with pytest.raises(ValueError, match="classification"):
        D.union([shapes_ds, scenes_ds])
    with pytest.raises(ValueError, match="at least one"):
        D.union([])


# --- split and loader ----------------------------------------------------------------------------

def test_split_disjoint_covering_deterministic_stratified(shapes_ds):
    tr, va, te = sp = D.split(shapes_ds, val=0.15, test=0.2, seed=0)
    assert isinstance(sp, D.Splits) and sp.train is tr
    idx = [set(s.meta["index"]) for s in sp]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert len(idx[0] | idx[1] | idx[2]) == len(shapes_ds)
    assert abs(len(va) - 150) <= 10 and abs(len(te) - 200) <= 10
    again = D.split(shapes_ds, val=0.15, test=0.2, seed=0)
    assert [s.fingerprint for s in again] == [s.fingerprint for s in sp]
    other = D.split(shapes_ds, val=0.15, test=0.2, seed=1)
    assert set(other.test.meta["index"]) != idx[2]
    full = np.bincount(shapes_ds.targets.numpy(), minlength=10)
    for part, frac in ((te, 0.2), (va, 0.15)):
        counts = np.bincount(part.targets.numpy(), minlength=10)
        assert (np.abs(counts - frac * full) <= 1).all(), counts  # rounded per class


def test_split_union_and_multilabel(shapes_ds, digits_ds, scenes_ds):
    u = D.union([shapes_ds, digits_ds])
    tr, va, te = D.split(u, val=0.1, test=0.1, seed=0)
    assert isinstance(te, D.UnionDataset) and te.num_classes == 20
    assert set(te.origin.tolist()) == {0, 1}
    assert np.abs(np.bincount(te.targets.numpy(), minlength=20) - 0.1 * np.bincount(u.targets.numpy())).max() <= 1
    keys = [set(zip(s.origin.tolist(), s.local_index.tolist())) for s in (tr, va, te)]
    assert not (keys[0] & keys[2]) and sum(map(len, keys)) == len(u)
    s = D.split(scenes_ds, val=0.2, test=0.2)  # not class ids: a plain seeded split
    assert len(s.train) + len(s.val) + len(s.test) == 300 and len(s.test) == 60


def test_split_and_loader_reject_bad_arguments(shapes_ds):
    with pytest.raises(ValueError, match="val \\+ test must be < 1"):
        D.split(shapes_ds, val=0.5, test=0.5)
    with pytest.raises(ValueError, match="fraction"):
        D.split(shapes_ds, val=-0.1)
    with pytest.raises(ValueError, match="fraction"):
        D.split(shapes_ds, test=1.5)
    with pytest.raises(ValueError, match="seed"):
        D.split(shapes_ds, seed=-1)
    with pytest.raises(ValueError, match="batch_size"):
        D.loader(shapes_ds, batch_size=0)


def test_loader_shuffling_is_seeded(shapes_ds):
    ds = shapes_ds.subset(range(64))

    def order(seed):
        torch.manual_seed(123)  # the global RNG must not matter
        return torch.cat([y for _, y in D.loader(ds, batch_size=16, shuffle=True, seed=seed)])

    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    plain = torch.cat([y for _, y in D.loader(ds, batch_size=16)])
    assert torch.equal(plain, ds.targets)
    x, y = next(iter(D.loader(ds, batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    batch = next(iter(D.loader(D.scenes(n=8, size=32), batch_size=4)))
    assert batch[1]["mask"].shape == (4, 32, 32) and batch[1]["labels"].shape == (4, 10)


# --- bad generator arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda: D.shapes(n=0), "n \\(the number of images\\) must be a positive int"),
    (lambda: D.shapes(n=-5), "positive int"),
    (lambda: D.shapes(n=10, size=8), "size must be an int >= 16"),
    (lambda: D.shape_attributes(n=10, size=12), "size must be an int >= 16"),
    (lambda: D.scenes(n=0), "positive int"),
    (lambda: D.scenes(n=4, max_objects=0), "max_objects"),
    (lambda: D.shapes(n=10, seed=-1), "seed must be a non-negative int"),
    (lambda: D.render_scenes([1, -2]), "non-negative"),
    (lambda: D.render_scenes(4, n_objects=(3, 2)), "1 <= lo <= hi"),
    (lambda: D.render_scenes(4, n_objects=3), "pair"),
    (lambda: D.render_scenes(4, noise=2), "noise"),
    (lambda: D.digits(size=4), "size must be an int >= 8"),
])
def test_bad_generator_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_import_is_light():
    code = ("import sys, kaviz.data; "
            "print(sorted(m for m in ('sklearn', 'pandas', 'plotly', 'umap', 'openTSNE') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rendered_pixels_and_labels_are_pinned():
    # sha256 of what main rendered before _render_chunk was split into named steps and columns (issue 13):
    # a refactor of the generator must not move a pixel; a deliberate change bumps GENERATOR_VERSION and this.
    import hashlib

    from kaviz.data import render_scenes

    r = render_scenes([5, 3, 99, 7], seed=3, size=48, n_objects=(1, 4))
    assert hashlib.sha256(r["image"].tobytes()).hexdigest()[:24] == "e4673fe989b704d7a6d13c49"
    assert hashlib.sha256(r["mask"].tobytes() + r["depth"].tobytes()).hexdigest()[:24] == "bfd61efc87b49f13ef8836ae"
