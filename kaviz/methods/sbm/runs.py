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
    for depth) — labels never enter the choice. With the blockwise schedule that epoch is the last
    stage's best one, where every branch has its final weights (none is trained after its stage)."""
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
    if "normals" in kinds.values():  # only then: the two-task table keeps its columns
        df["val mean_angle"] = [val_metric(t, p, "mean_angle") if kinds[t] == "normals" else np.nan for t,
                                p in zip(df["task"], df["point"])]
    return df


#: Per task kind: the ground-truth column of :func:`branch_summary` and whether higher is better.
CHOICE_METRICS = {"segmentation": ("val mIoU", True), "depth": ("val rmse", False),
                  "normals": ("val mean_angle", False)}


def choice_shares(summary, kinds: Mapping[str, str]):
    """How good branch-out's choice is on the validation ground truth, against its controls: per task
    (one row), the chosen point's score as a share of the best candidate's (``chosen ÷ best`` when higher
    is better, ``best ÷ chosen`` when lower is), the same share for a point **picked at random** (its
    expectation: the mean share over the candidates) and for the **worst** candidate. ``summary`` is
    :func:`branch_summary`'s table, ``kinds`` ``task -> "segmentation" | "depth" | "normals"``."""
    import pandas as pd

    missing = {"task", "point", "chosen"} - set(summary.columns)
    if missing:
        raise ValueError(f"summary must be branch_summary's table; it lacks {sorted(missing)}")
    rows = []
    for task, part in summary.groupby("task", sort=False):
        if kinds.get(task) not in CHOICE_METRICS:
            raise ValueError(f"task {task!r}: kinds must give one of {sorted(CHOICE_METRICS)}, got {kinds.get(task)!r}")
        metric, higher = CHOICE_METRICS[kinds[task]]
        values = part[metric].astype(float)
        if values.isna().any() or int(part["chosen"].sum()) != 1:
            raise ValueError(f"task {task!r}: every candidate needs a {metric!r} value and exactly one is chosen")
        best = values.max() if higher else values.min()
        shares = values / best if higher else best / values
        rows.append({"task": task, "metric": metric[4:], "chosen": str(part.loc[part["chosen"], "point"].item()),
                     "best candidate": str(part.loc[values.idxmax() if higher else values.idxmin(), "point"]),
                     "chosen ÷ best": float(shares[part["chosen"]].item()),
                     "random pick ÷ best (control)": float(shares.mean()),
                     "worst ÷ best (control)": float(shares.min()), "candidates": len(part)})
    return pd.DataFrame(rows).set_index("task")


#: The training schedules of the SBM block phase (:func:`run`): every candidate branch at once on
#: the summed loss (``"joint"``, the default), or stage by stage along the trunk (``"blockwise"``).
SCHEDULES = ("joint", "blockwise")


