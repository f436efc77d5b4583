"""The pretraining world of the synthetic generator (issue 12, item 1): PRETRAIN_SHAPES, the
``vocabulary`` keyword of render_scenes, pretraining() and pretraining_scenes()."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

import kaviz.data as D
from kaviz.data import synthetic as syn


def _h(*arrays):
    m = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        m.update(str(a.dtype).encode())
        m.update(str(a.shape).encode())
        m.update(a.tobytes())
    return m.hexdigest()[:16]


# --- the default path did not move -------------------------------------------------------------

def test_default_pixels_labels_and_fingerprints_unchanged():
    # Digests computed with kaviz/data/synthetic.py as it was before the pretraining vocabulary was
    # added (same hashing as _h): the notebooks' images, labels, uniforms and fingerprints.
    d = D.shapes(200)
    assert _h(d.images.numpy(), d.targets.numpy()) == "6d8d36e662574b77"
    assert d.fingerprint == "e1f39d8186da2b8f16dc5938f665e0f6"
    s = D.scenes(50)
    t = s.targets
    assert _h(s.images.numpy(), t["labels"].numpy(), t["difficult"].numpy(), t["mask"].numpy(),
              t["depth"].numpy()) == "b68eff5d856ed55d"
    assert s.fingerprint == "d109a84e966c0bbdb422a0b9753d598a"
    assert s.name == "scenes" and s.classes == syn.SHAPES and "vocabulary" not in s.info
    a = D.shape_attributes(100, seed=3, size=24)
    assert _h(a.images.numpy(), a.targets.numpy()) == "46ca7b31f448d3b4"
    assert a.fingerprint == "f57dec8eec93a185e51205ee132e7545"
    r = syn.render_scenes([5, 0, 17], seed=7, size=40, n_objects=(2, 3), return_footprints=True)
    assert _h(*[r[k] for k in sorted(r)]) == "1e2fbc3694b78cfa"
    nrm = D.scenes(20, seed=1, size=32, max_objects=3, normals=True)
    assert _h(nrm.targets["normals"].numpy()) == "5a688991a4c83f3d"
    assert nrm.fingerprint == "ac22e55b9bf2645e066da9d2b1918153"
    assert _h(syn._draw_uniforms(np.arange(10), 0, 1, 4)) == "99a1d20ba565b8bd"
    # the explicit default is the default
    e = syn.render_scenes([5, 0, 17], seed=7, size=40, n_objects=(2, 3), return_footprints=True,
                          vocabulary="notebook")
    assert _h(*[e[k] for k in sorted(e)]) == "1e2fbc3694b78cfa"
    # control: the digest sees a single changed pixel
    img = d.images.numpy().copy()
    img[0, 0, 0, 0] ^= 1
    assert _h(img, d.targets.numpy()) != "6d8d36e662574b77"


# --- the vocabulary ----------------------------------------------------------------------------

def _canonical_masks(kinds, px=64, radius=22.0, rotation=0.0):
    """Every kind's mask (len(kinds), px, px) drawn centred, ``radius`` pixels, turned by ``rotation``."""
    g = ((np.arange(px) + 0.5 - px / 2) / radius).astype(np.float32)
    x, y = np.meshgrid(g, g)
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    u, v = x * c + y * s, y * c - x * s
    return np.stack([syn._sdf(k, u, v, kinds) <= 0 for k in range(len(kinds))])


def _mean_iou(kinds_a, kinds_b, masks_a=None):
    """Mean over the poses -10, 0, +10 degrees (both in the same pose) of the IoU of every pair."""
    out = []
    for rot in (-10.0, 0.0, 10.0):
        a = _canonical_masks(kinds_a, rotation=rot) if masks_a is None else masks_a[rot]
        b = _canonical_masks(kinds_b, rotation=rot)
        out.append((a[:, None] & b[None]).sum((2, 3)) / (a[:, None] | b[None]).sum((2, 3)))
    return np.mean(out, axis=0)


