"""2-D maps (t-SNE, UMAP, PCA) of features from one or several networks, seeded and cached.

One entry point, :func:`embed`, returns a tidy DataFrame (``x, y, source, label, index``) that
:func:`kaviz.plots.embedding_scatter` draws and :class:`kaviz.widgets.EmbeddingExplorer` links.

* t-SNE: van der Maaten & Hinton, "Visualizing Data using t-SNE", JMLR 2008, through openTSNE
  (Poličar, Stražar & Zupan, "openTSNE: a modular Python library for t-SNE dimensionality
  reduction and embedding", JSS 2024), which can also place new points into an existing map.
* UMAP: McInnes, Healy & Melville, "UMAP: Uniform Manifold Approximation and Projection", 2018.
* PCA: the first two principal components.

Two modes:

* ``"joint"``: all sources are stacked and embedded together (the CFL t-SNE figure: student and
  teacher codes of the same images in one map).
* ``"reference"``: the map is fitted on one source; the other sources are placed into it
  (openTSNE's ``TSNEEmbedding.transform``, UMAP's ``transform``, PCA's ``transform``), so the
  reference map does not move when another network is added.

scikit-learn, openTSNE and umap are imported lazily: ``import kaviz.embed`` stays cheap.
"""
from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import pandas as pd

__all__ = ["embed", "embed_models", "pairing_distance", "quality", "cache_info", "clear_cache", "METHODS"]

#: Parameters each method accepts, with their defaults. ``embed(..., **params)`` may override any
#: of them; anything else is an error that lists these names.
METHODS: dict[str, dict] = {
    "tsne": {
        "perplexity": 30.0,
        "n_iter": 500,
        "early_exaggeration_iter": 250,
        "early_exaggeration": 12.0,
        "exaggeration": None,
        "learning_rate": "auto",
        "dof": 1.0,
        "metric": "euclidean",
        "initialization": "pca",
        # "auto": one thread below 1000 rows (thread start-up dominates), all cores above;
        # openTSNE's Barnes-Hut result does not depend on the thread count
        "n_jobs": "auto",
        # placing new points in reference mode (openTSNE's defaults for TSNEEmbedding.transform)
        "transform_n_iter": 250,
        "transform_perplexity": 5.0,
    },
    "umap": {
        "n_neighbors": 15,
        "min_dist": 0.1,
        "spread": 1.0,
        "metric": "euclidean",
        "n_epochs": None,
        "init": "spectral",
    },
    "pca": {},
}
MODES = ("joint", "reference")
QUALITY_K = 10
QUALITY_MAX_ROWS = 2000

