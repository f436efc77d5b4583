"""The SBM method: targets from frozen teachers and ``forward(batch) -> {<task>: loss}``."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ...cache import TeacherOutputs, cached_teacher_outputs
from ...data import images_of
from ...features import OUTPUT
from ...train import freeze
from .evaluation import score
from .student import SBMStudent
from .tasks import TARGET_KEYS, normals_loss, normals_target

#: SBM's precomputed teacher outputs: the shared :class:`kaviz.cache.TeacherOutputs` (teachers named by task,
#: their raw outputs under ``kaviz.features.OUTPUT``; the targets are derived from them batch by batch).
TeacherTargets = TeacherOutputs


class SBM(nn.Module):
    """The SBM training method for :func:`kaviz.train.fit`: ``forward(batch)`` returns one loss term
    per task and branch point of the student, named ``"<task>@<point>"`` (``"<task>"`` once each
    task has a single branch).

    - segmentation, ``seg_loss="ce"``: ``CE(ŷ, argmax p_t)`` per pixel; ``"kl"``:
      ``T² · mean_pixels KL(softmax(z_t/T) ‖ softmax(ŷ/T))``;
    - depth: ``mean |ŷ − d_t|``.

    The teachers are frozen (:func:`kaviz.train.freeze`); their predictions come from the batch
    (``y["teacher_outputs"]``, see :meth:`precompute`) or are computed on the fly. Labels are never read for
    training. ``evaluate(data)`` scores every branch against the ground truth (logging only:
    ``fit`` selects the epoch on the validation *loss*, i.e. agreement with the teachers).

    While the student is in a stage of the blockwise schedule (:meth:`SBMStudent.set_stage`),
    ``forward`` computes only the branches at that stage's point (and ``loss_weights`` names only
    their terms).
    """

    def __init__(self, student: SBMStudent, teachers: Mapping[str, nn.Module], *, seg_loss: str = "ce",
                 T: float = 1.0, weights: Mapping[str, float] | None = None, metrics: bool = True,
                 target_keys: Mapping[str, str] | None = None):
        super().__init__()
        if not isinstance(student, SBMStudent):
            raise TypeError(f"student must be an SBMStudent, got {type(student).__name__}")
        if set(teachers) != set(student.tasks):
            raise ValueError(f"teachers {list(teachers)} must match the student's tasks {student.tasks}")
        if seg_loss not in ("ce", "kl"):
            raise ValueError(f"seg_loss must be 'ce' (to the teacher's argmax) or 'kl' (to its soft output), got "
                             f"{seg_loss!r}")
        if T <= 0:
            raise ValueError(f"temperature T must be positive, got {T}")
        self.student = student
        self.teachers = nn.ModuleDict({t: freeze(teachers[t]) for t in student.tasks})
        self.kinds = dict(student.kinds)
        self.seg_loss = seg_loss
        self.T = float(T)
        self.metrics = metrics
        self.target_keys = {t: (target_keys or {}).get(t, TARGET_KEYS[k]) for t, k in self.kinds.items()}
        w = dict(weights or {})
        unknown = [t for t in w if t not in student.tasks]
        if unknown:
            raise ValueError(f"weights name unknown tasks {unknown}; tasks: {student.tasks}")
        self.task_weights = {t: float(w.get(t, 1.0)) for t in student.tasks}

    @property
    def loss_weights(self) -> dict:
        stage = self.student.stage
        return {self.term(t, p): self.task_weights[t] for t in self.student.tasks for p in self.student.branches[t]
                if stage is None or p == stage}

    def term(self, task: str, point: str) -> str:
        return task if len(self.student.branches[task]) == 1 else f"{task}@{point}"

    # -------------------------------------------------------------------------- teacher targets
    def teacher_target(self, task: str, x: torch.Tensor, output: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher ``task``'s target for images ``x``: argmax ids (``"ce"``), logits (``"kl"``), depth or unit
        normals;
        from the teacher's ``output`` when it is given (cached), else by running the teacher."""
        out = output
        if out is None:
            with torch.no_grad():
                out = self.teachers[task](x)
        if self.kinds[task] == "segmentation":
            return out.argmax(1) if self.seg_loss == "ce" else out
        if self.kinds[task] == "normals":
            return normals_target(out)
        return out[:, 0]

    def precompute(self, data, batch_size: int = 128) -> TeacherOutputs:
        """The teachers' outputs for every item of ``data``, computed once (:class:`kaviz.cache.TeacherOutputs`
        through the shared cache: another method or run on the same teachers and data reuses them).
        Refuses data with a random (training) transform (:func:`kaviz.data.has_random_transform`):
        its images change every epoch."""
        from ...data import has_random_transform

        if has_random_transform(data):
            raise ValueError("this data applies a random transform (augmentation), so the teachers' predictions "
                             "change every epoch and cannot be computed once; train on it directly "
                             "(run(..., precompute=False)) or load it with augment=False")
        device = next(self.teachers.parameters()).device
        return TeacherOutputs.compute(data, dict(self.teachers.items()), {t: [OUTPUT] for t in self.student.tasks},
                                      batch_size=batch_size, device=device)

    def _targets(self, batch, x):
        cached = cached_teacher_outputs(batch)
        return {t: self.teacher_target(t, x, None if cached is None else cached[t][OUTPUT]) for t in self.student.tasks}

    # ---------------------------------------------------------------------------------- losses
    def task_loss(self, task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kinds[task] == "normals":
            return normals_loss(output, target)
        if self.kinds[task] == "depth":
            return (output[:, 0] - target).abs().mean()
        if self.seg_loss == "ce":
            return F.cross_entropy(output, target.long())
        T = self.T
        log_ps = F.log_softmax(output / T, dim=1)
        log_pt = F.log_softmax(target.detach() / T, dim=1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * (T * T)

    def forward(self, batch):
        x = images_of(batch)
        targets = self._targets(batch, x)
        stage = self.student.stage
        outs = self.student.forward_all(x) if stage is None else self.student.forward_all(x, points=[stage])
        return {self.term(t, p): self.task_loss(t, out, targets[t]) for t, per in outs.items() for p,
                out in per.items()}

    def evaluate(self, data) -> dict:
        if not self.metrics:
            return {}
        return score(self.student, data, kinds=self.kinds, target_keys=self.target_keys, all_branches=True)
