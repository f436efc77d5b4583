"""Soft-target distillation from one or several teachers (SPEC.md §0.1–0.2), and union evaluation.

The KD baseline of the amalgamation papers: the student has one head over the comprehensive label
space, and is trained with ``soft_ce(s, [z_1 ‖ z_2 ‖ …]; T)`` on unlabeled images of the union
(T = 1 in the amalgamation papers). Labels are never read during training.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..data import images_of
from ..losses import soft_cross_entropy
from ..train import freeze

__all__ = ["images_of", "MultiTeacherKD", "concat_logits", "union_accuracy", "teacher_accuracy", "distill",
           "check_teachers"]


def concat_logits(teachers: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``[z_1(x) ‖ z_2(x) ‖ …]`` in teacher order, under ``no_grad``."""
    with torch.no_grad():
        return torch.cat([t(x) for t in teachers], dim=1)


def _union_of(data, depth: int = 0):
    """The :class:`kaviz.data.UnionDataset` (anything with ``class_counts`` and ``sources``) inside
    ``data``, looking through ``Unlabeled``, ``Subset`` and teacher-output wrappers; else None."""
    if data is None or depth > 8:
        return None
    if hasattr(data, "class_counts") and hasattr(data, "sources") and hasattr(data, "slices"):
        return data
    for attr in ("dataset", "data"):
        inner = getattr(data, attr, None)
        if inner is not None and inner is not data and hasattr(inner, "__len__") and not torch.is_tensor(inner):
            found = _union_of(inner, depth + 1)
            if found is not None:
                return found
    return None


def _num_outputs(model: nn.Module, x: torch.Tensor) -> int | None:
    from ..features import eval_mode

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    with torch.no_grad(), eval_mode(model):
        out = model(x.to(device=device, dtype=dtype))
    return int(out.shape[1]) if torch.is_tensor(out) and out.dim() == 2 else None


def check_teachers(teachers: Sequence[nn.Module], data, student: nn.Module | None = None, *,
                   method: str = "KD") -> None:
    """Raise when the teachers do not match the union's label space: one teacher per source of the
    :class:`kaviz.data.UnionDataset` in ``data`` (also inside ``Unlabeled``/teacher-output
    wrappers), in source order, teacher k with as many outputs as source k has classes; and, when
    ``student`` is given, a student with ``union.num_classes`` outputs. One forward pass of one
    image per network. Data without a union (plain datasets) is not checked."""
    union = _union_of(data)
    if union is None or len(union) == 0:
        return
    counts, names, slices = list(union.class_counts), list(union.sources), list(union.slices)
    if len(teachers) != len(counts):
        raise ValueError(f"{method}: {len(teachers)} teacher(s) for a union of {len(counts)} sources {names}; "
                         "pass one teacher per source, in the union's order.")
    with torch.random.fork_rng(devices=[]):  # a random transform must not shift the caller's RNG stream
        x = union.get_image(0)[None]
    bad = []
    for k, (t, name, sl, n) in enumerate(zip(teachers, names, slices, counts)):
        out = _num_outputs(t, x)
        if out is not None and out != n:
            bad.append(f"teacher {k + 1} has {out} outputs but source {k + 1} ({name!r}) has {n} classes "
                       f"(union labels {sl.start}..{sl.stop - 1})")
    if bad:
        raise ValueError(f"{method}: the teachers do not match the union's label space: " + "; ".join(bad)
                         + f". Pass the teachers in the union's source order {names}, each trained on its "
                         "source's classes.")
    if student is not None:
        out = _num_outputs(student, x)
        if out is not None and out != union.num_classes:
            raise ValueError(f"{method}: the student has {out} outputs but the union has {union.num_classes} "
                             f"classes ({' + '.join(map(str, counts))}); build it with "
                             f"num_classes={union.num_classes}.")


class MultiTeacherKD(nn.Module):
    """Student trained on the concatenated soft targets of frozen teachers: ``{"kd": soft_ce}``.

    ``evaluate(data)`` reports task-agnostic and task-aware accuracy when ``data`` is a
    :class:`kaviz.data.UnionDataset` (plain ``accuracy`` otherwise); used for model selection on
    the validation split only. ``union``: the training data (a union, or a wrapper of one); when
    given, the teachers' class counts are checked against it here (:func:`check_teachers`), not
    after an epoch.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], T: float = 1.0, *, union=None):
        super().__init__()
        if len(teachers) == 0:
            raise ValueError("MultiTeacherKD needs at least one teacher")
        self.student = student
        self.teachers = nn.ModuleList([freeze(t) for t in teachers])
        self.T = T
        if union is not None:
            check_teachers(self.teachers, union, student, method=type(self).__name__)

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
    rows.append({"model": "concatenated teachers", "task_aware": res["task_aware"],
                 "task_agnostic": res["task_agnostic"]})
    return pd.DataFrame(rows)


def distill(student: nn.Module, teachers: Sequence[nn.Module], train_data, val_data=None, *, T: float = 1.0,
            epochs: int = 10, lr: float = 1e-3, **fit_kwargs):
    """Train ``student`` by multi-teacher KD on ``train_data`` (labels never read: the data is
    wrapped in :class:`kaviz.data.Unlabeled`). Returns the history DataFrame."""
    from ..data import Unlabeled
    from ..train import fit

    method = MultiTeacherKD(student, teachers, T=T, union=train_data)
    if val_data is not None:
        check_teachers(method.teachers, val_data, student, method="MultiTeacherKD (val_data)")
    return fit(method, Unlabeled(train_data), val_data, epochs=epochs, lr=lr, **fit_kwargs)
