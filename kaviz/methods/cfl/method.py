"""The CFL method: CommonFeatureLearning, ``forward(batch) -> {kd, mmd, recon}`` (SPEC §1)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data import images_of
from ...features import FeatureTap, eval_mode
from ...losses import mmd, soft_cross_entropy
from ...train import freeze, unfrozen
from ..kd import check_teachers, union_accuracy
from .block import CFLBlock, CFLBlockFC, match_spatial

#: Weights of the named loss terms (SPEC §1: KD : MMD : reconstruction = 1 : 10 : 10).
LOSS_WEIGHTS = {"kd": 1.0, "mmd": 10.0, "recon": 10.0}


def student_head_params(student: nn.Module, head: str | None):
    from ...models import classifier_name

    if head is None:
        return []
    name = classifier_name(student) if head == "auto" else head
    modules = dict(student.named_modules())
    if name not in modules:
        raise ValueError(f"head {name!r} is not a module of the student; pass head='<dotted name of the "
                         f"classifier>' (e.g. 'fc', 'classifier') or head=None")
    return list(modules[name].parameters())


def split_student_params(student, head, lr, head_lr_mult):
    head_params = student_head_params(student, head)
    ids = {id(p) for p in head_params}
    groups = [{"params": [p for p in student.parameters() if id(p) not in ids], "lr": lr, "name": "backbone"}]
    if head_params:
        groups.append({"params": head_params, "lr": lr * head_lr_mult, "name": "head"})
    return groups



#: Suffix of a layer name read after the ReLU that follows it: ``"features:relu"`` taps ``features`` and
#: applies the ReLU the network applies next. For torchvision's DenseNet the last map ``features`` (after
#: ``norm5``) goes through a functional in-place ReLU before pooling; tapping ``features`` reads it
#: before that ReLU (about half the values negative), the reference code reads it after.
POST_RELU = ":relu"


def tap_name(layer: str) -> str:
    """The module name to hook for ``layer`` (without a :data:`POST_RELU` suffix)."""
    return layer[: -len(POST_RELU)] if layer.endswith(POST_RELU) else layer


def read_layer(layer: str, f: torch.Tensor) -> torch.Tensor:
    """The feature of ``layer`` from the tapped tensor ``f``: ``relu(f)`` for a :data:`POST_RELU` name,
    exactly the value the network's own (in-place) ReLU computes."""
    return F.relu(f) if layer.endswith(POST_RELU) else f


def teacher_name(k: int) -> str:
    """The name of teacher ``k`` (0-based) in CFL's cached teacher outputs."""
    return f"t{k}"


def cached_logits_and_features(batch, teacher_layers):
    """``([z_1 ‖ z_2 ‖ …], [f_t1, f_t2, …])`` from a batch of cached teacher outputs, or None."""
    from ...cache import cached_teacher_outputs
    from ...features import OUTPUT

    cached = cached_teacher_outputs(batch)
    if cached is None:
        return None
    per = [cached[teacher_name(k)] for k in range(len(teacher_layers))]
    return torch.cat([o[OUTPUT] for o in per], 1), [read_layer(layer, o[tap_name(layer)])
                                                    for o, layer in zip(per, teacher_layers)]

