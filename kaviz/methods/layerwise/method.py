"""Layer-wise amalgamation (SPEC §4.1): feature amalgamation (stage 1), layer-wise parameter learning with
folding (stage 2), logit matching (stage 3) and the one-stage variant."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data import images_of
from ...features import FeatureTap
from ...losses import soft_cross_entropy
from ...train import freeze
from ..kd import concat_logits, union_accuracy
from .layers import LINEAR_TYPES, NORM_TYPES, LayerPlan


# building blocks
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


# stage 1: feature amalgamation
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


# stage 2: layer-wise parameter learning, and folding
def fold_auxiliary(linear: nn.Module, aux: ChannelLinear, norm: nn.Module | None = None) -> None:
    """Fold ``aux`` (applied right after ``linear``) into ``linear``, in place:
    ``W' = A·W`` (for a conv, ``W'[o] = Σ_c A[o, c] W[c]`` over output channels), ``b' = A·b + b_A``.
    Without a bias on ``linear`` the offset goes into the following batch-norm: ``μ' = μ − b'``
    (exact in eval mode, and in training mode where the batch mean absorbs it). The paper's backwards
    fold (``placement="input"``) is the same operation on the previous layer, which has no norm."""
    if not isinstance(linear, LINEAR_TYPES):
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
        elif isinstance(norm, NORM_TYPES) and norm.running_mean is not None:
            norm.running_mean.sub_(new_b)
        else:
            raise ValueError(
                "the layer has no bias and no batch-norm with running statistics after it, so the auxiliary map's "
                "offset b' = A·b + b_A cannot be absorbed; build the layer with bias=True.")


PLACEMENTS = ("output", "input")


def check_placement(plan: LayerPlan, student: nn.Module, placement: str) -> None:
    """Raise a ValueError when the auxiliary maps cannot be placed (and later folded) as asked.

    ``"output"`` (kaviz's default) works for any plan. ``"input"`` (the paper's) folds the map on the
    input of layer l backwards into layer l−1's conv/linear, so each layer before the classifier must
    end at that conv/linear — no batch-norm — and have a bias to take the offset ``A·b + b_A``."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be 'output' (the auxiliary map right after each layer's own conv, kaviz's "
                         f"default) or 'input' (on the next layer's input, before its ReLU/pooling, folded backwards: "
                         f"the paper's); got {placement!r}")
    if placement == "output":
        return
    modules = dict(student.named_modules())
    for l, seg in enumerate(plan.segments[:-1], start=1):
        if seg.norm is not None:
            raise ValueError(
                f"placement='input' folds the auxiliary map on layer {l + 1}'s input backwards into layer {l} "
                f"({seg.linear!r}), which is exact only when nothing lies between that layer's conv and the map; "
                f"layer {l} ends with the batch-norm {seg.norm!r}. Use a BN-free student (e.g. "
                f"kaviz.models.build('vgg8_small', k, norm=False)) or placement='output'.")
        lin = modules.get(seg.linear)
        if lin is not None and getattr(lin, "bias", None) is None:
            raise ValueError(
                f"placement='input': layer {l} ({seg.linear!r}) has no bias, so the folded offset A·b + b_A of the "
                f"next layer's auxiliary map has nowhere to go; build it with bias=True (kaviz's small VGG does with "
                f"norm=False) or use placement='output'.")


