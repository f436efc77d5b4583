"""The recombined network (SPEC §4.3): a shared encoder, a quantised bottleneck and per-task decoders."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...models.dense import EncoderBlock, SegNetSmall

#: Groups of convs that :func:`prune` can thin out.
PRUNE_GROUPS = ("encoder", "bottleneck", "adaptors", "decoders")
#: Filter choices of :func:`prune` (``"smallest"`` is the method; the others are for comparison).
CRITERIA = ("smallest", "largest", "random", "bn-scaled")
#: What :func:`prune` thins out by default: the combined part (the block-diagonal encoder, where the
#: two teachers' filters overlap, and the shared code); the task decoders stay the teachers' own.
DEFAULT_GROUPS = ("encoder", "bottleneck")


# the combined network
class Quantiser(nn.Module):
    """Uniform scalar quantiser with a straight-through gradient.

    Forward: ``q(z) = Δ·round(z/Δ)`` (integer symbols ``round(z/Δ)``); backward: ``∂q/∂z = 1``
    (the identity straight-through estimator, Bengio et al. 2013, used for learned compression by
    Theis et al. 2017). ``step=None`` or 0 disables it; :meth:`disabled` turns it off temporarily.
    """

    def __init__(self, step: float | None = 0.05):
        super().__init__()
        if step is not None and (not isinstance(step, (int, float)) or isinstance(step, bool) or step < 0):
            raise ValueError(f"quantiser step must be a number >= 0 (or None for no quantisation), got {step!r}")
        self.step = float(step) if step else 0.0
        self.enabled = True

    @property
    def active(self) -> bool:
        return self.enabled and self.step > 0

    def forward(self, z):
        if not self.active:
            return z
        q = torch.round(z / self.step) * self.step
        return z + (q - z).detach()

    def symbols(self, z) -> torch.Tensor:
        """The integer symbols an entropy coder would transmit (``z`` itself rounded when off)."""
        return torch.round(z / self.step).long() if self.step > 0 else torch.round(z).long()

    @contextlib.contextmanager
    def disabled(self):
        old = self.enabled
        try:
            self.enabled = False
            yield self
        finally:
            self.enabled = old

    def extra_repr(self):
        return f"step={self.step}"


class TaskDecoder(nn.Module):
    """A teacher's own decoder (``dec3 dec2 dec1 head``, copied) behind the shared code:
    ``TaskDecoder(teacher)(teacher.encode(x)[0], size) == teacher(x)``."""

    def __init__(self, teacher: SegNetSmall):
        super().__init__()
        self.dec3 = copy.deepcopy(teacher.dec3)
        self.dec2 = copy.deepcopy(teacher.dec2)
        self.dec1 = copy.deepcopy(teacher.dec1)
        self.head = copy.deepcopy(teacher.head)
        self.output = teacher.output

    def forward(self, z, size=None):
        d = self.dec1(self.dec2(self.dec3(z)))
        if size is not None and tuple(d.shape[-2:]) != tuple(size):
            d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        out = self.head(d)
        return torch.sigmoid(out) if self.output == "sigmoid" else out


#: Code width of the reference bottleneck (``combine(bottleneck="reference")``).
REFERENCE_BOTTLENECK = 16
#: Negative slope of the LeakyReLU in :class:`Conv1x1Block` (PyTorch's default, as the reference code).
LEAKY_SLOPE = 0.01


class Conv1x1Block(nn.Module):
    """``1×1 conv → BN → LeakyReLU → 1×1 conv`` (both convs without bias): the reference code's shared
    bottleneck (``in_channels → width → out_channels``, ``width = out_channels = 16``) and its
    per-task adaptors (``16 → C_t → C_t``), selected by ``combine(bottleneck_norm=True)``.
    ``in_channels``/``out_channels`` are those of ``conv1``'s input and ``conv2``'s output, so the
    block stands wherever a plain 1×1 conv stood; :func:`prune` thins ``conv1`` (with ``bn``) and
    ``conv2`` like any other conv."""

    def __init__(self, in_channels: int, width: int, out_channels: int, *, negative_slope: float = LEAKY_SLOPE,
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("width", width), ("out_channels", out_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        f = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False, **f)
        self.bn = nn.BatchNorm2d(width, **f)
        self.act = nn.LeakyReLU(negative_slope)
        self.conv2 = nn.Conv2d(width, out_channels, 1, bias=False, **f)

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv2.out_channels

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


def _first_conv(name: str, module: nn.Module) -> str:
    """Dotted name of the conv that reads ``module``'s input (``module`` itself or its ``conv1``)."""
    return f"{name}.conv1" if isinstance(module, Conv1x1Block) else name


def _block_units(name: str, module: nn.Module, consumers: tuple, group: str) -> list:
    """Prune units of a plain 1×1 conv or of a :class:`Conv1x1Block` whose output feeds ``consumers``."""
    if isinstance(module, Conv1x1Block):
        return [PruneUnit(f"{name}.conv1", f"{name}.bn", (f"{name}.conv2",), group),
                PruneUnit(f"{name}.conv2", None, consumers, group)]
    return [PruneUnit(name, None, consumers, group)]


ENCODER_BLOCKS = ("enc1", "enc2", "enc3")
DECODER_BLOCKS = ("dec3", "dec2", "dec1")


@dataclass(frozen=True)
class PruneUnit:
    """A prunable conv (dotted name), its batch norm (or None) and the convs reading its output."""

    conv: str
    bn: str | None
    consumers: tuple[str, ...]
    group: str


