"""Layer-wise knowledge amalgamation (Shen, Wang, Song, Sun & Song, "Amalgamating Knowledge towards
Comprehensive Classification", AAAI 2019; SPEC.md §4.1), and its one-stage variant as an ablation.

Several teachers, each trained on one *part* of a label set; a compact student of the same kind of
plain network covers all parts (one head of size ΣK_t, SPEC §0.1). Labels are never used to train it.

Three stages, each run with :func:`kaviz.train.fit`:

1. **Feature amalgamation** (:class:`FeatureAmalgamation`). Per layer l, the teachers' pre-activation
   features are concatenated along channels, ``F^l = [F_1^l ; F_2^l ; …]``, and a linear autoencoder
   learns a code of the student's width: encoder ``E_l`` = 1×1 conv ΣC_t → C_s(l), decoder ``D_l`` =
   1×1 conv back, loss ``MSE(D_l(E_l(F^l)), F^l)``. The amalgamated feature is ``F_a^l = E_l(F^l)``.
2. **Layer-wise parameter learning** (:class:`LayerwiseLearning`). Every student layer is trained
   independently (all in one pass, their losses do not interact) to map the previous amalgamated
   feature to the current one: ``ops_l`` (the parameter-free operations between the two layers:
   ReLU, pooling, flatten) → the layer's conv/linear ``W_l`` → an auxiliary 1×1 map ``A_l`` → the
   layer's batch-norm (if any); loss ``MSE(·, F_a^l)``. The first layer reads the image; the last
   (the classifier) targets the concatenated teacher logits. Afterwards ``A_l`` is folded into
   ``W_l`` (:func:`fold_auxiliary`): ``W' = A·W``, ``b' = A·b + b_A``, exact because nothing
   non-linear lies between them. Where ``W_l`` has no bias, ``b'`` is absorbed into the following
   batch-norm's running mean (``μ' = μ − b'``), which is exact in eval mode and in training mode
   (the batch mean absorbs a constant). So the folded student has exactly the architecture it was
   built with.
3. **Joint fine-tuning** (:class:`LogitMatching`): the whole student, MSE to the concatenated
   teacher logits.

Where ``A`` sits. SPEC §4.1 describes ``A`` on the *input* of layer l (before its ReLU/pooling)
and also asks that it be folded into a layer with no non-linearity in between. Both cannot hold:
a ReLU lies between such an ``A`` and ``W_l``, and folding it backwards into layer l−1 would cross
that layer's batch-norm, which is exact only in eval mode (in training mode the norm re-standardises
the mixed channels). kaviz puts ``A`` right after ``W_l`` (before the norm), where the fold is exact
in both modes; ``A`` then re-parametrises the layer's linear map rather than widening its function
class (it is initialised to the identity, so training starts from the plain layer).

The one-stage variant (:class:`OneStageAmalgamation`) trains everything at once: per hooked layer an
encoder of the concatenated teacher features, a decoder back, and a 1×1 map of the student feature
onto the code; loss ``{"kd": soft_ce(student, [z_1 ‖ z_2 ‖ …]), "feat": Σ_l MSE(M_l(S^l),
E_l(F^l).detach()), "recon": Σ_l MSE(D_l(E_l(F^l)), F^l)}``.

Layers are found by name for any plain-chain network (:func:`infer_segments` traces one forward pass:
a conv/linear starts a layer, a batch-norm right after it ends it, parameter-free modules in between
are the ops); for networks with functional ops or skip connections, pass the :class:`Segment`\\ s
yourself. Teachers and student may differ in width and family as long as paired layers have the
same spatial size.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..features import FeatureTap, eval_mode
from ..losses import soft_cross_entropy
from ..train import freeze
from .kd import concat_logits, images_of, union_accuracy

__all__ = [
    "ClassPart",
    "class_parts",
    "Segment",
    "infer_segments",
    "LayerPlan",
    "plan_layers",
    "ChannelLinear",
    "FeatureAmalgamation",
    "LayerwiseLearning",
    "fold_auxiliary",
    "LogitMatching",
    "OneStageAmalgamation",
    "LayerwiseResult",
    "run_layerwise",
    "run_one_stage",
    "accuracy_table",
    "summarize_seeds",
    "seed_stats",
    "reconstruction_errors",
    "layer_errors",
    "feature_maps",
    "param_table",
    "fold_check",
]

_LINEAR = (nn.Conv2d, nn.Linear)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d)


# ------------------------------------------------------------------------------------------------
# parts of one label set
# ------------------------------------------------------------------------------------------------
class ClassPart(torch.utils.data.Dataset):
    """The samples of ``dataset`` whose class is in ``classes``, relabelled to local ids
    ``0..len(classes)-1`` in the order given (the label set of one teacher).

    Works on any kaviz dataset with ``targets`` (class ids), ``classes`` and ``subset`` (embedded
    or real). Images are read through the parent's ``get_image``; ``fingerprint`` covers the parent,
    the samples and the class mapping, so teacher caches keyed on it are never stale.
    """

    def __init__(self, dataset, classes: Sequence[int], name: str | None = None):
        targets = getattr(dataset, "targets", None)
        if not (torch.is_tensor(targets) and targets.dim() == 1 and not targets.dtype.is_floating_point):
            raise ValueError("class_parts needs a classification dataset whose `targets` are class ids "
                             f"(an int tensor of shape (N,)); got {type(targets).__name__}")
        classes = [int(c) for c in classes]
        k = getattr(dataset, "num_classes", None) or (int(targets.max()) + 1 if len(targets) else 0)
        bad = [c for c in classes if not 0 <= c < k]
        if not classes or bad or len(set(classes)) != len(classes):
            raise ValueError(f"a part must be distinct class ids in [0, {k}); got {classes}")
        lookup = torch.full((k,), -1, dtype=torch.int64)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        keep = torch.nonzero(lookup[targets.to(torch.int64)] >= 0).reshape(-1)
        names = getattr(dataset, "classes", None)
        class_names = [str(names[c]) if names else str(c) for c in classes]
        name = name or f"{getattr(dataset, 'name', '') or 'data'}[{_span(classes)}]"
        info = {**dict(getattr(dataset, "info", {}) or {}), "task": "classification", "classes_of_parent": classes}
        self._init(dataset.subset(keep), classes, lookup, class_names, name, info)

    def _init(self, base, classes, lookup, class_names, name, info):
        from ..data import fingerprint

        self.base = base
        self.parent_classes = list(classes)
        self._lookup = lookup
        self.targets = lookup[base.targets.to(torch.int64)]
        self.classes = list(class_names)
        self.name = name
        self.info = dict(info)
        self.fingerprint = fingerprint(("class_part", fingerprint(base), self.parent_classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self):
        return len(self.targets)

    def get_image(self, i):
        return self.base.get_image(i)

    def get_target(self, i):
        return self.targets[i]

    def __getitem__(self, i):
        return self.get_image(i), self.targets[i]

    def image_array(self, i):
        return self.base.image_array(i)

    def subset(self, indices) -> "ClassPart":
        new = ClassPart.__new__(ClassPart)
        new._init(self.base.subset(indices), self.parent_classes, self._lookup, self.classes, self.name, self.info)
        return new

    def __repr__(self):
        return f"ClassPart(name={self.name!r}, n={len(self)}, classes={self.classes})"


def _span(classes):
    c = list(classes)
    if c == list(range(c[0], c[0] + len(c))):
        return f"{c[0]}-{c[-1]}" if len(c) > 1 else str(c[0])
    return ",".join(map(str, c))


def class_parts(dataset, parts: int | Sequence[Sequence[int]] = 2, names: Sequence[str] | None = None) -> list[ClassPart]:
    """Split one label set into parts (one per teacher): ``parts=2`` cuts the classes into two
    contiguous halves (0–4 and 5–9 for ten classes); or give the class ids of each part. Each part
    is relabelled to local ids, so ``kaviz.data.union(parts)`` rebuilds the original label space
    with offsets 0, K_1, … (SPEC §0.1)."""
    k = getattr(dataset, "num_classes", None)
    if isinstance(parts, int) and not isinstance(parts, bool):
        if k is None or not 2 <= parts <= k:
            raise ValueError(f"parts={parts}: need 2 <= parts <= number of classes ({k}); or pass the class ids of each part")
        parts = [list(a) for a in np.array_split(np.arange(k), parts)]
    parts = [list(p) for p in parts]
    flat = [c for p in parts for c in p]
    if len(set(flat)) != len(flat):
        raise ValueError(f"parts must not share classes; got {parts}")
    if names is not None and len(names) != len(parts):
        raise ValueError(f"got {len(names)} names for {len(parts)} parts")
    return [ClassPart(dataset, p, None if names is None else names[i]) for i, p in enumerate(parts)]


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
@dataclass
class Segment:
    """One student layer for layer-wise learning.

    ``linear``: name of its ``nn.Conv2d`` / ``nn.Linear``; ``norm``: name of the batch-norm right
    after it (or None); ``ops``: what runs between the previous layer's feature and ``linear`` —
    module names of the model (parameter-free: ReLU, pooling, flatten, dropout) or callables (for
    functional ops such as ``functools.partial(torch.flatten, start_dim=1)``). The layer's feature
    (its pre-activation output) is the output of ``norm`` if any, else of ``linear``.
    """

    linear: str
    norm: str | None = None
    ops: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.norm or self.linear


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _target_device(device):
    from .. import default_device

    return default_device(device)


def _leaf_calls(model: nn.Module, example: torch.Tensor):
    """(name, input, output) of every leaf module in call order during one eval-mode forward."""
    calls, handles = [], []
    leaves = [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]

    def make(name):
        def hook(_m, inp, out):
            calls.append((name, inp[0] if isinstance(inp, tuple) and inp else inp, out))
        return hook

    try:
        for n, m in leaves:
            handles.append(m.register_forward_hook(make(n)))
        with eval_mode(model), torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    return calls, out


def infer_segments(model: nn.Module, example: torch.Tensor) -> list[Segment]:
    """The layers of a plain-chain network, from one forward pass of ``example`` (a batch).

    A ``Conv2d``/``Linear`` starts a layer; a ``BatchNorm`` right after it belongs to it; the
    parameter-free modules before it are its ``ops``. The last layer must produce the model output.
    Every module must run once and receive exactly the previous module's output; otherwise (a
    functional op, a skip connection, a reused module) the error names the place — pass the
    :class:`Segment` list yourself there.
    """
    example = example.to(_device_of(model))
    calls, out = _leaf_calls(model, example)
    modules = dict(model.named_modules())
    mname = type(model).__name__
    if not calls:
        raise ValueError(f"{mname} ran no leaf modules on the example; layer-wise learning needs named layers")
    seen = set()
    prev_out, prev_name = example, "the model input"
    segments: list[Segment] = []
    pending: list[str] = []
    last_linear_call = None
    for k, (name, inp, o) in enumerate(calls):
        m = modules[name]
        if name in seen:
            raise ValueError(f"{mname}: module {name!r} runs more than once per forward; layer-wise learning needs "
                             "each layer to run once. Pass segments=[Segment(...), ...] explicitly.")
        seen.add(name)
        if inp is not prev_out:
            raise ValueError(
                f"{mname}: between {prev_name!r} and {name!r} the forward does something that is not a module "
                "(a functional op such as torch.flatten, or a residual addition), so the operations between "
                "layers cannot be inferred. Pass segments=[Segment(linear=..., norm=..., ops=[...]), ...] with the "
                "ops given as module names or callables, or use a plain-chain network such as vgg8_small.")
        if isinstance(m, _LINEAR):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"{mname}: {name!r} is a grouped/depthwise convolution (groups={m.groups}); the "
                                 "auxiliary 1×1 map mixes all channels and cannot be folded into it.")
            segments.append(Segment(linear=name, norm=None, ops=pending))
            pending = []
            last_linear_call = k
        elif isinstance(m, _NORM) and last_linear_call == k - 1 and segments and segments[-1].norm is None:
            segments[-1].norm = name
        elif any(True for _ in m.parameters(recurse=False)):
            raise ValueError(f"{mname}: {name!r} ({type(m).__name__}) has parameters but is neither a conv/linear "
                             "layer nor a batch-norm right after one; layer-wise learning cannot train it. Pass "
                             "segments=[...] explicitly or use a conv-bn-relu network.")
        else:
            pending.append(name)
        prev_out, prev_name = o, name
    if not segments:
        raise ValueError(f"{mname} has no Conv2d/Linear layer")
    trailing = [p for p in pending if not isinstance(modules[p], (nn.Identity, nn.Dropout))]
    if trailing or prev_out is not out:
        raise ValueError(f"{mname}: the model output is not the output of its last layer {segments[-1].name!r} "
                         f"(after it run {trailing or 'functional ops'}); pass segments=[...] explicitly.")
    return segments


@dataclass
class LayerPlan:
    """Which teacher features each student layer learns from (see :func:`plan_layers`).

    ``segments``: the L student layers (the last one is the classifier); ``teacher_layers[t]``: the
    L−1 feature names of teacher t paired with the student's first L−1 layers;
    ``teacher_channels[t][l]``, ``student_channels[l]`` (L entries, the last = number of outputs),
    ``sizes[l]`` the spatial size of layer l (``()`` for vectors), ``num_outputs[t]`` teacher t's
    classes.
    """

    segments: list[Segment]
    teacher_layers: list[list[str]]
    teacher_channels: list[list[int]]
    student_channels: list[int]
    sizes: list[tuple]
    num_outputs: list[int]

    @property
    def depth(self) -> int:
        return len(self.segments)

    def table(self):
        """One row per student layer: its name, the paired teacher layers, channels and size."""
        import pandas as pd

        rows = []
        for l, seg in enumerate(self.segments):
            last = l == self.depth - 1
            row = {"layer": l + 1, "student": seg.name, "ops before": ", ".join(_op_name(o) for o in seg.ops) or "-"}
            for t in range(len(self.teacher_layers)):
                row[f"teacher {t + 1}"] = "logits" if last else self.teacher_layers[t][l]
            row["teacher channels"] = " + ".join(str(c) for c in (self.num_outputs if last else [tc[l] for tc in self.teacher_channels]))
            row["student channels"] = self.student_channels[l]
            row["size"] = "×".join(map(str, self.sizes[l])) if self.sizes[l] else "vector"
            row["target"] = "concatenated logits" if last else "amalgamated feature E(F)"
            rows.append(row)
        return pd.DataFrame(rows)


def _op_name(op):
    if isinstance(op, str):
        return op
    fn = getattr(op, "func", op)  # functools.partial
    return getattr(fn, "__name__", None) or type(op).__name__


def _feature_shape(t: torch.Tensor) -> tuple[int, tuple]:
    if t.dim() == 4:
        return t.shape[1], tuple(t.shape[2:])
    if t.dim() == 2:
        return t.shape[1], ()
    raise ValueError(f"layer features must be (B, C, H, W) or (B, C), got shape {tuple(t.shape)}")


def plan_layers(teachers: Sequence[nn.Module], student: nn.Module, example: torch.Tensor, *,
                segments: Sequence[Segment] | None = None,
                teacher_layers: Sequence[Sequence[str]] | None = None) -> LayerPlan:
    """Pair the student's layers with the teachers' and check that the shapes fit.

    ``example``: a batch of images (a few suffice). ``segments`` default to
    :func:`infer_segments` of the student; ``teacher_layers`` (per teacher, the names of the L−1
    features paired with the student's first L−1 layers) default to the pre-activation outputs
    of each teacher's inferred layers, which must then be as many as the student's.
    """
    teachers = [t.module if hasattr(t, "module") and type(t).__name__ == "Frozen" else t for t in teachers]
    if len(teachers) < 1:
        raise ValueError("plan_layers needs at least one teacher")
    segments = list(segments) if segments is not None else infer_segments(student, example)
    L = len(segments)
    if L < 2:
        raise ValueError(f"the student has {L} layer; layer-wise amalgamation needs at least a feature layer and a classifier")
    if teacher_layers is None:
        teacher_layers = []
        for k, t in enumerate(teachers):
            segs = infer_segments(t, example)
            if len(segs) != L:
                raise ValueError(
                    f"teacher {k + 1} has {len(segs)} layers ({[s.name for s in segs]}) but the student has {L} "
                    f"({[s.name for s in segments]}); pass teacher_layers=[[...], ...] naming, for each teacher, the "
                    f"{L - 1} features paired with the student's first {L - 1} layers.")
            teacher_layers.append([s.name for s in segs[:-1]])
    teacher_layers = [list(names) for names in teacher_layers]
    if len(teacher_layers) != len(teachers):
        raise ValueError(f"teacher_layers has {len(teacher_layers)} lists for {len(teachers)} teachers")
    for k, names in enumerate(teacher_layers):
        if len(names) != L - 1:
            raise ValueError(f"teacher_layers[{k}] names {len(names)} layers; the student has {L - 1} feature layers "
                             f"({[s.name for s in segments[:-1]]}) before its classifier")
    s_names = [s.name for s in segments]
    with eval_mode(student), torch.no_grad(), FeatureTap(student, s_names) as tap:
        s_out = student(example.to(_device_of(student)))
        s_shapes = [_feature_shape(tap[n]) for n in s_names[:-1]]
    t_shapes, n_out = [], []
    for t, names in zip(teachers, teacher_layers):
        with eval_mode(t), torch.no_grad(), FeatureTap(t, names) as tap:
            out = t(example.to(_device_of(t)))
            t_shapes.append([_feature_shape(tap[n]) for n in names])
        n_out.append(int(out.shape[1]))
    for l in range(L - 1):
        for k in range(len(teachers)):
            if t_shapes[k][l][1] != s_shapes[l][1]:
                raise ValueError(
                    f"layer {l + 1}: teacher {k + 1}'s {teacher_layers[k][l]!r} has spatial size {t_shapes[k][l][1]} but the "
                    f"student's {s_names[l]!r} has {s_shapes[l][1]}; pair layers of equal resolution (teacher_layers=...).")
    if s_out.dim() != 2 or s_out.shape[1] != sum(n_out):
        raise ValueError(f"the student has {tuple(s_out.shape[1:])} outputs but the teachers have {n_out} classes: its head "
                         f"must cover the comprehensive label space (sum = {sum(n_out)}), teacher order first to last.")
    return LayerPlan(
        segments=segments,
        teacher_layers=teacher_layers,
        teacher_channels=[[c for c, _ in ts] for ts in t_shapes],
        student_channels=[c for c, _ in s_shapes] + [int(s_out.shape[1])],
        sizes=[s for _, s in s_shapes] + [()],
        num_outputs=n_out,
    )


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------
class ChannelLinear(nn.Module):
    """A 1×1 convolution that also takes vectors: ``y[:, o] = Σ_c weight[o, c] x[:, c] + bias[o]``
    on (B, C, H, W) or (B, C)."""

    def __init__(self, in_channels: int, out_channels: int, identity: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if identity:
            if in_channels != out_channels:
                raise ValueError("an identity map needs in_channels == out_channels")
            with torch.no_grad():
                self.weight.copy_(torch.eye(out_channels))
        else:
            nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default
            bound = 1 / in_channels ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        if x.dim() == 4:
            return F.conv2d(x, self.weight[:, :, None, None], self.bias)
        if x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        raise ValueError(f"ChannelLinear takes (B, C, H, W) or (B, C), got {tuple(x.shape)}")

    def extra_repr(self):
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}"


def _check_plan(plan, teachers):
    if not isinstance(plan, LayerPlan):
        raise TypeError(f"plan must be a LayerPlan (from plan_layers), got {type(plan).__name__}")
    if len(plan.teacher_layers) != len(teachers):
        raise ValueError(f"the plan is for {len(plan.teacher_layers)} teachers, {len(teachers)} were given")


def _unfrozen(t):
    return t.module if type(t).__name__ == "Frozen" else t


def teacher_features(teachers: Sequence[nn.Module], plan: LayerPlan, x: torch.Tensor):
    """``([F^1, …, F^{L−1}], z)``: per layer the teachers' features concatenated along channels (in
    teacher order), and the concatenated logits. No gradients."""
    feats, logits = [], []
    with torch.no_grad():
        for t, names in zip(teachers, plan.teacher_layers):
            inner = _unfrozen(t)
            with FeatureTap(inner, names) as tap:
                logits.append(t(x))
                feats.append([tap[n] for n in names])
    per_layer = [torch.cat([f[l] for f in feats], 1) for l in range(plan.depth - 1)]
    return per_layer, torch.cat(logits, 1)


# ------------------------------------------------------------------------------------------------
# stage 1: feature amalgamation
# ------------------------------------------------------------------------------------------------
class FeatureAmalgamation(nn.Module):
    """Stage 1: per layer a linear autoencoder of the concatenated teacher features,
    ``{"recon_l<k>": MSE(D_k(E_k(F^k)), F^k)}`` for k = 1..L−1 (SPEC §4.1). The teachers are frozen.
    ``targets(x)`` returns the amalgamated features ``E_k(F^k)`` and the concatenated logits."""

    def __init__(self, teachers: Sequence[nn.Module], plan: LayerPlan):
        super().__init__()
        _check_plan(plan, teachers)
        self.teachers = nn.ModuleList([freeze(t) for t in teachers])
        self.plan = plan
        L = plan.depth
        total = [sum(tc[l] for tc in plan.teacher_channels) for l in range(L - 1)]
        self.encoders = nn.ModuleList([ChannelLinear(total[l], plan.student_channels[l]) for l in range(L - 1)])
        self.decoders = nn.ModuleList([ChannelLinear(plan.student_channels[l], total[l]) for l in range(L - 1)])

    def features(self, x):
        return teacher_features(self.teachers, self.plan, x)

    def forward(self, batch):
        feats, _ = self.features(images_of(batch))
        return {f"recon_l{l + 1}": F.mse_loss(dec(enc(f)), f)
                for l, (f, enc, dec) in enumerate(zip(feats, self.encoders, self.decoders))}

    def targets(self, x):
        """``[F_a^1, …, F_a^{L−1}, z]``: the amalgamated features and the concatenated logits."""
        with torch.no_grad():
            feats, logits = self.features(x)
            return [enc(f) for f, enc in zip(feats, self.encoders)] + [logits]


# ------------------------------------------------------------------------------------------------
# stage 2: layer-wise parameter learning, and folding
# ------------------------------------------------------------------------------------------------
def fold_auxiliary(linear: nn.Module, aux: ChannelLinear, norm: nn.Module | None = None) -> None:
    """Fold ``aux`` (applied right after ``linear``) into ``linear``, in place:
    ``W' = A·W`` (for a conv, ``W'[o] = Σ_c A[o, c] W[c]`` over output channels), ``b' = A·b + b_A``.
    Without a bias on ``linear`` the offset goes into the following batch-norm: ``μ' = μ − b'``
    (exact in eval mode, and in training mode where the batch mean absorbs it)."""
    if not isinstance(linear, _LINEAR):
        raise TypeError(f"can only fold into nn.Conv2d or nn.Linear, got {type(linear).__name__}")
    if isinstance(linear, nn.Conv2d) and linear.groups != 1:
        raise ValueError(f"cannot fold a channel-mixing map into a grouped convolution (groups={linear.groups})")
    A, b_A = aux.weight.detach(), aux.bias.detach()
    W = linear.weight.detach()
    if A.shape[1] != W.shape[0]:
        raise ValueError(f"the auxiliary map takes {A.shape[1]} channels but the layer has {W.shape[0]} outputs")
    if A.shape[0] != A.shape[1]:
        raise ValueError("the auxiliary map must be square (C_s → C_s) to be folded")
    b = linear.bias.detach() if linear.bias is not None else torch.zeros_like(b_A)
    new_w = (A @ W.reshape(W.shape[0], -1)).reshape(W.shape)
    new_b = A @ b + b_A
    with torch.no_grad():
        linear.weight.copy_(new_w)
        if linear.bias is not None:
            linear.bias.copy_(new_b)
        elif isinstance(norm, _NORM) and norm.running_mean is not None:
            norm.running_mean.sub_(new_b)
        else:
            raise ValueError(
                f"the layer has no bias and no batch-norm with running statistics after it, so the auxiliary map's "
                f"offset b' = A·b + b_A cannot be absorbed; build the layer with bias=True.")


class LayerwiseLearning(nn.Module):
    """Stage 2: every student layer learns, independently, to map the previous amalgamated feature
    to the current one (the first from the image, the last to the concatenated logits):
    ``{"mse_l<k>": MSE(norm_k(A_k(W_k(ops_k(F_a^{k−1})))), F_a^k)}``. The student's own modules are
    trained (in place); ``A_k`` (identity at start) lives here. ``folded()`` returns a copy of the
    student with every ``A_k`` folded in; ``evaluate`` reports that copy's union accuracy."""

    def __init__(self, student: nn.Module, amalgamation: FeatureAmalgamation):
        super().__init__()
        if not isinstance(amalgamation, FeatureAmalgamation):
            raise TypeError("LayerwiseLearning needs the trained stage-1 FeatureAmalgamation")
        self.student = student
        self.amalgamation = freeze(amalgamation)
        self.plan = amalgamation.plan
        self.aux = nn.ModuleList([ChannelLinear(c, c, identity=True) for c in self.plan.student_channels])
        modules = dict(student.named_modules())
        missing = [n for s in self.plan.segments for n in [s.linear, s.norm, *[o for o in s.ops if isinstance(o, str)]]
                   if n is not None and n not in modules]
        if missing:
            raise ValueError(f"the plan names modules the student does not have: {missing}")
        owned = {id(p) for s in self.plan.segments for n in (s.linear, s.norm) if n for p in modules[n].parameters()}
        orphans = [n for n, p in student.named_parameters() if id(p) not in owned]
        if orphans:
            raise ValueError(f"student parameters {orphans[:5]} belong to no layer of the plan, so stage 2 would never "
                             "train them; add them to a Segment or use a conv-bn-relu network.")

    def _student_modules(self):
        return dict(self.student.named_modules())

    def run_layer(self, l: int, h: torch.Tensor, modules=None) -> torch.Tensor:
        """Layer ``l`` (0-based) of the student on input ``h``, with its auxiliary map (unfolded)."""
        modules = modules or self._student_modules()
        seg = self.plan.segments[l]
        for op in seg.ops:
            h = modules[op](h) if isinstance(op, str) else op(h)
        h = self.aux[l](modules[seg.linear](h))
        return modules[seg.norm](h) if seg.norm else h

    def forward(self, batch):
        x = images_of(batch)
        targets = self.amalgamation.module.targets(x)
        inputs = [x] + targets[:-1]
        modules = self._student_modules()
        return {f"mse_l{l + 1}": F.mse_loss(self.run_layer(l, inputs[l], modules), targets[l])
                for l in range(self.plan.depth)}

    def chain(self, x: torch.Tensor) -> torch.Tensor:
        """The student run end to end through its layers with the auxiliary maps unfolded (what
        :meth:`folded` must reproduce)."""
        modules = self._student_modules()
        for l in range(self.plan.depth):
            x = self.run_layer(l, x, modules)
        return x

    def folded(self) -> nn.Module:
        """A copy of the student with each ``A_k`` folded into its layer (same architecture)."""
        student = copy.deepcopy(self.student)
        modules = dict(student.named_modules())
        for seg, aux in zip(self.plan.segments, self.aux):
            fold_auxiliary(modules[seg.linear], aux, modules[seg.norm] if seg.norm else None)
        return student

    def evaluate(self, data) -> dict:
        return union_accuracy(self.folded(), data)


