"""kaviz.embed: determinism, cache, modes, quality numbers, errors. Small data, few iterations."""
import numpy as np
import pandas as pd
import pytest
import torch

from kaviz import embed as E

FAST = dict(n_iter=120, early_exaggeration_iter=60, perplexity=15)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    E.clear_cache()
    yield
    E.clear_cache()


def blobs(n_per=40, centers=4, dim=16, spread=0.5, seed=0):
    """Well-separated Gaussian blobs: centres 10 apart, unit-ish noise."""
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 10, size=(centers, dim))
    y = np.repeat(np.arange(centers), n_per)
    X = c[y] + rng.normal(0, spread, size=(len(y), dim))
    return X, y


def three_sources(n_per=30, centers=4, dim=16):
    X, y = blobs(n_per, centers, dim)
    rng = np.random.default_rng(1)
    return {"student": X, "t1": X + rng.normal(0, 0.3, X.shape),
            "t2": X + rng.normal(0, 0.3, X.shape)}, y


# ------------------------------------------------------------------------------------------------
def test_output_columns_order_and_attrs():
    feats, y = three_sources()
    df = E.embed(feats, y, method="pca")
    assert list(df.columns) == ["x", "y", "source", "label", "index"]
    n = len(y)
    assert len(df) == 3 * n
    assert df["source"].tolist() == ["student"] * n + ["t1"] * n + ["t2"] * n
    assert (df["index"].to_numpy() == np.tile(np.arange(n), 3)).all()
    assert (df["label"].to_numpy() == np.tile(y, 3)).all()
    for key in ("method", "params", "mode", "seed", "trustworthiness", "knn_preservation"):
        assert key in df.attrs
    assert df.attrs["method"] == "pca" and df.attrs["mode"] == "joint"


def test_single_array_and_no_labels():
    X, _ = blobs()
    df = E.embed(X, method="pca")
    assert set(df["source"]) == {"features"}
    assert df["label"].isna().all()


def test_tsne_seeded_is_deterministic_and_seed_matters():
    feats, y = three_sources()
    a = E.embed(feats, y, method="tsne", cache=False, seed=3, **FAST)
    b = E.embed(feats, y, method="tsne", cache=False, seed=3, **FAST)
    c = E.embed(feats, y, method="tsne", cache=False, seed=4, **FAST)
    np.testing.assert_array_equal(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())
    assert not np.allclose(a[["x", "y"]].to_numpy(), c[["x", "y"]].to_numpy())