_CACHE_MAXSIZE = 32
_cache: OrderedDict[str, pd.DataFrame] = OrderedDict()
_cache_stats = {"hits": 0, "misses": 0}
_cache_lock = threading.Lock()


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def embed(features, labels=None, *, method="tsne", mode="joint", reference=None, index=None,
          pca=50, seed=0, cache=True, **params) -> pd.DataFrame:
    """Embed the features of one or several sources (networks) into 2-D.

    Parameters
    ----------
    features : Mapping[str, array] or array
        ``source name -> (N_s, D)`` array (numpy or torch). ``(N, C, H, W)`` (or any ``(N, ...)``)
        arrays are flattened per sample. A single array is one source named ``"features"``.
    labels : array, Mapping[str, array] or None
        One array for all sources (when every source has the same N: the same images seen by
        several networks) or one array per source. Stored in the ``label`` column.
    method : {"tsne", "umap", "pca"}
    mode : {"joint", "reference"}
        ``"joint"``: one map of all sources stacked. ``"reference"``: fit on ``reference`` and place
        the other sources into that map.
    reference : str
        The source the map is fitted on (``mode="reference"`` only).
    index : array, Mapping[str, array] or None
        Sample index per row (default ``arange(N_s)``): the key that links the same image across
        sources and across maps.
    pca : int or None
        Reduce to at most ``pca`` principal components first (fitted on all rows in joint mode, on
        the reference source in reference mode); ``None`` skips it. No standardisation is applied.
    seed : int
        Same inputs and seed give identical coordinates.
    cache : bool
        Keep results in an in-memory LRU keyed by a hash of the input bytes, method, params, seed,
        mode, reference and pca; ``False`` neither reads nor writes it.
    **params
        Method parameters, see :data:`METHODS` (t-SNE: ``perplexity=30, n_iter=500, ...``;
        UMAP: ``n_neighbors=15, min_dist=0.1, ...``; PCA: none).

    Returns
    -------
    DataFrame with columns ``x, y, source, label, index``; rows ordered by source (in the given
    order), then as given. ``df.attrs`` holds ``method, params`` (effective values), ``mode,
    reference, seed, pca`` (components kept, or None), ``trustworthiness`` and ``knn_preservation``
    (see :func:`quality`; computed against the PCA'd input), ``seconds`` and ``cached``.
    """
    method, full_params, seed = _check_arguments(method, params, mode, seed, pca)
    sources = _as_sources(features)
    names = list(sources)
    sizes = {k: v.shape[0] for k, v in sources.items()}
    _check_sources(sources, mode, reference)
    label_col = _per_source(labels, sizes, "labels")
    index_col = _per_source(index, sizes, "index")
    if index_col is not None:
        index_col = {k: _as_int_index(v, k) for k, v in index_col.items()}
    else:
        index_col = {k: np.arange(n) for k, n in sizes.items()}

    key = None
    if cache:
        key = _cache_key(sources, label_col, index_col, method, full_params, mode, reference,
                         pca, seed)
        hit = _cache_get(key)
        if hit is not None:
            return hit

    t0 = time.perf_counter()
    fit_names = [reference] if mode == "reference" else names
    X_fit = np.concatenate([sources[k] for k in fit_names], axis=0)
    X_all = np.concatenate([sources[k] for k in names], axis=0)
    _check_fit_rows(X_fit, fit_names, method)

    # PCA first: denoises and makes the neighbour search cheap; fitted on what the map is fitted on
    reduced, pca_kept = _pca_reduce(X_fit, X_all, pca, seed)
    eff = dict(full_params)
    if method == "tsne":
        Y = _run_tsne(reduced, names, sources, fit_names, mode, reference, eff, seed)
    elif method == "umap":
        Y = _run_umap(reduced, names, sources, fit_names, mode, reference, eff, seed)
    else:
        Y = _run_pca(reduced, names, sources, fit_names, mode, reference, seed)

    df = pd.DataFrame({
        "x": Y[:, 0].astype(float),
        "y": Y[:, 1].astype(float),
        "source": np.concatenate([[k] * sizes[k] for k in names]).astype(object),
        "label": _concat_labels(label_col, names, sizes),
        "index": np.concatenate([index_col[k] for k in names]).astype(np.int64),
    })
    q = quality(reduced, Y, k=QUALITY_K, max_rows=QUALITY_MAX_ROWS, seed=seed)
    df.attrs.update({
        "method": method, "params": eff, "mode": mode, "reference": reference, "seed": seed,
        "pca": pca_kept, "trustworthiness": q["trustworthiness"],
        "knn_preservation": q["knn_preservation"], "quality_k": q["k"],
        "seconds": round(time.perf_counter() - t0, 3), "cached": False,
    })
    if cache:
        _cache_put(key, df)
    return df


def _check_arguments(method, params, mode, seed, pca):
    """Validate embed()'s scalar arguments; returns (method, full params, seed as int)."""
    method = _check_method(method)
    full_params = _check_params(method, params)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(map(repr, MODES))}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if pca is not None and (isinstance(pca, bool) or not isinstance(pca, (int, np.integer))
                            or pca < 2):
        raise ValueError(f"pca must be an int >= 2 (components kept before embedding) or None, "
                         f"got {pca!r}")
    return method, full_params, int(seed)


