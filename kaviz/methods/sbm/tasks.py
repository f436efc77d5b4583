"""SBM dense tasks: kinds (segmentation, depth, normals), their target keys, branch points, the ignore index."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ...metrics import (
    depth_valid,  # noqa: F401 (the one definition of a scored depth pixel)
    normal_valid,  # noqa: F401 (the one definition of a scored normal pixel)
)
from ..dense import DENSE_KINDS as KINDS
from ..dense import DENSE_TARGET_KEYS as TARGET_KEYS  # noqa: F401 (sbm.TARGET_KEYS)
from ..dense import (
    IGNORE_INDEX,  # noqa: F401 (sbm.IGNORE_INDEX)
    normals_loss,  # noqa: F401 (sbm.normals_loss: the normals task's loss to its teacher)
)

#: Candidate branch points of a SegNetSmall, shallow to deep: the block after which a task leaves
#: the shared trunk (``enc3``: only the encoder is shared; ``dec1``: all but the head is shared).
BRANCH_POINTS = ("enc3", "dec3", "dec2", "dec1")


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {KINDS}, got {kind!r}")
    return kind


def kind_channels(kind: str, num_classes: int | None = None) -> int:
    """Output channels of a dense model of ``kind``: ``num_classes`` (segmentation), 1 (depth) or 3
    (normals: x, y, z)."""
    check_kind(kind)
    if kind == "segmentation":
        if num_classes is None:
            raise ValueError("a segmentation model needs num_classes output channels: pass num_classes=...")
        return num_classes
    return 1 if kind == "depth" else 3


def normals_target(output: torch.Tensor) -> torch.Tensor:
    """A normals teacher's target for the student: its raw 3-channel output (B, 3, H, W) normalised to
    unit length per pixel (a zero vector stays zero, so :func:`normals_loss` skips that pixel)."""
    if output.dim() != 4 or output.shape[1] != 3:
        raise ValueError(f"a normals teacher outputs (B, 3, H, W), got {tuple(output.shape)}")
    return F.normalize(output, dim=1, eps=1e-12)