def test_vocabulary_is_new_and_disjoint_from_the_notebooks():
    P = syn.PRETRAIN_SHAPES
    assert len(P) >= 24 and len(set(P)) == len(P)
    assert not set(P) & set(syn.SHAPES)
    assert D.PRETRAIN_SHAPES is P and D.VOCABULARIES == {"notebook": syn.SHAPES, "pretrain": P}
    # no kind is a near-copy of a notebook kind: IoU < 0.9 with every one of SHAPES in the same pose
    cross = _mean_iou(P, syn.SHAPES)
    assert cross.max() < 0.9, [(P[i], syn.SHAPES[j]) for i, j in zip(*np.nonzero(cross >= 0.9))]
    # control: a near-copy (a regular 12-gon for "circle") is caught by the same bound
    g = _canonical_masks(["circle"])[0]
    px = ((np.arange(64) + 0.5 - 32) / 22.0).astype(np.float32)
    x, y = np.meshgrid(px, px)
    dodecagon = syn._polygon(x, y, 12, 0.98) <= 0
    assert (g & dodecagon).sum() / (g | dodecagon).sum() >= 0.9


def test_kinds_are_pairwise_distinct():
    P = syn.PRETRAIN_SHAPES
    iou = _mean_iou(P, P)
    assert np.allclose(np.diag(iou), 1.0)  # control: a kind against itself
    off = iou.copy()
    np.fill_diagonal(off, 0.0)
    assert off.max() < 0.8, [(P[i], P[j], round(off[i, j], 3)) for i, j in zip(*np.nonzero(off >= 0.8))]
    # control: a kind against itself drawn 5 % smaller is a near-copy, and the bound catches it
    small = {rot: _canonical_masks(P, radius=22.0 * 0.95, rotation=rot) for rot in (-10.0, 0.0, 10.0)}
    assert np.diag(_mean_iou(P, P, masks_a=small)).min() >= 0.8


def test_kinds_have_the_notebook_shapes_size():
    # about one radius, within 1.25 radii along each axis (the renderer keeps centres 1.15 radii from
    # the frame), covering 0.8-3.2 squared radii (the notebook shapes: 2.1-3.1)
    g = (np.arange(128) + 0.5 - 64) / 40.0
    x, y = np.meshgrid(g, g)
    for name, m in zip(syn.PRETRAIN_SHAPES, _canonical_masks(syn.PRETRAIN_SHAPES, px=128, radius=40.0)):
        assert np.abs(x[m]).max() <= 1.25 and np.abs(y[m]).max() <= 1.25, name
        assert 0.8 <= m.sum() / 40.0 ** 2 <= 3.2, name
        assert np.abs(x[m]).max() >= 0.5 and np.abs(y[m]).max() >= 0.15, name  # not a speck
    # control: the extent check catches an outline drawn too large
    big = syn._box(x.astype(np.float32), y.astype(np.float32), 1.4, 0.5) <= 0
    assert np.abs(x[big]).max() > 1.25


# --- the datasets ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pre():
    return D.pretraining(n=5000, seed=0, size=32)


def test_every_kind_is_drawn_uniformly(pre):
    K = len(syn.PRETRAIN_SHAPES)
    counts = np.bincount(pre.targets.numpy(), minlength=K)
    assert counts.shape == (K,) and counts.min() > 0

    def chi2(c):
        expected = c.sum() / len(c)
        return float(((c - expected) ** 2 / expected).sum())

    # K - 1 = 29 degrees of freedom: mean 29, sd 7.6; P(chi2 > 80) ~ 1e-6
    assert chi2(counts) < 80, counts
    # the labels are the kind draw of the pretraining stream's uniforms ...
    u = syn._draw_uniforms(np.arange(5000), 0, 1, 1, syn._STREAMS["pretrain"])[:, syn._NB + syn.O_KIND]
    assert np.array_equal(pre.targets.numpy(), np.minimum((u * K).astype(np.int64), K - 1))
    # ... and controls: broken draws (a slightly wrong multiplier; the notebooks' 10 kinds) fail
    broken = np.bincount(np.minimum((u * (K + 2)).astype(np.int64), K - 1), minlength=K)
    assert chi2(broken) > 80
    assert chi2(np.bincount(np.minimum((u * 10).astype(np.int64), 9), minlength=K)) > 80


