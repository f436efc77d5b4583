"""Frozen-teacher outputs (logits and pooled features) computed once when the data carries no random augmentation."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ...features import OUTPUT, extract
from .heads import feature_layer


class TeacherOutputs(torch.utils.data.Dataset):
    """``dataset`` with the frozen teacher's pooled feature and logits added to every target dict
    (``"teacher_feature"``, ``"teacher_logits"``), computed once (SPEC/DESIGN §6: reuse frozen
    outputs across epochs and methods). Valid only without random augmentation: the cached outputs
    are those of the images as the dataset returns them now. ``keys`` keeps only these entries of
    dict targets (the scenes' masks and depth maps are not needed here); a plain target (class ids)
    is kept under ``"target"``."""

    def __init__(self, dataset, teacher: nn.Module, *, layer: str | None = None,
                 keys: Sequence[str] | None = ("labels", "difficult"), batch_size: int = 256, device=None):
        self.dataset = dataset
        self.layer = layer or feature_layer(teacher)
        store = extract(teacher, dataset, [self.layer, OUTPUT], pool="none", batch_size=batch_size,
                        device=device, progress=False)
        self.features = store.tensor(self.layer)
        self.logits = store.tensor(OUTPUT)
        self.keys = None if keys is None else tuple(keys)
        from ...models import weights_hash

        self._teacher_hash = weights_hash(teacher)

    def __len__(self):
        return len(self.dataset)

    def _target(self, y, i):
        if isinstance(y, Mapping):
            out = {k: v for k, v in y.items() if self.keys is None or k in self.keys}
        else:
            out = {"target": y}  # class ids or multi-hot rows: kept under "target"
        out["teacher_feature"] = self.features[i]
        out["teacher_logits"] = self.logits[i]
        return out

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, self._target(y, i)

    def get_image(self, i):
        return self.dataset.get_image(i) if hasattr(self.dataset, "get_image") else self.dataset[i][0]

    def image_array(self, i):
        return self.dataset.image_array(i)

    @property
    def fingerprint(self) -> str:
        from ...data import digest, fingerprint

        return digest(("teacher-outputs", fingerprint(self.dataset), self._teacher_hash, self.layer, self.keys))

    @property
    def num_classes(self):
        return getattr(self.dataset, "num_classes", None)

    @property
    def classes(self):
        return getattr(self.dataset, "classes", None)

    def __repr__(self):
        return f"TeacherOutputs({self.dataset!r}, layer={self.layer!r})"


def teacher_outputs(data, teacher: nn.Module, **kwargs):
    """``TeacherOutputs(data, teacher)`` when ``data`` returns the same images every time
    (:func:`kaviz.data.has_random_transform` is False: no transform, or a deterministic one), else
    ``data`` unchanged (the teacher then runs on every augmented batch)."""
    from ...data import has_random_transform

    if data is None or isinstance(data, TeacherOutputs) or has_random_transform(data):
        return data
    return TeacherOutputs(data, teacher, **kwargs)


def forced_cache(data, teacher):
    """``cache_teacher=True``: the caller overrides the check (e.g. a custom transform kaviz cannot
    see into); warn when kaviz thinks the data is augmented."""
    import warnings

    from ...data import has_random_transform

    if data is None or isinstance(data, TeacherOutputs):
        return data
    if has_random_transform(data):
        warnings.warn(f"cache_teacher=True on data with a random transform ({getattr(data, 'transform', None)!r}): "
                      "the teacher's outputs of one augmented view are reused every epoch. Pass "
                      "cache_teacher='auto' to cache only deterministic data.", stacklevel=3)
    return TeacherOutputs(data, teacher)


def teacher_pooled_features(teacher, data, layer, batch_size=256):
    if isinstance(data, TeacherOutputs) and data.layer == layer:
        return data.features
    return extract(teacher, data, layer, pool="none", batch_size=batch_size, progress=False).tensor(layer)
