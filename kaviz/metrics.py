"""Metrics. Classification over one label set or over a union of label sets (SPEC §0.1).

All functions take logits/scores and targets as torch tensors or NumPy arrays and return Python
floats or NumPy arrays, so they work the same on live outputs and on stored features.
"""
from __future__ import annotations

import math
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
    "iou_scores",
    "SegmentationMeter",
    "depth_scores",
    "DEPTH_METRICS",
    "DEPTH_METRICS_FULL",
    "depth_valid",
    "DepthMeter",
    "NORMAL_METRICS",
    "NORMAL_THRESHOLDS",
    "normal_valid",
    "angular_errors",
    "normal_scores",
    "NormalMeter",
    "dense_meter",
    "psnr",
    "SSIM_WINDOW",
    "ssim_index",
    "ssim",
    "ssim_loss",
    "MS_SSIM_WEIGHTS",
    "ms_ssim_index",
    "ms_ssim",
    "ms_ssim_loss",
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
        raise ValueError(f"class ids must lie in [0, {k}); got predictions in [{p.min()}, {p.max()}], targets in "
                         f"[{t.min()}, {t.max()}]")
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

def iou_scores(cm: np.ndarray) -> dict:
    """Pixel accuracy, mean IoU over the classes that occur (in targets or predictions) and the per-class
    IoU (NaN for a class absent from both) of a confusion matrix (rows = prediction, columns = target)."""
    cm = np.asarray(cm)
    if cm.sum() == 0:
        raise ValueError("no labelled pixels were scored (every target pixel is ignore_index?)")
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"pixel_accuracy": float(tp.sum() / cm.sum()), "mIoU": float(np.nanmean(iou)), "iou": iou}


def segmentation_scores(predictions, targets, num_classes: int, ignore_index: int = 255) -> dict:
    """Pixel accuracy, mean IoU over the classes that occur (in targets or predictions) and the
    per-class IoU (NaN for a class absent from both). ``predictions``: ids (N,H,W) or logits (N,K,H,W).
    For data that does not fit in memory use :class:`SegmentationMeter` (the same numbers, batch by batch)."""
    meter = SegmentationMeter(num_classes, ignore_index)
    meter.update(predictions, targets)
    return meter.result(per_class=True)