def fold_check(method: LayerwiseLearning, x: torch.Tensor) -> dict:
    """Largest absolute and relative difference between the unfolded chain and the folded student
    on ``x``, in eval and in training mode (the training-mode check leaves batch-norm statistics as
    they were). Both should be at float round-off."""
    folded = method.folded()
    out = {}
    for mode in ("eval", "train"):
        a_model, b_model = copy.deepcopy(method).to(x.device), copy.deepcopy(folded).to(x.device)
        a_model.train(mode == "train")
        b_model.train(mode == "train")
        with torch.no_grad():
            a, b = a_model.chain(x), b_model(x)
        out[f"max_abs_diff_{mode}"] = float((a - b).abs().max())
        out[f"max_rel_diff_{mode}"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    return out


# ------------------------------------------------------------------------------------------------
# stage 3 and the one-stage variant
# ------------------------------------------------------------------------------------------------
class LogitMatching(nn.Module):
    """Stage 3, joint fine-tuning: ``{"mse": MSE(student(x), [z_1(x) ‖ z_2(x) ‖ …])}``."""

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module]):
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList([freeze(t) for t in teachers])

    def forward(self, batch):
        x = images_of(batch)
        return {"mse": F.mse_loss(self.student(x), concat_logits(self.teachers, x))}

    def evaluate(self, data) -> dict:
        return union_accuracy(self.student, data)


