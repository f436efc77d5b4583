"""KD vs CFL over seeds with the same budget: run_students, the per-seed and mean ± std tables, term gradients."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..kd import check_teachers, union_accuracy
from .method import CommonFeatureLearning
from .teachers import KDBaseline, first_images, precompute_teachers


@dataclasses.dataclass
class Run:
    """One trained student: ``method`` ("KD" or "CFL", plus any ``tag``), architecture, seed, the
    trained ``student``, the CFL method (``cfl``, None for KD), the training history and its
    accuracies on the evaluation split at the best-on-validation epoch (``scores``).
    ``initial()`` rebuilds the method as it was before training (same seed, same weights)."""

    method: str
    arch: str
    seed: int
    student: nn.Module
    cfl: CommonFeatureLearning | None
    history: object
    scores: dict
    initial: Callable[[], nn.Module] | None = dataclasses.field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.method} · {self.arch} · seed {self.seed}"


def run_students(student: str | Callable[[], nn.Module], teachers: Sequence[nn.Module], student_layer: str,
                 teacher_layers: Sequence[str], train_data, val_data, test_data, *, seeds: Sequence[int] = (0, 1),
                 methods: Sequence[str] = ("KD", "CFL"), epochs: int = 30, lr: float | Mapping[str, float] = 1e-4,
                 batch_size: int = 64,
                 hidden: int = 128, T: float = 1.0, weights: Mapping[str, float] | None = None,
                 head_lr_mult: float = 10.0, block_lr_mult: float = 5.0, optimizer: str = "adam",
                 weight_decay: float = 1e-4, schedule="step", arch_kwargs: Mapping | None = None,
                 cache_teachers: bool | str = "auto", tag: str = "", device=None, **fit_kwargs) -> list[Run]:
    """Train a KD student and a CFL student per seed with the same budget (epochs, batch, data,
    optimiser, learning rates of the backbone and the head), select each on the validation split by
    task-agnostic accuracy, and score it on ``test_data``. ``student`` is an architecture name for
    :func:`kaviz.models.build` (with ``arch_kwargs``, e.g. ``weights_path``) or a callable returning
    a fresh student. ``cache_teachers``: ``"auto"`` computes the teachers' outputs once
    (:func:`precompute_teachers`) when ``train_data`` has no random augmentation
    (:func:`kaviz.data.has_random_transform`); True forces it (warning on augmented data), False
    runs the teachers on every batch. ``tag`` is appended to the
    method's name in the runs (e.g. ``" (mmd weight 1)"`` for an ablation). KD and CFL students of
    one seed start from the same weights. ``lr`` (the backbone's; head ×``head_lr_mult``, block
    ×``block_lr_mult``) may be a dict ``{architecture: lr}`` (:func:`lr_for`), as the reference code uses
    per-architecture rates (ResNet-50 2e-5, DenseNet-121 2e-4, each head 10×). Returns a list of :class:`Run`.
    """
    from ... import seed_everything
    from ...data import Unlabeled
    from ...models import build
    from ...train import fit

    unknown = [m for m in methods if m not in ("KD", "CFL")]
    if unknown:
        raise ValueError(f"methods must be 'KD' and/or 'CFL', got {unknown}")
    if not seeds:
        raise ValueError("seeds is empty; pass e.g. seeds=[0, 1]")
    num_classes = getattr(train_data, "num_classes", None)
    if isinstance(student, str):
        arch = student
        if num_classes is None:
            raise ValueError("train_data does not say its number of classes (a UnionDataset does); "
                             "pass a callable that builds the student instead of a name")
        make = lambda: build(arch, num_classes, **dict(arch_kwargs or {}))  # noqa: E731
    elif callable(student):
        make, arch = student, None
    else:
        raise TypeError(f"student must be an architecture name or a callable returning a model, got {student!r}")
    lr = lr_for(lr, arch)
    for what, d in (("val_data", val_data), ("test_data", test_data)):
        check_teachers(teachers, d, method=f"run_students ({what})")
    if cache_teachers not in (True, False, "auto"):
        raise ValueError(f"cache_teachers must be True, False or 'auto', got {cache_teachers!r}")
    if cache_teachers == "auto":
        from ...data import has_random_transform

        cache_teachers = not has_random_transform(train_data)
    train = precompute_teachers(teachers, teacher_layers, train_data, device=device) if cache_teachers \
        else Unlabeled(train_data)
    runs = []
    common = dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
                  schedule=schedule, device=device, **fit_kwargs)
    common.setdefault("monitor", "val/task_agnostic")
    example = first_images(train)

    def initial(m, seed):
        seed_everything(int(seed))
        net = make()
        if m == "KD":
            return KDBaseline(net, teachers, T=T, head_lr_mult=head_lr_mult, union=train_data)
        return CommonFeatureLearning(net, teachers, student_layer, teacher_layers, example=example, hidden=hidden,
                                     T=T, head_lr_mult=head_lr_mult, block_lr_mult=block_lr_mult, weights=weights,
                                     union=train_data)

    for seed in seeds:
        for m in methods:
            method = initial(m, seed)
            net = method.student
            history = fit(method, train, val_data, seed=int(seed), **common)
            scores = union_accuracy(net, test_data) if test_data is not None else {}
            runs.append(Run(m + tag, arch or type(net).__name__, int(seed), net.eval(),
                            method if m == "CFL" else None, history, scores,
                            initial=(lambda m=m, seed=seed: initial(m, seed))))
    return runs


def lr_for(lr: float | Mapping[str, float], arch: str | None) -> float:
    """The learning rate of architecture ``arch``: ``lr`` itself, or ``lr[arch]`` for a dict
    ``{architecture: lr}`` (per-architecture rates, as the CFL reference code)."""
    if not isinstance(lr, Mapping):
        return lr
    if arch is None:
        raise ValueError("lr is a dict {architecture: lr} but the student is a callable, not an architecture name; "
                         "pass lr as a number (or the student as a name)")
    if arch not in lr:
        raise ValueError(f"lr has no entry for the student architecture {arch!r}; its keys are {sorted(lr)}. Add "
                         f"{arch!r}: <lr> to the dict")
    return float(lr[arch])


def step_schedule(decay_epoch: int, factor: float = 0.1):
    """A ``schedule=`` for :func:`run_students` / :func:`kaviz.train.fit`: every group's lr times
    ``factor`` from epoch ``decay_epoch`` on (0-based: ``decay_epoch=14`` of 30 decays one epoch before
    ``schedule="step"``, which decays from epoch ``epochs // 2``; the CFL reference code decays one
    epoch earlier than kaviz's default)."""
    if isinstance(decay_epoch, bool) or not isinstance(decay_epoch, int) or decay_epoch < 0:
        raise ValueError(f"decay_epoch must be an int >= 0 (0-based epoch of the decay), got {decay_epoch!r}")

    def make(optimizer, epochs, steps_per_epoch):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: factor if e >= decay_epoch else 1.0), "epoch"

    return make