class CommonFeatureLearning(nn.Module):
    """CFL as a kaviz method: ``forward(batch) -> {"kd", "mmd", "recon"}`` (SPEC §1).

    Parameters
    ----------
    student : the network to train, with ΣK_t outputs (the comprehensive label space).
    teachers : frozen on entry (:func:`kaviz.train.freeze`: eval mode, no gradients, ``no_grad``).
    student_layer, teacher_layers : dotted names from ``named_modules()`` (one per teacher); conv
        maps select :class:`CFLBlock`, vectors (e.g. ``"fc:in"``) :class:`CFLBlockFC`. A name ending
        in :data:`POST_RELU` (``"features:relu"``) reads the map after the ReLU that follows it (the
        reference code's DenseNet-121 feature).
    example : one batch of images, used once to read the layers' channel counts (not needed when
        ``block`` is given).
    hidden : width h of the common space (128 in the paper for 512-channel features).
    T : temperature of the KD term (1 in the paper).
    head : the student's classifier (``"auto"``: its last ``nn.Linear``), trained at
        ``lr * head_lr_mult``; the block at ``lr * block_lr_mult``; the rest of the student at ``lr``
        (:meth:`param_groups`, used by :func:`kaviz.train.fit`). The paper: lr 1e-4, head 10×,
        block 5e-4 (5×).
    weights : loss weights (default :data:`LOSS_WEIGHTS`, 1 : 10 : 10).
    union : the training data (a :class:`kaviz.data.UnionDataset` or a wrapper of one); when given,
        each teacher's class count is checked against its source's here (:func:`kaviz.methods.kd.check_teachers`).

    A batch is images, ``(images, anything)`` (the second element is never read), or the
    ``(images, {"teacher_outputs": ...})`` pairs of :class:`kaviz.cache.TeacherOutputs`, in which
    case the teachers are not run again.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], student_layer: str,
                 teacher_layers: Sequence[str], *, example: torch.Tensor | None = None,
                 block: nn.Module | None = None, hidden: int = 128, T: float = 1.0, head: str | None = "auto",
                 head_lr_mult: float = 10.0, block_lr_mult: float = 5.0,
                 weights: Mapping[str, float] | None = None, union=None):
        super().__init__()
        if len(teachers) == 0:
            raise ValueError("CommonFeatureLearning needs at least one teacher")
        if isinstance(teacher_layers, str) or len(teacher_layers) != len(teachers):
            raise ValueError(f"teacher_layers must list one layer name per teacher ({len(teachers)} teachers), "
                             f"got {teacher_layers!r}")
        if T <= 0:
            raise ValueError(f"temperature T must be positive, got {T}")
        for name, v in (("head_lr_mult", head_lr_mult), ("block_lr_mult", block_lr_mult)):
            if not v > 0:
                raise ValueError(f"{name} must be positive, got {v!r}")
        self.student = student
        self.teachers = nn.ModuleList([freeze(t) for t in teachers])
        self.student_layer = str(student_layer)
        self.teacher_layers = [str(l) for l in teacher_layers]
        self.T = float(T)
        self.head = head
        self.head_lr_mult = float(head_lr_mult)
        self.block_lr_mult = float(block_lr_mult)
        self.loss_weights = dict(LOSS_WEIGHTS if weights is None else weights)
        unknown = set(self.loss_weights) - set(LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)} in weights; the terms are {list(LOSS_WEIGHTS)}")
        student_head_params(student, head)  # a wrong head name fails here, not at the first epoch
        if union is not None:
            check_teachers(self.teachers, union, student, method="CommonFeatureLearning")
        if block is None:
            if example is None:
                raise ValueError("pass example=<one batch of images> (to read the layers' channel counts) "
                                 "or a ready block=CFLBlock(...)")
            block = self._build_block(example, hidden)
        self.block = block

    # -- construction ----------------------------------------------------------------------------
    def _build_block(self, example, hidden):
        x = images_of(example)
        if x.dim() == 3:
            x = x[None]
        x = x[:2].to(next((p.device for p in self.student.parameters()), torch.device("cpu")))
        with torch.no_grad(), eval_mode(self.student):
            logits_t, f_ts = self._teacher_outputs(x)
            name = tap_name(self.student_layer)
            with FeatureTap(self.student, name, clone=True) as tap:
                logits_s = self.student(x)
            f_s = read_layer(self.student_layer, tap[name])
        if logits_s.shape[1] != logits_t.shape[1]:
            raise ValueError(f"the student has {logits_s.shape[1]} outputs but the teachers have "
                             f"{logits_t.shape[1]} classes together; build the student with "
                             f"num_classes={logits_t.shape[1]} (the comprehensive label space)")
        dims = {f_s.dim(), *(f.dim() for f in f_ts)}
        if dims == {4}:
            return CFLBlock(f_s.shape[1], [f.shape[1] for f in f_ts], hidden)
        if dims == {2}:
            return CFLBlockFC(f_s.shape[1], [f.shape[1] for f in f_ts], hidden)
        shapes = [("student", self.student_layer, tuple(f_s.shape[1:]))] + [
            (f"teacher {k + 1}", l, tuple(f.shape[1:])) for k, (l, f) in enumerate(zip(self.teacher_layers, f_ts))]
        raise ValueError(f"CFL needs conv maps (C, H, W) from every network, or vectors (C,) from every "
                         f"network; got {shapes}. Tap the last conv stage of each (e.g. 'layer4'), or "
                         "'fc:in' of each for the fully-connected variant.")

    # -- pieces ----------------------------------------------------------------------------------
    def _teacher_outputs(self, x):
        logits, feats = [], []
        for t, layer in zip(self.teachers, self.teacher_layers):
            with FeatureTap(unfrozen(t), tap_name(layer), clone=True) as tap:
                logits.append(t(x))  # Frozen: eval mode and no_grad
            feats.append(read_layer(layer, tap[tap_name(layer)]))
        return torch.cat(logits, 1), feats

    def cached_outputs(self, batch):
        """``(logits_t, [f_t...])`` from a batch of :class:`kaviz.cache.TeacherOutputs` (teachers ``t0``,
        ``t1``, ...: :func:`teacher_name`), or None for a batch of images."""
        return cached_logits_and_features(batch, self.teacher_layers)

    def encode(self, x: torch.Tensor):
        """Student logits, features and codes for images ``x``, with the teachers' features, codes
        and reconstructions: a dict with ``logits_s, logits_t, f_s, f_t, h_s, h_t, rec_t`` (feature
        maps after :func:`match_spatial`; ``f_s``/``h_s`` keep the student's graph)."""
        return self._encode(x, None)

    def _encode(self, x, cached):
        logits_t, f_ts = cached if cached is not None else self._teacher_outputs(x)
        name = tap_name(self.student_layer)
        with FeatureTap(self.student, name, detach=False, clone=True) as tap:
            logits_s = self.student(x)
        f_s = read_layer(self.student_layer, tap[name])
        f_s, *f_ts = match_spatial([f_s, *f_ts])
        h_s, h_ts, rec = self.block(f_s, f_ts)
        return {"logits_s": logits_s, "logits_t": logits_t, "f_s": f_s, "f_t": f_ts, "h_s": h_s,
                "h_t": h_ts, "rec_t": rec}

    def forward(self, batch):
        x = images_of(batch)
        cached = self.cached_outputs(batch)
        if cached is not None:
            cached = (cached[0].to(x.device), [f.to(x.device) for f in cached[1]])
        e = self._encode(x, cached)
        return {
            "kd": soft_cross_entropy(e["logits_s"], e["logits_t"], self.T),
            "mmd": sum(mmd(e["h_s"], h) for h in e["h_t"]),
            "recon": sum(F.mse_loss(r, f) for r, f in zip(e["rec_t"], e["f_t"])),
        }

    def param_groups(self, lr: float):
        """Backbone at ``lr``, the new head at ``lr * head_lr_mult``, the block at ``lr * block_lr_mult``."""
        groups = split_student_params(self.student, self.head, lr, self.head_lr_mult)
        groups.append({"params": list(self.block.parameters()), "lr": lr * self.block_lr_mult, "name": "block"})
        return groups

    def evaluate(self, data) -> dict:
        """Task-agnostic and task-aware accuracy of the student (``union_accuracy``)."""
        return union_accuracy(self.student, data)