class LayerwiseLearning(nn.Module):
    """Stage 2: every student layer learns, independently, to map the previous amalgamated feature
    to the current one (the first from the image, the last to the concatenated logits). The
    student's own modules are trained (in place); the auxiliary 1×1 maps (identity at start) live
    here. ``folded()`` returns a copy of the student with every map folded in; ``evaluate`` reports
    that copy's union accuracy.

    ``placement`` says where the auxiliary maps sit:

    - ``"output"`` (default): ``A_k`` right after layer k's own conv/linear, before its batch-norm,
      ``{"mse_l<k>": MSE(norm_k(A_k(W_k(ops_k(F_a^{k−1})))), F_a^k)}``; folded into ``W_k``. This
      only re-parametrises the layer's linear map.
    - ``"input"`` (the paper's, SPEC §4.1): ``A_k`` on the layer's input, the pre-activation
      ``F_a^{k−1}``, before the parameter-free ops (ReLU, pooling),
      ``{"mse_l<k>": MSE(norm_k(W_k(ops_k(A_k(F_a^{k−1})))), F_a^k)}`` for k ≥ 2 (layer 1 reads the
      image, which has no map); afterwards each ``A_k`` is folded *backwards* into ``W_{k−1}``, whose
      output it consumed before any non-linearity. Exact only for layers without batch-norm and with
      a bias (a BN-free student, e.g. ``build("vgg8_small", k, norm=False)``); anything else raises
      a ValueError here. ``aux[k−2]`` is ``A_k`` (L−1 maps; ``aux[j]`` has layer j+1's width).
    """

    def __init__(self, student: nn.Module, amalgamation: FeatureAmalgamation, placement: str = "output"):
        super().__init__()
        if not isinstance(amalgamation, FeatureAmalgamation):
            raise TypeError("LayerwiseLearning needs the trained stage-1 FeatureAmalgamation")
        self.student = student
        self.amalgamation = freeze(amalgamation)
        self.plan = amalgamation.plan
        check_placement(self.plan, student, placement)
        self.placement = placement
        channels = self.plan.student_channels if placement == "output" else self.plan.student_channels[:-1]
        self.aux = nn.ModuleList([ChannelLinear(c, c, identity=True) for c in channels])
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
        if self.placement == "input" and l > 0:
            h = self.aux[l - 1](h)
        for op in seg.ops:
            h = modules[op](h) if isinstance(op, str) else op(h)
        h = modules[seg.linear](h)
        if self.placement == "output":
            h = self.aux[l](h)
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
        """A copy of the student with each auxiliary map folded in (same architecture): into its own
        layer (``placement="output"``) or backwards into the previous one (``"input"``)."""
        student = copy.deepcopy(self.student)
        modules = dict(student.named_modules())
        if self.placement == "output":
            for seg, aux in zip(self.plan.segments, self.aux):
                fold_auxiliary(modules[seg.linear], aux, modules[seg.norm] if seg.norm else None)
        else:
            for prev, aux in zip(self.plan.segments[:-1], self.aux):
                fold_auxiliary(modules[prev.linear], aux)
        return student

    def evaluate(self, data) -> dict:
        return union_accuracy(self.folded(), data)


def fold_check(method: LayerwiseLearning, x: torch.Tensor) -> dict:
    """Largest absolute and relative difference between the unfolded chain and the folded student
    on ``x``, in eval and in training mode (the training-mode check leaves batch-norm statistics as
    they were): ``max_abs_diff_<mode>``, ``max_rel_diff_<mode>``. Both should be at float round-off.

    The control, ``dropped_maps_rel_diff_<mode>``: the same relative difference for the student with
    its auxiliary maps left out (not folded), which a check of the folding must tell apart from the
    folded one — it is large unless the maps stayed at the identity."""
    folded = method.folded()
    out = {}
    for mode in ("eval", "train"):
        a_model, b_model = copy.deepcopy(method).to(x.device), copy.deepcopy(folded).to(x.device)
        dropped = copy.deepcopy(method.student).to(x.device)
        for m in (a_model, b_model, dropped):
            m.train(mode == "train")
        with torch.no_grad():
            a, b, c = a_model.chain(x), b_model(x), dropped(x)
        scale = a.abs().max().clamp_min(1e-30)
        out[f"max_abs_diff_{mode}"] = float((a - b).abs().max())
        out[f"max_rel_diff_{mode}"] = float((a - b).abs().max() / scale)
        out[f"dropped_maps_rel_diff_{mode}"] = float((a - c).abs().max() / scale)
    return out


# stage 3 and the one-stage variant
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