def test_pretraining_dataset(pre):
    assert pre.name == "pretraining" and pre.classes == syn.PRETRAIN_SHAPES
    assert pre.images.shape == (5000, 3, 32, 32) and pre.images.dtype == torch.uint8
    assert pre.targets.dtype == torch.int64
    assert pre.info == {"task": "classification", "generator": "kaviz.data.synthetic.render_scenes",
                        "vocabulary": "pretrain", "seed": 0, "size": 32}
    meta = pre.meta
    assert len(meta) == 5000 and list(meta.columns) == list(D.shapes(5).meta.columns)
    assert np.array_equal(meta["label"].to_numpy(), pre.targets.numpy())
    assert list(meta["shape"][:50]) == [syn.PRETRAIN_SHAPES[k] for k in pre.targets[:50].tolist()]
    x, y = pre[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == int(pre.targets[3])


def test_labels_match_the_rendered_mask(pre):
    n = 600
    r = syn.render_scenes(range(n), seed=0, size=32, vocabulary="pretrain")
    assert np.array_equal(pre.images[:n].numpy(), r["image"].transpose(0, 3, 1, 2))
    labels = pre.targets[:n].numpy()
    assert np.array_equal(labels, r["kind"][:, 0])

    def agrees(lab):
        # the mask holds background and the labelled kind only, with at least a few pixels of it
        return [set(np.unique(m)) == {0, k + 1} and (m == k + 1).sum() >= 20 for m, k in zip(r["mask"], lab)]

    assert all(agrees(labels))
    assert not any(agrees((labels + 1) % len(syn.PRETRAIN_SHAPES)))  # control: wrong labels


def test_pretraining_scenes():
    K = len(syn.PRETRAIN_SHAPES)
    ds = D.pretraining_scenes(n=200, seed=0, size=48, max_objects=4)
    t = ds.targets
    assert ds.name == "pretraining_scenes" and ds.classes == syn.PRETRAIN_SHAPES
    assert ds.info["mask_classes"] == ["background", *syn.PRETRAIN_SHAPES] and ds.info["vocabulary"] == "pretrain"
    assert t["labels"].shape == (200, K) and t["mask"].shape == (200, 48, 48) and t["depth"].shape == (200, 48, 48)
    assert t["mask"].dtype == torch.int64 and int(t["mask"].max()) <= K
    labels, mask, difficult = t["labels"].numpy(), t["mask"].numpy(), t["difficult"].numpy()
    assert set(ds.meta["n_objects"]) == {1, 2, 3, 4}

    def mask_within_labels(lab):
        return [set(np.unique(m)) - {0} <= {k + 1 for k in np.nonzero(row)[0]} for m, row in zip(mask, lab)]

    assert all(mask_within_labels(labels))
    assert not all(mask_within_labels(np.roll(labels, 1, axis=0)))  # control: another image's labels
    # every present class that is not difficult is visible in the mask
    for m, row, diff in zip(mask, labels, difficult):
        for k in np.nonzero((row > 0) & ~diff)[0]:
            assert (m == k + 1).any()
    # the same render as render_scenes(vocabulary="pretrain"), the objects named from PRETRAIN_SHAPES
    r = syn.render_scenes(range(200), seed=0, size=48, n_objects=(1, 4), vocabulary="pretrain")
    assert np.array_equal(ds.images.numpy(), r["image"].transpose(0, 3, 1, 2))
    assert np.array_equal(mask, r["mask"])
    assert set(ds.info["objects"]["shape"]) <= set(syn.PRETRAIN_SHAPES)
    # normals are an extra target only: same images, other fingerprint
    nrm = D.pretraining_scenes(n=20, seed=0, size=48, normals=True)
    assert nrm.targets["normals"].shape == (20, 3, 48, 48)
    assert torch.equal(nrm.images, ds.images[:20])
    assert nrm.fingerprint != D.pretraining_scenes(n=20, seed=0, size=48).fingerprint


def test_determinism_and_batch_independence(pre):
    again = D.pretraining(n=300, seed=0, size=32)
    assert torch.equal(again.images, pre.images[:300]) and torch.equal(again.targets, pre.targets[:300])
    batch = syn.render_scenes(range(300), seed=0, size=32, vocabulary="pretrain")
    for i in (0, 7, 150, 299):
        alone = syn.render_scenes([i], seed=0, size=32, vocabulary="pretrain")
        assert np.array_equal(alone["image"][0], batch["image"][i]) and alone["kind"][0, 0] == batch["kind"][i, 0]
    shuffled = syn.render_scenes([299, 7, 0], seed=0, size=32, vocabulary="pretrain")
    assert np.array_equal(shuffled["image"], batch["image"][[299, 7, 0]])
    sc = syn.render_scenes([3, 1], seed=2, size=48, n_objects=(1, 4), vocabulary="pretrain")
    sc1 = syn.render_scenes([1], seed=2, size=48, n_objects=(1, 4), vocabulary="pretrain")
    assert np.array_equal(sc["image"][1], sc1["image"][0]) and np.array_equal(sc["mask"][1], sc1["mask"][0])
    # control: another seed gives other images
    other = D.pretraining(n=300, seed=1, size=32)
    assert not torch.equal(other.images, again.images)


def test_vocabulary_changes_the_images():
    n = 200
    note = syn.render_scenes(range(n), seed=0, size=32)
    pret = syn.render_scenes(range(n), seed=0, size=32, vocabulary="pretrain")
    # another vocabulary and its own stream: every image differs, and so do the other draws
    assert all((a != b).any() for a, b in zip(note["image"], pret["image"]))
    assert not np.allclose(note["background_rgb"], pret["background_rgb"])
    assert not np.allclose(note["x"], pret["x"])
    # control: the same vocabulary twice gives the same images
    assert np.array_equal(pret["image"], syn.render_scenes(range(n), seed=0, size=32, vocabulary="pretrain")["image"])
    # and the datasets are told apart by their fingerprints
    assert D.pretraining(n, 0, 32).fingerprint != D.shapes(n, 0, 32).fingerprint
    assert D.pretraining_scenes(20, 0, 48).fingerprint != D.scenes(20, 0, 48).fingerprint


def test_fingerprints(pre):
    fp = pre.fingerprint
    assert D.pretraining(n=5000, seed=0, size=32).fingerprint == fp == D.fingerprint(pre)
    assert len({fp, D.pretraining(n=5000, seed=1).fingerprint, D.pretraining(n=4999).fingerprint,
                D.pretraining(n=5000, size=24).fingerprint}) == 4
    # the key holds GENERATOR_VERSION and the vocabulary tag: without the tag it would be another digest
    assert fp == D.digest(("pretraining", syn.GENERATOR_VERSION, ("vocabulary", "pretrain", syn._PRETRAIN_VERSION),
                           5000, 0, 32))
    assert fp != D.digest(("pretraining", syn.GENERATOR_VERSION, 5000, 0, 32))
    a = D.pretraining_scenes(n=30, seed=0, size=48, max_objects=4)
    assert a.fingerprint == D.pretraining_scenes(n=30, seed=0, size=48, max_objects=4).fingerprint
    assert a.fingerprint != D.pretraining_scenes(n=30, seed=0, size=48, max_objects=3).fingerprint


# --- bad inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: syn.render_scenes(4, vocabulary="imagenet"), "vocabulary must be one of"),
    (lambda: syn.render_scenes(4, vocabulary=None), "vocabulary must be one of"),
    (lambda: syn.render_scenes(4, vocabulary=syn.PRETRAIN_SHAPES), "vocabulary must be one of"),
    (lambda: D.pretraining(n=0), "n .* positive int"),
    (lambda: D.pretraining(n=-5), "n .* positive int"),
    (lambda: D.pretraining(n=2.5), "n .* positive int"),
    (lambda: D.pretraining(n=10, size=8), "size must be an int >= 16"),
    (lambda: D.pretraining(n=10, size=32.0), "size must be an int >= 16"),
    (lambda: D.pretraining(n=10, seed=-1), "seed must be a non-negative int"),
    (lambda: D.pretraining_scenes(n=0), "n .* positive int"),
    (lambda: D.pretraining_scenes(n=10, size=12), "size must be an int >= 16"),
    (lambda: D.pretraining_scenes(n=10, max_objects=0), "max_objects must be an int >= 1"),
    (lambda: D.pretraining_scenes(n=10, normals="yes"), "normals must be True or False"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
