"""The recombination loss (SPEC §4.3): each task's output against its teacher and the ground truth, plus
the code-size term."""
from __future__ import annotations

from typing import Mapping

from torch import nn

from ...data import images_of
from ...losses import soft_cross_entropy
from ...train import freeze
from .evaluation import evaluate_dense
from .network import RecombinedNet
from .tasks import IGNORE_INDEX, SSIM_WINDOW, TASK_KINDS, check_segnet_teachers
from .teachers import ssim_loss

#: Reconstruction losses of :class:`RecombinationLoss` and their named terms: ``"l1+ssim"`` (kaviz's
#: default, as the reference code) and ``"ms_ssim"`` (the paper's MS-SSIM).
RECONSTRUCTION_LOSSES = {"l1+ssim": ("l1", "ssim_loss"), "ms_ssim": ("ms_ssim_loss",)}


# retraining and evaluation
class RecombinationLoss(nn.Module):
    """The retraining objective of a :class:`RecombinedNet` (label-free).

    Reconstruction tasks: ``l1 = mean |x̂ − x|`` and ``ssim_loss = 1 − SSIM(x̂, x)``; segmentation tasks:
    ``kd = soft_ce`` per pixel against the frozen segmentation teacher's logits at temperature
    ``T``. ``reconstruction="ms_ssim"`` replaces the two reconstruction terms by ``ms_ssim_loss =
    1 − MS-SSIM(x̂, x)`` (:func:`kaviz.metrics.ms_ssim_loss`, the same 7×7 SSIM, scale weights
    ``ms_ssim_weights``, default the standard five — images need 112 px a side; pass e.g.
    ``MS_SSIM_WEIGHTS[:3]`` for small ones); ``evaluate`` then also reports ``ms_ssim``.
    Term names get a ``<task>_`` prefix when two tasks share a kind. ``evaluate`` reports
    :func:`evaluate_dense` on the given data (ground-truth masks, for monitoring only: the default
    model selection is on ``val/loss``, which needs no labels).
    """

    def __init__(self, net: RecombinedNet, teachers: Mapping[str, nn.Module], *, T: float = 1.0,
                 num_classes: int | None = None, ignore_index: int = IGNORE_INDEX,
                 weights: Mapping[str, float] | None = None, reconstruction: str = "l1+ssim",
                 ms_ssim_weights=None):
        super().__init__()
        teachers = check_segnet_teachers(teachers)
        missing = [t for t, k in net.kinds.items() if k == "segmentation" and t not in teachers]
        if missing:
            raise ValueError(f"segmentation tasks {missing} need their teacher for the soft targets")
        if T <= 0:
            raise ValueError(f"temperature T must be positive, got {T}")
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_LOSSES} ('l1+ssim': L1 + (1 − SSIM), "
                             f"kaviz's default; 'ms_ssim': 1 − MS-SSIM, the paper's), got {reconstruction!r}")
        from ...metrics import MS_SSIM_WEIGHTS

        self.reconstruction = reconstruction
        self.ms_ssim_weights = tuple(MS_SSIM_WEIGHTS if ms_ssim_weights is None else ms_ssim_weights)
        self.net = net
        self.teachers = nn.ModuleDict({t: freeze(m) for t, m in teachers.items() if net.kinds.get(t) == "segmentation"})
        self.T = float(T)
        seg = [t for t, k in net.kinds.items() if k == "segmentation"]
        self.num_classes = num_classes if num_classes is not None else (
            net.decoders[seg[0]].head.out_channels if seg else None)
        self.ignore_index = ignore_index
        counts = {k: list(net.kinds.values()).count(k) for k in TASK_KINDS}
        self._names = {}
        for task, kind in net.kinds.items():
            terms = RECONSTRUCTION_LOSSES[reconstruction] if kind == "reconstruction" else ("kd",)
            self._names[task] = {t: (f"{task}_{t}" if counts[kind] > 1 else t) for t in terms}
        self.loss_weights = {n: 1.0 for names in self._names.values() for n in names.values()}
        if weights:
            unknown = [k for k in weights if k not in self.loss_weights]
            if unknown:
                raise ValueError(f"unknown loss terms {unknown}; terms are {list(self.loss_weights)}")
            self.loss_weights.update({k: float(v) for k, v in weights.items()})

    def forward(self, batch):
        from ... import metrics

        x = images_of(batch)
        out = self.net(x)
        terms = {}
        for task, kind in self.net.kinds.items():
            names = self._names[task]
            if kind == "reconstruction" and self.reconstruction == "ms_ssim":
                terms[names["ms_ssim_loss"]] = metrics.ms_ssim_loss(out[task], x, window=SSIM_WINDOW,
                                                                    weights=self.ms_ssim_weights)
            elif kind == "reconstruction":
                terms[names["l1"]] = (out[task] - x).abs().mean()
                terms[names["ssim_loss"]] = ssim_loss(out[task], x)
            else:
                s = out[task]
                t = self.teachers[task](x)
                k = s.shape[1]
                terms[names["kd"]] = soft_cross_entropy(s.permute(0, 2, 3, 1).reshape(-1, k),
                                                        t.permute(0, 2, 3, 1).reshape(-1, k), self.T)
        return terms

    def evaluate(self, data) -> dict:
        extra = {"ms_ssim_weights": self.ms_ssim_weights} if self.reconstruction == "ms_ssim" else {}
        return evaluate_dense(self.net, data, num_classes=self.num_classes, ignore_index=self.ignore_index, **extra)
