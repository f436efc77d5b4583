"""Decoders shared by the dense loaders (NYUv2, CamVid): stored maps -> class ids / metres."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import IGNORE_INDEX, DatasetLayoutError


def _to_2d(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim != 2:
        raise DatasetLayoutError(
            f"{path}: a {what} must be a single-channel (H, W) map, got shape {arr.shape}"
            + (" (a colour-coded label image? store class ids, not colours)" if arr.ndim == 3 else ""))
    return arr


def decode_labels(arr: np.ndarray, path: Path, num_classes: int, void_values: Sequence[int] = (IGNORE_INDEX,),
                  zero_is_void: bool = False) -> np.ndarray:
    """Class ids 0..num_classes-1 as int64, with every void value mapped to ``IGNORE_INDEX`` (255).

    ``zero_is_void``: the map stores 0 = void and 1..num_classes for the classes (shifted down by one).
    Any other value is an error naming the file, so a map in another convention is not silently
    misread.
    """
    arr = _to_2d(np.asarray(arr), path, "label map").astype(np.int64)
    if zero_is_void:
        zero = arr == 0
        arr = arr - 1
        arr[zero] = IGNORE_INDEX
    void = np.isin(arr, list(void_values))
    bad = ~void & ((arr < 0) | (arr >= num_classes))
    if bad.any():
        vals = np.unique(arr[bad])[:5].tolist()
        hint = (" If the map stores 0 = void and 1..%d for the classes, pass zero_is_void=True." % num_classes
                if not zero_is_void and int(arr.max()) == num_classes else "")
        raise DatasetLayoutError(
            f"{path}: label values {vals} are neither classes 0..{num_classes - 1} nor void "
            f"{list(void_values)}.{hint}")
    arr[void] = IGNORE_INDEX
    return arr


def decode_depth(arr: np.ndarray, path: Path) -> np.ndarray:
    """Depth in metres as float32: float ``.npy`` maps are metres already; integer maps (16-bit PNGs,
    integer ``.npy``) are millimetres and are divided by 1000.

    0 stays 0 (no measurement); metrics should mask it out.
    """
    arr = _to_2d(np.asarray(arr), path, "depth map")
    if path.suffix.lower() != ".npy" or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / 1000.0
    return arr.astype(np.float32)
