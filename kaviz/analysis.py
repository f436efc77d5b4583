"""Comparing any two networks: CKA (full, debiased, minibatch), layer × layer CKA matrices,
linear probes, and knowledge consistency of a student with each of its teachers.

Plain functions over features (like anatome), plus :func:`cka_matrix`, which streams a dataset through
two models once and never holds more than one batch of features.

**CKA** (Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations Revisited",
ICML 2019). For features X (N×D1) and Y (N×D2) with Gram matrices K = k(X, X), L = k(Y, Y)::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))

- biased HSIC (Gretton et al. 2005): ``HSIC(K, L) = tr(K H L H) / (N − 1)²`` with the centring
  matrix ``H = I − 11ᵀ/N``;
- unbiased HSIC (Song et al. 2012), used by the *debiased* CKA (Nguyen, Raghu & Kornblith, "Do Wide and
  Deep Networks Learn the Same Things?", ICLR 2021): with K̃, L̃ the Gram matrices with a zeroed
  diagonal, ``HSIC_u = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((N−1)(N−2)) − 2/(N−2)·1ᵀK̃L̃1] / (N(N−3))``
  (N ≥ 4). It removes the upward bias of the biased estimator at small N (two independent random
  feature sets of high dimension give a biased CKA far above 0; the debiased one is near 0);
- minibatch CKA (Nguyen et al. 2021): the HSIC_u terms averaged over minibatches, then combined
  into one CKA — memory flat in N, and the average of HSIC_u over random equal-size batches is an
  unbiased estimate of the full-sample HSIC_u (HSIC_u is a U-statistic);
- kernels: ``linear`` (k(x, y) = x·y) and ``rbf`` (k = exp(−‖x − y‖² / (2σ²)), σ = ``sigma`` × the
  median distance between distinct samples; Kornblith et al. use 0.8).

All estimators are translation invariant, so features are centred before their Gram matrix is formed
(which removes the cancellation a float Gram of large ReLU activations would otherwise suffer), and
everything is computed in float64.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "cka",
    "gram",
    "hsic",
    "MinibatchCKA",
    "cka_matrix",
    "linear_probe",
    "layer_features",
    "cka_controls",
    "LayerView",
    "teacher_consistency",
]

KERNELS = ("linear", "rbf")


# ------------------------------------------------------------------------------------------ inputs
def _matrix(x, name: str) -> torch.Tensor:
    """(N, ...) array or tensor -> (N, D) float64 tensor (conv maps are flattened, as in Kornblith et al.)."""
    if torch.is_tensor(x):
        t = x.detach().cpu()
    elif isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        t = torch.from_numpy(np.asarray(x))
    else:
        raise TypeError(f"{name} must be a NumPy array or a torch tensor of shape (N, D) or (N, C, H, W), "
                        f"got {type(x).__name__}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (N, D) (one row per sample), got {tuple(t.shape)}; "
                         "reshape a single feature vector per sample with x.reshape(len(x), -1)")
    t = t.reshape(t.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values; CKA needs finite features")
    return t


def _check_kernel(kernel: str, sigma: float):
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "rbf" and not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma (the RBF bandwidth as a fraction of the median distance) must be > 0, got {sigma!r}")


def _sq_distances(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    d2.clamp_(min=0)
    d2.fill_diagonal_(0)
    return d2


def _median_distance(d2: torch.Tensor) -> float:
    n = d2.shape[0]
    iu = torch.triu_indices(n, n, offset=1)
    # torch.median returns the lower of the two middle values; take the usual median
    return float(np.median(d2[iu[0], iu[1]].sqrt().numpy())) if n > 1 else 0.0


def gram(x, kernel: str = "linear", sigma: float = 0.8, *, bandwidth: float | None = None) -> torch.Tensor:
    """The (N, N) float64 Gram matrix of ``x`` (N, D): ``x xᵀ`` (linear) or
    ``exp(−‖xᵢ − xⱼ‖² / (2 bw²))`` (rbf) with ``bw = bandwidth`` when given, else ``sigma`` × the
    median distance between distinct samples."""
    _check_kernel(kernel, sigma)
    x = _matrix(x, "x")
    x = x - x.mean(0, keepdim=True)
    if kernel == "linear":
        return x @ x.T
    d2 = _sq_distances(x)
    bw = bandwidth if bandwidth is not None else sigma * _median_distance(d2)
    if bw <= 0:  # all samples identical: a constant kernel, whose HSIC is 0
        return torch.ones_like(d2)
    return torch.exp(-d2 / (2.0 * bw * bw))


def _hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    n = K.shape[-1]
    Kc = K - K.mean(-1, keepdim=True) - K.mean(-2, keepdim=True) + K.mean((-1, -2), keepdim=True)
    return (Kc * L).sum((-1, -2)) / (n - 1) ** 2


def _offdiag(K: torch.Tensor) -> torch.Tensor:
    K = K.clone()
    K.diagonal(dim1=-2, dim2=-1).zero_()
    return K


def _hsic_unbiased_cross(Ks: torch.Tensor, Ls: torch.Tensor) -> torch.Tensor:
    """HSIC_u(K_i, L_j) for stacks Ks (a, n, n) and Ls (b, n, n): an (a, b) matrix, from the
    flattened off-diagonal Gram matrices (one matrix product for all pairs)."""
    n = Ks.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {n}")
    Kt, Lt = _offdiag(Ks), _offdiag(Ls)
    trace = Kt.reshape(Kt.shape[0], -1) @ Lt.reshape(Lt.shape[0], -1).T  # tr(K̃ L̃) (K̃, L̃ symmetric)
    ks, ls = Kt.sum(-1), Lt.sum(-1)  # K̃1, L̃1: (a, n), (b, n)
    sums = ks.sum(-1)[:, None] * ls.sum(-1)[None, :]
    cross = ks @ ls.T  # 1ᵀ K̃ L̃ 1
    return (trace + sums / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    return _hsic_unbiased_cross(K[None], L[None])[0, 0]


def _hsic_unbiased_self(Ks: torch.Tensor) -> torch.Tensor:
    """HSIC_u(K_i, K_i) for a stack (a, n, n): the diagonal of the cross matrix, without the a×a product."""
    n = Ks.shape[-1]
    Kt = _offdiag(Ks)
    trace = (Kt * Kt).sum((-1, -2))
    ks = Kt.sum(-1)
    return (trace + ks.sum(-1) ** 2 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ks * ks).sum(-1)) / (n * (n - 3))


def hsic(x, y, kernel: str = "linear", debiased: bool = False, sigma: float = 0.8) -> float:
    """HSIC between features ``x`` (N, D1) and ``y`` (N, D2): biased ``tr(KHLH)/(N−1)²`` or, with
    ``debiased=True``, the unbiased estimator of Song et al. (2012) (see the module docstring)."""
    x, y = _matrix(x, "x"), _matrix(y, "y")
    _same_n(x, y)
    K, L = gram(x, kernel, sigma), gram(y, kernel, sigma)
    return float(_hsic_unbiased(K, L) if debiased else _hsic_biased(K, L))


def _same_n(x, y):
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples and y has {y.shape[0]}: CKA compares the features of the "
                         "same samples, in the same order")


def _ratio(xy: float, xx: float, yy: float) -> float:
    den = xx * yy
    if not den > 0:  # a constant feature (e.g. a dead layer), or an HSIC_u estimate <= 0 at tiny N
        return float("nan")
    return float(xy / np.sqrt(den))


def _linear_terms(x: torch.Tensor, y: torch.Tensor, debiased: bool):
    """HSIC(x, y), HSIC(x, x), HSIC(y, y) of the linear kernel from the features, in O(N·D1·D2)
    instead of O(N²·D) (for N larger than the feature dimensions). x, y centred."""
    n = x.shape[0]
    xty, xtx, yty = x.T @ y, x.T @ x, y.T @ y
    if not debiased:
        return [(m * m).sum() / (n - 1) ** 2 for m in (xty, xtx, yty)]
    nx, ny = (x * x).sum(1), (y * y).sum(1)  # the diagonals of K and L
    sx, sy = x.sum(0), y.sum(0)
    kx, ky = x @ sx - nx, y @ sy - ny  # K̃1, L̃1
    out = []
    for (m, da, db, ka, kb) in ((xty, nx, ny, kx, ky), (xtx, nx, nx, kx, kx), (yty, ny, ny, ky, ky)):
        trace = (m * m).sum() - (da * db).sum()  # Σ_{i≠j} K_ij L_ij
        out.append((trace + ka.sum() * kb.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ka @ kb)) / (n * (n - 3)))
    return out


def cka(x, y, kernel: str = "linear", debiased: bool = False, sigma: float = 0.8) -> float:
    """Centred kernel alignment between features ``x`` (N, D1) and ``y`` (N, D2) of the same N samples
    (maps (N, C, H, W) are flattened).

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` (Kornblith et al., ICML 2019) with the biased
    HSIC, or with ``debiased=True`` the unbiased HSIC of Song et al. (2012) as in Nguyen et al. (ICLR
    2021) — use it for small N or high-dimensional features, where the biased CKA of unrelated
    features is far above 0. ``kernel="rbf"``: Gaussian kernel with bandwidth ``sigma`` × the median
    distance between distinct samples. The linear CKA is invariant to orthogonal transforms and
    isotropic scaling of either input, and 1 for identical inputs. Returns NaN when a feature is
    constant. float64 throughout; for N too large for an N×N matrix use :class:`MinibatchCKA`
    (the linear kernel never forms one when the feature dimensions are below N).
    """
    _check_kernel(kernel, sigma)
    x, y = _matrix(x, "x"), _matrix(y, "y")
    _same_n(x, y)
    n = x.shape[0]
    if n < (4 if debiased else 2):
        raise ValueError(f"CKA needs at least {4 if debiased else 2} samples{' (debiased)' if debiased else ''}, got "
                         f"{n}")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if kernel == "linear" and x.shape[1] * y.shape[1] <= n * n and max(x.shape[1], y.shape[1]) <= n:
        return _ratio(*(float(v) for v in _linear_terms(x, y, debiased)))
    K, L = gram(x, kernel, sigma), gram(y, kernel, sigma)
    if debiased:
        return _ratio(float(_hsic_unbiased(K, L)), float(_hsic_unbiased(K, K)), float(_hsic_unbiased(L, L)))
    return _ratio(float(_hsic_biased(K, L)), float(_hsic_biased(K, K)), float(_hsic_biased(L, L)))


# -------------------------------------------------------------------------------------- minibatch
class MinibatchCKA:
    """Minibatch CKA (Nguyen, Raghu & Kornblith, ICLR 2021) for N too large for an N×N Gram matrix.

    ``update(x_batch, y_batch)`` adds one minibatch (the rows of ``x`` and ``y`` are the same samples);
    ``value()`` is ``mean_b HSIC_u(K_b, L_b) / sqrt(mean_b HSIC_u(K_b, K_b) · mean_b HSIC_u(L_b, L_b))``
    over the minibatches b. Memory is one batch. Each HSIC_u term is unbiased, so the estimate does not
    drift with the batch size, and its average over random equal-size batches (e.g. several shuffled
    epochs) converges to the full-sample debiased CKA. Batches of fewer than 4 samples cannot give an
    unbiased HSIC and are skipped (counted in ``skipped``).

    ``x`` and ``y`` may also be *lists* of features (several layers): then ``value()`` is the
    len(x) × len(y) matrix of CKAs (NumPy), each Gram matrix formed once per batch. ``kernel="rbf"``
    fixes each layer's bandwidth (``sigma`` × median distance) on the first batch.
    """

    def __init__(self, kernel: str = "linear", sigma: float = 0.8):
        _check_kernel(kernel, sigma)
        self.kernel, self.sigma = kernel, float(sigma)
        self.xy = self.xx = self.yy = None
        self.batches = 0
        self.samples = 0
        self.skipped = 0
        self._single = None
        self._bw: dict = {}

    def _grams(self, feats, side: str) -> torch.Tensor:
        out = []
        for i, f in enumerate(feats):
            f = _matrix(f, f"{side}[{i}]")
            f = f - f.mean(0, keepdim=True)
            if self.kernel == "linear":
                out.append(f @ f.T)
                continue
            d2 = _sq_distances(f)
            if (side, i) not in self._bw:
                self._bw[(side, i)] = self.sigma * _median_distance(d2)
            bw = self._bw[(side, i)]
            out.append(torch.ones_like(d2) if bw <= 0 else torch.exp(-d2 / (2.0 * bw * bw)))
        return torch.stack(out)

    def update(self, x, y) -> "MinibatchCKA":
        single = not isinstance(x, (list, tuple)) and not isinstance(y, (list, tuple))
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        ys = list(y) if isinstance(y, (list, tuple)) else [y]
        if not xs or not ys:
            raise ValueError("update() needs at least one feature on each side")
        if self._single is None:
            self._single, self._shape = single, (len(xs), len(ys))
        elif (len(xs), len(ys)) != self._shape or single != self._single:
            raise ValueError(f"every update must pass the same number of features: first {self._shape}, "
                             f"now {(len(xs), len(ys))}")
        ns = {len(f) for f in xs + ys}
        if len(ns) != 1:
            raise ValueError(f"the features of one batch have different numbers of rows {sorted(ns)}: they must be "
                             "the same samples")
        n = ns.pop()
        if n < 4:
            self.skipped += n
            return self
        return self.add_grams(self._grams(xs, "x"), self._grams(ys, "y"))

    def add_grams(self, Ks: torch.Tensor, Ls: torch.Tensor) -> "MinibatchCKA":
        """Add one batch given its Gram matrices: ``Ks`` (a, n, n) and ``Ls`` (b, n, n), float64."""
        xy = _hsic_unbiased_cross(Ks, Ls)
        xx, yy = _hsic_unbiased_self(Ks), _hsic_unbiased_self(Ls)
        if self.xy is None:
            self.xy, self.xx, self.yy = xy, xx, yy
            if self._single is None:
                self._single, self._shape = False, tuple(xy.shape)
        else:
            self.xy, self.xx, self.yy = self.xy + xy, self.xx + xx, self.yy + yy
        self.batches += 1
        self.samples += Ks.shape[-1]
        return self

    def value(self):
        if self.xy is None:
            raise ValueError("no minibatch of at least 4 samples was added yet: call update(x_batch, y_batch)")
        den = self.xx[:, None] * self.yy[None, :]
        out = torch.where(den > 0, self.xy / den.clamp_min(1e-300).sqrt(), torch.full_like(den, float("nan")))
        out = out.numpy()
        return float(out[0, 0]) if self._single else out


# ----------------------------------------------------------------------------------------- models
def _n_samples(data):
    try:
        return len(data.dataset) if hasattr(data, "dataset") and hasattr(data, "batch_size") else len(data)
    except TypeError:
        return None


def cka_matrix(model_a: nn.Module, model_b: nn.Module, data, layers_a: Sequence[str], layers_b: Sequence[str], *,
               batch_size: int = 256, kernel: str = "linear", sigma: float = 0.8, pool: str = "none",
               device=None, progress: bool | None = None, clone: bool = False, on_repeat: str = "error",
               max_batches: int | None = None):
    """Layer × layer minibatch CKA between ``model_a`` and ``model_b`` on ``data``: a DataFrame with
    one row per layer of ``layers_a`` and one column per layer of ``layers_b``.

    Streams ``data`` in batches of ``batch_size`` (a DataLoader's own batches when one is given): ONE
    forward pass per model per batch through :class:`kaviz.features.FeatureTap` (one pass in all when
    ``model_b is model_a``), every layer's Gram matrix formed once per batch, and the unbiased HSIC of
    every pair accumulated (:class:`MinibatchCKA`) — memory is one batch of features, whatever N.
    The estimate is the debiased minibatch CKA of Nguyen et al. (2021); with ``batch_size`` ≥ N it is
    exactly ``cka(x, y, debiased=True)``. Features are flattened (``pool="none"``, as in Kornblith et
    al.) or pooled (``"avg"``, ``"normalize-avg"``; see :func:`kaviz.features.pool_features`).
    Models run in eval mode under ``torch.no_grad`` and their modes are restored. ``max_batches``
    stops early (a quick look on part of the data). ``df.attrs`` records N, the batches and the estimator.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from . import default_device
    from .features import FeatureTap, eval_mode, iter_batches, pool_features

    if isinstance(layers_a, str):
        layers_a = [layers_a]
    if isinstance(layers_b, str):
        layers_b = [layers_b]
    layers_a, layers_b = list(dict.fromkeys(layers_a)), list(dict.fromkeys(layers_b))
    if not layers_a or not layers_b:
        raise ValueError("cka_matrix needs at least one layer of each model (layers_a, layers_b); "
                         "kaviz.models.stages(model) suggests some")
    if not isinstance(batch_size, int) or batch_size < 4:
        raise ValueError(f"batch_size must be an int >= 4 (the unbiased HSIC needs 4 samples per batch), got "
                         f"{batch_size!r}")
    _check_kernel(kernel, sigma)
    same = model_b is model_a
    dev_a = default_device(device) if device is not None else next((p.device for p in model_a.parameters()),
                                                                     torch.device("cpu"))
    dev_b = default_device(device) if device is not None else next((p.device for p in model_b.parameters()),
                                                                     torch.device("cpu"))
    acc = MinibatchCKA(kernel, sigma)
    taps_a = list(dict.fromkeys(layers_a + layers_b)) if same else layers_a
    total = _n_samples(data)
    show = progress if progress is not None else not os.environ.get("CI")
    bar = tqdm(total=total, desc="CKA", disable=not show, leave=False)

    def grams(feats, layers, side):
        out = []
        for i, l in enumerate(layers):
            f = pool_features(feats[l], pool).reshape(feats[l].shape[0], -1)
            # centre in the features' own precision (CKA is translation invariant), then Gram in float64
            f = (f - f.mean(0, keepdim=True)).to(torch.float64)
            if kernel == "linear":
                out.append(f @ f.T)
                continue
            d2 = _sq_distances(f)
            key = (side, i)
            if key not in acc._bw:
                acc._bw[key] = sigma * _median_distance(d2.cpu())
            bw = acc._bw[key]
            out.append(torch.ones_like(d2) if bw <= 0 else torch.exp(-d2 / (2.0 * bw * bw)))
        return torch.stack(out).cpu()

    batches = 0
    with eval_mode(model_a), eval_mode(model_b), torch.no_grad(), \
            FeatureTap(model_a, taps_a, clone=clone, on_repeat=on_repeat) as tap_a:
        tap_b = None if same else FeatureTap(model_b, layers_b, clone=clone, on_repeat=on_repeat)
        with (tap_b if tap_b is not None else _null()):
            for images, _ in iter_batches(data, batch_size, who="the data"):
                n = images.shape[0]
                model_a(images.to(dev_a, non_blocking=True))
                fa = {l: tap_a[l] for l in taps_a}
                if same:
                    fb = fa
                else:
                    model_b(images.to(dev_b, non_blocking=True))
                    fb = {l: tap_b[l] for l in layers_b}
                bar.update(n)
                if n < 4:
                    acc.skipped += n
                    continue
                acc.add_grams(grams(fa, layers_a, "x"), grams(fb, layers_b, "y"))
                batches += 1
                if max_batches is not None and batches >= max_batches:
                    break
    bar.close()
    if acc.batches == 0:
        raise ValueError("no batch of at least 4 samples: give cka_matrix more data or a larger batch_size")
    values = acc.value()
    values = np.atleast_2d(values)
    df = pd.DataFrame(values, index=pd.Index(layers_a, name="A"), columns=pd.Index(layers_b, name="B"))
    df.attrs.update({"n": acc.samples, "batches": acc.batches, "skipped": acc.skipped,
                     "kernel": kernel, "pool": pool,
                     "estimator": "minibatch debiased CKA (unbiased HSIC averaged over batches; Nguyen et al. 2021)"})
    return df


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------- controls
def layer_features(model: nn.Module, data, layers, *, pool: str = "none", batch_size: int = 256, device=None,
                   progress: bool | None = False) -> dict:
    """Features of ``layers`` for every sample of ``data`` (in memory, float32 NumPy arrays, one row
    per sample): :func:`kaviz.features.extract` without a store. For the few hundred images a CKA
    or a probe needs; for more, :func:`cka_matrix` streams."""
    from .features import extract

    layers = [layers] if isinstance(layers, str) else list(layers)
    store = extract(model, data, layers, pool=pool, batch_size=batch_size, device=device, progress=progress)
    return {l: np.asarray(store[l]).reshape(len(store[l]), -1) for l in layers}


def cka_controls(x, y, *, random=None, seed: int = 0, kernel: str = "linear", debiased: bool = True,
                 sigma: float = 0.8) -> dict:
    """CKA of two networks' features next to the controls that would fail a claim about it
    (DESIGN.md §4): ``network`` = cka(x, y); ``shuffled`` = cka(x, y with its rows permuted by
    ``seed``) — the same two feature sets with the image correspondence broken, which an unrelated
    pair of networks would also reach; ``random-init`` = cka(x, random) when ``random`` (the
    features of a randomly initialised network of B's architecture on the same images) is given —
    what the architecture alone shares with A. Debiased by default, so unrelated features score near
    0 at small N. Returns a dict of floats."""
    x, y = _matrix(x, "x"), _matrix(y, "y")
    _same_n(x, y)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    out = {"network": cka(x, y, kernel, debiased, sigma), "shuffled": cka(x, y[perm], kernel, debiased, sigma)}
    if random is not None:
        r = _matrix(random, "random")
        _same_n(x, r)
        out["random-init"] = cka(x, r, kernel, debiased, sigma)
    return out


class LayerView(nn.Module):
    """One layer of a network as a network of its own, average-pooled to ``size`` (H, W): its output
    (and its tappable module ``"view"``) is ``adaptive_avg_pool2d(model.<layer>, size)``. It lets a
    Trans-Net (which maps a feature to one of the same shape) compare layers of different spatial
    sizes, e.g. an 8×8 teacher stage with a 4×4 student stage (as :func:`kaviz.methods.cfl.match_spatial`
    does for CFL). The wrapped model is not changed (a :class:`kaviz.features.FeatureTap` reads the layer)."""

    def __init__(self, model: nn.Module, layer: str, size):
        super().__init__()
        self.model, self.layer = model, str(layer)
        self.view = nn.AdaptiveAvgPool2d(size)
        self.kaviz_spec = {"name": f"{_spec_name(model)}[{layer}→{tuple(np.atleast_1d(size))}]"}

    def forward(self, x):
        from .features import FeatureTap

        with FeatureTap(self.model, [self.layer], clone=True) as tap:
            self.model(x)
            f = tap[self.layer]
        if f.dim() != 4:
            raise ValueError(f"LayerView: layer {self.layer!r} gives shape {tuple(f.shape)}, "
                             "not a feature map (B, C, H, W)")
        return self.view(f)


def _spec_name(model):
    from .models import spec

    return spec(model).get("name", type(model).__name__)


def _shape_of(model, layer, example):
    from .features import FeatureTap, eval_mode

    with eval_mode(model), torch.no_grad(), FeatureTap(model, [layer], clone=True) as tap:
        model(example)
        return tuple(tap[layer].shape[1:])


# ------------------------------------------------------------------------------------------ probes
def _feature_dict(features, layers):
    from .features import FeatureStore

    if isinstance(features, FeatureStore):
        names = layers or features.layers
        return {l: features[l] for l in names}, features.targets
    if isinstance(features, Mapping):
        names = layers or list(features)
        missing = [l for l in names if l not in features]
        if missing:
            raise KeyError(f"layers {missing} are not in the features dict; it has {list(features)}")
        return {l: features[l] for l in names}, None
    return {"features": features}, None


def linear_probe(features, targets=None, *, cv: int = 5, layers: Iterable[str] | None = None, C: float = 1.0,
                 max_iter: int = 2000, seed: int = 0, control: bool = False):
    """Cross-validated linear-probe accuracy per layer: how linearly decodable the labels are from
    each layer's features.

    ``features``: a :class:`kaviz.features.FeatureStore` (its targets are used when ``targets`` is
    None), a dict layer → (N, ...) array, or one array. For each layer: a scikit-learn pipeline
    (``StandardScaler`` fitted on the training folds only, then multinomial ``LogisticRegression(C)``)
    scored on ``cv`` stratified, shuffled folds (``seed``). Returns a DataFrame indexed by layer with
    ``accuracy`` (mean over folds) and ``std`` (sample std over folds, ddof=1), ``folds``, ``n``, ``dim``
    and ``chance`` (the majority-class share). ``control=True`` adds the same probe on shuffled labels
    (``shuffled``, ``shuffled std``): the accuracy a probe reaches without any real signal.
    """
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    feats, store_targets = _feature_dict(features, list(layers) if layers is not None else None)
    y = store_targets if targets is None else targets
    if y is None:
        raise ValueError("linear_probe needs class labels: pass targets=..., or a FeatureStore extracted from "
                         "data that yields (image, label)")
    if isinstance(y, Mapping):
        raise ValueError(f"the targets are a dict {list(y)}; pass the class-id array as targets=...")
    y = np.asarray(y.cpu() if torch.is_tensor(y) else y).reshape(-1)
    if not isinstance(cv, int) or cv < 2:
        raise ValueError(f"cv must be an int >= 2 (the number of folds), got {cv!r}")
    _, counts = np.unique(y, return_counts=True)
    if counts.min() < cv:
        raise ValueError(f"the rarest class has {counts.min()} samples, fewer than cv={cv} folds; lower cv or add data")
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed)
    shuffled = np.random.default_rng(seed).permutation(y)
    # one BLAS thread: these matrices are small, and a multi-threaded OpenBLAS beside torch's OpenMP pool spent
    # ~30× the time synchronising threads (41 s vs 1.3 s for the comparison notebook's probes, same scores)
    with threadpool_limits(limits=1, user_api="blas"):
        return _probe_layers(feats, y, shuffled, folds, cv, counts, C, max_iter, control)


def _probe_layers(feats, y, shuffled, folds, cv, counts, C, max_iter, control):
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = []
    done = {}  # two layers with the very same features (e.g. a network's last stage and its classifier's input)
    for layer, f in feats.items():
        x = np.ascontiguousarray(f.cpu() if torch.is_tensor(f) else f, dtype=np.float64)
        x = x.reshape(len(x), -1)
        if len(x) != len(y):
            raise ValueError(f"layer {layer!r} has {len(x)} samples but there are {len(y)} targets")
        digest = (x.shape, hashlib.sha256(x.tobytes()).hexdigest())
        if digest in done:  # the same probe on the same numbers: the same scores, without fitting it again
            rows.append({**done[digest], "layer": layer})
            continue

        def score(labels, x=x):
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
            return cross_val_score(probe, x, labels, cv=folds, scoring="accuracy")

        s = score(y)
        row = {"layer": layer, "accuracy": float(s.mean()), "std": float(s.std(ddof=1)), "folds": cv,
               "n": len(y), "dim": x.shape[1], "chance": float(counts.max() / len(y))}
        if control:
            c = score(shuffled)
            row["shuffled"], row["shuffled std"] = float(c.mean()), float(c.std(ddof=1))
        rows.append(row)
        done[digest] = row
    return pd.DataFrame(rows).set_index("layer")


# ------------------------------------------------------------------------------ teacher consistency
def _example(data, n: int = 2) -> torch.Tensor:
    items = [data[i] for i in range(min(n, len(data)))]
    return torch.stack([it[0] if isinstance(it, (list, tuple)) else it for it in items])


class _Keyed(torch.utils.data.Dataset):
    """A ``Subset`` of a fingerprinted dataset, with a fingerprint of its own (for the feature cache)."""

    def __init__(self, subset, fingerprint: str):
        self.subset, self.fingerprint = subset, fingerprint

    def __len__(self):
        return len(self.subset)

    def __getitem__(self, i):
        return self.subset[i]


def _keyed(part, whole, tag: str):
    if isinstance(getattr(part, "fingerprint", None), str):
        return part
    from .data import digest, fingerprint

    idx = np.asarray(getattr(part, "indices", range(len(part))), dtype=np.int64)
    return _Keyed(part, f"{fingerprint(whole)}-{tag}-{digest(idx)[:12]}")


def teacher_consistency(student: nn.Module, teachers, data, student_layer: str, teacher_layers, *,
                        val_data=None, orders: int = 3, epochs: int = 100, seed: int = 0,
                        return_fits: bool = False, resize: bool = False, **fit_kwargs):
    """Which teacher did this part of the student come from? Knowledge consistency (Liang et al.,
    ICLR 2020; SPEC §3) of the student's ``student_layer`` feature with each teacher.

    For every teacher a Trans-Net g is trained to explain the student's feature x_S from the
    teacher's feature x_T (:func:`kaviz.methods.consistency.fit_transnet` on ``data``, statistics on
    ``val_data``; when ``val_data`` is None, a stratified quarter of ``data`` is held out with
    ``seed``). The table has one row per teacher: the share of Var(x_S) of each order's consistent
    component x⁽ᵏ⁾, of their sum g(x_T) (what that teacher explains) and of the inconsistent rest
    x^Δ = x_S − g(x_T) (what it does not), the absolute Var(x_S) and the learned gates
    (:func:`kaviz.methods.consistency.compare`). Shares need not add to 1 (components correlate).

    ``teachers``: a dict name → model (or a list: named ``teacher 0``, ...); include a control, e.g. a
    random-init network of a teacher's architecture, to see how much a teacher explains beyond chance.
    ``teacher_layers``: one layer for all, or a dict / list per teacher; each must have the student
    layer's shape — or, with ``resize=True``, the student layer's channels and a spatial size at least
    the student's: such a teacher layer is average-pooled to the student's grid (:class:`LayerView`).
    Extra keywords go to ``fit_transnet`` (``lr``, ``batch_size``, ``max_train``, ...).
    ``return_fits=True`` also returns the dict name → :class:`~kaviz.methods.consistency.Consistency`.
    """
    from .methods.consistency import compare, fit_transnet

    if isinstance(teachers, nn.Module):
        teachers = [teachers]
    if not isinstance(teachers, Mapping):
        teachers = {f"teacher {i}": t for i, t in enumerate(teachers)}
    if not teachers:
        raise ValueError("teacher_consistency needs at least one teacher")
    names = list(teachers)
    if isinstance(teacher_layers, str):
        t_layers = {n: teacher_layers for n in names}
    elif isinstance(teacher_layers, Mapping):
        missing = [n for n in names if n not in teacher_layers]
        if missing:
            raise KeyError(f"teacher_layers has no layer for teacher(s) {missing}; it has {list(teacher_layers)}")
        t_layers = dict(teacher_layers)
    else:
        t_layers = list(teacher_layers)
        if len(t_layers) != len(names):
            raise ValueError(f"{len(names)} teachers but {len(t_layers)} teacher_layers")
        t_layers = dict(zip(names, t_layers))
    train_data = data
    if val_data is None:
        from . import data as kdata

        sp = kdata.split(data, val=0.25, test=0.0, seed=seed)
        train_data, val_data = (_keyed(part, data, f"teacher_consistency-{kind}-{seed}")
                                for kind, part in (("train", sp.train), ("val", sp.val)))
    models = dict(teachers)
    if resize:
        example = _example(train_data)
        want = _shape_of(student, student_layer, example)
        for name in names:
            have = _shape_of(teachers[name], t_layers[name], example)
            if have != want and len(have) == 3 and len(want) == 3 and have[0] == want[0] \
                    and have[1] >= want[1] and have[2] >= want[2]:
                models[name] = LayerView(teachers[name], t_layers[name], want[1:])
                t_layers[name] = "view"
    fits = {}
    for name in names:
        fits[name] = fit_transnet(models[name], student, train_data, val_data, layer_a=t_layers[name],
                                  layer_b=student_layer, orders=orders, epochs=epochs, seed=seed,
                                  names=(name, "student"), **fit_kwargs)
    table = compare(fits, split="val")
    table.index.name = "teacher"
    table.insert(0, "teacher layer", [teacher_layers[n] if isinstance(teacher_layers, Mapping) else
                                      (teacher_layers if isinstance(teacher_layers, str) else list(teacher_layers)[i])
                                      for i, n in enumerate(names)])
    if resize:
        table.insert(1, "pooled to", [str(tuple(models[n].view.output_size))
                                      if isinstance(models[n], LayerView) else "—"
                                      for n in names])
    table.insert(1, "student layer", student_layer)
    table.attrs["definition"] = ("share: variance / Var(x_S) of the student's feature (centred per channel); "
                                 "g(x_A): all that the teacher explains; x^Δ: what it does not")
    return (table, fits) if return_fits else table
