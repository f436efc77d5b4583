"""Metrics. Classification over one label set or over a union of label sets (SPEC §0.1).

All functions take logits/scores and targets as torch tensors or NumPy arrays and return Python
floats or NumPy arrays, so they work the same on live outputs and on stored features.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "accuracy",
    "task_agnostic_accuracy",
    "task_aware_accuracy",
    "union_accuracies",
    "confusion_matrix",
    "per_class_accuracy",
    "knn_accuracy",
    "segmentation_scores",
    "depth_scores",
    "psnr",
    "ssim",
]


def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(targets) -> np.ndarray:
    t = _np(targets)
    if t.ndim != 1:
        raise ValueError(f"targets must be a 1-D array of class ids, got shape {t.shape}")
    if t.dtype.kind not in "iu":
        if t.size and not np.all(np.mod(t, 1) == 0):
            raise ValueError("targets must be integer class ids")
    return t.astype(np.int64)  # never a small int type: uint8 would alias classes >= 256 (SPEC §0.1)


def accuracy(logits, targets, topk: int = 1) -> float:
    """Share of samples whose target is among the ``topk`` highest scores; ``logits`` (N, K) or
    predicted ids (N,)."""
    s = _np(logits)
    t = _labels(targets)
    if len(s) != len(t):
        raise ValueError(f"{len(s)} predictions but {len(t)} targets")
    if len(t) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    if s.ndim == 1:
        if topk != 1:
            raise ValueError("top-k accuracy needs scores (N, K), not predicted ids")
        return float(np.mean(s.astype(np.int64) == t))
    if t.max() >= s.shape[1] or t.min() < 0:
        raise ValueError(f"targets range over [{t.min()}, {t.max()}] but the scores have {s.shape[1]} classes")
    if topk == 1:
        return float(np.mean(s.argmax(1) == t))
    top = np.argpartition(-s, kth=min(topk, s.shape[1]) - 1, axis=1)[:, :topk]
    return float(np.mean((top == t[:, None]).any(1)))


def task_agnostic_accuracy(logits, targets) -> float:
    """Argmax over all ΣK_t outputs against the offset label of the union (SPEC §0.1)."""
    return accuracy(logits, targets)


def task_aware_accuracy(logits, targets, origin, slices: Sequence[slice]) -> float:
    """For a sample from dataset t, argmax over teacher t's slice only (SPEC §0.1).

    ``targets`` are offset labels in the union space, ``origin`` the source index of each sample,
    ``slices[t]`` the label slice of source t.
    """
    s = _np(logits)
    t = _labels(targets)
    o = _labels(origin)
    if not (len(s) == len(t) == len(o)):
        raise ValueError(f"logits ({len(s)}), targets ({len(t)}) and origin ({len(o)}) differ in length")
    if len(o) and (o.max() >= len(slices) or o.min() < 0):
        raise ValueError(f"origin has source ids in [{o.min()}, {o.max()}] but {len(slices)} slices were given")
    correct = np.zeros(len(t), dtype=bool)
    for k, sl in enumerate(slices):
        rows = o == k
        if not rows.any():
            continue
        pred = s[rows][:, sl].argmax(1) + sl.start
        correct[rows] = pred == t[rows]
    return float(correct.mean())


def union_accuracies(logits, targets, origin, slices: Sequence[slice], names: Sequence[str] | None = None) -> dict:
    """Task-agnostic and task-aware accuracy overall and per source, as one flat dict."""
    s = _np(logits)
    t = _labels(targets)
    o = _labels(origin)
    out = {
        "task_agnostic": task_agnostic_accuracy(s, t),
        "task_aware": task_aware_accuracy(s, t, o, slices),
    }
    names = list(names) if names is not None else [str(i) for i in range(len(slices))]
    for k, name in enumerate(names):
        rows = o == k
        if rows.any():
            out[f"task_aware/{name}"] = task_aware_accuracy(s[rows], t[rows], np.full(rows.sum(), k), slices)
            out[f"task_agnostic/{name}"] = accuracy(s[rows], t[rows])
    return out


def confusion_matrix(predictions, targets, num_classes: int | None = None) -> np.ndarray:
    """Counts C[i, j] of samples with target i predicted as j, for any number of classes (int64).

    ``predictions`` are ids (N,) or scores (N, K) (argmax taken)."""
    p = _np(predictions)
    if p.ndim == 2:
        num_classes = num_classes or p.shape[1]
        p = p.argmax(1)
    p = p.astype(np.int64)
    t = _labels(targets)
    if len(p) != len(t):
        raise ValueError(f"{len(p)} predictions but {len(t)} targets")
    k = int(num_classes if num_classes is not None else max(p.max(initial=-1), t.max(initial=-1)) + 1)
    if len(t) and (max(p.max(), t.max()) >= k or min(p.min(), t.min()) < 0):
        raise ValueError(f"class ids must lie in [0, {k}); got predictions in [{p.min()}, {p.max()}], targets in [{t.min()}, {t.max()}]")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def per_class_accuracy(predictions, targets, num_classes: int | None = None) -> np.ndarray:
    """Recall of each class (NaN for a class without samples)."""
    cm = confusion_matrix(predictions, targets, num_classes)
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def knn_accuracy(features, labels, k: int = 5, metric: str = "cosine") -> float:
    """Leave-one-out k-nearest-neighbour accuracy of features (N, D) (flattened per sample): how
    well a layer separates the classes without training anything on it. Majority vote, ties to
    the nearest neighbour's class."""
    x = _np(features).reshape(len(_np(features)), -1).astype(np.float64)
    y = _labels(labels)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
    if not 1 <= k < len(y):
        raise ValueError(f"k must be in [1, {len(y) - 1}] for {len(y)} samples, got {k}")
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        d = -x @ x.T
    elif metric == "euclidean":
        sq = (x * x).sum(1)
        d = sq[:, None] + sq[None, :] - 2 * x @ x.T
    else:
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    np.fill_diagonal(d, np.inf)
    nn_idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    votes = y[nn_idx]
    correct = 0
    for row, v in zip(range(len(y)), votes):
        counts = np.bincount(v)
        best = np.flatnonzero(counts == counts.max())
        pred = best[0] if len(best) == 1 else next(c for c in v if c in best)
        correct += pred == y[row]
    return float(correct / len(y))


