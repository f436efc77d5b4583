"""The layers of teachers and student, matched into segments by a traced forward (LayerPlan, plan_layers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ...features import FeatureTap, eval_mode

LINEAR_TYPES = (nn.Conv2d, nn.Linear)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


# layers
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


def target_device(device):
    from ... import default_device

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
        if isinstance(m, LINEAR_TYPES):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"{mname}: {name!r} is a grouped/depthwise convolution (groups={m.groups}); the "
                                 "auxiliary 1×1 map mixes all channels and cannot be folded into it.")
            segments.append(Segment(linear=name, norm=None, ops=pending))
            pending = []
            last_linear_call = k
        elif isinstance(m, NORM_TYPES) and last_linear_call == k - 1 and segments and segments[-1].norm is None:
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
            row[
                "teacher channels"] = " + ".join(
                    str(c) for c in (self.num_outputs if last else [tc[l] for tc in self.teacher_channels]))
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
        raise ValueError(f"the student has {L} layer; layer-wise amalgamation needs at least a feature layer and a "
                         f"classifier")
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
                    f"layer {l + 1}: teacher {k + 1}'s {teacher_layers[k][l]!r} has spatial size {t_shapes[k][l][1]} "
                    f"but the "
                    f"student's {s_names[l]!r} has {s_shapes[l][1]}; pair layers of equal resolution "
                    f"(teacher_layers=...).")
    if s_out.dim() != 2 or s_out.shape[1] != sum(n_out):
        raise ValueError(f"the student has {tuple(s_out.shape[1:])} outputs but the teachers have {n_out} classes: "
                         f"its head "
                         f"must cover the comprehensive label space (sum = {sum(n_out)}), teacher order first to last.")
    return LayerPlan(
        segments=segments,
        teacher_layers=teacher_layers,
        teacher_channels=[[c for c, _ in ts] for ts in t_shapes],
        student_channels=[c for c, _ in s_shapes] + [int(s_out.shape[1])],
        sizes=[s for _, s in s_shapes] + [()],
        num_outputs=n_out,
    )