class OneStageAmalgamation(nn.Module):
    """The one-stage variant (ablation): autoencoders, student feature maps and the student trained
    together, ``{"kd": soft_ce(s, z; T), "feat": Σ_l MSE(M_l(S^l), E_l(F^l).detach()),
    "recon": Σ_l MSE(D_l(E_l(F^l)), F^l)}`` over the hooked layers l, with ``S^l`` the student's
    pre-activation feature of layer l (tapped with gradients) and ``z`` the concatenated teacher
    logits. ``layers``: the hooked layers (1-based plan layers; default all L−1 feature layers)."""

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], plan: LayerPlan, T: float = 1.0,
                 layers: Sequence[int] | None = None):
        super().__init__()
        _check_plan(plan, teachers)
        L = plan.depth
        layers = list(range(1, L)) if layers is None else [int(l) for l in layers]
        if not layers or any(not 1 <= l <= L - 1 for l in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct feature layers of the plan, in 1..{L - 1}; got {layers}")
        self.layers = layers
        self.student = student
        self.teachers = nn.ModuleList([freeze(t) for t in teachers])
        self.plan = plan
        self.T = T
        total = [sum(tc[l - 1] for tc in plan.teacher_channels) for l in layers]
        cs = [plan.student_channels[l - 1] for l in layers]
        self.encoders = nn.ModuleList([ChannelLinear(t, c) for t, c in zip(total, cs)])
        self.decoders = nn.ModuleList([ChannelLinear(c, t) for t, c in zip(total, cs)])
        self.maps = nn.ModuleList([ChannelLinear(c, c) for c in cs])
        self._names = [plan.segments[l - 1].name for l in layers]

    def forward(self, batch):
        x = images_of(batch)
        feats, logits = teacher_features(self.teachers, self.plan, x)
        feats = [feats[l - 1] for l in self.layers]
        with FeatureTap(self.student, self._names, detach=False) as tap:
            out = self.student(x)
            s_feats = [tap[n] for n in self._names]
        feat = recon = 0.0
        for f_t, f_s, enc, dec, m in zip(feats, s_feats, self.encoders, self.decoders, self.maps):
            code = enc(f_t)
            recon = recon + F.mse_loss(dec(code), f_t)
            feat = feat + F.mse_loss(m(f_s), code.detach())
        return {"kd": soft_cross_entropy(out, logits, self.T), "feat": feat, "recon": recon}

    def evaluate(self, data) -> dict:
        return union_accuracy(self.student, data)


# ------------------------------------------------------------------------------------------------
# runners
# ------------------------------------------------------------------------------------------------
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
    from ..data import Unlabeled

    u = Unlabeled(data)
    return torch.stack([u[i] for i in range(min(n, len(u)))])


def run_layerwise(teachers: Sequence[nn.Module], student: nn.Module, train_data, val_data=None, *,
                  epochs=(4, 4, 4), lr=1e-3, batch_size: int = 64, seed: int = 0, plan: LayerPlan | None = None,
                  segments=None, teacher_layers=None, device=None, progress: bool | None = None,
                  **fit_kwargs) -> LayerwiseResult:
    """The three stages of layer-wise amalgamation, each with :func:`kaviz.train.fit` on the
    images of ``train_data`` (labels are never read: the data is wrapped in ``Unlabeled``).

    ``epochs``/``lr``: one value or one per stage (autoencoders, layer-wise, fine-tuning).
    ``val_data`` (a union split) selects each stage's epoch: stage 1 on its validation loss,
    stages 2 and 3 on the task-agnostic validation accuracy of the (folded) student. The student
    is trained in place by stage 2; ``result.students`` holds ``"layer-wise"`` (stage 2, folded)
    and ``"fine-tuned"`` (stage 3), two separate copies.
    """
    from .. import seed_everything
    from ..data import Unlabeled
    from ..train import fit

    epochs = _per_stage(epochs, 3, "epochs")
    lrs = _per_stage(lr, 3, "lr")
    if plan is None:
        plan = plan_layers(teachers, student, _example(train_data), segments=segments, teacher_layers=teacher_layers)
    seed_everything(seed)
    common = dict(batch_size=batch_size, seed=seed, device=device, progress=progress, **fit_kwargs)
    unlabeled = Unlabeled(train_data)
    monitor = _monitor(val_data)

    amalgamation = FeatureAmalgamation(teachers, plan)
    h1 = fit(amalgamation, unlabeled, val_data, epochs=epochs[0], lr=lrs[0], **common)
    amalgamation.cpu()  # the device is fit's business; keep results on the CPU between stages
    layerwise = LayerwiseLearning(student, amalgamation)
    h2 = fit(layerwise, unlabeled, val_data, epochs=epochs[1], lr=lrs[1], monitor=monitor, **common)
    stage2 = layerwise.folded()
    stage3 = copy.deepcopy(stage2)
    h3 = fit(LogitMatching(stage3, teachers), unlabeled, val_data, epochs=epochs[2], lr=lrs[2], monitor=monitor, **common)
    layerwise.cpu()
    return LayerwiseResult(plan=plan, amalgamation=amalgamation, layerwise=layerwise,
                           students={"layer-wise": stage2.cpu().eval(), "fine-tuned": stage3.cpu().eval()},
                           histories={"stage 1: autoencoders": h1, "stage 2: layer-wise": h2, "stage 3: fine-tuning": h3})


def run_one_stage(teachers: Sequence[nn.Module], student: nn.Module, train_data, val_data=None, *, epochs: int = 8,
                  lr: float = 1e-3, T: float = 1.0, layers: Sequence[int] | None = None,
                  weights: Mapping[str, float] | None = None, batch_size: int = 64,
                  seed: int = 0, plan: LayerPlan | None = None, segments=None, teacher_layers=None, device=None,
                  progress: bool | None = None, **fit_kwargs):
    """The one-stage variant (:class:`OneStageAmalgamation`, hooking ``layers``) with
    :func:`kaviz.train.fit`; returns ``(method, history)``; ``method.student`` is the trained student."""
    from .. import seed_everything
    from ..data import Unlabeled
    from ..train import fit

    if plan is None:
        plan = plan_layers(teachers, student, _example(train_data), segments=segments, teacher_layers=teacher_layers)
    seed_everything(seed)
    method = OneStageAmalgamation(student, teachers, plan, T=T, layers=layers)
    history = fit(method, Unlabeled(train_data), val_data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                  weights=weights, monitor=_monitor(val_data), device=device, progress=progress, **fit_kwargs)
    method.cpu()
    return method, history


# ------------------------------------------------------------------------------------------------
# evaluation and analysis
# ------------------------------------------------------------------------------------------------
class _Concat(nn.Module):
    def __init__(self, teachers):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)

    def forward(self, x):
        return torch.cat([t(x) for t in self.teachers], 1)


