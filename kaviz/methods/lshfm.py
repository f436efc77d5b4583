"""Distilling knowledge by mimicking features (Guo-Hua Wang, Yifan Ge & Jianxin Wu, "Distilling
Knowledge by Mimicking Features", IEEE TPAMI 2021, arXiv:2011.01424; SPEC.md §2).

The student mimics the teacher's penultimate feature (the global-pooled vector that feeds the
classifier) instead of its soft logits, so the method also works for teachers without a softmax
(multi-label BCE teachers). It mainly mimics the feature's *direction*: random hyperplanes
(locality-sensitive hashing) turn a direction into bits, and the student must reproduce the
teacher's bits.

- :class:`LSHLoss` — frozen projection ``W`` (N×D, entries ~ N(0, std²)) and bias ``b`` (N);
  ``h = f Wᵀ + b``; ``L_LSH = mean BCEWithLogits(h_s, 1[h_t > 0])``, ``L_L2 = mean (f_s − f_t)²``.
- :func:`adapt` — the adaptation layer: the student's classifier ``fc`` becomes
  :class:`AdaptedHead` ``fc.fc(fc.feat_fc(x))`` with ``feat_fc = Linear(d_s, d_t)``; the mimicked
  feature is ``feat_fc``'s output.
- :class:`FeatureMimic` — the method (one of :data:`VARIANTS`: ``bce``, ``l2``, ``lsh``, ``lshl2``,
  ``kd``), stage 1 (only ``feat_fc`` trains, β·L alone, batch-norm statistics updating) or stage 2
  (everything, ``BCE + β·L``).
- :func:`run` — stage 1 then stage 2 with :func:`kaviz.train.fit` (bias re-fitted before stage 2),
  model selection on the validation split.
- Data and analysis: :func:`load_data` (embedded scenes or VOC2007 / COCO 2014),
  :func:`teacher_outputs`, :func:`evaluate_model`, :func:`results_table`, :func:`per_class_table`,
  :func:`feature_agreement`, :func:`mean_feature_cosine`, :func:`feature_sets`,
  :func:`angle_hamming`, :func:`primary_labels`.

Why :func:`adapt` replaces the classifier module instead of wrapping the student: the adapted
student stays *one* ``nn.Module`` whose ``forward(x)`` returns logits, so everything that takes a
model (``extract``, ``FeatureTap``, ``Supervised``, the embedding explorer, checkpoints) works on
it unchanged, and the adaptation is part of its state dict. A wrapper that re-routes the
classifier's input with a hook would make ``student(x)`` behave differently inside and outside
the wrapper. The student's class is not edited: only its classifier attribute is replaced, and
the names stay tappable (``fc:in`` the pooled feature, ``fc.feat_fc`` the adapted one).
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..features import OUTPUT, FeatureTap, extract
from ..train import freeze

__all__ = [
    "LSHLoss",
    "BIAS_MODES",
    "VARIANTS",
    "AdaptedHead",
    "adapt",
    "adapted_layer",
    "pooled_layer",
    "feature_layer",
    "classifier_std",
    "teacher_correct",
    "binary_kd",
    "TeacherOutputs",
    "teacher_outputs",
    "FeatureMimic",
    "RunResult",
    "run",
    "load_data",
    "label_summary",
    "evaluate_model",
    "results_table",
    "per_class_table",
    "feature_agreement",
    "mean_feature_cosine",
    "feature_sets",
    "angle_hamming",
    "primary_labels",
]

BIAS_MODES = ("median", "mean", "zero")
#: Student variants: the mimicking terms each one optimises (besides the classification loss).
VARIANTS: dict[str, tuple[str, ...]] = {
    "bce": (),              # the student alone
    "l2": ("l2",),          # L2 feature mimicking
    "lsh": ("lsh",),        # LSH (direction) mimicking
    "lshl2": ("l2", "lsh"),  # both: the paper's method
    "kd": ("kd",),          # logit KD (per-class sigmoid soft targets for multi-label teachers)
}
MIMIC_VARIANTS = tuple(v for v, terms in VARIANTS.items() if set(terms) & {"l2", "lsh"})


def _check_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _as_features(f, what) -> torch.Tensor:
    if isinstance(f, np.ndarray):
        f = torch.from_numpy(np.ascontiguousarray(f))
    if not torch.is_tensor(f):
        raise TypeError(f"{what} must be a tensor or a NumPy array (N, D), got {type(f).__name__}")
    if f.dim() != 2:
        raise ValueError(f"{what} must be (N, D) pooled feature vectors, got shape {tuple(f.shape)}; pool "
                         "conv maps first (extract(..., pool='avg')) or tap the classifier's input ('fc:in')")
    return f


# ------------------------------------------------------------------------------------------ loss
class LSHLoss(nn.Module):
    """Locality-sensitive-hashing feature-mimicking loss (LSHFM, TPAMI 2021; SPEC §2).

    Buffers (frozen, saved with the state dict): ``weight`` W ∈ R^{N×D} with entries ~ N(0, std²)
    and ``bias`` b ∈ R^N. With ``h(f) = f Wᵀ + b`` and the teacher's bits ``y = 1[h(f_t) > 0]``:

    - ``lsh = mean over (batch × N) of BCEWithLogits(h(f_s), y)``
    - ``l2  = mean over (batch × D) of (f_s − f_t)²``  (only when ``with_l2``)

    ``forward(f_s, f_t, mask=None)`` returns ``{"l2": ..., "lsh": ...}`` (named terms for
    :func:`kaviz.train.fit`); ``mask`` (bool per sample) restricts the average to some samples
    — the single-label variant averages over the samples the teacher classifies correctly
    (:func:`teacher_correct`); a batch with no such sample gives 0.

    ``std`` acts as an inverse temperature: scaling W scales ``h(f_s)`` but leaves the teacher's
    bits unchanged (also with a fitted bias, which scales with W). ``bias``: ``"median"``
    (``b_j = −median_i(w_j·f_t,i)`` over the teacher's training features, the lower median for an
    even count, so each bit splits the data 50/50), ``"mean"``, or ``"zero"`` (then the probability
    that a bit differs is θ(f_s, f_t)/π, the angle between the features over π). Call
    :meth:`fit_bias` before the first forward unless ``bias="zero"``. ``seed`` draws W from a
    private generator (else from torch's global RNG).
    """

    def __init__(self, dim: int, n_hashes: int, std: float, bias: str = "median", with_l2: bool = True, *,
                 seed: int | None = None):
        super().__init__()
        dim = _check_int("dim", dim)
        n_hashes = _check_int("n_hashes", n_hashes)
        if torch.is_tensor(std) and std.numel() == 1:
            std = float(std)
        elif isinstance(std, (int, float, np.floating)) and not isinstance(std, bool):
            std = float(std)
        if not isinstance(std, float) or not math.isfinite(std) or std <= 0:
            raise ValueError(f"std must be a positive finite number (the std of the hyperplanes' entries; by "
                             f"default the std of the teacher classifier's weights), got {std!r}")
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
        g = None
        if seed is not None:
            g = torch.Generator().manual_seed(_check_int("seed", seed, minimum=0))
        self.dim, self.n_hashes, self.std, self.bias_mode, self.with_l2 = dim, n_hashes, std, bias, bool(with_l2)
        self.register_buffer("weight", torch.randn(n_hashes, dim, generator=g) * std)
        self.register_buffer("bias", torch.zeros(n_hashes))
        self.register_buffer("bias_fitted", torch.tensor(bias == "zero"))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_hashes={self.n_hashes}, std={self.std:.4g}, bias={self.bias_mode!r}, with_l2={self.with_l2}"

    @torch.no_grad()
    def fit_bias(self, teacher_features) -> "LSHLoss":
        """Set ``b = −stat_i(W f_t,i)`` over the teacher's training features (N_t, D): the lower
        median (``"median"``), the mean (``"mean"``) or 0 (``"zero"``). Returns self."""
        f = _as_features(teacher_features, "teacher_features")
        if f.shape[1] != self.dim:
            raise ValueError(f"teacher features have {f.shape[1]} dimensions, this LSHLoss expects {self.dim}")
        if f.shape[0] == 0:
            raise ValueError("fit_bias needs at least one teacher feature vector")
        f = f.to(self.weight.device, self.weight.dtype)  # the module's dtype: a .double() loss works
        if not torch.isfinite(f).all():
            raise ValueError("teacher features contain NaN/inf; check the teacher")
        proj = f @ self.weight.T
        if self.bias_mode == "median":
            stat = proj.median(dim=0).values  # torch's median is the lower median for an even count
        elif self.bias_mode == "mean":
            stat = proj.mean(0)
        else:
            stat = torch.zeros_like(self.bias)
        self.bias.copy_(-stat)
        self.bias_fitted.fill_(True)
        return self

    def hash(self, f: torch.Tensor) -> torch.Tensor:
        """``h(f) = f Wᵀ + b``, (B, N): the hash logits (their signs are the bits), in the module's
        dtype (features of another floating dtype are cast, keeping their graph)."""
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be (B, {self.dim}), got {tuple(f.shape)}")
        if f.dtype != self.weight.dtype and f.is_floating_point():
            f = f.to(self.weight.dtype)
        return F.linear(f, self.weight, self.bias)

    def bits(self, f: torch.Tensor) -> torch.Tensor:
        """``1[h(f) > 0]`` as a bool tensor (B, N)."""
        return self.hash(f) > 0

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        if f_s.shape != f_t.shape:
            raise ValueError(f"student features {tuple(f_s.shape)} and teacher features {tuple(f_t.shape)} must "
                             "have the same shape: put an adaptation layer on the student (kaviz.methods.lshfm.adapt)")
        if not bool(self.bias_fitted):
            raise RuntimeError(f"the LSH bias ({self.bias_mode!r}) is not fitted: call "
                               "lsh.fit_bias(teacher_training_features) first, or use bias='zero'")
        f_t = f_t.detach()
        logits = self.hash(f_s)
        y = (self.hash(f_t) > 0).to(logits.dtype)
        per_sample = {"lsh": F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)}
        if self.with_l2:
            per_sample = {"l2": (f_s - f_t).pow(2).mean(1), **per_sample}
        return {k: _masked_mean(v, mask) for k, v in per_sample.items()}


def _masked_mean(v: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return v.mean()
    mask = mask.to(device=v.device, dtype=torch.bool)
    if mask.shape != v.shape:
        raise ValueError(f"mask must be one bool per sample {tuple(v.shape)}, got {tuple(mask.shape)}")
    w = mask.to(v.dtype)
    # the sum keeps the graph connected (a zero gradient) when the teacher gets no sample right
    return (v * w).sum() / w.sum().clamp_min(1.0)


def l2_loss(f_s, f_t, mask=None) -> torch.Tensor:
    """``mean over (batch × D) of (f_s − f_t)²`` (the L2 mimicking baseline)."""
    if f_s.shape != f_t.shape:
        raise ValueError(f"student features {tuple(f_s.shape)} and teacher features {tuple(f_t.shape)} differ")
    return _masked_mean((f_s - f_t.detach()).pow(2).mean(1), mask)


def teacher_correct(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Single-label variant: which samples the teacher classifies correctly (argmax == target)."""
    return teacher_logits.argmax(1) == targets


def binary_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Logit KD for a multi-label (sigmoid) teacher: per class, the teacher's probability is a soft
    binary target, ``mean over (batch × K) of BCEWithLogits(s/T, sigmoid(t/T)) · T²``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if T <= 0:
        raise ValueError(f"temperature T must be positive, got {T}")
    return F.binary_cross_entropy_with_logits(student_logits / T, torch.sigmoid(teacher_logits.detach() / T)) * T * T


# ---------------------------------------------------------------------------------- adaptation
class AdaptedHead(nn.Module):
    """The student's classifier on top of the adaptation layer: ``fc(feat_fc(x))`` with
    ``feat_fc = Linear(d_s, d_t)`` (no activation, SPEC §2). ``feat_fc``'s output is the student
    feature that mimics the teacher's."""

    def __init__(self, in_features: int, feature_dim: int, num_classes: int):
        super().__init__()
        self.feat_fc = nn.Linear(in_features, feature_dim)
        self.fc = nn.Linear(feature_dim, num_classes)

    @property
    def in_features(self) -> int:
        return self.feat_fc.in_features

    @property
    def out_features(self) -> int:
        return self.fc.out_features

    def forward(self, x):
        return self.fc(self.feat_fc(x))


def _get(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        from ..features import _unknown

        raise _unknown(model, name)
    return modules[name]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = _get(model, parent_name) if parent_name else model
    setattr(parent, child, module)


def _head_name(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, AdaptedHead):
            return name
    return None


def adapt(student: nn.Module, feature_dim: int, classifier: str | None = None) -> nn.Module:
    """Put the adaptation layer on ``student`` (in place; returns it): its classifier (``classifier``,
    default :func:`kaviz.models.classifier_name`, e.g. ``fc``) becomes an :class:`AdaptedHead`
    ``Linear(d_s, feature_dim)`` → ``Linear(feature_dim, K)``, also when ``d_s == feature_dim``
    (SPEC §2: ResNet-18 ← ResNet-34 uses 512→512). Layer names afterwards: ``"<classifier>:in"``
    the pooled feature, ``"<classifier>.feat_fc"`` the adapted (mimicking) feature."""
    from ..models import classifier_name, spec

    feature_dim = _check_int("feature_dim", feature_dim)
    if _head_name(student) is not None:
        raise ValueError(f"{type(student).__name__} already has an adaptation layer at {_head_name(student)!r}")
    name = classifier or classifier_name(student)
    old = _get(student, name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"the classifier {name!r} must be an nn.Linear, got {type(old).__name__}; pass "
                        "classifier='<dotted name of the final Linear layer>'")
    head = AdaptedHead(old.in_features, feature_dim, old.out_features).to(old.weight.device)
    _set(student, name, head)
    student.kaviz_classifier = f"{name}.fc"
    student.kaviz_spec = {**spec(student), "adaptation": [name, feature_dim]}
    return student


def adapted_layer(student: nn.Module) -> str:
    """The name of the adapted (mimicking) feature of a student that went through :func:`adapt`."""
    name = _head_name(student)
    if name is None:
        raise ValueError(f"{type(student).__name__} has no adaptation layer: call kaviz.methods.lshfm.adapt("
                         "student, teacher_feature_dim) first")
    return f"{name}.feat_fc"


def pooled_layer(student: nn.Module) -> str:
    """The student's own pooled feature (the adaptation layer's input)."""
    return f"{adapted_layer(student)}:in"


def feature_layer(model: nn.Module) -> str:
    """The pooled feature a (teacher) model's classifier reads: ``"<classifier>:in"``."""
    from ..models import classifier_name

    return f"{classifier_name(model)}:in"


def classifier_std(model: nn.Module) -> float:
    """Standard deviation of the classifier's weight matrix (the default LSH ``std``, SPEC §2)."""
    from ..models import classifier_name

    w = _get(model, classifier_name(model)).weight.detach()
    return float(w.float().std())


def _feature_dim(model: nn.Module) -> int:
    from ..models import classifier_name

    return int(_get(model, classifier_name(model)).in_features)


# ------------------------------------------------------------------------ cached teacher outputs
class TeacherOutputs(torch.utils.data.Dataset):
    """``dataset`` with the frozen teacher's pooled feature and logits added to every target dict
    (``"teacher_feature"``, ``"teacher_logits"``), computed once (SPEC/DESIGN §6: reuse frozen
    outputs across epochs and methods). Valid only without random augmentation: the cached outputs
    are those of the images as the dataset returns them now. ``keys`` keeps only these entries of
    dict targets (the scenes' masks and depth maps are not needed here); a plain target (class ids)
    is kept under ``"target"``."""

    def __init__(self, dataset, teacher: nn.Module, *, layer: str | None = None,
                 keys: Sequence[str] | None = ("labels", "difficult"), batch_size: int = 256, device=None):
        self.dataset = dataset
        self.layer = layer or feature_layer(teacher)
        store = extract(teacher, dataset, [self.layer, OUTPUT], pool="none", batch_size=batch_size,
                        device=device, progress=False)
        self.features = store.tensor(self.layer)
        self.logits = store.tensor(OUTPUT)
        self.keys = None if keys is None else tuple(keys)
        from ..models import weights_hash

        self._teacher_hash = weights_hash(teacher)

    def __len__(self):
        return len(self.dataset)

    def _target(self, y, i):
        if isinstance(y, Mapping):
            out = {k: v for k, v in y.items() if self.keys is None or k in self.keys}
        else:
            out = {"target": y}  # class ids or multi-hot rows: kept under "target"
        out["teacher_feature"] = self.features[i]
        out["teacher_logits"] = self.logits[i]
        return out

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, self._target(y, i)

    def get_image(self, i):
        return self.dataset.get_image(i) if hasattr(self.dataset, "get_image") else self.dataset[i][0]

    def image_array(self, i):
        return self.dataset.image_array(i)

    @property
    def fingerprint(self) -> str:
        from ..data import fingerprint
        from ..data.core import _digest

        return _digest(("teacher-outputs", fingerprint(self.dataset), self._teacher_hash, self.layer, self.keys))

    @property
    def num_classes(self):
        return getattr(self.dataset, "num_classes", None)

    @property
    def classes(self):
        return getattr(self.dataset, "classes", None)

    def __repr__(self):
        return f"TeacherOutputs({self.dataset!r}, layer={self.layer!r})"


def teacher_outputs(data, teacher: nn.Module, **kwargs):
    """``TeacherOutputs(data, teacher)`` when ``data`` returns the same images every time
    (:func:`kaviz.data.has_random_transform` is False: no transform, or a deterministic one), else
    ``data`` unchanged (the teacher then runs on every augmented batch)."""
    from ..data import has_random_transform

    if data is None or isinstance(data, TeacherOutputs) or has_random_transform(data):
        return data
    return TeacherOutputs(data, teacher, **kwargs)


def _forced_cache(data, teacher):
    """``cache_teacher=True``: the caller overrides the check (e.g. a custom transform kaviz cannot
    see into); warn when kaviz thinks the data is augmented."""
    import warnings

    from ..data import has_random_transform

    if data is None or isinstance(data, TeacherOutputs):
        return data
    if has_random_transform(data):
        warnings.warn(f"cache_teacher=True on data with a random transform ({getattr(data, 'transform', None)!r}): "
                      "the teacher's outputs of one augmented view are reused every epoch. Pass "
                      "cache_teacher='auto' to cache only deterministic data.", stacklevel=3)
    return TeacherOutputs(data, teacher)


def _teacher_features(teacher, data, layer, batch_size=256):
    if isinstance(data, TeacherOutputs) and data.layer == layer:
        return data.features
    return extract(teacher, data, layer, pool="none", batch_size=batch_size, progress=False).tensor(layer)


# ------------------------------------------------------------------------------------- method
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

    ``loss="bce"`` (multi-label, targets ``batch[1][target_key]``) or ``"ce"`` (single-label: the
    mimicking terms average over the samples the teacher gets right). The teacher is frozen; when
    the batch targets carry ``teacher_feature``/``teacher_logits`` (:class:`TeacherOutputs`) it is
    not run at all. ``evaluate(data)`` reports ``mAP`` (or ``accuracy``) and ``cos``, the mean
    cosine between the student's adapted feature and the teacher's feature.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, variant: str = "lshl2", *, beta: float = 0.5,
                 beta1: float = 1.0, n_hashes: int | None = None, std: float | None = None, bias: str = "median",
                 kd_weight: float = 1.0, T: float = 1.0, loss: str = "bce", target_key: str | None = "labels",
                 teacher_layer: str | None = None, lsh_seed: int = 0, stage: int = 2):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        if loss not in ("bce", "ce"):
            raise ValueError(f"loss must be 'bce' (multi-label) or 'ce' (single-label), got {loss!r}")
        for name, v in (("beta", beta), ("beta1", beta1), ("kd_weight", kd_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        self.teacher = freeze(teacher)
        inner = self.teacher.module
        self.teacher_layer = teacher_layer or feature_layer(inner)
        d_t = _feature_dim(inner) if teacher_layer is None else None
        if d_t is None:
            raise ValueError("teacher_layer other than the classifier input is not supported by the default "
                             "adaptation; adapt the student yourself with kaviz.methods.lshfm.adapt(student, d_t)")
        if _head_name(student) is None:
            adapt(student, d_t)
        self.student = student
        self.student_layer = adapted_layer(student)
        head = _get(student, _head_name(student))
        if head.feat_fc.out_features != d_t:
            raise ValueError(f"the student's adaptation layer outputs {head.feat_fc.out_features} features but the "
                             f"teacher's {self.teacher_layer!r} has {d_t}")
        self.variant = variant
        self.terms = VARIANTS[variant]
        self.beta, self.beta1, self.kd_weight, self.T = float(beta), float(beta1), float(kd_weight), float(T)
        self.loss = loss
        self.target_key = target_key
        self.lsh = None
        if "lsh" in self.terms:
            std = classifier_std(inner) if std is None else std
            self.lsh = LSHLoss(d_t, n_hashes if n_hashes is not None else 4 * d_t, std, bias=bias,
                               with_l2="l2" in self.terms, seed=lsh_seed)
        self.stage = stage
        self._val_teacher: dict[str, torch.Tensor] = {}

    # -- configuration ---------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        return self._stage

    @stage.setter
    def stage(self, value: int):
        if value not in (1, 2):
            raise ValueError(f"stage must be 1 (align feat_fc) or 2 (train everything), got {value!r}")
        if value == 1 and not set(self.terms) & {"l2", "lsh"}:
            raise ValueError(f"variant {self.variant!r} has no feature-mimicking term: stage 1 is for "
                             f"{list(MIMIC_VARIANTS)}")
        self._stage = value

    @property
    def feat_fc(self) -> nn.Linear:
        return _get(self.student, self.student_layer)

    @property
    def loss_weights(self) -> dict:
        if self.stage == 1:
            return {t: self.beta1 for t in ("l2", "lsh")}
        return {self.loss: 1.0, "l2": self.beta, "lsh": self.beta, "kd": self.kd_weight}

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
            return x, y[key], y.get("teacher_feature"), y.get("teacher_logits")
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
            return self._mimic(self.feat_fc(pooled), f_t, mask)
        with FeatureTap(self.student, self.student_layer, detach=False) as tap:
            logits = self.student(x)
            f_s = tap[self.student_layer]
        if self.loss == "bce":
            out = {"bce": F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))}
        else:
            out = {"ce": F.cross_entropy(logits, y)}
        out.update(self._mimic(f_s, f_t, mask))
        if "kd" in self.terms:
            if self.loss == "bce":
                out["kd"] = binary_kd(logits, z_t, self.T)
            else:
                from ..losses import soft_cross_entropy

                out["kd"] = soft_cross_entropy(logits, z_t, self.T)
        return out

    def _mimic(self, f_s, f_t, mask) -> dict:
        if self.lsh is not None:
            return self.lsh(f_s, f_t, mask)
        if "l2" in self.terms:
            return {"l2": l2_loss(f_s, f_t, mask)}
        return {}

    # -- evaluation ------------------------------------------------------------------------------
    def _teacher_val(self, data, targets):
        if isinstance(targets, dict) and "teacher_feature" in targets:
            return torch.as_tensor(np.asarray(targets["teacher_feature"]))
        from ..data import fingerprint

        try:
            key = fingerprint(data)
        except TypeError:
            key = None
        if key is None or key not in self._val_teacher:
            feats = _teacher_features(self.teacher.module, data, self.teacher_layer)
            if key is None:
                return feats
            self._val_teacher[key] = feats
        return self._val_teacher[key]

    def evaluate(self, data) -> dict:
        from .. import metrics

        store = extract(self.student, data, [OUTPUT, self.student_layer], pool="none", progress=False)
        logits = store[OUTPUT]
        targets = store.targets
        out = {}
        labels = targets[self.target_key or "target"] if isinstance(targets, dict) else targets
        if self.loss == "bce":
            difficult = targets.get("difficult") if isinstance(targets, dict) else None
            out["mAP"] = metrics.multilabel_map(logits, labels, difficult=difficult)
        else:
            out["accuracy"] = metrics.accuracy(logits, labels)
        f_t = self._teacher_val(data, targets)
        f_s = store.tensor(self.student_layer)
        out["cos"] = float(F.cosine_similarity(f_s, f_t.to(f_s.dtype), dim=1).mean())
        return out


# ----------------------------------------------------------------------------------------- run
class RunResult(NamedTuple):
    """What :func:`run` returns: the trained (adapted) student, the method, and the history of both
    stages (``stage`` column; ``epoch`` runs on across stages; ``attrs["best_epoch"]`` is the
    stage-2 epoch selected on validation, in that numbering)."""

    student: nn.Module
    method: FeatureMimic
    history: "object"


def run(variant: str, student: nn.Module | str, teacher: nn.Module, train_data, val_data, *, epochs: int,
        stage1_epochs: int = 0, num_classes: int | None = None, arch_kwargs: Mapping | None = None,
        seed: int = 0, beta: float = 0.5, beta1: float = 1.0, n_hashes: int | None = None, std: float | None = None,
        bias: str = "median", kd_weight: float = 1.0, T: float = 1.0, loss: str = "bce",
        target_key: str | None = "labels", lr: float = 1e-3, stage1_lr: float | None = None,
        cache_teacher: bool | str = "auto", monitor: str | None = None, **fit_kwargs) -> RunResult:
    """Train one student variant: stage 1 (mimicking variants, ``stage1_epochs`` > 0) then stage 2.

    ``student``: a model, or an architecture name built (after ``kaviz.seed_everything(seed)``) with
    ``num_classes`` and ``arch_kwargs``. Stage 1 keeps its best epoch by validation loss
    (the mimicking loss); stage 2 by ``monitor`` (default ``val/mAP`` for ``loss="bce"``, else
    ``val/accuracy``) — never on a test split. The LSH bias is fitted on the teacher's training
    features before each stage (SPEC §2: re-fitted before stage 2; with cached teacher outputs the
    re-fit gives the same bias, with augmentation a fresh pass). ``cache_teacher``: ``"auto"``
    caches the teacher's outputs (:func:`teacher_outputs`) when the data has no random
    augmentation (:func:`kaviz.data.has_random_transform`); True forces the cache (with a warning
    on augmented data), False never caches. Other keywords go to :func:`kaviz.train.fit` (``batch_size``,
    ``optimizer="sgd"``, ``schedule="cosine"``, ``weight_decay``, ``device``...).

    Epoch numbers: stage 1 is epochs ``1..stage1_epochs``, stage 2 starts at
    ``stage1_epochs + 1`` for *every* variant (also the baselines, which have no stage 1), so the
    curves of all variants line up on stage 2.
    """
    import pandas as pd

    from .. import seed_everything
    from ..train import fit

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    _check_int("epochs", epochs)
    _check_int("stage1_epochs", stage1_epochs, minimum=0)
    seed_everything(seed)
    if isinstance(student, str):
        from ..models import build

        num_classes = num_classes or getattr(train_data, "num_classes", None)
        if num_classes is None:
            raise ValueError("num_classes is not given and the training data does not say (data.num_classes)")
        student = build(student, num_classes, **dict(arch_kwargs or {}))
    if cache_teacher == "auto":
        train_data, val_data = teacher_outputs(train_data, teacher), teacher_outputs(val_data, teacher)
    elif cache_teacher:
        train_data, val_data = _forced_cache(train_data, teacher), _forced_cache(val_data, teacher)
    method = FeatureMimic(student, teacher, variant, beta=beta, beta1=beta1, n_hashes=n_hashes, std=std,
                          bias=bias, kd_weight=kd_weight, T=T, loss=loss, target_key=target_key, lsh_seed=seed)
    t_train = (_teacher_features(method.teacher.module, train_data, method.teacher_layer)
               if method.lsh is not None else None)
    parts = []
    offset = stage1_epochs
    if stage1_epochs and variant in MIMIC_VARIANTS:
        method.stage = 1
        method.fit_bias(t_train)
        h1 = fit(method, train_data, val_data, epochs=stage1_epochs, lr=stage1_lr or lr, seed=seed,
                 monitor="val/loss" if val_data is not None else "train/loss", **fit_kwargs)
        h1.insert(0, "stage", 1)
        parts.append(h1)
    method.stage = 2
    if t_train is not None and variant in MIMIC_VARIANTS:
        if parts and getattr(train_data, "transform", None) is not None:
            t_train = _teacher_features(method.teacher.module, train_data, method.teacher_layer)
        method.fit_bias(t_train)
    if monitor is None:
        monitor = ("val/mAP" if loss == "bce" else "val/accuracy") if val_data is not None else "train/loss"
    h2 = fit(method, train_data, val_data, epochs=epochs, lr=lr, seed=seed, monitor=monitor, **fit_kwargs)
    h2.insert(0, "stage", 2)
    best = h2.attrs.get("best_epoch")
    h2["epoch"] = h2["epoch"] + offset
    parts.append(h2)
    history = pd.concat(parts, ignore_index=True)
    history.attrs.update({"best_epoch": None if best is None else best + offset, "monitor": monitor,
                          "best_value": h2.attrs.get("best_value"), "variant": variant, "seed": seed,
                          "stage1_epochs": offset if len(parts) > 1 else 0,
                          "stage1_best_epoch": parts[0].attrs.get("best_epoch") if len(parts) > 1 else None})
    student.eval()
    return RunResult(student, method, history)


# ------------------------------------------------------------------------------------------ data
DATA_SOURCES = ("embedded", "voc2007", "coco2014")


def load_data(source: str = "embedded", *, root=None, n: int = 2500, image_size: int = 32, max_objects: int = 2,
              val: float = 0.2, test: float = 0.2, seed: int = 0):
    """Train / validation / test splits for the LSHFM notebook (``kaviz.data.Splits``).

    - ``"embedded"``: ``kaviz.data.scenes(n, seed, image_size, max_objects)`` (multi-hot labels,
      VOC-style difficult flags), split ``val``/``test`` of it;
    - ``"voc2007"``: ``trainval`` (a seeded ``val`` share held out for model selection, shown with
      the evaluation transform) and ``test`` from :func:`kaviz.data.real.voc2007`;
    - ``"coco2014"``: ``train`` (``val`` share held out) and COCO's ``val`` as the test split.

    ``root=None`` for a real source raises the loader's error that shows the expected folder
    layout (no silent fallback to the embedded data).
    """
    from ..data import Splits, scenes, split

    if source not in DATA_SOURCES:
        raise ValueError(f"source must be one of {DATA_SOURCES}, got {source!r}")
    if source == "embedded":
        return split(scenes(n, seed=seed, size=image_size, max_objects=max_objects), val=val, test=test, seed=seed)
    from ..data import real

    if source == "voc2007":
        full = real.voc2007(root, split="trainval", image_size=image_size)
        test_ds = real.voc2007(root, split="test", image_size=image_size)
    else:
        full = real.coco2014_multilabel(root, split="train", image_size=image_size)
        test_ds = real.coco2014_multilabel(root, split="val", image_size=image_size)
    tr, va, _ = split(full, val=val, test=0.0, seed=seed)
    return Splits(tr, va.with_transform(None), test_ds)


def label_summary(splits: Mapping[str, object], *, target_key: str = "labels"):
    """Images per class in each split (``{"train": ds, ...}``), and how many of them are
    difficult (ignored by the mAP), from the datasets' ``targets`` (no image is loaded)."""
    import pandas as pd

    cols = {}
    classes = None
    for name, ds in splits.items():
        t = getattr(ds, "targets", None)
        if not isinstance(t, Mapping) or target_key not in t:
            raise ValueError(f"split {name!r} has no multi-hot {target_key!r} targets")
        classes = classes or list(getattr(ds, "classes", None) or range(t[target_key].shape[1]))
        cols[name] = np.asarray(t[target_key]).sum(0).astype(np.int64)
        if "difficult" in t:
            cols[f"{name} difficult"] = np.asarray(t["difficult"]).sum(0).astype(np.int64)
    return pd.DataFrame(cols, index=pd.Index(classes, name="class"))


# -------------------------------------------------------------------------------------- analysis
def evaluate_model(model: nn.Module, data, *, target_key: str = "labels", threshold: float = 0.5,
                   batch_size: int = 256) -> dict:
    """Multi-label scores of ``model`` on ``data`` (targets ``{target_key, "difficult"}``):
    ``mAP``, per-class ``ap`` (NaN and listed in ``missing`` for classes without positives) and
    CP/CR/CF1/OP/OR/OF1 at ``threshold`` (see :func:`kaviz.metrics.multilabel_report`)."""
    from .. import metrics

    store = extract(model, data, OUTPUT, pool="none", batch_size=batch_size, progress=False)
    targets = store.targets
    if not isinstance(targets, dict) or target_key not in targets:
        raise KeyError(f"the data's targets have no {target_key!r} entry (multi-hot labels)")
    return metrics.multilabel_report(store[OUTPUT], targets[target_key], difficult=targets.get("difficult"),
                                     threshold=threshold, class_names=getattr(data, "classes", None))


def results_table(runs: Mapping, test_data, teacher: nn.Module | None = None, *, target_key: str = "labels",
                  threshold: float = 0.5, agreement: Mapping | None = None):
    """One row per variant (``runs``: ``{(variant, seed): RunResult}``), teacher on top: test mAP,
    CF1 and OF1 as mean and std over seeds (each student at its best-on-validation epoch), plus the
    mean cosine to the teacher's feature when ``agreement`` (``{(variant, seed): dict}`` from
    :func:`feature_agreement`) is given. Returns ``(table, scores)``; ``scores`` has one row per
    run with the per-class AP (``ap/<class>``)."""
    import pandas as pd

    classes = list(getattr(test_data, "classes", None) or [])
    rows = []
    if teacher is not None:
        r = evaluate_model(teacher, test_data, target_key=target_key, threshold=threshold)
        rows.append({"model": "teacher", "variant": "teacher", "seed": None, **_flat(r, classes)})
    for (variant, seed), res in runs.items():
        r = evaluate_model(res.student, test_data, target_key=target_key, threshold=threshold)
        row = {"model": "student", "variant": variant, "seed": seed, **_flat(r, classes),
               "best_epoch": res.history.attrs.get("best_epoch")}
        if agreement is not None and (variant, seed) in agreement:
            row.update({k: v for k, v in agreement[(variant, seed)].items()})
        rows.append(row)
    scores = pd.DataFrame(rows)
    metrics_cols = [c for c in ("mAP", "CF1", "OF1", "cos", "cos_linear") if c in scores.columns]
    order = list(dict.fromkeys(scores["variant"]))
    g = scores.groupby("variant", sort=False)
    table = pd.DataFrame(index=pd.Index(order, name="variant"))
    table["seeds"] = g.size().reindex(order)
    for c in metrics_cols:
        table[f"{c} mean"] = g[c].mean().reindex(order)
        table[f"{c} std"] = g[c].std(ddof=1).reindex(order) if len(scores) else np.nan
    return table, scores


def _flat(report: dict, classes) -> dict:
    out = {k: report[k] for k in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")}
    for k, v in enumerate(report["ap"]):
        out[f"ap/{classes[k] if k < len(classes) else k}"] = float(v)
    return out


def per_class_table(scores):
    """Per-class test AP (mean over seeds) of every variant, classes as rows (from
    :func:`results_table`'s ``scores``)."""
    cols = [c for c in scores.columns if c.startswith("ap/")]
    t = scores.groupby("variant", sort=False)[cols].mean().T
    t.index = [c[3:] for c in cols]
    t.index.name = "class"
    return t


def _lstsq_map(x_train: torch.Tensor, y_train: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine map x -> y (ridge-regularised), in float64."""
    x = x_train.double()
    y = y_train.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    a = xc.T @ xc
    a = a + ridge * a.diagonal().mean().clamp_min(1e-12) * torch.eye(a.shape[0], dtype=a.dtype)
    w = torch.linalg.solve(a, xc.T @ yc)
    return w, my - mx @ w


def feature_agreement(student: nn.Module, teacher: nn.Module, test_data, train_data=None, *,
                      teacher_layer: str | None = None, batch_size: int = 256) -> dict:
    """How close the student's feature is to the teacher's on ``test_data``:

    - ``cos``: mean cosine between the student's adapted feature (``feat_fc``'s output) and the
      teacher's pooled feature, image by image;
    - ``cos_linear`` (with ``train_data``): the same after the best affine map from the student's
      own pooled feature to the teacher's, fitted (least squares) on ``train_data`` — it asks
      whether the teacher's feature is *linearly recoverable* from the student's, whatever basis
      the student uses (fair to students trained without mimicking).
    """
    layer_t = teacher_layer or feature_layer(teacher)
    s_layers = [adapted_layer(student), pooled_layer(student)]
    s_test = extract(student, test_data, s_layers, pool="none", batch_size=batch_size, progress=False)
    t_test = _teacher_features(teacher, test_data, layer_t, batch_size)
    f_s = s_test.tensor(s_layers[0])
    out = {"cos": float(F.cosine_similarity(f_s, t_test, dim=1).mean())}
    if train_data is not None:
        s_train = extract(student, train_data, s_layers[1], pool="none", batch_size=batch_size,
                          progress=False).tensor(s_layers[1])
        t_train = _teacher_features(teacher, train_data, layer_t, batch_size)
        w, b = _lstsq_map(s_train, t_train)
        pred = s_test.tensor(s_layers[1]).double() @ w + b
        out["cos_linear"] = float(F.cosine_similarity(pred, t_test.double(), dim=1).mean())
    return out


def mean_feature_cosine(teacher: nn.Module, train_data, test_data, *, layer: str | None = None) -> float:
    """Reference for ``cos``: the mean cosine between each test feature of the teacher and the
    teacher's *mean* training feature (a constant "student"). Post-ReLU pooled features share a
    large common direction, so a cosine must be read against this number, not against 0."""
    layer = layer or feature_layer(teacher)
    mean = _teacher_features(teacher, train_data, layer).mean(0, keepdim=True)
    t_test = _teacher_features(teacher, test_data, layer)
    return float(F.cosine_similarity(t_test, mean.expand_as(t_test), dim=1).mean())


def feature_sets(students: Mapping[str, nn.Module], teacher: nn.Module, data, *,
                 teacher_name: str = "teacher") -> dict:
    """``{name: (N, D) array}``: each student's adapted feature and the teacher's pooled feature
    (``teacher_name`` first) on ``data``, for maps and angle–Hamming pairs."""
    out = {teacher_name: _teacher_features(teacher, data, feature_layer(teacher)).numpy()}
    for name, st in students.items():
        layer = adapted_layer(st)
        out[name] = extract(st, data, layer, pool="none", progress=False)[layer]
    return out


def angle_hamming(pairs: Mapping[str, tuple], *, n_hashes: int, std: float, bias: str = "zero",
                  fit_on=None, seed: int = 0, max_pairs: int | None = 400):
    """The angle–Hamming relation of random-hyperplane LSH, measured (SPEC §2).

    ``pairs``: ``{name: (f_a, f_b)}`` with two (M, D) arrays of paired features (e.g. a student's
    adapted features and the teacher's, for the same images). For each pair the fraction of the
    ``n_hashes`` bits that differ is measured with a fresh :class:`LSHLoss` (``std``, ``bias``
    fitted on ``fit_on``, the teacher's training features, unless ``bias="zero"``); for
    ``bias="zero"`` its expectation is θ/π. Returns a DataFrame with columns ``pair``,
    ``angle/π`` (θ/π), ``differing bits`` and ``lsh`` (the LSH loss of that pair, ``f_a``
    mimicking ``f_b``); ``attrs``: ``mean_abs_dev`` (mean |differing − θ/π|), ``lsh`` (mean loss).
    """
    import pandas as pd

    if not pairs:
        raise ValueError("pairs is empty: give {name: (features_a, features_b)}")
    dims = {name: _as_features(a, f"pairs[{name!r}][0]").shape[1] for name, (a, _b) in pairs.items()}
    dim = next(iter(dims.values()))
    if len(set(dims.values())) > 1:
        raise ValueError(f"all pairs must have one feature dimension, got {dims}")
    lsh = LSHLoss(dim, n_hashes, std, bias=bias, with_l2=False, seed=seed)
    if bias != "zero":
        if fit_on is None:
            raise ValueError(f"bias={bias!r} is fitted on teacher features: pass fit_on=<(N, {dim}) features>")
        lsh.fit_bias(fit_on)
    frames = []
    rng = np.random.default_rng(seed)
    for name, (a, b) in pairs.items():
        a = _as_features(a, f"pairs[{name!r}][0]").float()
        b = _as_features(b, f"pairs[{name!r}][1]").float()
        if a.shape != b.shape:
            raise ValueError(f"pairs[{name!r}]: the two feature arrays differ in shape, {tuple(a.shape)} vs {tuple(b.shape)}")
        idx = np.arange(len(a))
        if max_pairs is not None and len(idx) > max_pairs:
            idx = np.sort(rng.choice(len(a), size=max_pairs, replace=False))
        a, b = a[idx], b[idx]
        with torch.no_grad():
            cos = F.cosine_similarity(a, b, dim=1).clamp(-1, 1).double()
            differ = (lsh.bits(a) != lsh.bits(b)).double().mean(1)
            y = lsh.bits(b).float()
            loss = F.binary_cross_entropy_with_logits(lsh.hash(a), y, reduction="none").mean(1)
        frames.append(pd.DataFrame({"pair": name, "index": idx, "angle/π": (torch.arccos(cos) / math.pi).numpy(),
                                    "differing bits": differ.numpy(), "lsh": loss.double().numpy()}))
    df = pd.concat(frames, ignore_index=True)
    df.attrs.update({"mean_abs_dev": float((df["differing bits"] - df["angle/π"]).abs().mean()),
                     "lsh": float(df["lsh"].mean()), "n_hashes": n_hashes, "std": float(std), "bias": bias})
    return df


def primary_labels(dataset) -> np.ndarray:
    """One class per image for colouring maps of multi-label data: for the synthetic scenes the
    most visible object (largest visible area, ``info["objects"]``), otherwise the first class
    present in the multi-hot labels (-1 for an image without labels)."""
    base = dataset.dataset if isinstance(dataset, TeacherOutputs) else dataset
    info = getattr(base, "info", {}) or {}
    meta = getattr(base, "meta", None)
    objects = info.get("objects")
    classes = list(getattr(base, "classes", None) or [])
    if objects is not None and meta is not None and "index" in getattr(meta, "columns", []) and classes:
        obj = objects.assign(area=objects["radius"] ** 2 * objects["visible_fraction"])
        top = obj.sort_values(["index", "area"], ascending=[True, False]).drop_duplicates("index")
        lookup = dict(zip(top["index"].to_numpy(), top["shape"].to_numpy()))
        pos = {c: k for k, c in enumerate(classes)}
        return np.array([pos.get(lookup.get(int(i)), -1) for i in meta["index"].to_numpy()], dtype=np.int64)
    targets = getattr(base, "targets", None)
    labels = targets["labels"] if isinstance(targets, Mapping) else targets
    if labels is None:
        raise ValueError("the dataset has no targets to take a label from")
    lab = np.asarray(labels.numpy() if torch.is_tensor(labels) else labels)
    if lab.ndim == 1:
        return lab.astype(np.int64)
    has = lab.any(1)
    return np.where(has, lab.argmax(1), -1).astype(np.int64)