def _check_sources(sources, mode, reference):
    """One input space for one map, and a reference source only in reference mode."""
    names = list(sources)
    dims = {k: v.shape[1] for k, v in sources.items()}
    if len(set(dims.values())) > 1:
        detail = ", ".join(f"{k!r}: {d}" for k, d in dims.items())
        raise ValueError(
            f"sources have different feature dimensions ({detail}); one map needs one input "
            f"space, in mode='joint' and in mode='reference' alike. Project the features to a "
            f"common space first (e.g. CFL's common space h_s, h_t), pool conv maps to vectors, "
            f"or embed each source separately.")
    if mode == "reference":
        if reference is None:
            raise ValueError(f"mode='reference' needs reference=<source name>; sources: {names}")
        if reference not in sources:
            raise ValueError(f"unknown reference source {reference!r}; sources: {names}")
    elif reference is not None:
        raise ValueError(f"reference={reference!r} is only used with mode='reference' "
                         f"(mode is {mode!r}); drop it or pass mode='reference'")


def _check_fit_rows(X_fit, fit_names, method):
    """At least 3 rows, and not all the same vector (no neighbourhoods to map)."""
    n_fit = X_fit.shape[0]
    if n_fit < 3:
        raise ValueError(f"need at least 3 rows to fit a map, got {n_fit}")
    spread = float(np.ptp(X_fit, axis=0).max())
    if spread <= 1e-7 * max(1.0, float(np.abs(X_fit).max())):
        raise ValueError(
            f"the features the map is fitted on ({', '.join(map(repr, fit_names))}) are constant: all "
            f"{n_fit} rows are the same vector, so there are no neighbourhoods to map ({method} of "
            f"identical points fails or draws noise). The layer does not respond to its input (a dead "
            f"ReLU, an untrained or collapsed network, identical images?): pick another layer or "
            f"check the model.")


def _cache_get(key):
    """A deep copy of the cached map (attrs["cached"] = True), or None; counts hits and misses."""
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            _cache_stats["hits"] += 1
            out = _cache[key].copy(deep=True)
            out.attrs["cached"] = True
            return out
        _cache_stats["misses"] += 1
    return None


def _cache_put(key, df):
    with _cache_lock:
        _cache[key] = df.copy(deep=True)
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_MAXSIZE:
            _cache.popitem(last=False)


def embed_models(models: Mapping, data, *, method: str = "tsne", mode: str = "joint", reference=None,
                 pool: str = "avg", labels=None, seed: int = 0, batch_size: int = 256, **params) -> pd.DataFrame:
    """Extract one named layer of each model on the same images and embed them (one call of
    :func:`kaviz.features.extract` per model, then :func:`embed`).

    ``models``: ``name -> (model, layer)``; ``data``: a dataset (subsample it first: t-SNE of a
    few thousand points is what a figure can show). ``labels`` default to the data's targets.
    Joint mode needs the layers to have the same width after pooling (else :func:`embed` says so).
    """
    from .features import extract

    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty mapping name -> (model, layer)")
    feats = {}
    targets = None
    for name, pair in models.items():
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], str)):
            raise ValueError(f"models[{name!r}] must be a (model, layer name) pair, got {type(pair).__name__}")
        model, layer = pair
        store = extract(model, data, layer, pool=pool, batch_size=batch_size, progress=False)
        feats[name] = store[layer]
        if targets is None:
            targets = store.targets
    if labels is None and targets is not None and not isinstance(targets, Mapping):
        labels = targets
    return embed(feats, labels, method=method, mode=mode, reference=reference, seed=seed, **params)