def accuracy_table(models: Mapping[str, nn.Module], data, teachers: Sequence[nn.Module] | None = None, device=None):
    """Test accuracies of comprehensive-space classifiers on a union split ``data``: one column per
    part (task-aware: argmax over that part's classes, on that part's images), ``task-aware (all)``
    and ``whole`` (task-agnostic: argmax over all classes, SPEC §0.1). With ``teachers``, first a row
    per teacher (its own part only) and one for the concatenated teachers. The models are moved to
    ``device`` (default: CUDA when available, else CPU)."""
    import pandas as pd

    if not hasattr(data, "slices"):
        raise TypeError("accuracy_table needs a union split (kaviz.data.union of the parts' test sets)")
    rows = []

    def row(name, res, only=None):
        r = {"model": name}
        for k, src in enumerate(data.sources):
            r[src] = res.get(f"task_aware/{src}", np.nan) if only in (None, k) else np.nan
        r["task-aware (all)"] = res["task_aware"] if only is None else np.nan
        r["whole"] = res["task_agnostic"] if only is None else np.nan
        return r

    if teachers is not None:
        if len(teachers) != len(data.sources):
            raise ValueError(f"{len(teachers)} teachers for {len(data.sources)} parts")
        res = union_accuracy(_Concat(teachers).to(_target_device(device)).eval(), data)
        for k in range(len(teachers)):
            rows.append(row(f"teacher {k + 1}", res, only=k))
        rows.append(row("concatenated teachers", res))
    for name, m in models.items():
        rows.append(row(name, union_accuracy(m.to(_target_device(device)), data)))
    return pd.DataFrame(rows)


