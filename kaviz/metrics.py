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
    "iou_scores",
    "SegmentationMeter",
    "depth_scores",
    "depth_valid",
    "DepthMeter",
    "dense_meter",
    "psnr",
    "SSIM_WINDOW",
    "ssim_index",
    "ssim",
    "ssim_loss",
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


def depth_scores(predictions, targets, valid=None, min_depth: float = 1e-3) -> dict:
    """RMSE, absolute relative error and δ<1.25 (share of pixels with max(p/t, t/p) < 1.25) over
    valid pixels (targets > ``min_depth`` and finite, and ``valid`` if given); predictions are clamped
    below at ``min_depth``. For data that does not fit in memory use :class:`DepthMeter`."""
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


def depth_valid(targets: torch.Tensor, min_depth: float = 1e-3) -> torch.Tensor:
    """Pixels with a depth to score: finite and above ``min_depth`` (NYUv2 stores 0 where the sensor saw nothing)."""
    return torch.isfinite(targets) & (targets > min_depth)


class DepthMeter:
    """Streaming depth scores: sums over valid pixels (:func:`depth_valid`), predictions clamped below at
    ``min_depth``, in float64, batch by batch; ``result()`` gives ``rmse``, ``abs_rel`` and ``delta1``
    as :func:`depth_scores`."""

    def __init__(self, min_depth: float = 1e-3):
        self.min_depth = min_depth
        self.sums = {"sq": 0.0, "rel": 0.0, "delta": 0.0, "n": 0}

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
        ratio = torch.maximum(p / t, t / p)
        self.sums["sq"] += float(((p - t) ** 2).sum())
        self.sums["rel"] += float(((p - t).abs() / t).sum())
        self.sums["delta"] += float((ratio < 1.25).sum())
        self.sums["n"] += int(m.sum())

    def result(self) -> dict:
        n = self.sums["n"]
        if n == 0:
            raise ValueError("no valid depth pixels were scored")
        return {"rmse": float(np.sqrt(self.sums["sq"] / n)), "abs_rel": self.sums["rel"] / n,
                "delta1": self.sums["delta"] / n}


def dense_meter(kind: str, num_classes: int | None = None, ignore_index: int = 255, min_depth: float = 1e-3):
    """A :class:`SegmentationMeter` (``kind="segmentation"``) or a :class:`DepthMeter` (``kind="depth"``)."""
    if kind == "segmentation":
        return SegmentationMeter(num_classes, ignore_index)
    if kind == "depth":
        return DepthMeter(min_depth)
    raise ValueError(f"dense_meter: kind must be 'segmentation' or 'depth', got {kind!r}")


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


def ssim_index(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
               sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) as a differentiable scalar tensor in the inputs' dtype:
    a Gaussian window (``window``×``window``, σ = ``sigma``; 11×11 by default, as the paper and scikit-image),
    c1 = (0.01·L)², c2 = (0.03·L)², averaged over channels, valid positions and images.
    Images (N, C, H, W) in [0, data_range]."""
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
    return s.mean()


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

__all__ += ["average_precision", "multilabel_map", "multilabel_prf", "multilabel_report",
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


def _ap_one(s: np.ndarray, t: np.ndarray) -> float:
    """All-point interpolated AP of one class (VOC2010+ devkit): the area under the precision
    envelope ``p̂(r) = max_{r' >= r} p(r')``, with tied scores taken together as one threshold."""
    npos = int(t.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # one (recall, precision) point per distinct score: the last row of each block of ties
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    rec = tp[last] / npos
    prec = tp[last] / (tp[last] + fp[last])
    mrec = np.r_[0.0, rec, 1.0]
    mpre = np.r_[0.0, prec, 0.0]
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def average_precision(scores, targets, difficult=None) -> np.ndarray:
    """Per-class VOC average precision (all-point interpolation), an array (K,) in [0, 1].

    For class k, the images are ranked by score; ``difficult`` image–class pairs are removed
    from the ranking (neither true nor false positives: VOC's "0" label); precision p and recall r
    are taken at every distinct score (tied scores form one threshold), and
    ``AP_k = Σ_i (r_{i+1} − r_i) · max_{r >= r_{i+1}} p(r)``.
    A class without any non-difficult positive gets NaN (its AP is undefined).
    """
    s, t, d = _multilabel_inputs(scores, targets, difficult)
    out = np.empty(s.shape[1], dtype=np.float64)
    for k in range(s.shape[1]):
        keep = ~d[:, k]
        out[k] = _ap_one(s[keep, k], t[keep, k])
    return out


def _no_positive_message(missing, class_names=None) -> str:
    names = [str(class_names[k]) if class_names is not None else str(k) for k in missing]
    return (f"{len(missing)} class(es) have no positive (non-difficult) example: {', '.join(names[:10])}"
            f"{' ...' if len(names) > 10 else ''}; their AP is undefined and they are left out of the mAP. "
            "Use a larger evaluation split to cover every class.")


def multilabel_map(scores, targets, difficult=None) -> float:
    """Mean over classes of :func:`average_precision` (VOC all-point AP, difficult pairs ignored),
    a float in [0, 1].

    Classes without a positive are left out of the mean and reported with a
    :class:`MissingPositivesWarning` naming them; if no class has a positive, ``ValueError``.
    """
    ap = average_precision(scores, targets, difficult)
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
