"""Loaders for the papers' real datasets, read from folders the user supplies (nothing is downloaded).

>>> from kaviz.data import real
>>> real.available()
['camvid', 'celeba', 'coco2014_multilabel', 'cub200', 'nyuv2', 'stanford_dogs', 'voc2007']
>>> train = real.load("cub200", root="/data/CUB_200_2011", split="train", image_size=224)  # doctest: +SKIP

Every loader takes ``root``, ``split``, ``image_size``, ``transform=None`` (the default augments on
training splits: RandomResizedCrop(scale=(0.5, 1)) + flip; evaluation splits resize + centre-crop;
``augment=False`` gives the evaluation transform on any split) and returns a dataset with ``name``,
``classes``, ``num_classes``, ``targets``, ``fingerprint``, ``image_array(i)``, ``subset(indices)``.
A missing or incomplete folder raises :class:`DatasetLayoutError` (a ``FileNotFoundError``) showing
the expected layout; a present but malformed file (a bad line, named by its number; a file name
that leaves the folder; a truncated image) raises its subclass :class:`DatasetFormatError`. ``data/README.md`` ("Real datasets") lists where each dataset comes from.
"""
from __future__ import annotations

import difflib
from typing import Callable

from .base import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetFormatError,
    DatasetLayoutError,
    DenseDataset,
    JointTransform,
    RealImageDataset,
    ResizeCover,
    default_transform,
)
from .camvid import CAMVID_CLASSES, camvid
from .celeba import celeba
from .coco import coco2014_multilabel
from .cub import cub200
from .dogs import stanford_dogs
from .nyu import NYU13_CLASSES, NYU40_CLASSES, nyuv2
from .voc import VOC_CLASSES, voc2007

__all__ = [
    "load", "available", "cub200", "stanford_dogs", "voc2007", "coco2014_multilabel", "celeba", "nyuv2",
    "camvid", "DatasetLayoutError", "DatasetFormatError", "RealImageDataset", "DenseDataset", "JointTransform", "ResizeCover",
    "default_transform", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "VOC_CLASSES", "NYU13_CLASSES", "NYU40_CLASSES",
    "CAMVID_CLASSES",
]

_REGISTRY: dict[str, Callable[..., RealImageDataset]] = {
    "cub200": cub200,
    "stanford_dogs": stanford_dogs,
    "voc2007": voc2007,
    "coco2014_multilabel": coco2014_multilabel,
    "celeba": celeba,
    "nyuv2": nyuv2,
    "camvid": camvid,
}


def available() -> list[str]:
    """Names accepted by :func:`load`, sorted."""
    return sorted(_REGISTRY)


def load(name: str, root, **kwargs) -> RealImageDataset:
    """``load("cub200", root, split="test", ...)`` calls the loader registered under ``name``."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.4)
        hint = f"closest: {close}; " if close else ""
        raise KeyError(f"no real dataset named {name!r}; {hint}available: {available()}")
    return _REGISTRY[name](root, **kwargs)