def quality(X, Y, *, k=QUALITY_K, max_rows=QUALITY_MAX_ROWS, seed=0) -> dict:
    """How well a map ``Y`` (n, 2) keeps the neighbourhoods of ``X`` (n, D).

    * ``trustworthiness`` (Venna & Kaski 2001; ``sklearn.manifold.trustworthiness``):
      ``T(k) = 1 - 2/(n k (2n - 3k - 1)) * sum_i sum_{j in U_k(i)} (r(i, j) - k)`` where ``U_k(i)``
      are the map neighbours of i that are not among its k input neighbours and ``r(i, j)`` is the
      rank of j among i's input neighbours. 1 = no false neighbours; about 0.5 for a random map.
    * ``knn_preservation``: mean over points of ``|N_k^X(i) ∩ N_k^Y(i)| / k``, the fraction of each
      point's k nearest input neighbours that are also among its k nearest map neighbours
      (about k/n for a random map).

    Both are computed on a seeded subsample of at most ``max_rows`` rows; ``k`` is lowered for
    tiny inputs (trustworthiness needs ``k < n/2``).
    """
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    n = X.shape[0]
    if n > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
        X, Y, n = X[rows], Y[rows], max_rows
    k = int(min(k, (n - 1) // 2))
    if k < 1:
        return {"trustworthiness": float("nan"), "knn_preservation": float("nan"), "k": 0}
    tw = float(trustworthiness(X, Y, n_neighbors=k))
    nx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(return_distance=False)[:, :k]
    ny = NearestNeighbors(n_neighbors=k + 1).fit(Y).kneighbors(return_distance=False)[:, :k]
    # kneighbors() without X excludes each point itself, so exactly k neighbours per row remain
    shared = [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(nx, ny)]
    return {"trustworthiness": round(tw, 6),
            "knn_preservation": round(float(np.mean(shared)) / k, 6), "k": k}


def pairing_distance(df: pd.DataFrame, *, max_rows: int = 4000, seed: int = 0) -> float:
    """Are the codes of the same image closer than the codes of different images?

    For every pair of sources (a, b) and every sample index present in both,
    ``d_pair = mean_i ||y_a(i) - y_b(i)||`` (same image, two networks) and
    ``d_rand = mean_{i != j} ||y_a(i) - y_b(j)||`` (different images: the mean over all such
    pairs, exact). Returns ``sum d_pair / sum d_rand`` pooled over source pairs, weighted by the
    number of shared indices: below 1 means the same image lands closer across networks than two
    random images do; about 1 means no pairing at all.

    ``max_rows`` caps the shared indices per source pair (a seeded subsample) to bound the
    all-pairs baseline.
    """
    from scipy.spatial.distance import cdist

    missing = [c for c in ("x", "y", "source", "index") if c not in df.columns]
    if missing:
        raise ValueError(f"pairing_distance needs the columns x, y, source, index (as returned by "
                         f"kaviz.embed.embed); missing: {missing}")
    srcs = list(pd.unique(df["source"]))
    if len(srcs) < 2:
        raise ValueError(f"pairing_distance needs at least two sources, got {srcs}")
    per = {}
    for s in srcs:
        part = df[df["source"] == s]
        dup = part["index"][part["index"].duplicated()]
        if len(dup):
            raise ValueError(f"source {s!r} has duplicated sample indices (e.g. "
                             f"{dup.iloc[:5].tolist()}); pairing needs one row per image and source")
        per[s] = pd.Series(np.arange(len(part)), index=part["index"].to_numpy()), \
            part[["x", "y"]].to_numpy(dtype=np.float64)
    rng = np.random.default_rng(seed)
    num = den = 0.0
    pairs = 0
    for i, a in enumerate(srcs):
        for b in srcs[i + 1:]:
            (pos_a, Ya), (pos_b, Yb) = per[a], per[b]
            shared = np.intersect1d(pos_a.index.to_numpy(), pos_b.index.to_numpy())
            if len(shared) < 2:
                continue
            if len(shared) > max_rows:
                shared = np.sort(rng.choice(shared, size=max_rows, replace=False))
            A = Ya[pos_a.loc[shared].to_numpy()]
            B = Yb[pos_b.loc[shared].to_numpy()]
            m = len(shared)
            same = np.linalg.norm(A - B, axis=1)
            total = sum(cdist(A[s:s + 512], B).sum() for s in range(0, m, 512))
            d_pair = same.mean()
            d_rand = (total - same.sum()) / (m * m - m)
            num += m * d_pair
            den += m * d_rand
            pairs += 1
    if pairs == 0:
        raise ValueError(f"no sample index is shared by two sources (sources: {srcs}); pass the "
                         f"same index=... for the same images when calling embed")
    if den == 0:
        raise ValueError("all points lie on one spot: the map is degenerate")
    return float(num / den)


def cache_info() -> dict:
    """``{"hits", "misses", "size", "maxsize"}`` of the in-memory embedding cache."""
    with _cache_lock:
        return {**_cache_stats, "size": len(_cache), "maxsize": _CACHE_MAXSIZE}


def clear_cache() -> None:
    """Empty the in-memory embedding cache and reset its counters."""
    with _cache_lock:
        _cache.clear()
        _cache_stats.update(hits=0, misses=0)


# ------------------------------------------------------------------------------------------------
# input checking
# ------------------------------------------------------------------------------------------------
def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: "
                         f"{', '.join(map(repr, METHODS))}")
    return method


def _check_params(method, params):
    valid = METHODS[method]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        hint = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise ValueError(f"unknown parameter(s) {unknown} for method {method!r}; valid "
                         f"parameters (with defaults): {hint}")
    full = {**valid, **params}
    if method == "tsne" and not full["perplexity"] > 0:
        raise ValueError(f"perplexity must be > 0, got {full['perplexity']!r}")
    if method == "umap":
        if not (isinstance(full["n_neighbors"], (int, np.integer)) and full["n_neighbors"] >= 2):
            raise ValueError(f"n_neighbors must be an int >= 2, got {full['n_neighbors']!r}")
        if not 0 <= full["min_dist"] <= full["spread"]:
            raise ValueError(f"min_dist must be in [0, spread={full['spread']}], "
                             f"got {full['min_dist']!r}")
    return full


def _to_numpy(a, what):
    """float32 stays float32 (conv features can be large); everything else becomes float64."""
    if type(a).__module__.split(".")[0] == "torch":
        import torch  # already imported by whoever made the tensor

        a = a.detach().cpu()
        a = (a if a.dtype in (torch.float32, torch.float64) else a.double()).numpy()
    try:
        arr = np.asarray(a)
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be a numeric array (numpy or torch), got "
                        f"{type(a).__name__}: {e}") from None
    return arr