class RecombinedNet(nn.Module):
    """Block-diagonally combined encoder → shared 1×1 bottleneck → quantiser → per-task 1×1
    adaptor → the teacher's decoder. Built by :func:`combine`; ``forward(x)`` returns
    ``{task: output}`` (reconstruction in [0, 1], segmentation logits).

    ``offsets[block][t]`` is teacher t's channel range in a combined encoder block (valid until
    the first pruning round); ``kinds`` maps each task to ``"reconstruction"``/``"segmentation"``.
    The bottleneck and the adaptors are plain 1×1 convs (kaviz's default) or, with
    ``combine(bottleneck_norm=True)``, :class:`Conv1x1Block` s (conv → BN → LeakyReLU → conv, the
    reference code's); ``bottleneck_norm`` says which.
    """

    def __init__(self, blocks: Mapping[str, EncoderBlock], bottleneck: nn.Conv2d | Conv1x1Block,
                 quantiser: Quantiser, adaptors: Mapping[str, nn.Conv2d | Conv1x1Block],
                 decoders: Mapping[str, TaskDecoder], kinds: Mapping[str, str],
                 in_channels: int, offsets: Mapping[str, list], identity_bottleneck: bool):
        super().__init__()
        for name in ENCODER_BLOCKS:
            self.add_module(name, blocks[name])
        self.bottleneck = bottleneck
        self.quantiser = quantiser
        self.adaptors = nn.ModuleDict(dict(adaptors))
        self.decoders = nn.ModuleDict(dict(decoders))
        self.kinds = dict(kinds)
        self.tasks = list(kinds)
        self.in_channels = int(in_channels)
        self.offsets = {k: list(v) for k, v in offsets.items()}
        self.identity_bottleneck = bool(identity_bottleneck)
        self.pruned_rounds = 0
        # which teacher each output channel of the combined convs came from (kept through pruning);
        # a teacher's encoder block has conv1 and conv2 of one width, so both share the block's ranges
        self.origins: dict[str, torch.Tensor] = {}
        for b, ranges in self.offsets.items():
            sizes = torch.tensor([hi - lo for lo, hi in ranges])
            for conv in ("conv1", "conv2"):
                self.origins[f"{b}.{conv}"] = torch.repeat_interleave(torch.arange(len(ranges)), sizes)
        if self.identity_bottleneck:
            self.origins["bottleneck"] = self.origins["enc3.conv2"].clone()

    @property
    def n_teachers(self) -> int:
        return len(self.tasks)

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got {tuple(x.shape)}; the network "
                             "repeats the image once per teacher itself, so pass the plain image")
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"height and width must be divisible by 8 (three ×½ stages), got {tuple(x.shape[-2:])}")

    def encode(self, x):
        """The combined encoder's output (before the bottleneck) for plain images ``x``."""
        self._check_input(x)
        h = x.repeat(1, self.n_teachers, 1, 1)  # teacher t reads input channels 3t..3t+2
        for name in ENCODER_BLOCKS:
            h = getattr(self, name)(h)
        return h

    def code(self, x):
        """The quantised shared code ``q(bottleneck(encode(x)))``."""
        return self.quantiser(self.bottleneck(self.encode(x)))

    def decode(self, code, size=None):
        """``{task: decoder_t(adaptor_t(code))}``, resized to ``size`` (H, W) when given."""
        return {t: self.decoders[t](self.adaptors[t](code), size=size) for t in self.tasks}

    def forward(self, x):
        return self.decode(self.code(x), size=x.shape[-2:])

    def prune_units(self, groups: Sequence[str] = PRUNE_GROUPS) -> list[PruneUnit]:
        """The prunable convs of the given groups, in forward order (see :data:`PRUNE_GROUPS`)."""
        unknown = [g for g in groups if g not in PRUNE_GROUPS]
        if unknown:
            raise ValueError(f"unknown prune groups {unknown}; choose among {PRUNE_GROUPS}")
        units = []
        if "encoder" in groups:
            for i, b in enumerate(ENCODER_BLOCKS):
                nxt = (f"{ENCODER_BLOCKS[i + 1]}.conv1" if i + 1 < len(ENCODER_BLOCKS)
                       else _first_conv("bottleneck", self.bottleneck))
                units.append(PruneUnit(f"{b}.conv1", f"{b}.bn1", (f"{b}.conv2",), "encoder"))
                units.append(PruneUnit(f"{b}.conv2", f"{b}.bn2", (nxt,), "encoder"))
        if "bottleneck" in groups:
            readers = tuple(_first_conv(f"adaptors.{t}", self.adaptors[t]) for t in self.tasks)
            units += _block_units("bottleneck", self.bottleneck, readers, "bottleneck")
        if "adaptors" in groups:
            for t in self.tasks:
                units += _block_units(f"adaptors.{t}", self.adaptors[t], (f"decoders.{t}.dec3.conv1",), "adaptors")
        if "decoders" in groups:
            for t in self.tasks:
                for i, d in enumerate(DECODER_BLOCKS):
                    nxt = f"decoders.{t}.{DECODER_BLOCKS[i + 1]}.conv1" if i + 1 < len(
                        DECODER_BLOCKS) else f"decoders.{t}.head"
                    p = f"decoders.{t}.{d}"
                    units.append(PruneUnit(f"{p}.conv1", f"{p}.bn1", (f"{p}.conv2",), "decoders"))
                    units.append(PruneUnit(f"{p}.conv2", f"{p}.bn2", (nxt,), "decoders"))
        return units

    def widths(self) -> dict:
        """Output channels of every prunable conv (``{dotted name: channels}``)."""
        return {u.conv: self.get_submodule(u.conv).out_channels for u in self.prune_units()}

    def code_channels(self) -> int:
        return self.bottleneck.out_channels

    @property
    def bottleneck_norm(self) -> bool:
        """Whether the bottleneck (and the adaptors) are :class:`Conv1x1Block` s (BN and LeakyReLU)."""
        return isinstance(self.bottleneck, Conv1x1Block)
