"""The LSH feature mimicking method: FeatureMimic, ``forward(batch) -> {bce, l2, lsh, kd}`` per variant (SPEC §2)."""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...features import OUTPUT, FeatureTap, extract
from ...train import freeze
from .heads import (
    adapt,
    adapted_layer,
    classifier_std,
    feature_layer,
    head_name,
    pooled_feature_dim,
    pooled_layer,
    submodule_at,
)
from .loss import LSHLoss, binary_kd, l2_loss, softmax_kd, teacher_correct
from .teachers import TEACHER, teacher_pooled_features

#: Student variants: the mimicking terms each one optimises (besides the classification loss).
VARIANTS: dict[str, tuple[str, ...]] = {
    "bce": (),              # the student alone
    "l2": ("l2",),          # L2 feature mimicking
    "lsh": ("lsh",),        # LSH (direction) mimicking
    "lshl2": ("l2", "lsh"),  # both: the paper's method
    "kd": ("kd",),          # logit KD (per-class sigmoid soft targets for multi-label teachers)
}
MIMIC_VARIANTS = tuple(v for v, terms in VARIANTS.items() if set(terms) & {"l2", "lsh"})
#: The logit-KD losses of the ``"kd"`` variant: ``"sigmoid"`` (per-class binary KD, the default) or
#: ``"softmax"`` (KL over the classes, the LSHFM reference code's baseline).
KD_LOSSES = ("sigmoid", "softmax")
#: The ``"kd"`` variant as the LSHFM reference code runs it (issue 15; SPEC §2): softmax KL at T = 4,
#: weight 0.001, started from the L2 variant's stage-1 result (``stage1="l2"``; give ``run`` the
#: same ``stage1_epochs`` and seed as the L2 run). ``run("kd", ..., **REFERENCE_SOFTMAX_KD)``.
REFERENCE_SOFTMAX_KD = {"kd": "softmax", "T": 4.0, "kd_weight": 0.001, "stage1": "l2"}