def _as_sources(features) -> dict[str, np.ndarray]:
    if isinstance(features, Mapping):
        if not features:
            raise ValueError("features is an empty mapping; pass {source name: (N, D) array}")
        items = list(features.items())
    else:
        items = [("features", features)]
    out = {}
    for name, a in items:
        if not isinstance(name, str):
            raise TypeError(f"source names must be str, got {name!r}")
        arr = _to_numpy(a, f"features[{name!r}]")
        if arr.ndim < 2:
            raise ValueError(f"features[{name!r}] has shape {arr.shape}; expected (N, D) "
                             f"(one row per sample) or (N, C, H, W)")
        if arr.ndim > 2:
            arr = arr.reshape(arr.shape[0], -1)
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"features[{name!r}] is empty (shape {arr.shape})")
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ValueError(
                f"features[{name!r}] has NaN or infinite values in {bad.sum()} of {len(arr)} rows "
                f"(first rows: {rows[:5].tolist()}); check the model's forward for overflow, or "
                f"drop those rows (and their labels/index) before embedding")
        out[name] = np.ascontiguousarray(arr)
    return out


def _per_source(value, sizes, what):
    """Expand ``labels``/``index`` (None, one array, or a mapping per source) to a dict."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        missing = [k for k in sizes if k not in value]
        extra = [k for k in value if k not in sizes]
        if missing or extra:
            raise ValueError(f"{what} mapping keys must match the sources {list(sizes)}; "
                             f"missing {missing}, unexpected {extra}")
        out = {k: _as_1d(value[k], f"{what}[{k!r}]") for k in sizes}
    else:
        arr = _as_1d(value, what)
        if len(set(sizes.values())) > 1:
            raise ValueError(f"one {what} array for all sources needs all sources to have the "
                             f"same number of rows, got {sizes}; pass a mapping "
                             f"{{source: {what}}} instead")
        out = {k: arr for k in sizes}
    for k, n in sizes.items():
        if len(out[k]) != n:
            raise ValueError(f"{what} for source {k!r} has {len(out[k])} entries but the source "
                             f"has {n} rows")
    return out


def _as_1d(a, what):
    if type(a).__module__.split(".")[0] == "torch":
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one entry per row), got shape {arr.shape}")
    return arr


def _as_int_index(arr, name):
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            return arr.astype(np.int64)
        raise ValueError(f"index for source {name!r} must hold integer sample indices, "
                         f"got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _concat_labels(label_col, names, sizes):
    if label_col is None:
        return np.full(sum(sizes.values()), np.nan)
    parts = [np.asarray(label_col[k]) for k in names]
    try:
        return np.concatenate(parts)
    except (TypeError, ValueError):
        return np.concatenate([p.astype(object) for p in parts])


def _cache_key(sources, labels, index, method, params, mode, reference, pca, seed) -> str:
    h = hashlib.sha256()

    def put(tag, arr):
        arr = np.asarray(arr)
        h.update(f"|{tag}|{arr.dtype.str}|{arr.shape}|".encode())
        if arr.dtype == object:
            h.update(repr(arr.tolist()).encode())
        else:
            h.update(np.ascontiguousarray(arr).tobytes())

    for k, v in sources.items():
        put(f"features:{k}", v)
    for k in sources:
        put(f"index:{k}", index[k])
        if labels is not None:
            put(f"labels:{k}", labels[k])
    h.update(repr((method, sorted(params.items(), key=lambda kv: kv[0]), mode, reference,
                   pca, seed, labels is None)).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# the three methods
# ------------------------------------------------------------------------------------------------
def _pca_reduce(X_fit, X_all, pca, seed):
    n, d = X_fit.shape
    if pca is None or d <= pca:
        return X_all, None
    from sklearn.decomposition import PCA

    kept = int(min(pca, n))
    model = PCA(n_components=kept, random_state=seed).fit(X_fit)
    return model.transform(X_all), kept


def _blocks(Y_or_X, names, sources):
    """Split stacked rows back into per-source blocks (rows are stacked in ``names`` order)."""
    out, start = {}, 0
    for k in names:
        n = sources[k].shape[0]
        out[k] = Y_or_X[start:start + n]
        start += n
    return out


def _run_pca(X, names, sources, fit_names, mode, reference, seed):
    from sklearn.decomposition import PCA

    blocks = _blocks(X, names, sources)
    X_fit = np.concatenate([blocks[k] for k in fit_names], axis=0)
    if X.shape[1] < 2:
        raise ValueError(f"PCA to 2-D needs at least 2 feature dimensions, got {X.shape[1]}")
    model = PCA(n_components=2, random_state=seed).fit(X_fit)
    return model.transform(X)


def _run_tsne(X, names, sources, fit_names, mode, reference, eff, seed):
    import openTSNE

    blocks = _blocks(X, names, sources)
    X_fit = np.concatenate([blocks[k] for k in fit_names], axis=0)
    n = X_fit.shape[0]
    # openTSNE lowers a too-high perplexity itself but says so on stdout; do it here, quietly,
    # and record the value used in df.attrs["params"]
    max_perp = max((n - 1) / 3.0, 1.0)
    if eff["perplexity"] > max_perp:
        eff["perplexity"] = float(np.floor(max_perp * 1000) / 1000)  # rounded down: 3 * p <= n - 1
    n_jobs = eff["n_jobs"]
    if n_jobs == "auto":
        n_jobs = 1 if n < 1000 else -1
    tsne = openTSNE.TSNE(
        n_components=2, perplexity=eff["perplexity"], n_iter=eff["n_iter"],
        early_exaggeration_iter=eff["early_exaggeration_iter"],
        early_exaggeration=eff["early_exaggeration"], exaggeration=eff["exaggeration"],
        learning_rate=eff["learning_rate"], dof=eff["dof"], metric=eff["metric"],
        initialization=eff["initialization"], n_jobs=n_jobs, random_state=seed,
        verbose=False)
    emb = tsne.fit(X_fit)
    # TSNEEmbedding.transform re-centres the reference map in place (bounding-box centre to 0);
    # centre it once here so a map does not move when other sources are placed into it
    emb -= (np.max(emb, axis=0) + np.min(emb, axis=0)) / 2
    if mode == "joint":
        return np.array(emb, dtype=np.float64)
    placed = {}
    for k in names:
        if k != reference:
            perp = min(eff["transform_perplexity"], max_perp)
            part = emb.transform(blocks[k], perplexity=perp, n_iter=eff["transform_n_iter"])
            placed[k] = np.array(part, dtype=np.float64)
    placed[reference] = np.array(emb, dtype=np.float64)  # read after the transforms: same frame
    return np.concatenate([placed[k] for k in names], axis=0)


_UMAP_MODULES = ("umap.umap_", "umap.layouts", "umap.utils", "umap.spectral", "umap.distances",
                 "umap.sparse")
_umap_cache_on = False


def _import_umap():
    """``import umap`` with numba's on-disk cache switched on for umap's jitted functions.

    umap compiles most of them without ``cache=True``, so every new kernel spent ~10 s (2 cores)
    compiling on its first UMAP; with the cache, the compiled code is written once (``make setup``
    runs :func:`warm_umap`) and a new kernel's first UMAP of 1,200 points takes ~1 s (measured,
    tests/browser). numba keys the cache by the function's source and the CPU, so results are the
    same as compiling afresh."""
    global _umap_cache_on
    import importlib

    import umap

    if not _umap_cache_on:
        from numba.core.registry import CPUDispatcher

        for name in _UMAP_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            for obj in vars(mod).values():
                if isinstance(obj, CPUDispatcher) and type(getattr(obj, "_cache", None)).__name__ == "NullCache":
                    try:
                        obj.enable_caching()
                    except Exception:  # noqa: BLE001 - no writable cache location: compile as umap does
                        pass
        _umap_cache_on = True
    return umap


def warm_umap(n: int = 300, dim: int = 32) -> float:
    """Run UMAP once on random data (joint and reference mode) so that its compiled code is in
    numba's on-disk cache for every later process; returns the seconds taken."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    feats = {k: rng.normal(size=(n, dim)).astype(np.float32) for k in ("a", "b")}
    labels = rng.integers(0, 5, n)
    embed(feats, labels, method="umap", cache=False)
    embed(feats, labels, method="umap", mode="reference", reference="a", cache=False)
    return time.perf_counter() - t0