def seed_stats(tables: Sequence, by: str = "model"):
    """Long form of per-seed tables with identical rows: one row per (``by``, column) with the
    ``mean``, ``std`` (ddof=0) and number of ``seeds``; undefined cells (NaN in every seed) dropped.
    For bar charts with error bars (``kaviz.plots.bar(..., error="std")``)."""
    import pandas as pd

    frame = pd.concat(list(tables), ignore_index=True)
    order = list(dict.fromkeys(frame[by]))
    g = frame.groupby(by, sort=False)
    mean, std, n = g.mean(numeric_only=True), g.std(ddof=0, numeric_only=True), g.count()
    rows = [{by: r, "column": c, "mean": mean.loc[r, c], "std": std.loc[r, c], "seeds": int(n.loc[r, c])}
            for r in order for c in mean.columns if np.isfinite(mean.loc[r, c])]
    return pd.DataFrame(rows)


def summarize_seeds(tables: Sequence, by: str = "model", decimals: int = 3):
    """Mean ± std over seeds of tables with identical rows (one table per seed): a DataFrame of
    ``"0.912 ± 0.004"`` strings, rows in first-seen order (std with ddof=0; "-" where undefined)."""
    import pandas as pd

    frame = pd.concat(list(tables), ignore_index=True)
    order = list(dict.fromkeys(frame[by]))
    g = frame.groupby(by, sort=False)
    mean, std = g.mean(numeric_only=True), g.std(ddof=0, numeric_only=True)

    def fmt(m, s):
        if not np.isfinite(m):
            return "-"
        return f"{m:.{decimals}f} ± {s:.{decimals}f}"

    out = pd.DataFrame({c: [fmt(mean.loc[r, c], std.loc[r, c]) for r in order] for c in mean.columns}, index=order)
    out.index.name = by
    out.insert(0, "seeds", [int(g.size().loc[r]) for r in order])
    return out