def _stage_histories(histories: Mapping[str, object]):
    """The blockwise stages' histories as one: a ``stage`` column (the stage's point), ``stage_epoch``
    (the epoch within it) and ``epoch`` counted across the stages; ``attrs["best_epoch"]`` is the
    last stage's best epoch in that count (every branch is final then: a branch is never trained
    after its own stage) and ``attrs["stage_best_epochs"]`` holds each stage's."""
    import pandas as pd

    parts, best, offset = [], {}, 0
    for point, h in histories.items():
        h = h.copy()
        h.insert(0, "stage", point)
        h.insert(1, "stage_epoch", h["epoch"])
        h["epoch"] = h["epoch"] + offset
        b = h.attrs.get("best_epoch")
        best[point] = None if b is None else int(b) + offset
        offset += len(h)
        parts.append(h)
    frame = pd.concat(parts, ignore_index=True)
    last = next(reversed(histories.values())).attrs
    frame.attrs.update({"best_epoch": best[next(reversed(histories))], "monitor": last.get("monitor"),
                        "stage_best_epochs": best})
    return frame


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
        device=None, progress: bool | None = None, schedule: str = "joint",
        kinds: Mapping[str, str] | None = None, **fit_kwargs) -> SBMResult:
    """The whole SBM pipeline with :func:`kaviz.train.fit` (labels are never read for training):

    1. block phase: student with every candidate branch (``points``, default all of
       :data:`BRANCH_POINTS` per task), teacher tails frozen, ``search_epochs`` at ``lr``;
    2. branch-out: :func:`branch_losses` on ``train_data``, :func:`select_branches`;
    3. fine-tuning of everything (tails released) for ``finetune_epochs`` at ``finetune_lr``.

    ``schedule`` says how step 1 trains (SPEC.md §4.2, "Branch-out"; the paper trains the student
    block by block):

    - ``"joint"`` (default): one training of the trunk and *every* candidate branch's adaptor at
      once on the sum of all the branch losses Σ_t Σ_p w_t·L_t(ŷ_{t,p}).
    - ``"blockwise"``: one stage per candidate point, shallow to deep, p_1 < … < p_K (the points of
      all tasks together, :attr:`SBMStudent.stage_points`). Stage k trains only the trunk blocks
      after p_{k−1} up to p_k (from ``enc1`` for k = 1; :meth:`SBMStudent.stage_blocks`) and the SE
      adaptors of the branches at p_k, on Σ_t w_t·L_t(tail_{t,p_k}(a_{t,p_k}(f_{p_k}))) over the
      tasks that have p_k as a candidate, through their frozen teacher tails, for ``search_epochs``
      epochs at ``lr`` (best validation epoch kept). Everything else — the blocks of earlier
      stages, the other adaptors, every teacher tail — is frozen, its batch norm in eval mode
      (:meth:`SBMStudent.set_stage`), so a branch's output never changes after its own stage.
      The branch-out and fine-tuning that follow are those of ``"joint"``: each task's loss per
      branch point on ``train_data``, the lowest kept per task, then everything fine-tuned. The
      block phase thus takes K × ``search_epochs`` epochs (each on fewer branches).
      ``search_history`` is the stages' histories one after the other (columns ``stage``,
      ``stage_epoch``; ``epoch`` counts across stages).

    Both phases keep the epoch with the lowest validation loss. ``precompute`` computes the
    teachers' predictions once (only without random augmentation). ``finetune_epochs=0`` skips 3.
    """
    from ... import seed_everything
    from ...train import fit

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'joint' (every candidate branch at once) or 'blockwise' (stage by "
                         f"stage along the trunk), got {schedule!r}")
    seed_everything(seed)
    student = SBMStudent(teachers, points, trunk_from=trunk_from, tails=tails, kinds=kinds)
    method = SBM(student, teachers, seg_loss=seg_loss, T=T, metrics=metrics)
    if device is not None:
        method.to(device)
    train = method.precompute(train_data) if precompute else train_data
    val = method.precompute(val_data) if (precompute and val_data is not None) else val_data
    common = dict(batch_size=batch_size, seed=seed, device=device, progress=progress, **fit_kwargs)
    if schedule == "joint":
        search_history = fit(method, train, val, epochs=search_epochs, lr=lr, **common)
    else:
        stages = {}
        try:
            for point in student.stage_points:
                student.set_stage(point)
                stages[point] = fit(method, train, val, epochs=search_epochs, lr=lr, **common)
        finally:
            student.set_stage(None)
        search_history = _stage_histories(stages)
    losses = branch_losses(method, train)
    chosen = select_branches(losses)
    final = student.branch_out(chosen).freeze_tails(False)
    finetune_history = None
    if finetune_epochs:
        method2 = SBM(final, teachers, seg_loss=seg_loss, T=T, metrics=metrics)
        finetune_history = fit(method2, train, val, epochs=finetune_epochs, lr=finetune_lr, **common)
    settings = dict(schedule=schedule, seg_loss=seg_loss, T=T, tails=tails, search_epochs=search_epochs,
                    finetune_epochs=finetune_epochs,
                    lr=lr, finetune_lr=finetune_lr, batch_size=batch_size, seed=seed, trunk_from=student.trunk_from)
    if kinds:  # a named kind (normals) only: the two-task settings stay as they were
        settings["kinds"] = dict(student.kinds)
    return SBMResult(final.eval(), student.eval(), losses, chosen, search_history, finetune_history, settings)