def _run_umap(X, names, sources, fit_names, mode, reference, eff, seed):
    blocks = _blocks(X, names, sources)
    X_fit = np.concatenate([blocks[k] for k in fit_names], axis=0)
    with warnings.catch_warnings():
        # seeded UMAP is single-threaded and says so with a UserWarning; we pass n_jobs=1 and
        # silence the remaining chatter (numba/sklearn deprecations) of the import and the fit
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
        warnings.filterwarnings("ignore", message=".*n_neighbors is larger than the dataset.*")
        # well-separated classes make a disconnected k-NN graph; UMAP copes (the spectral init
        # falls back per component), the warning only alarms notebook readers
        warnings.filterwarnings("ignore", message=".*Graph is not fully connected.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=ImportWarning)  # "Tensorflow not installed"
        umap = _import_umap()

        eff["n_neighbors"] = int(min(eff["n_neighbors"], X_fit.shape[0] - 1))
        model = umap.UMAP(
            n_components=2, n_neighbors=eff["n_neighbors"],
            min_dist=eff["min_dist"], spread=eff["spread"], metric=eff["metric"],
            n_epochs=eff["n_epochs"], init=eff["init"], random_state=seed, transform_seed=seed,
            n_jobs=1, verbose=False)
        Y_fit = model.fit_transform(X_fit)
        if mode == "joint":
            return np.asarray(Y_fit, dtype=np.float64)
        out = []
        for k in names:
            if k == reference:
                out.append(np.asarray(Y_fit, dtype=np.float64))
            else:
                out.append(np.asarray(model.transform(blocks[k]), dtype=np.float64))
    return np.concatenate(out, axis=0)