class FeatureMimic(nn.Module):
    """LSHFM student training as a kaviz method: ``forward(batch) -> {term: scalar}``.

    ``variant`` (see :data:`VARIANTS`): ``"bce"`` (classification loss only), ``"l2"``, ``"lsh"``,
    ``"lshl2"`` (feature mimicking, SPEC §2) or ``"kd"`` (logit KD: :func:`binary_kd` for BCE
    teachers, :func:`kaviz.losses.soft_cross_entropy` for softmax ones). Every variant gets the
    same adapted student (:func:`adapt` is applied here when the student has no adaptation layer),
    so the variants differ by their loss only.

    ``stage=1`` (mimicking variants): ``β₁·L`` alone (``beta1 = 1``); only ``feat_fc`` is
    optimised (:meth:`param_groups`), the backbone runs without gradients but in training mode, so
    its batch-norm statistics still update (``fit`` calls ``method.train()``); the classifier is not
    trained (nor copied from the teacher). ``stage=2``: ``L = CE/BCE + β·L_mimic`` over everything.

    Recipe options (defaults unchanged; docs/decisions.md, "Recipes"): ``kd="softmax"`` makes the
    ``"kd"`` variant a softmax KL (:func:`softmax_kd`) instead of the per-class sigmoid KD;
    ``stage1="l2"`` gives any variant with an adaptation layer (``"kd"`` included) the L2
    variant's stage 1 (``feat_fc`` aligned by L2 alone, so with the same seed every variant's stage 2
    starts from the one checkpoint the L2 run's stage 1 ends with: the reference code's shared stage 1);
    ``l2_weight`` weighs the L2 term in stage 2 apart from the LSH term (default ``beta``; the
    reference uses 1 for its L2 baseline); ``adaptation=False`` (``"bce"`` only) keeps the student
    as it is, without the adaptation layer (the reference BCE baseline; ``cos`` is then measured on
    the classifier input when its width matches the teacher's, else NaN); ``ap`` adds a second mAP
    definition to :meth:`evaluate` (``"non_interpolated"``: ``mAP_non_interpolated``, see
    :data:`kaviz.metrics.AP_DEFINITIONS`); ``mAP`` stays the VOC all-point value.

    ``loss="bce"`` (multi-label, targets ``batch[1][target_key]``) or ``"ce"`` (single-label: the
    mimicking terms average over the samples the teacher gets right). The teacher is frozen; when
    the batch targets carry the teacher's outputs (``"teacher_outputs"``, :class:`TeacherOutputs`) it is
    not run at all. ``evaluate(data)`` reports ``mAP`` (or ``accuracy``) and ``cos``, the mean
    cosine between the student's adapted feature and the teacher's feature.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, variant: str = "lshl2", *, beta: float = 0.5,
                 beta1: float = 1.0, n_hashes: int | None = None, std: float | None = None, bias: str = "median",
                 kd_weight: float = 1.0, T: float = 1.0, loss: str = "bce", target_key: str | None = "labels",
                 teacher_layer: str | None = None, lsh_seed: int = 0, stage: int = 2, kd: str = "sigmoid",
                 stage1: str | None = None, l2_weight: float | None = None, adaptation: bool = True,
                 ap: str = "all_point"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        if loss not in ("bce", "ce"):
            raise ValueError(f"loss must be 'bce' (multi-label) or 'ce' (single-label), got {loss!r}")
        if kd not in KD_LOSSES:
            raise ValueError(f"kd must be one of {KD_LOSSES} (the 'kd' variant's loss), got {kd!r}")
        if stage1 not in (None, "l2"):
            raise ValueError(f"stage1 must be None (the variant's own stage 1) or 'l2' (the L2 variant's stage 1), "
                             f"got {stage1!r}")
        if stage1 is not None and variant == "bce":
            raise ValueError("stage1='l2' needs the adaptation layer to align; the 'bce' baseline has no stage 1")
        if not adaptation and variant != "bce":
            raise ValueError(f"adaptation=False is for the 'bce' baseline only: variant {variant!r} compares the "
                             "adapted feature with the teacher's")
        for name, v in (("beta", beta), ("beta1", beta1), ("kd_weight", kd_weight),
                        ("l2_weight", 0.0 if l2_weight is None else l2_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        self.teacher = freeze(teacher)
        inner = self.teacher.module
        self.teacher_layer = teacher_layer or feature_layer(inner)
        d_t = pooled_feature_dim(inner) if teacher_layer is None else None
        if d_t is None:
            raise ValueError("teacher_layer other than the classifier input is not supported by the default "
                             "adaptation; adapt the student yourself with kaviz.methods.lshfm.adapt(student, d_t)")
        self.adaptation = bool(adaptation)
        if not self.adaptation:
            if head_name(student) is not None:
                raise ValueError("adaptation=False needs a student without an adaptation layer; this one has one at "
                                 f"{head_name(student)!r}")
            self.student = student
            # the classifier input stands in for the mimicked feature in `cos` when the widths agree
            self.student_layer = feature_layer(student) if pooled_feature_dim(student) == d_t else None
        else:
            if head_name(student) is None:
                adapt(student, d_t)
            self.student = student
            self.student_layer = adapted_layer(student)
            head = submodule_at(student, head_name(student))
            if head.feat_fc.out_features != d_t:
                raise ValueError(f"the student's adaptation layer outputs {head.feat_fc.out_features} features but "
                                 f"the teacher's {self.teacher_layer!r} has {d_t}")
        self.variant = variant
        self.terms = VARIANTS[variant]
        self.beta, self.beta1, self.kd_weight, self.T = float(beta), float(beta1), float(kd_weight), float(T)
        self.l2_weight = None if l2_weight is None else float(l2_weight)
        self.kd, self.stage1 = kd, stage1
        from ...metrics import AP_DEFINITIONS

        if ap not in AP_DEFINITIONS:
            raise ValueError(f"ap must be one of {list(AP_DEFINITIONS)}, got {ap!r}")
        self.ap = ap
        self.loss = loss
        self.target_key = target_key
        self.lsh = None
        if "lsh" in self.terms:
            std = classifier_std(inner) if std is None else std
            self.lsh = LSHLoss(d_t, n_hashes if n_hashes is not None else 4 * d_t, std, bias=bias,
                               with_l2="l2" in self.terms, seed=lsh_seed)
        self.stage = stage

    # -- configuration ---------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        return self._stage

    @stage.setter
    def stage(self, value: int):
        if value not in (1, 2):
            raise ValueError(f"stage must be 1 (align feat_fc) or 2 (train everything), got {value!r}")
        if value == 1 and not self.stage1_terms:
            raise ValueError(f"variant {self.variant!r} has no feature-mimicking term: stage 1 is for "
                             f"{list(MIMIC_VARIANTS)} (and for 'kd' with stage1='l2')")
        self._stage = value

    @property
    def stage1_terms(self) -> tuple:
        """The mimicking terms stage 1 optimises: the variant's own, or L2 alone with ``stage1="l2"``."""
        if self.stage1 == "l2":
            return ("l2",)
        return tuple(t for t in self.terms if t in ("l2", "lsh"))

    @property
    def feat_fc(self) -> nn.Linear:
        return submodule_at(self.student, self.student_layer)

    @property
    def loss_weights(self) -> dict:
        if self.stage == 1:
            return {t: self.beta1 for t in ("l2", "lsh")}
        l2 = self.beta if self.l2_weight is None else self.l2_weight
        return {self.loss: 1.0, "l2": l2, "lsh": self.beta, "kd": self.kd_weight}

    def param_groups(self, lr):
        if self.stage == 1:
            return [{"params": list(self.feat_fc.parameters())}]
        return [{"params": [p for p in self.student.parameters() if p.requires_grad]}]

    def fit_bias(self, teacher_features) -> None:
        """Re-fit the LSH bias on the teacher's training features (no-op for variants without LSH)."""
        if self.lsh is not None:
            self.lsh.fit_bias(teacher_features)

    # -- forward ---------------------------------------------------------------------------------
    def _split(self, batch):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError("FeatureMimic needs (images, targets) batches")
        x, y = batch[0], batch[1]
        if isinstance(y, Mapping):
            key = self.target_key or "target"
            if key not in y:
                raise KeyError(f"target_key {key!r} not in the batch targets {list(y)}")
            cached = (y.get("teacher_outputs") or {}).get(TEACHER) or {}
            return x, y[key], cached.get(self.teacher_layer), cached.get(OUTPUT)
        return x, y, None, None

    def _teacher(self, x):
        with FeatureTap(self.teacher.module, self.teacher_layer) as tap:
            logits = self.teacher(x)
            return tap[self.teacher_layer], logits

    def forward(self, batch):
        x, y, f_t, z_t = self._split(batch)
        need_logits = "kd" in self.terms or self.loss == "ce"
        if f_t is None or (need_logits and z_t is None):
            f_t, z_t = self._teacher(x)
        mask = teacher_correct(z_t, y) if (self.loss == "ce" and set(self.terms) & {"l2", "lsh"}) else None
        if self.stage == 1:
            # the backbone only provides features here: no graph through it, but train-mode batch norm
            pooled_name = pooled_layer(self.student)
            with torch.no_grad(), FeatureTap(self.student, pooled_name) as tap:
                self.student(x)
                pooled = tap[pooled_name]
            return self._mimic(self.feat_fc(pooled), f_t, mask, self.stage1_terms)
        if self.student_layer is None:  # adaptation=False: no mimicked feature
            logits, f_s = self.student(x), None
        else:
            with FeatureTap(self.student, self.student_layer, detach=False) as tap:
                logits = self.student(x)
                f_s = tap[self.student_layer]
        if self.loss == "bce":
            out = {"bce": F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))}
        else:
            out = {"ce": F.cross_entropy(logits, y)}
        out.update(self._mimic(f_s, f_t, mask, self.terms))
        if "kd" in self.terms:
            if self.kd == "softmax":
                out["kd"] = softmax_kd(logits, z_t, self.T)
            elif self.loss == "bce":
                out["kd"] = binary_kd(logits, z_t, self.T)
            else:
                from ...losses import soft_cross_entropy

                out["kd"] = soft_cross_entropy(logits, z_t, self.T)
        return out

    def _mimic(self, f_s, f_t, mask, terms) -> dict:
        if "lsh" in terms:
            return self.lsh(f_s, f_t, mask)
        if "l2" in terms:  # the L2 variant, or any variant's stage1="l2"
            return {"l2": l2_loss(f_s, f_t, mask)}
        return {}

    # -- evaluation ------------------------------------------------------------------------------
    def _teacher_val(self, data, targets):
        # the teacher's features of the validation data: carried by a TeacherOutputs, else computed once
        # and reused every epoch through the shared cache (kaviz.cache.teacher_outputs)
        return teacher_pooled_features(self.teacher.module, data, self.teacher_layer)

    def evaluate(self, data) -> dict:
        from ... import metrics

        layers = [OUTPUT] + ([self.student_layer] if self.student_layer is not None else [])
        store = extract(self.student, data, layers, pool="none", progress=False)
        logits = store[OUTPUT]
        targets = store.targets
        out = {}
        labels = targets[self.target_key or "target"] if isinstance(targets, dict) else targets
        if self.loss == "bce":
            difficult = targets.get("difficult") if isinstance(targets, dict) else None
            out["mAP"] = metrics.multilabel_map(logits, labels, difficult=difficult)
            if self.ap != "all_point":
                out[f"mAP_{self.ap}"] = metrics.multilabel_map(logits, labels, difficult=difficult, ap=self.ap)
        else:
            out["accuracy"] = metrics.accuracy(logits, labels)
        if self.student_layer is None:
            out["cos"] = float("nan")  # no student feature of the teacher's width to compare
            return out
        f_t = self._teacher_val(data, targets)
        f_s = store.tensor(self.student_layer)
        out["cos"] = float(F.cosine_similarity(f_s, f_t.to(f_s.dtype), dim=1).mean())
        return out
