"""Runners: the three-stage layer-wise procedure and the one-stage baseline."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .layers import LayerPlan, plan_layers
from .method import (
    FeatureAmalgamation,
    LayerwiseLearning,
    LogitMatching,
    OneStageAmalgamation,
    check_placement,
)


# runners
@dataclass
class LayerwiseResult:
    """What :func:`run_layerwise` returns: the plan, the stage-1 autoencoders, the stage-2 method
    (student with its auxiliary maps), the students after stage 2 (folded) and stage 3, and the
    history of each stage (one row per epoch; ``attrs["best_epoch"]`` is the epoch kept)."""

    plan: LayerPlan
    amalgamation: FeatureAmalgamation
    layerwise: LayerwiseLearning
    students: dict
    histories: dict


def _monitor(val_data):
    return "val/task_agnostic" if val_data is not None and hasattr(val_data, "slices") else None


def _per_stage(value, n, what):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{what} must be one value or {n} values (one per stage), got {value!r}")
        return list(value)
    return [value] * n


def _example(data, n=2):
    from ...data import Unlabeled

    u = Unlabeled(data)
    return torch.stack([u[i] for i in range(min(n, len(u)))])


def run_layerwise(teachers: Sequence[nn.Module], student: nn.Module, train_data, val_data=None, *,
                  epochs=(4, 4, 4), lr=1e-3, batch_size: int = 64, seed: int = 0, plan: LayerPlan | None = None,
                  segments=None, teacher_layers=None, device=None, progress: bool | None = None,
                  placement: str = "output", **fit_kwargs) -> LayerwiseResult:
    """The three stages of layer-wise amalgamation, each with :func:`kaviz.train.fit` on the
    images of ``train_data`` (labels are never read: the data is wrapped in ``Unlabeled``).

    ``epochs``/``lr``: one value or one per stage (autoencoders, layer-wise, fine-tuning).
    ``val_data`` (a union split) selects each stage's epoch: stage 1 on its validation loss,
    stages 2 and 3 on the task-agnostic validation accuracy of the (folded) student. The student
    is trained in place by stage 2; ``result.students`` holds ``"layer-wise"`` (stage 2, folded)
    and ``"fine-tuned"`` (stage 3), two separate copies. ``placement``: where stage 2's auxiliary
    maps sit (:class:`LayerwiseLearning`): ``"output"`` (default) or ``"input"`` (the paper's, folded
    backwards; needs a BN-free student with biases, checked before stage 1 starts).
    """
    from ... import seed_everything
    from ...data import Unlabeled
    from ...train import fit

    epochs = _per_stage(epochs, 3, "epochs")
    lrs = _per_stage(lr, 3, "lr")
    if plan is None:
        plan = plan_layers(teachers, student, _example(train_data), segments=segments, teacher_layers=teacher_layers)
    check_placement(plan, student, placement)
    seed_everything(seed)
    common = dict(batch_size=batch_size, seed=seed, device=device, progress=progress, **fit_kwargs)
    unlabeled = Unlabeled(train_data)
    monitor = _monitor(val_data)

    amalgamation = FeatureAmalgamation(teachers, plan)
    h1 = fit(amalgamation, unlabeled, val_data, epochs=epochs[0], lr=lrs[0], **common)
    amalgamation.cpu()  # the device is fit's business; keep results on the CPU between stages
    layerwise = LayerwiseLearning(student, amalgamation, placement=placement)
    h2 = fit(layerwise, unlabeled, val_data, epochs=epochs[1], lr=lrs[1], monitor=monitor, **common)
    stage2 = layerwise.folded()
    stage3 = copy.deepcopy(stage2)
    h3 = fit(LogitMatching(stage3, teachers), unlabeled, val_data, epochs=epochs[2], lr=lrs[2], monitor=monitor,
             **common)
    layerwise.cpu()
    return LayerwiseResult(plan=plan, amalgamation=amalgamation, layerwise=layerwise,
                           students={"layer-wise": stage2.cpu().eval(), "fine-tuned": stage3.cpu().eval()},
                           histories={"stage 1: autoencoders": h1, "stage 2: layer-wise": h2,
                                      "stage 3: fine-tuning": h3})


def run_one_stage(teachers: Sequence[nn.Module], student: nn.Module, train_data, val_data=None, *, epochs: int = 8,
                  lr: float = 1e-3, T: float = 1.0, layers: Sequence[int] | None = None,
                  weights: Mapping[str, float] | None = None, batch_size: int = 64,
                  seed: int = 0, plan: LayerPlan | None = None, segments=None, teacher_layers=None, device=None,
                  progress: bool | None = None, **fit_kwargs):
    """The one-stage variant (:class:`OneStageAmalgamation`, hooking ``layers``) with
    :func:`kaviz.train.fit`; returns ``(method, history)``; ``method.student`` is the trained student."""
    from ... import seed_everything
    from ...data import Unlabeled
    from ...train import fit

    if plan is None:
        plan = plan_layers(teachers, student, _example(train_data), segments=segments, teacher_layers=teacher_layers)
    seed_everything(seed)
    method = OneStageAmalgamation(student, teachers, plan, T=T, layers=layers)
    history = fit(method, Unlabeled(train_data), val_data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                  weights=weights, monitor=_monitor(val_data), device=device, progress=progress, **fit_kwargs)
    method.cpu()
    return method, history
