"""The SBM method: targets from frozen teachers and ``forward(batch) -> {<task>: loss}``."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ...data import images_of
from ...train import freeze
from .evaluation import score
from .student import SBMStudent
from .tasks import TARGET_KEYS


class TeacherTargets(torch.utils.data.Dataset):
    """``data``'s items with the frozen teachers' targets computed once: the target dict gains
    ``"teacher": {task: target}`` (class ids for ``seg_loss="ce"``, logits for ``"kl"``, depth).

    Only valid when ``data`` has no random augmentation (the same image every epoch); build it with
    :meth:`SBM.precompute`.
    """

    def __init__(self, data, targets: Mapping[str, torch.Tensor], key: str):
        self.data = data
        self.targets = dict(targets)
        self.key = key
        for t, v in self.targets.items():
            if len(v) != len(data):
                raise ValueError(f"teacher targets for {t!r} have {len(v)} rows for {len(data)} images")

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        y = dict(y) if isinstance(y, Mapping) else {"target": y}
        y["teacher"] = {t: v[i] for t, v in self.targets.items()}
        return x, y

    def get_image(self, i):
        get = getattr(self.data, "get_image", None)
        return get(i) if get is not None else self.data[i][0]

    def image_array(self, i):
        return self.data.image_array(i)

    @property
    def fingerprint(self) -> str:
        from ...data import fingerprint

        return fingerprint(("teacher-targets", fingerprint(self.data), self.key))


class SBM(nn.Module):
    """The SBM training method for :func:`kaviz.train.fit`: ``forward(batch)`` returns one loss term
    per task and branch point of the student, named ``"<task>@<point>"`` (``"<task>"`` once each
    task has a single branch).

    - segmentation, ``seg_loss="ce"``: ``CE(ŷ, argmax p_t)`` per pixel; ``"kl"``:
      ``T² · mean_pixels KL(softmax(z_t/T) ‖ softmax(ŷ/T))``;
    - depth: ``mean |ŷ − d_t|``.

    The teachers are frozen (:func:`kaviz.train.freeze`); their predictions come from the batch
    (``y["teacher"]``, see :meth:`precompute`) or are computed on the fly. Labels are never read for
    training. ``evaluate(data)`` scores every branch against the ground truth (logging only:
    ``fit`` selects the epoch on the validation *loss*, i.e. agreement with the teachers).
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
        return {self.term(t, p): self.task_weights[t] for t in self.student.tasks for p in self.student.branches[t]}

    def term(self, task: str, point: str) -> str:
        return task if len(self.student.branches[task]) == 1 else f"{task}@{point}"

    # -------------------------------------------------------------------------- teacher targets
    def teacher_target(self, task: str, x: torch.Tensor) -> torch.Tensor:
        """Teacher ``task``'s target for images ``x``: argmax ids (``"ce"``), logits (``"kl"``) or depth."""
        with torch.no_grad():
            out = self.teachers[task](x)
        if self.kinds[task] == "segmentation":
            return out.argmax(1) if self.seg_loss == "ce" else out
        return out[:, 0]

    def precompute(self, data, batch_size: int = 128) -> TeacherTargets:
        """The teachers' targets for every item of ``data``, computed once (:class:`TeacherTargets`).
        Refuses data with a random (training) transform (:func:`kaviz.data.has_random_transform`):
        its images change every epoch."""
        from ...data import has_random_transform
        from ...features import eval_mode

        if has_random_transform(data):
            raise ValueError("this data applies a random transform (augmentation), so the teachers' predictions "
                             "change every epoch and cannot be computed once; train on it directly "
                             "(run(..., precompute=False)) or load it with augment=False")
        device = next(self.teachers.parameters()).device
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        parts: dict[str, list] = {t: [] for t in self.student.tasks}
        with eval_mode(self), torch.no_grad():
            for batch in loader:
                x = images_of(batch).to(device)
                for t in self.student.tasks:
                    parts[t].append(self.teacher_target(t, x).cpu())
        targets = {t: torch.cat(v) for t, v in parts.items()}
        return TeacherTargets(data, targets, key=f"{self.seg_loss}:{self.T}:" + ":".join(
            _weights_id(self.teachers[t].module) for t in self.student.tasks))

    def _targets(self, batch, x):
        y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        pre = y.get("teacher") if isinstance(y, Mapping) else None
        if pre is not None:
            return pre
        return {t: self.teacher_target(t, x) for t in self.student.tasks}

    # ---------------------------------------------------------------------------------- losses
    def task_loss(self, task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
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
        outs = self.student.forward_all(x)
        return {self.term(t, p): self.task_loss(t, out, targets[t]) for t, per in outs.items() for p,
                out in per.items()}

    def evaluate(self, data) -> dict:
        if not self.metrics:
            return {}
        return score(self.student, data, kinds=self.kinds, target_keys=self.target_keys, all_branches=True)


def _weights_id(model: nn.Module) -> str:
    from ...models import weights_hash

    return weights_hash(model)[:12]