def test_tsne_quality_high_on_blobs():
    X, y = blobs(n_per=50)
    df = E.embed(X, y, method="tsne", **FAST)
    assert df.attrs["trustworthiness"] > 0.9
    assert df.attrs["knn_preservation"] > 0.3
    # the classes stay apart: each point's nearest map neighbour has its class
    Y = df[["x", "y"]].to_numpy()
    d = np.linalg.norm(Y[:, None] - Y[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).mean() > 0.95


def test_quality_is_low_for_shuffled_coordinates():
    X, y = blobs(n_per=50)
    df = E.embed(X, y, method="pca")
    Y = df[["x", "y"]].to_numpy()
    good = E.quality(X, Y)
    bad = E.quality(X, np.random.default_rng(0).permutation(Y))
    assert good["trustworthiness"] > 0.85 and good["knn_preservation"] > 0.2
    assert bad["trustworthiness"] < 0.6 and bad["knn_preservation"] < 0.15
    assert good["k"] == 10


def test_quality_subsamples_large_inputs():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    q = E.quality(X, X[:, :2], max_rows=100)
    assert 0 < q["trustworthiness"] <= 1
    with pytest.raises(ValueError, match="rows"):
        E.quality(X, X[:10, :2])


def test_cache_hit_and_invalidation():
    feats, y = three_sources()
    first = E.embed(feats, y, method="pca")
    assert E.cache_info()["misses"] == 1 and E.cache_info()["hits"] == 0
    second = E.embed(feats, y, method="pca")
    assert E.cache_info()["hits"] == 1
    assert second.attrs["cached"] and not first.attrs["cached"]
    pd.testing.assert_frame_equal(first, second)
    second.loc[0, "x"] = 1e9          # mutating a returned frame must not poison the cache
    assert E.embed(feats, y, method="pca")["x"].iloc[0] != 1e9

    changed = dict(feats)
    changed["t1"] = feats["t1"].copy()
    changed["t1"][5, 3] += 1e-9
    variants = [
        dict(features=changed, labels=y, kw=dict(method="pca")),
        dict(features=feats, labels=y[::-1].copy(), kw=dict(method="pca")),
        dict(features=feats, labels=y, kw=dict(method="pca", seed=1)),
        dict(features=feats, labels=y, kw=dict(method="pca", pca=5)),
        dict(features=feats, labels=y, kw=dict(method="pca", mode="reference", reference="t1")),
        dict(features=feats, labels=y, kw=dict(method="pca", index=np.arange(len(y)) + 1)),
        dict(features=feats, labels=y, kw=dict(method="tsne", **FAST)),
        dict(features=feats, labels=y, kw=dict(method="tsne", **{**FAST, "perplexity": 10})),
    ]
    for i, v in enumerate(variants):
        before = E.cache_info()["misses"]
        E.embed(v["features"], v["labels"], **v["kw"])
        assert E.cache_info()["misses"] == before + 1, f"variant {i} was a cache hit"
    hits = E.cache_info()["hits"]
    E.embed(feats, y, method="pca", cache=False)
    assert E.cache_info()["hits"] == hits


def test_reference_mode_keeps_reference_map_and_places_others():
    X, y = blobs(n_per=40, centers=4)
    rng = np.random.default_rng(2)
    feats = {"ref": X, "new": X + rng.normal(0, 0.3, X.shape)}
    df = E.embed(feats, y, method="tsne", mode="reference", reference="ref",
                 transform_n_iter=50, **FAST)
    alone = E.embed({"ref": X}, y, method="tsne", **FAST)
    ref_rows = df[df["source"] == "ref"][["x", "y"]].to_numpy()
    # the reference map does not move when another source is placed into it
    np.testing.assert_allclose(ref_rows, alone[["x", "y"]].to_numpy(), rtol=0, atol=1e-9)
    new = df[df["source"] == "new"]
    assert np.isfinite(new[["x", "y"]].to_numpy()).all()
    # a placed point lands among the reference points of its own class
    d = np.linalg.norm(new[["x", "y"]].to_numpy()[:, None] - ref_rows[None], axis=-1)
    assert (y[d.argmin(1)] == new["label"].to_numpy()).mean() > 0.9
    assert E.pairing_distance(df) < 0.3


def test_reference_mode_pca_fits_on_reference_only():
    X, y = blobs(n_per=30)
    far = X * 0 + np.random.default_rng(0).normal(0, 100, X.shape)  # would dominate a joint PCA
    df = E.embed({"a": X, "b": far}, method="pca", mode="reference", reference="a")
    alone = E.embed({"a": X}, method="pca")
    np.testing.assert_allclose(df[df["source"] == "a"][["x", "y"]].to_numpy(),
                               alone[["x", "y"]].to_numpy())


def test_umap_deterministic_reference_and_quality():
    X, y = blobs(n_per=40, centers=3)
    feats = {"ref": X, "new": X + np.random.default_rng(5).normal(0, 0.3, X.shape)}
    a = E.embed(feats, y, method="umap", mode="reference", reference="ref", cache=False,
                n_neighbors=10)
    b = E.embed(feats, y, method="umap", mode="reference", reference="ref", cache=False,
                n_neighbors=10)
    np.testing.assert_array_equal(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())
    assert a.attrs["trustworthiness"] > 0.85
    assert np.isfinite(a[["x", "y"]].to_numpy()).all()
    assert E.pairing_distance(a) < 0.5


def test_torch_and_conv_maps_are_flattened():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(30, 4, 3, 3)).astype(np.float32)
    df_t = E.embed({"m": torch.from_numpy(maps).requires_grad_(True)}, method="pca", cache=False)
    df_n = E.embed({"m": maps.reshape(30, -1)}, method="pca", cache=False)
    np.testing.assert_allclose(df_t[["x", "y"]].to_numpy(), df_n[["x", "y"]].to_numpy())