class _Stats:
    """Running sums for the fraction of unexplained variance per layer,
    ``Σ (pred − target)² / Σ_c Σ (target_c − mean_c)²`` (each channel centred on its own mean)."""

    def __init__(self, n):
        self.err = [0.0] * n
        self.s = [None] * n
        self.s2 = [0.0] * n
        self.count = [0] * n

    def add(self, l, pred, target):
        t = target.double()
        self.err[l] += float(((pred.double() - t) ** 2).sum())
        per_channel = t.transpose(0, 1).reshape(t.shape[1], -1)
        s = per_channel.sum(1)
        self.s[l] = s if self.s[l] is None else self.s[l] + s
        self.s2[l] += float((t ** 2).sum())
        self.count[l] += per_channel.shape[1]

    def fuv(self, l):
        n = self.count[l]
        total = self.s2[l] - float((self.s[l] ** 2).sum()) / n
        return self.err[l] / max(total, 1e-30)


def _batches(data, batch_size):
    from ..data import Unlabeled

    loader = torch.utils.data.DataLoader(Unlabeled(data), batch_size=batch_size, shuffle=False)
    yield from loader


def _pca_floor(cov_sum, mean_sum, n, k):
    """Smallest relative error of any rank-k affine reconstruction (the PCA bound)."""
    mean = mean_sum / n
    cov = cov_sum / n - torch.outer(mean, mean)
    ev = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
    return float(ev[k:].sum() / ev.sum().clamp_min(1e-30))


