"""Embedded datasets (synthetic shapes/scenes, scikit-learn digits), the comprehensive label space
(union), splits, fingerprints, seeded loaders and :func:`is_random` (does a transform augment?).
Importing this package imports torch and NumPy only; scikit-learn and pandas are imported when a dataset is built."""
from .core import (
    ImageDataset,
    Splits,
    UnionDataset,
    Unlabeled,
    digest,
    fingerprint,
    images_of,
    limit,
    loader,
    split,
    union,
)
from .digits import digits
from .synthetic import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    PRETRAIN_SHAPES,
    SHAPES,
    TEXTURES,
    VOCABULARIES,
    pretraining,
    pretraining_scenes,
    render_scenes,
    scenes,
    shape_attributes,
    shapes,
)
from .transforms import has_random_transform, is_random

__all__ = [
    "ImageDataset",
    "Unlabeled",
    "UnionDataset",
    "union",
    "Splits",
    "split",
    "fingerprint",
    "digest",
    "loader",
    "images_of",
    "limit",
    "is_random",
    "has_random_transform",
    "SHAPES",
    "TEXTURES",
    "BACKGROUNDS",
    "COLOURS",
    "ATTRIBUTES",
    "render_scenes",
    "shapes",
    "shape_attributes",
    "scenes",
    "PRETRAIN_SHAPES",
    "VOCABULARIES",
    "pretraining",
    "pretraining_scenes",
    "digits",
]
