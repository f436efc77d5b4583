"""SBM dense tasks: kinds (segmentation, depth), their target keys, branch points, the ignore index."""
from __future__ import annotations

from ...metrics import depth_valid  # noqa: F401 (the one definition of a scored depth pixel)
from ..dense import DENSE_KINDS as KINDS
from ..dense import DENSE_TARGET_KEYS as TARGET_KEYS  # noqa: F401 (sbm.TARGET_KEYS)
from ..dense import IGNORE_INDEX  # noqa: F401 (sbm.IGNORE_INDEX)

#: Candidate branch points of a SegNetSmall, shallow to deep: the block after which a task leaves
#: the shared trunk (``enc3``: only the encoder is shared; ``dec1``: all but the head is shared).
BRANCH_POINTS = ("enc3", "dec3", "dec2", "dec1")


def check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {KINDS}, got {kind!r}")
    return kind