def reconstruction_errors(amalgamation: FeatureAmalgamation, data, batch_size: int = 256, device=None):
    """Per layer, how well the stage-1 autoencoder reconstructs the concatenated teacher features
    on ``data``: the fraction of unexplained variance ``Σ(D(E(F)) − F)² / Σ(F − mean F)²``, next to
    the smallest value any rank-C_s linear autoencoder can reach (the PCA bound). The autoencoders
    (and the teachers inside) are moved to ``device`` (default: CUDA when available, else CPU)."""
    import pandas as pd

    plan = amalgamation.plan
    L = plan.depth
    stats = _Stats(L - 1)
    dims = [sum(tc[l] for tc in plan.teacher_channels) for l in range(L - 1)]
    cov = [torch.zeros(d, d, dtype=torch.float64) for d in dims]
    mean = [torch.zeros(d, dtype=torch.float64) for d in dims]
    count = [0] * (L - 1)
    device = _target_device(device)
    amalgamation.to(device)
    with eval_mode(amalgamation), torch.no_grad():
        for x in _batches(data, batch_size):
            feats, _ = amalgamation.features(x.to(device))
            for l, f in enumerate(feats):
                stats.add(l, amalgamation.decoders[l](amalgamation.encoders[l](f)), f)
                v = (f.movedim(1, -1) if f.dim() == 4 else f).reshape(-1, f.shape[1]).double().cpu()
                cov[l] += v.T @ v
                mean[l] += v.sum(0)
                count[l] += v.shape[0]
    rows = []
    for l in range(L - 1):
        rows.append({"layer": l + 1, "student layer": plan.segments[l].name,
                     "teacher channels": dims[l], "code channels": plan.student_channels[l],
                     "unexplained variance": stats.fuv(l),
                     "PCA bound": _pca_floor(cov[l], mean[l], count[l], plan.student_channels[l])})
    return pd.DataFrame(rows)


