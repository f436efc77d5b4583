"""CFL teachers: frozen-teacher outputs computed once, teacher training, the one-call amalgamate and the KD baseline."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ...cache import TeacherOutputs, cached_teacher_outputs
from ...data import images_of
from ...features import OUTPUT
from ...losses import soft_cross_entropy
from ..kd import MultiTeacherKD, check_teachers
from .data import PairData
from .method import (
    CommonFeatureLearning,
    split_student_params,
    student_head_params,
    tap_name,
    teacher_name,
)


def precompute_teachers(teachers: Sequence[nn.Module], teacher_layers: Sequence[str], data, *,
                        batch_size: int = 256, device=None) -> TeacherOutputs:
    """Run the frozen teachers once over ``data`` (images only) and keep their logits and the features of
    ``teacher_layers`` (unpooled) in the shared teacher-output cache (:func:`kaviz.cache.teacher_outputs`),
    so that training epochs, seeds and methods reuse them. Use only without random augmentation: on data
    with a random transform (:func:`kaviz.data.has_random_transform`) it warns, since the outputs of one
    augmented view would be reused every epoch."""
    import warnings

    from ...data import Unlabeled, has_random_transform

    if isinstance(teacher_layers, str) or len(teacher_layers) != len(teachers):
        raise ValueError(f"teacher_layers must list one layer per teacher ({len(teachers)}), got {teacher_layers!r}")
    if has_random_transform(data):
        warnings.warn(f"precompute_teachers on data with a random transform ({getattr(data, 'transform', None)!r}): "
                      "the teachers' outputs of one augmented view are reused every epoch. Use "
                      "cache_teachers='auto' (or False) for augmented data.", stacklevel=2)
    teachers = {teacher_name(k): t for k, t in enumerate(teachers)}
    layers = {teacher_name(k): [OUTPUT, tap_name(layer)] for k, layer in enumerate(teacher_layers)}
    return TeacherOutputs.compute(Unlabeled(data), teachers, layers, keep=(), batch_size=batch_size, device=device)


def train_teachers(specs: Mapping[str, Mapping], data: "PairData", *, device=None, progress=None):
    """Train (or load from the cache) one teacher per source of ``data`` with
    :func:`kaviz.train.train_teacher`. ``specs``: ``{source: {"arch": ..., "layer": ..., and any
    train_teacher keyword (arch_kwargs, epochs, lr, batch_size, ...)}}`` in teacher order (the
    order of the union's sources). Returns ``(teachers, layers, histories)``; each teacher is
    selected on its source's validation split."""
    from ...train import train_teacher

    if list(specs) != list(data.sources):
        raise ValueError(f"specs must name one teacher per source, in the union's order {list(data.sources)}; "
                         f"got {list(specs)}")
    teachers, layers, histories = [], [], {}
    for name, spec in specs.items():
        spec = dict(spec)
        missing = [k for k in ("arch", "layer") if k not in spec]
        if missing:
            raise ValueError(f"teacher spec for {name!r} lacks {missing}; e.g. "
                             "{'arch': 'cifar_resnet8', 'layer': 'layer3', 'epochs': 8}")
        arch, layer = spec.pop("arch"), spec.pop("layer")
        model, hist = train_teacher(arch, data.sources[name].train, data.sources[name].val, device=device,
                                    progress=progress, **spec)
        teachers.append(model)
        layers.append(layer)
        histories[name] = hist
    return teachers, layers, histories


def first_images(data) -> torch.Tensor:
    from ...data import Unlabeled

    item = Unlabeled(data)[0] if not isinstance(data, TeacherOutputs) else data[0][0]
    return images_of(item)[None]


def amalgamate(student: nn.Module, teachers: Sequence[nn.Module], student_layer: str,
               teacher_layers: Sequence[str], train_data, val_data=None, *, hidden: int = 128, T: float = 1.0,
               weights: Mapping[str, float] | None = None, head: str | None = "auto",
               head_lr_mult: float = 10.0, block_lr_mult: float = 5.0, epochs: int = 30, lr: float = 1e-4,
               optimizer: str = "adam", weight_decay: float = 1e-4, schedule="step", **fit_kwargs):
    """Amalgamate ``teachers`` into ``student`` by CFL on the unlabeled images of ``train_data``.

    ``train_data`` (the union's training split, a :class:`TeacherOutputs`, or any dataset of
    images) is wrapped in :class:`kaviz.data.Unlabeled`: its labels are never read. Model selection
    on ``val_data`` by task-agnostic accuracy (``monitor="val/task_agnostic"``) when it is given.
    Defaults are the paper's optimisation (Adam, wd 1e-4, lr 1e-4, head 10×, block 5×, step decay
    ×0.1 at mid-training, 30 epochs). Returns ``(method, history)``: ``method.student`` is the
    trained student (best epoch restored), ``method.block`` the CFL block.
    """
    from ...data import Unlabeled
    from ...train import fit

    method = CommonFeatureLearning(student, teachers, student_layer, teacher_layers,
                                   example=first_images(train_data), hidden=hidden, T=T, head=head,
                                   head_lr_mult=head_lr_mult, block_lr_mult=block_lr_mult, weights=weights,
                                   union=train_data)
    if val_data is not None:
        check_teachers(method.teachers, val_data, student, method="CommonFeatureLearning (val_data)")
    train = train_data if isinstance(train_data, TeacherOutputs) else Unlabeled(train_data)
    if val_data is not None:
        fit_kwargs.setdefault("monitor", "val/task_agnostic")
    history = fit(method, train, val_data, epochs=epochs, lr=lr, optimizer=optimizer,
                  weight_decay=weight_decay, schedule=schedule, **fit_kwargs)
    return method, history


class KDBaseline(MultiTeacherKD):
    """Multi-teacher KD (``{"kd": soft_ce}``, :class:`kaviz.methods.kd.MultiTeacherKD`) with the same
    learning rates as CFL's student (head at ``lr * head_lr_mult``) and the same cached teacher
    outputs, so that KD and CFL differ only by the CFL terms."""

    def __init__(self, student, teachers, T: float = 1.0, head: str | None = "auto", head_lr_mult: float = 10.0,
                 *, union=None):
        super().__init__(student, teachers, T=T, union=union)
        student_head_params(student, head)
        self.head = head
        self.head_lr_mult = float(head_lr_mult)

    def forward(self, batch):
        cached = cached_teacher_outputs(batch)
        if cached is None:
            return super().forward(batch)
        x = images_of(batch)
        logits_t = torch.cat([cached[teacher_name(k)][OUTPUT] for k in range(len(self.teachers))], 1)
        return {"kd": soft_cross_entropy(self.student(x), logits_t.to(x.device), self.T)}

    def param_groups(self, lr: float):
        return split_student_params(self.student, self.head, lr, self.head_lr_mult)