def test_dtypes_float32_kept_half_and_int_accepted():
    X, y = blobs(n_per=10)
    a = E.embed({"m": torch.tensor(X, dtype=torch.float16)}, method="pca", cache=False)
    b = E.embed({"m": X.astype(np.float16).astype(np.float64)}, method="pca", cache=False)
    np.testing.assert_allclose(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy(), atol=1e-9)
    c = E.embed({"m": np.round(X).astype(int)}, method="pca", cache=False)
    assert np.isfinite(c[["x", "y"]].to_numpy()).all()
    with pytest.raises(TypeError, match="numeric array"):
        E.embed({"m": np.array([["a", "b"]] * 5)}, method="pca")


def test_labels_and_index_per_source_with_different_sizes():
    X, y = blobs(n_per=20)
    feats = {"a": X, "b": X[:50]}
    df = E.embed(feats, {"a": y, "b": y[:50]}, method="pca",
                 index={"a": np.arange(80), "b": np.arange(50) * 2})
    assert (df[df["source"] == "b"]["index"].to_numpy() == np.arange(50) * 2).all()
    with pytest.raises(ValueError, match="same number of rows"):
        E.embed(feats, y, method="pca")
    with pytest.raises(ValueError, match="missing"):
        E.embed(feats, {"a": y}, method="pca")
    with pytest.raises(ValueError, match="has 3 entries"):
        E.embed({"a": X}, y[:3], method="pca")
    with pytest.raises(ValueError, match="integer sample indices"):
        E.embed({"a": X}, index=np.linspace(0, 1, len(X)), method="pca")


def test_bad_inputs_raise_teaching_errors():
    X, y = blobs()
    with pytest.raises(ValueError, match=r"unknown method 'tnse'.*'tsne', 'umap', 'pca'"):
        E.embed(X, method="tnse")
    with pytest.raises(ValueError, match=r"unknown parameter.*perplexty.*perplexity="):
        E.embed(X, method="tsne", perplexty=5)
    with pytest.raises(ValueError, match=r"unknown parameter.*n_neighbors.*'pca'"):
        E.embed(X, method="pca", n_neighbors=5)
    with pytest.raises(ValueError, match=r"'a': 16, 'b': 8.*common space"):
        E.embed({"a": X, "b": X[:, :8]}, method="pca")
    with pytest.raises(ValueError, match=r"'a': 16, 'b': 8"):
        E.embed({"a": X, "b": X[:, :8]}, method="pca", mode="reference", reference="a")
    with pytest.raises(ValueError, match=r"unknown reference source 'c'.*\['a', 'b'\]"):
        E.embed({"a": X, "b": X}, method="pca", mode="reference", reference="c")
    with pytest.raises(ValueError, match="needs reference="):
        E.embed({"a": X}, method="pca", mode="reference")
    with pytest.raises(ValueError, match="only used with mode='reference'"):
        E.embed({"a": X}, method="pca", reference="a")
    with pytest.raises(ValueError, match="unknown mode"):
        E.embed(X, method="pca", mode="stacked")
    bad = X.copy()
    bad[[3, 7], 2] = np.nan
    with pytest.raises(ValueError, match=r"features\['b'\] has NaN.*2 of 160 rows.*\[3, 7\]"):
        E.embed({"a": X, "b": bad}, method="pca")
    with pytest.raises(ValueError, match="expected \\(N, D\\)"):
        E.embed(np.arange(5.0), method="pca")
    with pytest.raises(ValueError, match="pca must be"):
        E.embed(X, method="pca", pca=1)
    with pytest.raises(ValueError, match="seed must be"):
        E.embed(X, method="pca", seed=-1)
    with pytest.raises(ValueError, match="at least 3 rows"):
        E.embed(X[:2], method="pca")
    with pytest.raises(ValueError, match="min_dist"):
        E.embed(X, method="umap", min_dist=2.0)


def test_perplexity_is_lowered_for_tiny_inputs_quietly_and_recorded(capfd, caplog):
    X, _ = blobs(n_per=15)            # 60 rows: perplexity 30 is impossible, 59/3 is the most
    df = E.embed(X, method="tsne", n_iter=50, early_exaggeration_iter=20)
    assert df.attrs["params"]["perplexity"] == pytest.approx(59 / 3, abs=1e-3)
    assert 3 * df.attrs["params"]["perplexity"] <= 59
    assert capfd.readouterr() == ("", "")            # openTSNE did not have to complain
    assert not [r for r in caplog.records if "perplexity" in r.getMessage().lower()]


