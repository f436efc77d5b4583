"""Frozen-teacher outputs (logits and pooled features) computed once when the data carries no random augmentation."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...cache import TeacherOutputs as SharedTeacherOutputs
from ...cache import teacher_outputs as shared_teacher_outputs
from ...features import OUTPUT
from .heads import feature_layer

#: The teacher's name in LSHFM's cached teacher outputs.
TEACHER = "teacher"


class TeacherOutputs(SharedTeacherOutputs):
    """``dataset`` with the frozen teacher's feature (``layer``, default :func:`feature_layer`) and logits
    attached: the shared :class:`kaviz.cache.TeacherOutputs` (item ``(x, {..., "teacher_outputs":
    {"teacher": {layer: f_t, OUTPUT: z_t}}})``), computed once through :func:`kaviz.cache.teacher_outputs`
    (SPEC/DESIGN §6: reuse frozen outputs across epochs and methods). Valid only without random augmentation.
    ``keys`` keeps only these entries of dict targets (the scenes' masks and depth maps are not needed
    here); a plain target (class ids) is kept under ``"target"``."""

    def __init__(self, dataset, teacher: nn.Module, *, layer: str | None = None,
                 keys: Sequence[str] | None = ("labels", "difficult"), batch_size: int = 256, device=None):
        from ...models import weights_hash
        from ...train import unfrozen

        self.layer = layer or feature_layer(teacher)
        outputs = shared_teacher_outputs(teacher, dataset, [self.layer, OUTPUT], batch_size=batch_size, device=device)
        keep = None if keys is None else (*keys, "target")
        super().__init__(dataset, {TEACHER: outputs}, keep=keep,
                         keys={TEACHER: [weights_hash(unfrozen(teacher)), self.layer, batch_size]})

    @property
    def features(self) -> torch.Tensor:
        return self.outputs[TEACHER][self.layer]

    @property
    def logits(self) -> torch.Tensor:
        return self.outputs[TEACHER][OUTPUT]

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
    """The teacher's (pooled) features at ``layer`` for every item of ``data``: those a
    :class:`TeacherOutputs` carries, else from the shared cache (:func:`kaviz.cache.teacher_outputs`)."""
    if isinstance(data, TeacherOutputs) and data.layer == layer:
        return data.features
    return shared_teacher_outputs(teacher, data, [layer], batch_size=batch_size)[layer]
