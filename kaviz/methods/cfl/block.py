"""CFL blocks (SPEC §1): the common-space encoder/decoder for conv features (CFLBlock) and its
fully-connected variant."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _Residual(nn.Module):
    """3×3 conv, ReLU, 3×3 conv, plus a 1×1 projection shortcut when channels change, ReLU after
    the sum; no batch-norm and no bias (SPEC §1)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + self.shortcut(x))


def _check_channels(student_channels, teacher_channels, hidden, what="channels"):
    def ok(c):
        return isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1

    if not ok(student_channels):
        raise ValueError(f"student_channels must be a positive int ({what} of the student's layer), "
                         f"got {student_channels!r}")
    if isinstance(teacher_channels, (int, np.integer)) or not isinstance(teacher_channels, Sequence) \
            or not teacher_channels or not all(ok(c) for c in teacher_channels):
        raise ValueError(f"teacher_channels must be a non-empty list of positive ints, one per teacher "
                         f"({what} of each teacher's layer), got {teacher_channels!r}")
    if not ok(hidden):
        raise ValueError(f"hidden must be a positive int (width h of the common space), got {hidden!r}")


class CFLBlock(nn.Module):
    """The convolutional CFL block (SPEC §1) for feature maps (N, C, H, W).

    - ``align_s``: 1×1 conv C_s→2h (no bias) + ReLU; ``align_t[k]`` likewise C_t→2h per teacher;
    - ``extractor`` E (shared): three residual blocks 2h→h→h→h, no batch-norm, no bias;
    - ``decoders[k]``: 3×3 conv h→C_t (pad 1, no bias), ReLU, 1×1 conv C_t→C_t (no bias).

    ``block(f_s, [f_t1, f_t2, …])`` returns ``(h_s, [h_t…], [f̂_t…])`` with
    ``h_s = E(align_s(f_s))``, ``h_t = E(align_t(f_t))``, ``f̂_t = dec_t(h_t)``. All maps must share
    one spatial size (see :func:`match_spatial`). For (512, [512, 512], 128) the block has
    3,162,112 parameters (align 393,216 + extractor 1,064,960 + decoders 1,703,936).
    """

    def __init__(self, student_channels: int, teacher_channels: Sequence[int], hidden: int = 128):
        super().__init__()
        _check_channels(student_channels, teacher_channels, hidden)
        self.student_channels = int(student_channels)
        self.teacher_channels = [int(c) for c in teacher_channels]
        self.hidden = int(hidden)
        h = self.hidden

        def align(c):
            return nn.Sequential(nn.Conv2d(c, 2 * h, 1, bias=False), nn.ReLU())

        self.align_s = align(self.student_channels)
        self.align_t = nn.ModuleList([align(c) for c in self.teacher_channels])
        self.extractor = nn.Sequential(_Residual(2 * h, h), _Residual(h, h), _Residual(h, h))
        self.decoders = nn.ModuleList([
            nn.Sequential(nn.Conv2d(h, c, 3, 1, 1, bias=False), nn.ReLU(), nn.Conv2d(c, c, 1, bias=False))
            for c in self.teacher_channels])

    def _check(self, f_s, f_ts):
        if not torch.is_tensor(f_s) or f_s.dim() != 4:
            raise ValueError(f"CFLBlock takes conv feature maps (N, C, H, W); the student's has shape "
                             f"{tuple(f_s.shape) if torch.is_tensor(f_s) else type(f_s).__name__}. "
                             "For pooled vectors (N, C) use CFLBlockFC.")
        if len(f_ts) != len(self.teacher_channels):
            raise ValueError(f"this block was built for {len(self.teacher_channels)} teachers, got "
                             f"{len(f_ts)} teacher feature maps")
        shapes = [tuple(f_s.shape)] + [tuple(f.shape) for f in f_ts]
        chans = [self.student_channels] + self.teacher_channels
        for k, (shape, c) in enumerate(zip(shapes, chans)):
            who = "student" if k == 0 else f"teacher {k}"
            if len(shape) != 4 or shape[1] != c:
                raise ValueError(f"the {who}'s features have shape {shape} but the block expects {c} "
                                 f"channels (N, {c}, H, W); build the block with the channel counts of "
                                 "the tapped layers")
        if len({s[2:] for s in shapes}) > 1 or len({s[0] for s in shapes}) > 1:
            raise ValueError(f"student and teacher feature maps must share batch and spatial size, got "
                             f"{shapes}; pool them to one size first (kaviz.methods.cfl.match_spatial)")

    def forward(self, f_s: torch.Tensor, f_ts: Sequence[torch.Tensor]):
        self._check(f_s, f_ts)
        h_s = self.extractor(self.align_s(f_s))
        h_ts = [self.extractor(a(f)) for a, f in zip(self.align_t, f_ts)]
        rec = [d(h) for d, h in zip(self.decoders, h_ts)]
        return h_s, h_ts, rec


class CFLBlockFC(nn.Module):
    """The fully-connected CFL block, on the pooled vectors that feed the classifier (N, C):
    ``align`` Linear C→h + ReLU per network, a shared extractor Linear-ReLU-Linear (h→h→h), and a
    decoder Linear-ReLU-Linear (h→C_t→C_t) per teacher. Same call and outputs as
    :class:`CFLBlock`."""

    def __init__(self, student_dim: int, teacher_dims: Sequence[int], hidden: int = 128):
        super().__init__()
        _check_channels(student_dim, teacher_dims, hidden, what="feature sizes")
        self.student_channels = int(student_dim)
        self.teacher_channels = [int(c) for c in teacher_dims]
        self.hidden = h = int(hidden)
        self.align_s = nn.Sequential(nn.Linear(self.student_channels, h), nn.ReLU())
        self.align_t = nn.ModuleList([nn.Sequential(nn.Linear(c, h), nn.ReLU()) for c in self.teacher_channels])
        self.extractor = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h))
        self.decoders = nn.ModuleList([nn.Sequential(nn.Linear(h, c), nn.ReLU(), nn.Linear(c, c))
                                       for c in self.teacher_channels])

    def forward(self, f_s: torch.Tensor, f_ts: Sequence[torch.Tensor]):
        if len(f_ts) != len(self.teacher_channels):
            raise ValueError(f"this block was built for {len(self.teacher_channels)} teachers, got {len(f_ts)}")
        for k, (f, c) in enumerate(zip([f_s, *f_ts], [self.student_channels, *self.teacher_channels])):
            if f.dim() != 2 or f.shape[1] != c:
                who = "student" if k == 0 else f"teacher {k}"
                raise ValueError(f"CFLBlockFC takes vectors (N, C); the {who}'s have shape {tuple(f.shape)}, "
                                 f"expected (N, {c}). For conv maps use CFLBlock.")
        h_s = self.extractor(self.align_s(f_s))
        h_ts = [self.extractor(a(f)) for a, f in zip(self.align_t, f_ts)]
        return h_s, h_ts, [d(h) for d, h in zip(self.decoders, h_ts)]


def match_spatial(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Average-pool conv maps (N, C, H, W) to the smallest H and the smallest W among them.

    Why pooling to the smaller grid: upsampling would invent positions the coarser network never
    saw, while average pooling only summarises the finer map; vectors (N, C) pass unchanged.
    """
    maps = [f for f in features if f.dim() == 4]
    if not maps:
        return list(features)
    h = min(f.shape[2] for f in maps)
    w = min(f.shape[3] for f in maps)
    return [F.adaptive_avg_pool2d(f, (h, w)) if f.dim() == 4 and tuple(f.shape[2:]) != (h, w) else f
            for f in features]
