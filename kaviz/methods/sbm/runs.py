"""Branch-out: each task's loss at every candidate branch point, the selection and the full run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...data import images_of
from .method import SBM
from .student import SBMStudent


def branch_losses(method: SBM, data, batch_size: int = 128):
    """Each task's loss per candidate branch point, averaged over ``data`` (the training data, as
    the paper measures it), with the student in eval mode. A DataFrame (task, point, loss, best)."""
    import pandas as pd

    from ...features import eval_mode
    from ...train import to_device

    device = next(method.student.parameters()).device
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    sums: dict[str, float] = {}
    n = 0
    with eval_mode(method), torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            b = images_of(batch).shape[0]
            for k, v in method(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
            n += b
    if n == 0:
        raise ValueError("branch_losses got empty data")
    rows = []
    for t in method.student.tasks:
        for p in method.student.branches[t]:
            rows.append({"task": t, "point": p, "loss": sums[method.term(t, p)] / n})
    df = pd.DataFrame(rows)
    df["best"] = df["loss"] == df.groupby("task")["loss"].transform("min")
    return df


def select_branches(losses) -> dict[str, str]:
    """``{task: point}`` with the lowest loss per task (ties: the shallower point, i.e. the first
    row, which shares fewer blocks)."""
    if not {"task", "point", "loss"} <= set(losses.columns):
        raise ValueError(f"losses must have columns task, point, loss (from branch_losses), got {list(losses.columns)}")
    out = {}
    for t, part in losses.groupby("task", sort=False):
        if part["loss"].isna().all():
            raise ValueError(f"every branch loss of task {t!r} is NaN")
        out[t] = str(part.loc[part["loss"].idxmin(), "point"])
    return out


def branch_summary(result: "SBMResult"):
    """One row per (task, branch point): the loss against the teacher on the training data (what
    branch-out ranks by), ``chosen``, and for reading only the ground-truth score of that branch on
    the validation split at the block phase's best epoch (``val mIoU`` for segmentation, ``val rmse``
    for depth) — labels never enter the choice."""
    h = result.search_history
    best = h.attrs.get("best_epoch") or int(h["epoch"].iloc[-1])
    row = h[h["epoch"] == best].iloc[0]
    df = result.branch_losses.rename(columns={"loss": "train loss"}).drop(columns=["best"])
    df["chosen"] = [result.points.get(t) == p for t, p in zip(df["task"], df["point"])]
    kinds = result.search_student.kinds

    def val_metric(t, p, metric):
        name = f"val/{t}@{p}/{metric}" if len(result.search_student.branches[t]) > 1 else f"val/{t}/{metric}"
        return float(row[name]) if name in row.index else float("nan")

    df["val mIoU"] = [val_metric(t, p, "mIoU") if kinds[t] == "segmentation" else np.nan for t,
                      p in zip(df["task"], df["point"])]
    df["val rmse"] = [val_metric(t, p, "rmse") if kinds[t] == "depth" else np.nan for t,
                      p in zip(df["task"], df["point"])]
    return df


@dataclass
class SBMResult:
    """What :func:`run` returns: the final student (one branch per task, fine-tuned), the search
    student (every candidate branch, after the block phase), the branch-point losses, the chosen
    points and both training histories."""

    student: SBMStudent
    search_student: SBMStudent
    branch_losses: object
    points: dict
    search_history: object
    finetune_history: object
    settings: dict = field(default_factory=dict)


def run(teachers: Mapping[str, nn.Module], train_data, val_data=None, *,
        points: Mapping[str, Sequence[str]] | None = None,
        trunk_from: str | None = None, seg_loss: str = "ce", T: float = 1.0, tails: str = "teacher",
        search_epochs: int = 3, finetune_epochs: int = 3, lr: float = 1e-3, finetune_lr: float = 3e-4,
        batch_size: int = 32, seed: int = 0, precompute: bool = True, metrics: bool = True,
        device=None, progress: bool | None = None, **fit_kwargs) -> SBMResult:
    """The whole SBM pipeline with :func:`kaviz.train.fit` (labels are never read for training):

    1. block phase: student with every candidate branch (``points``, default all of
       :data:`BRANCH_POINTS` per task), teacher tails frozen, ``search_epochs`` at ``lr``;
    2. branch-out: :func:`branch_losses` on ``train_data``, :func:`select_branches`;
    3. fine-tuning of everything (tails released) for ``finetune_epochs`` at ``finetune_lr``.

    Both phases keep the epoch with the lowest validation loss. ``precompute`` computes the
    teachers' predictions once (only without random augmentation). ``finetune_epochs=0`` skips 3.
    """
    from ... import seed_everything
    from ...train import fit

    seed_everything(seed)
    student = SBMStudent(teachers, points, trunk_from=trunk_from, tails=tails)
    method = SBM(student, teachers, seg_loss=seg_loss, T=T, metrics=metrics)
    if device is not None:
        method.to(device)
    train = method.precompute(train_data) if precompute else train_data
    val = method.precompute(val_data) if (precompute and val_data is not None) else val_data
    common = dict(batch_size=batch_size, seed=seed, device=device, progress=progress, **fit_kwargs)
    search_history = fit(method, train, val, epochs=search_epochs, lr=lr, **common)
    losses = branch_losses(method, train)
    chosen = select_branches(losses)
    final = student.branch_out(chosen).freeze_tails(False)
    finetune_history = None
    if finetune_epochs:
        method2 = SBM(final, teachers, seg_loss=seg_loss, T=T, metrics=metrics)
        finetune_history = fit(method2, train, val, epochs=finetune_epochs, lr=finetune_lr, **common)
    settings = dict(seg_loss=seg_loss, T=T, tails=tails, search_epochs=search_epochs, finetune_epochs=finetune_epochs,
                    lr=lr, finetune_lr=finetune_lr, batch_size=batch_size, seed=seed, trunk_from=student.trunk_from)
    return SBMResult(final.eval(), student.eval(), losses, chosen, search_history, finetune_history, settings)