def test_pairing_distance_separates_paired_from_shuffled():
    rng = np.random.default_rng(0)
    pts = rng.normal(0, 10, size=(100, 2))
    idx = np.arange(100)

    def frame(b):
        return pd.DataFrame({"x": np.r_[pts[:, 0], b[:, 0]], "y": np.r_[pts[:, 1], b[:, 1]],
                             "source": ["a"] * 100 + ["b"] * 100, "index": np.r_[idx, idx]})

    close = E.pairing_distance(frame(pts + rng.normal(0, 0.5, pts.shape)))
    shuffled = E.pairing_distance(frame(rng.permutation(pts)))
    assert close < 0.1
    assert 0.8 < shuffled < 1.2
    with pytest.raises(ValueError, match="at least two sources"):
        E.pairing_distance(frame(pts).query("source == 'a'"))
    dup = frame(pts)
    dup.loc[1, "index"] = 0
    with pytest.raises(ValueError, match="duplicated sample indices"):
        E.pairing_distance(dup)
    with pytest.raises(ValueError, match="missing"):
        E.pairing_distance(frame(pts).drop(columns="index"))


def test_embed_models_extracts_each_layer_and_embeds_jointly():
    import torch

    from kaviz import models as kmodels

    torch.manual_seed(0)
    a = kmodels.build("cifar_resnet8", 3, width=8)
    b = kmodels.build("vgg8_small", 3, width=4)
    x = torch.rand(40, 3, 32, 32)
    ds = torch.utils.data.TensorDataset(x, torch.arange(40) % 3)
    df = E.embed_models({"a": (a, "fc:in"), "b": (b, "fc:in")}, ds, method="pca")
    assert list(df.source.unique()) == ["a", "b"] and len(df) == 80
    assert list(df["label"][:3]) == [0, 1, 2] and list(df["index"][:3]) == [0, 1, 2]
    with pytest.raises(ValueError, match="pair"):
        E.embed_models({"a": a}, ds, method="pca")


def test_umap_jit_cache_switched_on():
    # issue 18: a new kernel's first UMAP took 13 s compiling umap's numba functions, which umap
    # does not cache; kaviz switches numba's on-disk cache on for them (make setup fills it)
    import umap.umap_ as U
    from numba.core.registry import CPUDispatcher

    E._import_umap()
    jitted = [f for f in vars(U).values() if isinstance(f, CPUDispatcher)]
    assert jitted, "control: umap.umap_ has numba functions"
    assert all(type(f._cache).__name__ != "NullCache" for f in jitted)
    assert type(U.fast_knn_indices._cache).__name__ == "FunctionCache"
    # control: umap alone leaves it off (a fresh process)
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-W", "ignore", "-c", "import umap.umap_ as U; "
                          "print(type(U.fast_knn_indices._cache).__name__)"],
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out[-1] == "NullCache"


def test_umap_runs_when_numba_cannot_cache(monkeypatch):
    # a read-only install with no writable cache location: numba refuses to cache; UMAP must still run
    from numba.core.registry import CPUDispatcher

    def refuse(self):
        raise RuntimeError("cannot cache function: no locator available")

    import sys
    import types

    import numba
    import umap  # noqa: F401 - imported before numba is made to refuse (its own cache=True functions)

    mod = types.ModuleType("kaviz_test_jitted")   # a jitted function nothing has cached yet
    mod.f = numba.njit(lambda x: x + 1)
    assert type(mod.f._cache).__name__ == "NullCache"
    monkeypatch.setitem(sys.modules, "kaviz_test_jitted", mod)
    monkeypatch.setattr(E, "_UMAP_MODULES", ("kaviz_test_jitted",))
    monkeypatch.setattr(CPUDispatcher, "enable_caching", refuse)
    monkeypatch.setattr(E, "_umap_cache_on", False)
    with pytest.raises(RuntimeError):                 # control: numba's refusal reaches the caller
        mod.f.enable_caching()
    assert E._import_umap() is not None and E._umap_cache_on and mod.f(1) == 2
    rng = np.random.default_rng(0)
    df = E.embed({"a": rng.normal(size=(40, 8))}, rng.integers(0, 2, 40), method="umap", cache=False)
    assert len(df) == 40 and np.isfinite(df[["x", "y"]].to_numpy()).all()