class SegmentationMeter:
    """Streaming segmentation scores: a confusion matrix over the pixels whose target is not
    ``ignore_index``, summed batch by batch; ``result()`` as :func:`segmentation_scores`
    (``pixel_accuracy``, ``mIoU``; ``per_class=True`` adds ``iou``)."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise ValueError(f"a segmentation meter needs num_classes >= 2, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.cm = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, predictions, targets) -> None:
        """``predictions``: logits (B, K, H, W) or ids (B, H, W); ``targets``: ids (B, H, W)."""
        p = _np(predictions)
        if p.ndim == 4:
            p = p.argmax(1)
        t = _np(targets).astype(np.int64)
        if p.shape != t.shape:
            raise ValueError(f"predictions {p.shape} and targets {t.shape} differ in shape: they must have the same "
                             "shape (N, H, W)")
        valid = t != self.ignore_index
        self.cm += confusion_matrix(p[valid].ravel(), t[valid].ravel(), self.num_classes)

    def result(self, per_class: bool = False) -> dict:
        out = iou_scores(self.cm)
        if not per_class:
            del out["iou"]
        return out


#: The depth metrics of :func:`depth_scores` / :class:`DepthMeter`: the three reported by default and the
#: standard full set of NYUv2 depth tables (Eigen et al. 2014): with p the prediction and t the target over
#: valid pixels, ``abs_rel = mean |p−t|/t``, ``sq_rel = mean (p−t)²/t``, ``rmse = √mean (p−t)²``,
#: ``log_rmse = √mean (ln p − ln t)²``, ``delta{k} = share of max(p/t, t/p) < 1.25^k``.
DEPTH_METRICS = ("rmse", "abs_rel", "delta1")
DEPTH_METRICS_FULL = ("abs_rel", "sq_rel", "rmse", "log_rmse", "delta1", "delta2", "delta3")


def _depth_sums(p, t, lib) -> dict:
    """Sums over valid pixels (p, t already selected and clamped) of every per-pixel term."""
    ratio = lib.maximum(p / t, t / p)
    d2 = (p - t) ** 2
    return {"sq": float(d2.sum()), "rel": float((abs(p - t) / t).sum()), "sq_rel": float((d2 / t).sum()),
            "log_sq": float(((lib.log(p) - lib.log(t)) ** 2).sum()),
            "delta": float((ratio < 1.25).sum()), "delta2": float((ratio < 1.25 ** 2).sum()),
            "delta3": float((ratio < 1.25 ** 3).sum()), "n": int(p.numel() if lib is torch else p.size)}


def _depth_result(sums: dict, full: bool) -> dict:
    n = sums["n"]
    out = {"rmse": float(np.sqrt(sums["sq"] / n)), "abs_rel": sums["rel"] / n, "delta1": sums["delta"] / n}
    if not full:
        return out
    out.update({"sq_rel": sums["sq_rel"] / n, "log_rmse": float(np.sqrt(sums["log_sq"] / n)),
                "delta2": sums["delta2"] / n, "delta3": sums["delta3"] / n})
    return {k: out[k] for k in DEPTH_METRICS_FULL}


def depth_scores(predictions, targets, valid=None, min_depth: float = 1e-3, full: bool = False) -> dict:
    """RMSE, absolute relative error and δ<1.25 (share of pixels with max(p/t, t/p) < 1.25) over
    valid pixels (targets > ``min_depth`` and finite, and ``valid`` if given); predictions are clamped
    below at ``min_depth``. ``full=True``: the full set :data:`DEPTH_METRICS_FULL` (adds sq-rel,
    log-RMSE, δ<1.25², δ<1.25³). For data that does not fit in memory use :class:`DepthMeter`."""
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
    if not full:
        ratio = np.maximum(p / t, t / p)
        return {"rmse": float(np.sqrt(np.mean((p - t) ** 2))), "abs_rel": float(np.mean(np.abs(p - t) / t)),
                "delta1": float(np.mean(ratio < 1.25))}
    return _depth_result(_depth_sums(p, t, np), full=True)


def depth_valid(targets: torch.Tensor, min_depth: float = 1e-3) -> torch.Tensor:
    """Pixels with a depth to score: finite and above ``min_depth`` (NYUv2 stores 0 where the sensor saw nothing)."""
    return torch.isfinite(targets) & (targets > min_depth)


class DepthMeter:
    """Streaming depth scores: sums over valid pixels (:func:`depth_valid`), predictions clamped below at
    ``min_depth``, in float64, batch by batch; ``result()`` gives ``rmse``, ``abs_rel`` and ``delta1``
    as :func:`depth_scores` (``full=True``: the full set :data:`DEPTH_METRICS_FULL`)."""

    def __init__(self, min_depth: float = 1e-3, full: bool = False):
        self.min_depth = min_depth
        self.full = bool(full)
        self.sums = {"sq": 0.0, "rel": 0.0, "delta": 0.0, "n": 0}
        if self.full:
            self.sums.update({"sq_rel": 0.0, "log_sq": 0.0, "delta2": 0.0, "delta3": 0.0})

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """``predictions``: depth (B, 1, H, W) or (B, H, W); ``targets``: (B, H, W)."""
        pred = predictions.detach().cpu()
        pred = pred[:, 0] if pred.dim() == 4 else pred
        t = targets.detach().cpu()
        if pred.shape != t.shape:
            raise ValueError(f"depth predictions {tuple(pred.shape)} and targets {tuple(t.shape)} differ in shape")
        t = t.double()
        m = depth_valid(t, self.min_depth)
        p, t = pred.double()[m].clamp_min(self.min_depth), t[m]
        if self.full:
            for k, v in _depth_sums(p, t, torch).items():
                self.sums[k] += v
            return
        ratio = torch.maximum(p / t, t / p)
        self.sums["sq"] += float(((p - t) ** 2).sum())
        self.sums["rel"] += float(((p - t).abs() / t).sum())
        self.sums["delta"] += float((ratio < 1.25).sum())
        self.sums["n"] += int(m.sum())

    def result(self) -> dict:
        n = self.sums["n"]
        if n == 0:
            raise ValueError("no valid depth pixels were scored")
        if self.full:
            return _depth_result(self.sums, full=True)
        return {"rmse": float(np.sqrt(self.sums["sq"] / n)), "abs_rel": self.sums["rel"] / n,
                "delta1": self.sums["delta"] / n}


#: Surface-normal metrics (the standard set of Eigen & Fergus 2015 and the NYUv2 normal tables): mean
#: and median angular error in degrees between the predicted and the true normal, and the shares of
#: pixels whose error is below 11.25°, 22.5° and 30° (``NORMAL_THRESHOLDS``).
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)
NORMAL_METRICS = ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30")


def _check_normal_maps(predictions: torch.Tensor, targets: torch.Tensor):
    if targets.dim() < 2 or targets.shape[1] != 3:
        raise ValueError(f"normal maps must be (B, 3, H, W) (x, y, z per pixel), got targets {tuple(targets.shape)}")
    if predictions.shape != targets.shape:
        raise ValueError(f"normal predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in "
                         "shape; both must be (B, 3, H, W)")


def normal_valid(targets: torch.Tensor, min_norm: float = 1e-3) -> torch.Tensor:
    """Pixels with a normal to score, (B, H, W) for targets (B, 3, H, W): all three components finite
    and the vector longer than ``min_norm`` (datasets store (0, 0, 0) where no normal is known)."""
    if targets.dim() < 2 or targets.shape[1] != 3:
        raise ValueError(f"normal maps must be (B, 3, H, W), got {tuple(targets.shape)}")
    finite = torch.isfinite(targets).all(1)
    return finite & (torch.nan_to_num(targets).norm(dim=1) > min_norm)


def angular_errors(predictions, targets) -> torch.Tensor:
    """Per-pixel angle in degrees (float64, (B, H, W)) between predicted and true normals (B, 3, H, W),
    neither of which needs to be of unit length: ``atan2(|p × t|, p · t)``, accurate also near 0°
    (unlike ``acos`` of the cosine). A zero-length prediction has no direction and counts as 90°; a
    non-finite one gives NaN."""
    p = torch.as_tensor(predictions).detach().cpu().double()
    t = torch.as_tensor(targets).detach().cpu().double()
    _check_normal_maps(p, t)
    cross = torch.linalg.vector_norm(torch.linalg.cross(p, t, dim=1), dim=1)
    err = torch.rad2deg(torch.atan2(cross, (p * t).sum(1)))
    return torch.where(p.norm(dim=1) == 0, torch.full_like(err, 90.0), err)


def _normal_result(total: float, n: int, counts, median: float) -> dict:
    out = {"mean_angle": total / n, "median_angle": median}
    out.update({k: c / n for k, c in zip(NORMAL_METRICS[2:], counts)})
    return out


def normal_scores(predictions, targets, valid=None, min_norm: float = 1e-3) -> dict:
    """:data:`NORMAL_METRICS` over the valid pixels (:func:`normal_valid`, and ``valid`` (B, H, W) if
    given): mean and (exact) median angular error in degrees (:func:`angular_errors`) and the shares
    with an error below 11.25°, 22.5° and 30°. Predictions (B, 3, H, W) need not be normalised. For
    data that does not fit in memory use :class:`NormalMeter`."""
    p, t = torch.as_tensor(predictions), torch.as_tensor(targets)
    _check_normal_maps(p, t)
    m = normal_valid(t.detach().cpu().double(), min_norm)
    if valid is not None:
        m &= torch.as_tensor(valid).cpu().bool().reshape(m.shape)
    if not bool(m.any()):
        raise ValueError("no valid normal pixels to score")
    e = angular_errors(p, t)[m].numpy()
    return _normal_result(float(e.sum()), e.size, [int((e < a).sum()) for a in NORMAL_THRESHOLDS],
                          float(np.median(e)))


class NormalMeter:
    """Streaming :data:`NORMAL_METRICS` (see :func:`normal_scores`), batch by batch in float64: the
    mean and the shares below 11.25°, 22.5° and 30° are exact; the median is read off a histogram of
    the errors with bins of ``resolution`` degrees (each of the two middle errors placed linearly
    within its bin), so it is within ``resolution`` of the exact median. Any NaN error (a non-finite
    prediction) makes the mean and the median NaN."""

    def __init__(self, min_norm: float = 1e-3, resolution: float = 0.01):
        if not (isinstance(resolution, (int, float)) and 0 < resolution <= 1):
            raise ValueError(f"resolution must be in (0, 1] degrees, got {resolution!r}")
        self.min_norm = min_norm
        self.resolution = float(resolution)
        self.hist = np.zeros(int(math.ceil(180.0 / self.resolution)), dtype=np.int64)
        self.sums = {"angle": 0.0, "n": 0, "nan": 0, "within": [0] * len(NORMAL_THRESHOLDS)}

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """``predictions`` and ``targets``: normal maps (B, 3, H, W)."""
        p, t = predictions.detach().cpu(), targets.detach().cpu()
        _check_normal_maps(p, t)
        e = angular_errors(p, t)[normal_valid(t.double(), self.min_norm)].numpy()
        bad = np.isnan(e)
        self.sums["n"] += int(e.size)
        self.sums["nan"] += int(bad.sum())
        self.sums["angle"] += float(e.sum())
        for i, a in enumerate(NORMAL_THRESHOLDS):
            self.sums["within"][i] += int((e < a).sum())
        e = e[~bad]
        idx = np.minimum((e / self.resolution).astype(np.int64), len(self.hist) - 1)
        self.hist += np.bincount(idx, minlength=len(self.hist))

    def _median(self) -> float:
        # the mean of the two middle order statistics (as np.median), each placed inside its bin
        if self.sums["nan"]:
            return float("nan")
        n, cum = self.sums["n"], np.cumsum(self.hist)

        def order_statistic(j):  # the j-th smallest error (0-based), to within one bin
            b = int(np.searchsorted(cum, j, side="right"))
            before = cum[b - 1] if b else 0
            return (b + (j - before + 0.5) / self.hist[b]) * self.resolution

        return float((order_statistic((n - 1) // 2) + order_statistic(n // 2)) / 2)

    def result(self) -> dict:
        n = self.sums["n"]
        if n == 0:
            raise ValueError("no valid normal pixels were scored")
        return _normal_result(self.sums["angle"], n, self.sums["within"], self._median())


def dense_meter(kind: str, num_classes: int | None = None, ignore_index: int = 255, min_depth: float = 1e-3,
                full_depth: bool = False):
    """A :class:`SegmentationMeter` (``kind="segmentation"``), a :class:`DepthMeter` (``kind="depth"``;
    ``full_depth``: the full metric set :data:`DEPTH_METRICS_FULL`) or a :class:`NormalMeter`
    (``kind="normals"``)."""
    if kind == "segmentation":
        return SegmentationMeter(num_classes, ignore_index)
    if kind == "depth":
        return DepthMeter(min_depth, full=full_depth)
    if kind == "normals":
        return NormalMeter()
    raise ValueError(f"dense_meter: kind must be 'segmentation', 'depth' or 'normals', got {kind!r}")


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


#: The standard SSIM window (Wang et al. 2004; scikit-image with ``gaussian_weights=True``): 11×11, σ = 1.5.
SSIM_WINDOW = 11


def _ssim_kernel(channels: int, window: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()


def _ssim_maps(images: torch.Tensor, references: torch.Tensor, data_range: float, window: int, sigma: float,
               with_cs: bool = False):
    """The SSIM map (and, with ``with_cs``, the contrast–structure map ``(2σ_ab + c2)/(σ_a² + σ_b² + c2)``
    that MS-SSIM uses at its finer scales) over valid window positions."""
    import torch.nn.functional as F

    if images.shape != references.shape or images.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of one shape, got {tuple(images.shape)} "
                         f"and {tuple(references.shape)}")
    if min(images.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(images.shape[-2:])} are smaller than the {window}×{window} SSIM window; "
                         "pass a smaller window=")
    c = images.shape[1]
    kernel = _ssim_kernel(c, window, sigma, images.dtype, images.device)

    def blur(z):
        return F.conv2d(z, kernel, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(images), blur(references)
    var_a = blur(images * images) - mu_a ** 2
    var_b = blur(references * references) - mu_b ** 2
    cov = blur(images * references) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    if not with_cs:
        return s, None
    return s, (2 * cov + c2) / (var_a + var_b + c2)


def ssim_index(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
               sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) as a differentiable scalar tensor in the inputs' dtype:
    a Gaussian window (``window``×``window``, σ = ``sigma``; 11×11 by default, as the paper and scikit-image),
    c1 = (0.01·L)², c2 = (0.03·L)², averaged over channels, valid positions and images.
    Images (N, C, H, W) in [0, data_range]."""
    return _ssim_maps(images, references, data_range, window, sigma)[0].mean()


