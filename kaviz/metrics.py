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
