"""Soft-target distillation from one or several teachers (SPEC.md §0.1–0.2), and union evaluation.

The KD baseline of the amalgamation papers: the student has one head over the comprehensive label
space, and is trained with ``soft_ce(s, [z_1 ‖ z_2 ‖ …]; T)`` on unlabeled images of the union
(T = 1 in the amalgamation papers). Labels are never read during training.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..losses import soft_cross_entropy
from ..train import freeze

__all__ = ["images_of", "MultiTeacherKD", "concat_logits", "union_accuracy", "teacher_accuracy", "distill"]


def images_of(batch) -> torch.Tensor:
    """The images of a batch that is either images alone or ``(images, anything)``; the second
    element (labels) is never looked at."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    raise TypeError(f"a batch must be an image tensor or (images, ...), got {type(batch).__name__}")


def concat_logits(teachers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``[z_1(x) ‖ z_2(x) ‖ …]`` in teacher order, under ``no_grad``."""
    with torch.no_grad():
        return torch.cat([t(x) for t in teachers], dim=1)


class MultiTeacherKD(nn.Module):
    """Student trained on the concatenated soft targets of frozen teachers: ``{"kd": soft_ce}``.

    ``evaluate(data)`` reports task-agnostic and task-aware accuracy when ``data`` is a
    :class:`kaviz.data.UnionDataset` (plain ``accuracy`` otherwise); used for model selection on
    the validation split only.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], T: float = 1.0):
        super().__init__()
        if len(teachers) == 0:
            raise ValueError("MultiTeacherKD needs at least one teacher")
        self.student = student
        self.teachers = nn.ModuleList([freeze(t) for t in teachers])
        self.T = T

    def forward(self, batch):
        x = images_of(batch)
        return {"kd": soft_cross_entropy(self.student(x), concat_logits(self.teachers, x), self.T)}

    def evaluate(self, data) -> dict:
        return union_accuracy(self.student, data)


def union_accuracy(model: nn.Module, data, batch_size: int = 256) -> dict:
    """Accuracy of a comprehensive-space classifier on ``data``: for a UnionDataset, task-agnostic
    and task-aware accuracy overall and per source (SPEC §0.1); else top-1 accuracy."""
    from .. import metrics
    from ..features import OUTPUT, extract

    store = extract(model, data, OUTPUT, pool="none", batch_size=batch_size, progress=False)
    logits = store[OUTPUT]
    if hasattr(data, "slices") and hasattr(data, "origin"):
        expected = sum(s.stop - s.start for s in data.slices)
        if logits.shape[1] != expected:
            raise ValueError(f"the model has {logits.shape[1]} outputs but the union has {expected} classes")
        return metrics.union_accuracies(logits, data.targets, data.origin, data.slices, names=data.sources)
    return {"accuracy": metrics.accuracy(logits, store.targets)}


def teacher_accuracy(teachers: Sequence[nn.Module], union_data, batch_size: int = 256):
    """Each teacher's accuracy on its own source's samples of a union split, and the accuracy of
    the concatenated teachers (the ensemble the student imitates) both ways. Returns a DataFrame."""
    import pandas as pd

    from .. import metrics
    from ..features import OUTPUT, extract

    logits = [extract(t, union_data, OUTPUT, pool="none", batch_size=batch_size, progress=False)[OUTPUT]
              for t in teachers]
    import numpy as np

    cat = np.concatenate(logits, axis=1)
    res = metrics.union_accuracies(cat, union_data.targets, union_data.origin, union_data.slices,
                                   names=union_data.sources)
    rows = []
    for k, name in enumerate(union_data.sources):
        rows.append({"model": f"teacher {k + 1} ({name})", "task_aware": res[f"task_aware/{name}"],
                     "task_agnostic": np.nan})
    rows.append({"model": "concatenated teachers", "task_aware": res["task_aware"], "task_agnostic": res["task_agnostic"]})
    return pd.DataFrame(rows)


def distill(student: nn.Module, teachers: Sequence[nn.Module], train_data, val_data=None, *, T: float = 1.0,
            epochs: int = 10, lr: float = 1e-3, **fit_kwargs):
    """Train ``student`` by multi-teacher KD on ``train_data`` (labels never read: the data is
    wrapped in :class:`kaviz.data.Unlabeled`). Returns the history DataFrame."""
    from ..data import Unlabeled
    from ..train import fit

    method = MultiTeacherKD(student, teachers, T=T)
    return fit(method, Unlabeled(train_data), val_data, epochs=epochs, lr=lr, **fit_kwargs)