#: The standard MS-SSIM scale weights (Wang, Simoncelli & Bovik 2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_index(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0,
                  window: int = SSIM_WINDOW, sigma: float = 1.5, weights=MS_SSIM_WEIGHTS) -> torch.Tensor:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) as a differentiable scalar tensor, on the same
    SSIM maps as :func:`ssim_index`: with M = ``len(weights)`` scales (2×2 average pooling between
    them), ``MS-SSIM = Π_{j<M} cs_j^{w_j} · ssim_M^{w_M}``, where ``cs_j`` is the mean
    contrast–structure term at scale j and ``ssim_M`` the mean SSIM at the coarsest scale; the means
    are taken per image (clamped below at 1e-6 before the power, as common implementations clamp at
    0, so that a negative correlation cannot give NaN), and the result is averaged over images. The coarsest scale
    must still hold the window: images need ``window · 2^(M−1)`` pixels a side; for small images pass
    fewer ``weights`` (e.g. ``MS_SSIM_WEIGHTS[:3]``, renormalised here to sum to 1)."""
    import torch.nn.functional as F

    w = torch.as_tensor(list(weights), dtype=images.dtype, device=images.device)
    if w.dim() != 1 or len(w) == 0 or bool((w < 0).any()):
        raise ValueError(f"weights must be a non-empty list of non-negative scale weights, got {weights!r}")
    w = w / w.sum()
    m = len(w)
    need = window * 2 ** (m - 1)
    if min(images.shape[-2:]) < need:
        raise ValueError(f"MS-SSIM with {m} scales and a {window}×{window} window needs images of at least "
                         f"{need}×{need} pixels, got {tuple(images.shape[-2:])}; pass fewer scales "
                         f"(weights=MS_SSIM_WEIGHTS[:k]) or a smaller window=")
    a, b = images, references
    factors = []
    for j in range(m):
        s, cs = _ssim_maps(a, b, data_range, window, sigma, with_cs=j < m - 1)
        v = (cs if j < m - 1 else s).flatten(1).mean(1)  # per image
        factors.append(v.clamp_min(1e-6) ** w[j])  # a finite gradient also at the clamp
        if j < m - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    return torch.stack(factors).prod(0).mean()


def ms_ssim(images, references, data_range: float = 1.0, window: int = SSIM_WINDOW, sigma: float = 1.5,
            weights=MS_SSIM_WEIGHTS) -> float:
    """:func:`ms_ssim_index` in float64 as a number."""
    a = torch.as_tensor(_np(images), dtype=torch.float64)
    b = torch.as_tensor(_np(references), dtype=torch.float64)
    return float(ms_ssim_index(a, b, data_range, window, sigma, weights))


def ms_ssim_loss(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
                 sigma: float = 1.5, weights=MS_SSIM_WEIGHTS) -> torch.Tensor:
    """``1 − ms_ssim_index(images, references)``: a differentiable training loss."""
    return 1.0 - ms_ssim_index(images, references, data_range, window, sigma, weights)


def ssim(images, references, data_range: float = 1.0, window: int = SSIM_WINDOW, sigma: float = 1.5) -> float:
    """:func:`ssim_index` in float64 as a number (arrays or tensors, (N, C, H, W) in [0, data_range])."""
    a = torch.as_tensor(_np(images), dtype=torch.float64)
    b = torch.as_tensor(_np(references), dtype=torch.float64)
    return float(ssim_index(a, b, data_range, window, sigma))


def ssim_loss(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
              sigma: float = 1.5) -> torch.Tensor:
    """``1 − ssim_index(images, references)``: a differentiable training loss."""
    return 1.0 - ssim_index(images, references, data_range, window, sigma)


# ------------------------------------------------------------------------------------ multi-label
# Multi-label classification metrics (SPEC §2, LSHFM): VOC-style mean average precision with
# "difficult" image–class pairs ignored, and the COCO-style precision / recall / F1 at a threshold.
# Scores are (N, K) logits or probabilities, targets (N, K) multi-hot in {0, 1}, difficult (N, K)
# bool (optional). Tied scores form one threshold (a block of the ranking), so AP never depends on
# the order of the input rows.

__all__ += ["AP_DEFINITIONS", "average_precision", "multilabel_map", "multilabel_prf", "multilabel_report",
            "MissingPositivesWarning"]


class MissingPositivesWarning(UserWarning):
    """A class has no positive (non-difficult) example: its AP is undefined and left out of mAP."""


def _multilabel_inputs(scores, targets, difficult=None):
    s = _np(scores)
    t = _np(targets)
    if s.ndim == 1:
        s = s[:, None]
    if t.ndim == 1:
        t = t[:, None]
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must both be (N, K) arrays of one shape "
                         "(one row per image, one column per class)")
    if s.shape[0] == 0:
        raise ValueError("multi-label metrics of an empty set are undefined (no rows)")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        bad = np.argwhere(~np.isfinite(s))[0]
        raise ValueError(f"scores must be finite; row {bad[0]}, class {bad[1]} is {s[tuple(bad)]} "
                         "(a diverged model? check the training loss)")
    if t.dtype == bool:
        t = t.astype(np.int64)
    if not np.all((t == 0) | (t == 1)):
        vals = np.unique(t)[:6]
        raise ValueError(f"targets must be multi-hot (0 or 1), found values {vals.tolist()}; pass VOC's "
                         "'difficult' flags through difficult=..., not as a third target value")
    t = t.astype(bool)
    if difficult is None:
        d = np.zeros_like(t)
    else:
        d = _np(difficult)
        if d.ndim == 1:
            d = d[:, None]
        if d.shape != t.shape:
            raise ValueError(f"difficult {d.shape} must have the shape of targets {t.shape}")
        if d.dtype != bool:
            if not np.all((d == 0) | (d == 1)):
                raise ValueError("difficult must be boolean flags (0/1)")
            d = d.astype(bool)
    return s, t, d


def _pr_points(s: np.ndarray, t: np.ndarray):
    """One class's (recall, precision) points, one per distinct score (tied scores taken together as
    one threshold: the last row of each block of ties), in order of decreasing score; ``None`` when
    the class has no positive."""
    npos = int(t.sum())
    if npos == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    return tp[last] / npos, tp[last] / (tp[last] + fp[last])


def _ap_one(s: np.ndarray, t: np.ndarray) -> float:
    """All-point interpolated AP of one class (VOC2010+ devkit): the area under the precision
    envelope ``p̂(r) = max_{r' >= r} p(r')``, with tied scores taken together as one threshold."""
    points = _pr_points(s, t)
    if points is None:
        return float("nan")
    rec, prec = points
    mrec = np.r_[0.0, rec, 1.0]
    mpre = np.r_[0.0, prec, 0.0]
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def _ap_non_interpolated(s: np.ndarray, t: np.ndarray) -> float:
    """Non-interpolated AP of one class: the mean, over the true positives, of the precision at each
    one's rank, ``Σ_i (r_i − r_{i−1}) · p(r_i)`` with no envelope; tied scores form one threshold
    (each positive of a block of ties gets the block's precision), as scikit-learn's
    ``average_precision_score``."""
    points = _pr_points(s, t)
    if points is None:
        return float("nan")
    rec, prec = points
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


#: The average-precision definitions :func:`average_precision` offers, by what they compute.
#: ``"all_point"``: VOC2010+ area under the precision envelope (the default, SPEC §2);
#: ``"non_interpolated"``: the mean of the precision at each true positive's rank (the LSHFM reference
#: code's "COCO mAP"; not COCO detection's 101-point AP).
AP_DEFINITIONS = {"all_point": _ap_one, "non_interpolated": _ap_non_interpolated}


def _ap_function(ap: str):
    if ap not in AP_DEFINITIONS:
        raise ValueError(f"ap must be one of {list(AP_DEFINITIONS)} ('all_point': VOC area under the precision "
                         f"envelope; 'non_interpolated': mean precision at each true positive's rank), got {ap!r}")
    return AP_DEFINITIONS[ap]


def average_precision(scores, targets, difficult=None, ap: str = "all_point") -> np.ndarray:
    """Per-class average precision, an array (K,) in [0, 1]; by default VOC all-point interpolation.

    For class k, the images are ranked by score; ``difficult`` image–class pairs are removed
    from the ranking (neither true nor false positives: VOC's "0" label); precision p and recall r
    are taken at every distinct score (tied scores form one threshold), and
    ``AP_k = Σ_i (r_{i+1} − r_i) · max_{r >= r_{i+1}} p(r)`` (``ap="all_point"``), or
    ``AP_k = Σ_i (r_{i+1} − r_i) · p(r_{i+1})`` — the mean of the precision at each true positive's
    rank, no interpolation (``ap="non_interpolated"``, the LSHFM reference code's COCO metric;
    never above the all-point value). A class without any non-difficult positive gets NaN (its AP
    is undefined).
    """
    fn = _ap_function(ap)
    s, t, d = _multilabel_inputs(scores, targets, difficult)
    out = np.empty(s.shape[1], dtype=np.float64)
    for k in range(s.shape[1]):
        keep = ~d[:, k]
        out[k] = fn(s[keep, k], t[keep, k])
    return out


def _no_positive_message(missing, class_names=None) -> str:
    names = [str(class_names[k]) if class_names is not None else str(k) for k in missing]
    return (f"{len(missing)} class(es) have no positive (non-difficult) example: {', '.join(names[:10])}"
            f"{' ...' if len(names) > 10 else ''}; their AP is undefined and they are left out of the mAP. "
            "Use a larger evaluation split to cover every class.")


def multilabel_map(scores, targets, difficult=None, ap: str = "all_point") -> float:
    """Mean over classes of :func:`average_precision` (VOC all-point AP, difficult pairs ignored),
    a float in [0, 1]. ``ap="non_interpolated"``: the mean of the precision at each true positive's
    rank instead (see :data:`AP_DEFINITIONS`).

    Classes without a positive are left out of the mean and reported with a
    :class:`MissingPositivesWarning` naming them; if no class has a positive, ``ValueError``.
    """
    ap = average_precision(scores, targets, difficult, ap=ap)
    missing = np.flatnonzero(np.isnan(ap))
    if len(missing) == len(ap):
        raise ValueError("no class has a positive (non-difficult) example: mAP is undefined")
    if len(missing):
        import warnings

        warnings.warn(_no_positive_message(missing), MissingPositivesWarning, stacklevel=2)
    return float(np.nanmean(ap))


def multilabel_prf(scores, targets, threshold: float = 0.5, difficult=None, logits: bool = True) -> dict:
    """COCO-convention precision, recall and F1 at a threshold (Chen et al., ML-GCN, CVPR 2019).

    A class is predicted when its probability is >= ``threshold`` (``logits=True``: probability
    = sigmoid(score); ``logits=False``: the scores are probabilities in [0, 1]). ``difficult``
    pairs are left out of every count. With N^c_p predicted, N^c_g ground-truth and N^c_c correct
    images of class c:

    - per class: ``CP = mean_c N^c_c / N^c_p``, ``CR = mean_c N^c_c / N^c_g``, ``CF1 = 2·CP·CR / (CP + CR)``
      (a class never predicted counts precision 0; a class without positives is left out of CR);
    - overall: ``OP = Σ N_c / Σ N_p``, ``OR = Σ N_c / Σ N_g``, ``OF1 = 2·OP·OR / (OP + OR)``.
    """
    s, t, d = _multilabel_inputs(scores, targets, difficult)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not 0 < threshold < 1:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
    if logits:
        prob = 1.0 / (1.0 + np.exp(-np.clip(s, -60, 60)))
    else:
        if s.min() < 0 or s.max() > 1:
            raise ValueError(f"logits=False expects probabilities in [0, 1], got scores in [{s.min():.3g}, "
                             f"{s.max():.3g}]; pass logits=True for raw model outputs")
        prob = s
    keep = ~d
    pred = (prob >= threshold) & keep
    gt = t & keep
    n_c = (pred & gt).sum(0).astype(np.float64)
    n_p = pred.sum(0).astype(np.float64)
    n_g = gt.sum(0).astype(np.float64)
    has_pos = n_g > 0
    if not has_pos.any():
        raise ValueError("no class has a positive (non-difficult) example: recall is undefined")
    cp = float(np.mean(np.where(n_p > 0, n_c / np.maximum(n_p, 1), 0.0)))
    cr = float(np.mean(n_c[has_pos] / n_g[has_pos]))
    op = float(n_c.sum() / n_p.sum()) if n_p.sum() > 0 else 0.0
    orc = float(n_c.sum() / n_g.sum())

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    return {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": orc, "OF1": f1(op, orc)}


def multilabel_report(scores, targets, difficult=None, threshold: float = 0.5, logits: bool = True,
                      class_names=None) -> dict:
    """Everything at once, without warnings: ``mAP``, ``ap`` (per class, NaN where undefined),
    ``missing`` (names of the classes without positives), and the six numbers of
    :func:`multilabel_prf`."""
    ap = average_precision(scores, targets, difficult)
    missing = np.flatnonzero(np.isnan(ap))
    if len(missing) == len(ap):
        raise ValueError("no class has a positive (non-difficult) example: mAP is undefined")
    names = [str(class_names[k]) if class_names is not None else int(k) for k in missing]
    return {"mAP": float(np.nanmean(ap)), "ap": ap, "missing": names,
            **multilabel_prf(scores, targets, threshold=threshold, difficult=difficult, logits=logits)}