def per_seed_table(runs: Sequence[Run]):
    """One row per run: method, student, seed, best epoch (on validation), validation and test
    accuracies (task-agnostic and task-aware)."""
    import pandas as pd

    rows = []
    for r in runs:
        h = r.history
        best = h.attrs.get("best_epoch")
        row = h[h["epoch"] == best].iloc[0] if best is not None else h.iloc[-1]
        rows.append({"method": r.method, "student": r.arch, "seed": r.seed, "best epoch": best,
                     "val task-agnostic": row.get("val/task_agnostic", np.nan),
                     "test task-agnostic": r.scores.get("task_agnostic", np.nan),
                     "test task-aware": r.scores.get("task_aware", np.nan)})
    return pd.DataFrame(rows)


def results_table(runs: Sequence[Run], decimals: int = 3, as_text: bool = True):
    """Mean ± std over seeds of the test accuracies (task-agnostic and task-aware), each student
    taken at its best epoch on validation; one row per (student, method). ``as_text``: the cells
    read ``"0.812 ± 0.010"``; else numeric ``<accuracy> mean`` / ``<accuracy> std`` columns."""
    from ...stats import seed_table

    return seed_table(per_seed_table(runs), ["student", "method"], ["test task-agnostic", "test task-aware"],
                      digits=decimals, as_text=as_text)


def term_gradients(method: nn.Module, batch, weights: Mapping[str, float] | None = None):
    """How hard each weighted loss term pulls on each parameter group: the L2 norm of
    ``∇ (w_k · term_k)`` over the parameters of every group of ``method.param_groups`` (backbone,
    head, block), one row per term, for one batch (in training mode; nothing is updated).

    Why: with Adam, each parameter's step follows the direction of its summed gradient whatever its
    size, so a term whose gradient on the student's backbone is orders of magnitude larger than the
    KD term's decides where the backbone goes.
    """
    import pandas as pd

    from ...train import to_device

    weights = dict(weights if weights is not None else getattr(method, "loss_weights", {}) or {})
    groups = [g for g in method.param_groups(1.0) if g["params"]]
    batch = to_device(batch, next(method.parameters()).device)
    rows = []
    flags = {m: m.training for m in method.modules()}
    buffers = {n: b.detach().clone() for n, b in method.named_buffers()}  # batch-norm statistics
    try:
        method.train()
        terms = method(batch)
        for k, v in terms.items():
            w = weights.get(k, 1.0)
            row = {"term": k, "weight": w, "value": float(v.detach())}
            for g in groups:
                params = [p for p in g["params"] if p.requires_grad]
                grads = torch.autograd.grad(v * w, params, retain_graph=True, allow_unused=True)
                sq = sum(((gr.double() ** 2).sum() for gr in grads if gr is not None),
                         torch.zeros((), dtype=torch.float64))
                row[g.get("name", "group")] = float(sq.sqrt())
            rows.append(row)
    finally:
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for n, b in method.named_buffers():
                b.copy_(buffers[n])
    return pd.DataFrame(rows)