# ----------------------------------------------------------------------------------------- dense
# Segmentation, depth and reconstruction metrics for the dense papers (SPEC §4.2–4.3). Inputs are
# per-pixel maps (N, H, W) or (N, C, H, W); ``ignore_index`` pixels (void) are left out.

def segmentation_scores(predictions, targets, num_classes: int, ignore_index: int = 255) -> dict:
    """Pixel accuracy, mean IoU over the classes that occur (in targets or predictions) and the
    per-class IoU (NaN for a class absent from both). ``predictions``: ids (N,H,W) or logits (N,K,H,W)."""
    p = _np(predictions)
    if p.ndim == 4:
        p = p.argmax(1)
    t = _np(targets).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"predictions {p.shape} and targets {t.shape} must have the same shape (N, H, W)")
    valid = t != ignore_index
    if not valid.any():
        raise ValueError("every target pixel is ignore_index: nothing to score")
    cm = confusion_matrix(p[valid].ravel(), t[valid].ravel(), num_classes)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"pixel_accuracy": float(tp.sum() / cm.sum()), "mIoU": float(np.nanmean(iou)), "iou": iou}


def depth_scores(predictions, targets, valid=None, min_depth: float = 1e-3) -> dict:
    """RMSE, absolute relative error and δ<1.25 (share of pixels with max(p/t, t/p) < 1.25) over
    valid pixels (targets > ``min_depth`` and finite, and ``valid`` if given)."""
    p = _np(predictions).astype(np.float64)
    t = _np(targets).astype(np.float64)
    if p.shape != t.shape:
        p = p.reshape(t.shape) if p.size == t.size else p
    if p.shape != t.shape:
        raise ValueError(f"predictions {p.shape} and targets {t.shape} must have the same shape")
    m = np.isfinite(t) & (t > min_depth)
    if valid is not None:
        m &= _np(valid).astype(bool).reshape(m.shape)
    if not m.any():
        raise ValueError("no valid depth pixels to score")
    p, t = np.maximum(p[m], min_depth), t[m]
    ratio = np.maximum(p / t, t / p)
    return {"rmse": float(np.sqrt(np.mean((p - t) ** 2))), "abs_rel": float(np.mean(np.abs(p - t) / t)),
            "delta1": float(np.mean(ratio < 1.25))}


def psnr(images, references, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, averaged over images: 10·log10(range² / MSE)."""
    a = _np(images).astype(np.float64)
    b = _np(references).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images {a.shape} and references {b.shape} must have the same shape")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        vals = 10 * np.log10(data_range ** 2 / np.maximum(mse, 1e-12))
    return float(vals.mean())


def ssim(images, references, data_range: float = 1.0, window: int = 7, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, averaged over channels,
    positions and images; images (N, C, H, W) in [0, data_range]. Computed with torch conv2d."""
    import torch.nn.functional as F

    a = torch.as_tensor(_np(images), dtype=torch.float64)
    b = torch.as_tensor(_np(references), dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) arrays of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(a.shape[-2:])} are smaller than the {window}×{window} window")
    c = a.shape[1]
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(z):
        return F.conv2d(z, kernel, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