def layer_errors(result: LayerwiseResult, data, students: Mapping[str, nn.Module] | None = None,
                 batch_size: int = 256, device=None):
    """Per student layer, the fraction of unexplained variance of the amalgamated feature (the last
    layer: of the concatenated logits) on ``data``:

    - ``layer-wise``: the stage-2 layer given the *amalgamated* input (its training objective);
    - one column per student in ``students`` (default: ``result.students``): that network run end
      to end, its own layer-l feature against ``F_a^l`` — how the layers' errors compound, and how
      far fine-tuning moves the features away from the amalgamated ones.

    The networks are moved to ``device`` (default: CUDA when available, else CPU).
    """
    import pandas as pd

    students = dict(result.students if students is None else students)
    device = _target_device(device)
    method = result.layerwise.to(device)  # with the stage-1 autoencoders and the teachers inside
    for s in students.values():
        s.to(device)
    plan = result.plan
    L = plan.depth
    names = [s.name for s in plan.segments]
    own = _Stats(L)
    ends = {k: _Stats(L) for k in students}
    amalg = result.amalgamation
    with eval_mode(method), torch.no_grad():
        for x in _batches(data, batch_size):
            x = x.to(device)
            targets = amalg.targets(x)
            inputs = [x] + targets[:-1]
            for l in range(L):
                own.add(l, method.run_layer(l, inputs[l]), targets[l])
            for k, s in students.items():
                with eval_mode(s), FeatureTap(s, names[:-1]) as tap:
                    out = s(x)
                    feats = [tap[n] for n in names[:-1]] + [out]
                for l in range(L):
                    ends[k].add(l, feats[l], targets[l])
    rows = []
    for l in range(L):
        r = {"layer": l + 1, "student layer": names[l], "target": "logits" if l == L - 1 else "F_a",
             "layer-wise": own.fuv(l)}
        for k in students:
            r[f"end-to-end: {k}"] = ends[k].fuv(l)
        rows.append(r)
    return pd.DataFrame(rows)


def feature_maps(result: LayerwiseResult, data, index: int, layer: int, channels: Sequence[int] = (0,),
                 students: Mapping[str, nn.Module] | None = None, device=None):
    """Maps of image ``index`` at student layer ``layer`` (1-based, a conv layer), for
    :func:`kaviz.plots.feature_grid`: one row per student channel c with the image (first row only), each teacher's
    channel with the largest encoder weight |E[c, ·]| into code channel c, the amalgamated map
    ``F_a[c]`` and each student's own map c (end to end). Channels are taken modulo the layer's
    width. Returns ``(rows, titles)`` (NumPy arrays); the networks are moved to ``device``."""
    plan = result.plan
    if not 1 <= layer <= plan.depth - 1 or not plan.sizes[layer - 1]:
        convs = [l + 1 for l in range(plan.depth - 1) if plan.sizes[l]]
        raise ValueError(f"layer must be a spatial (conv) layer, one of {convs}; got {layer}")
    l = layer - 1
    students = dict(result.students if students is None else students)
    device = _target_device(device)
    x = torch.stack([data.get_image(index) if hasattr(data, "get_image") else data[index][0]]).to(device)
    amalg = result.amalgamation.to(device)
    with eval_mode(amalg), torch.no_grad():
        feats, _ = amalg.features(x)
        code = amalg.encoders[l](feats[l])[0].cpu()
        feats = [f.cpu() for f in feats]
    s_maps = {}
    for k, s in students.items():
        with eval_mode(s.to(device)), torch.no_grad(), FeatureTap(s, plan.segments[l].name) as tap:
            s(x)
            s_maps[k] = tap[plan.segments[l].name][0].cpu()
    image = data.image_array(index) if hasattr(data, "image_array") else x[0].cpu()
    E = amalg.encoders[l].weight.detach().cpu()
    offsets = np.cumsum([0] + [tc[l] for tc in plan.teacher_channels])
    rows, titles = [], []
    C = plan.student_channels[l]
    for r, c in enumerate(channels):
        c = int(c) % C
        row, title = ([image], ["image"]) if r == 0 else ([None], [None])
        for t in range(len(plan.teacher_channels)):
            w = E[c, offsets[t]:offsets[t + 1]].abs()
            j = int(w.argmax())
            row.append(feats[l][0, offsets[t] + j].numpy())
            title.append(f"teacher {t + 1} ch {j}")
        row.append(code[c].numpy())
        title.append(f"amalgamated ch {c}")
        for k, m in s_maps.items():
            row.append(m[c].numpy())
            title.append(f"{k} ch {c}")
        rows.append(row)
        titles.append(title)
    return rows, titles


def param_table(teachers: Sequence[nn.Module], students: Mapping[str, nn.Module]):
    """Parameter counts of the teachers, their sum, and the students (with their share of the sum)."""
    import pandas as pd

    from ..models import param_count

    counts = [param_count(t) for t in teachers]
    total = sum(counts)
    rows = [{"model": f"teacher {k + 1}", "parameters": c, "share of teachers": c / total} for k, c in enumerate(counts)]
    rows.append({"model": "teachers combined", "parameters": total, "share of teachers": 1.0})
    for name, s in students.items():
        c = param_count(s)
        rows.append({"model": name, "parameters": c, "share of teachers": c / total})
    return pd.DataFrame(rows)
