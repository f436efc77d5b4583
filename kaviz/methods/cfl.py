"""Common Feature Learning (CFL): amalgamating heterogeneous teachers into one student.

Luo, Wang, Feng, Song, Tao, Song, "Knowledge Amalgamation from Heterogeneous Networks by Common
Feature Learning", IJCAI 2019 (SPEC.md §1).

Teachers t = 1..M (different architectures, different datasets, disjoint label sets) are frozen. A
student with one head over the comprehensive label space (ΣK_t classes) learns from unlabeled images
of the union by

    L = soft_ce(s, [z_1 ‖ … ‖ z_M]; T=1) + λ·( Σ_t MMD²(h_s, h_t) + Σ_t MSE(f̂_t, f_t) ),  λ = 10,

where ``f_s``/``f_t`` are the features of the student's and each teacher's chosen layer (the last
conv stage), ``h = E(align(f))`` their codes in a *common space* (one alignment per network, a
shared extractor E), and ``f̂_t = dec_t(h_t)`` a reconstruction of teacher t's features from its
code, which keeps the teachers' information in the common space. The weights of the terms
``kd : mmd : recon`` are 1 : 10 : 10 (:data:`LOSS_WEIGHTS`); MMD is the multi-kernel variant of
SPEC §0.3 (:func:`kaviz.losses.mmd`).

**Spatial sizes.** Student and teacher features may have different spatial sizes (different
strides, e.g. an 8×8 ResNet stage and a 4×4 VGG stage). :func:`match_spatial` average-pools every
map to the smallest height and width among them (``adaptive_avg_pool2d``) before the block, so all
codes live on one grid and the reconstruction target is the pooled teacher map. Equal sizes are
left untouched (the paper's ResNets and DenseNet all give 7×7 at 224 px).

Public pieces: :class:`CFLBlock` (conv, SPEC §1) and :class:`CFLBlockFC` (the later fully-connected
variant), :class:`CommonFeatureLearning` (the method for :func:`kaviz.train.fit`),
:func:`amalgamate` (one call), :class:`KDBaseline` and :func:`run_students` (KD vs CFL over seeds
with the same budget), :func:`precompute_teachers` (frozen-teacher outputs computed once),
:class:`Spaces` (feature space vs common space for :class:`kaviz.widgets.EmbeddingExplorer`),
:func:`paired_distance_ratio`, :func:`load_data` (embedded shapes+digits or CUB-200+Stanford Dogs).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..features import FeatureTap, eval_mode, pool_features
from ..losses import mmd, soft_cross_entropy
from ..train import Frozen, freeze
from .kd import MultiTeacherKD, check_teachers, images_of, union_accuracy

__all__ = [
    "LOSS_WEIGHTS",
    "CFLBlock",
    "CFLBlockFC",
    "match_spatial",
    "CommonFeatureLearning",
    "TeacherOutputs",
    "precompute_teachers",
    "amalgamate",
    "train_teachers",
    "KDBaseline",
    "Run",
    "run_students",
    "results_table",
    "per_seed_table",
    "term_gradients",
    "Spaces",
    "paired_distance_ratio",
    "pick_per_class",
    "PairData",
    "load_data",
]

#: Weights of the named loss terms (SPEC §1: KD : MMD : reconstruction = 1 : 10 : 10).
LOSS_WEIGHTS = {"kd": 1.0, "mmd": 10.0, "recon": 10.0}


# ------------------------------------------------------------------------------------------ blocks
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


# ------------------------------------------------------------------------------------------ method
def _unwrap(teacher: nn.Module) -> nn.Module:
    return teacher.module if isinstance(teacher, Frozen) else teacher


def _head_params(student: nn.Module, head: str | None):
    from ..models import classifier_name

    if head is None:
        return []
    name = classifier_name(student) if head == "auto" else head
    modules = dict(student.named_modules())
    if name not in modules:
        raise ValueError(f"head {name!r} is not a module of the student; pass head='<dotted name of the "
                         f"classifier>' (e.g. 'fc', 'classifier') or head=None")
    return list(modules[name].parameters())


def _split_student_params(student, head, lr, head_lr_mult):
    head_params = _head_params(student, head)
    ids = {id(p) for p in head_params}
    groups = [{"params": [p for p in student.parameters() if id(p) not in ids], "lr": lr, "name": "backbone"}]
    if head_params:
        groups.append({"params": head_params, "lr": lr * head_lr_mult, "name": "head"})
    return groups


class CommonFeatureLearning(nn.Module):
    """CFL as a kaviz method: ``forward(batch) -> {"kd", "mmd", "recon"}`` (SPEC §1).

    Parameters
    ----------
    student : the network to train, with ΣK_t outputs (the comprehensive label space).
    teachers : frozen on entry (:func:`kaviz.train.freeze`: eval mode, no gradients, ``no_grad``).
    student_layer, teacher_layers : dotted names from ``named_modules()`` (one per teacher); conv
        maps select :class:`CFLBlock`, vectors (e.g. ``"fc:in"``) :class:`CFLBlockFC`.
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
    ``(images, {"teacher_logits", "teacher_features"})`` pairs of :class:`TeacherOutputs`, in which
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
        _head_params(student, head)  # a wrong head name fails here, not at the first epoch
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
            with FeatureTap(self.student, self.student_layer, clone=True) as tap:
                logits_s = self.student(x)
            f_s = tap[self.student_layer]
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
            with FeatureTap(_unwrap(t), layer, clone=True) as tap:
                logits.append(t(x))  # Frozen: eval mode and no_grad
            feats.append(tap[layer])
        return torch.cat(logits, 1), feats

    @staticmethod
    def _cached(batch):
        if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[1], Mapping) \
                and "teacher_logits" in batch[1]:
            return batch[1]["teacher_logits"], list(batch[1]["teacher_features"])
        return None

    def encode(self, x: torch.Tensor):
        """Student logits, features and codes for images ``x``, with the teachers' features, codes
        and reconstructions: a dict with ``logits_s, logits_t, f_s, f_t, h_s, h_t, rec_t`` (feature
        maps after :func:`match_spatial`; ``f_s``/``h_s`` keep the student's graph)."""
        return self._encode(x, None)

    def _encode(self, x, cached):
        logits_t, f_ts = cached if cached is not None else self._teacher_outputs(x)
        with FeatureTap(self.student, self.student_layer, detach=False, clone=True) as tap:
            logits_s = self.student(x)
        f_s = tap[self.student_layer]
        f_s, *f_ts = match_spatial([f_s, *f_ts])
        h_s, h_ts, rec = self.block(f_s, f_ts)
        return {"logits_s": logits_s, "logits_t": logits_t, "f_s": f_s, "f_t": f_ts, "h_s": h_s,
                "h_t": h_ts, "rec_t": rec}

    def forward(self, batch):
        x = images_of(batch)
        cached = self._cached(batch)
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
        groups = _split_student_params(self.student, self.head, lr, self.head_lr_mult)
        groups.append({"params": list(self.block.parameters()), "lr": lr * self.block_lr_mult, "name": "block"})
        return groups

    def evaluate(self, data) -> dict:
        """Task-agnostic and task-aware accuracy of the student (``union_accuracy``)."""
        return union_accuracy(self.student, data)


# ------------------------------------------------------------------------------- cached teachers
class TeacherOutputs(torch.utils.data.Dataset):
    """Unlabeled images with their frozen teachers' outputs, computed once (DESIGN §6).

    Item i is ``(image, {"teacher_logits": [z_1 ‖ …] (ΣK,), "teacher_features": (f_t1, f_t2, …)})``;
    labels are never read. Valid only when the images carry no random augmentation (every epoch
    sees the same pixels). Built by :func:`precompute_teachers`.
    """

    def __init__(self, images_data, logits: torch.Tensor, features: Sequence[torch.Tensor], layers: Sequence[str]):
        from ..data import Unlabeled

        self.data = Unlabeled(images_data)
        n = len(self.data)
        if logits.shape[0] != n or any(f.shape[0] != n for f in features):
            raise ValueError(f"teacher outputs have {logits.shape[0]} rows but the data has {n} images")
        self.logits = logits
        self.features = list(features)
        self.layers = list(layers)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i], {"teacher_logits": self.logits[i],
                              "teacher_features": tuple(f[i] for f in self.features)}

    @property
    def fingerprint(self) -> str:
        from ..data.core import _digest

        return _digest(("teacher-outputs", self.data.fingerprint, self.layers, self.logits))


def precompute_teachers(teachers: Sequence[nn.Module], teacher_layers: Sequence[str], data, *,
                        batch_size: int = 256, device=None) -> TeacherOutputs:
    """Run the frozen teachers once over ``data`` (images only) and keep their concatenated logits
    and the features of ``teacher_layers`` (unpooled), so that training epochs, seeds and methods
    reuse them. Use only without random augmentation: on data with a random transform
    (:func:`kaviz.data.has_random_transform`) it warns, since the outputs of one augmented view would
    be reused every epoch."""
    import warnings

    from ..data import Unlabeled, has_random_transform
    from ..features import OUTPUT, extract

    if isinstance(teacher_layers, str) or len(teacher_layers) != len(teachers):
        raise ValueError(f"teacher_layers must list one layer per teacher ({len(teachers)}), got {teacher_layers!r}")
    if has_random_transform(data):
        warnings.warn(f"precompute_teachers on data with a random transform ({getattr(data, 'transform', None)!r}): "
                      "the teachers' outputs of one augmented view are reused every epoch. Use "
                      "cache_teachers='auto' (or False) for augmented data.", stacklevel=2)
    images = Unlabeled(data)
    logits, feats = [], []
    for t, layer in zip(teachers, teacher_layers):
        store = extract(_unwrap(t), images, [OUTPUT, layer], pool="none", batch_size=batch_size,
                        device=device, progress=False, clone=True)
        logits.append(store.tensor(OUTPUT))
        feats.append(store.tensor(layer))
    return TeacherOutputs(data, torch.cat(logits, 1), feats, teacher_layers)


def train_teachers(specs: Mapping[str, Mapping], data: "PairData", *, device=None, progress=None):
    """Train (or load from the cache) one teacher per source of ``data`` with
    :func:`kaviz.train.train_teacher`. ``specs``: ``{source: {"arch": ..., "layer": ..., and any
    train_teacher keyword (arch_kwargs, epochs, lr, batch_size, ...)}}`` in teacher order (the
    order of the union's sources). Returns ``(teachers, layers, histories)``; each teacher is
    selected on its source's validation split."""
    from ..train import train_teacher

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


def _first_images(data) -> torch.Tensor:
    from ..data import Unlabeled

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
    from ..data import Unlabeled
    from ..train import fit

    method = CommonFeatureLearning(student, teachers, student_layer, teacher_layers,
                                   example=_first_images(train_data), hidden=hidden, T=T, head=head,
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
        _head_params(student, head)
        self.head = head
        self.head_lr_mult = float(head_lr_mult)

    def forward(self, batch):
        cached = CommonFeatureLearning._cached(batch)
        if cached is None:
            return super().forward(batch)
        x = images_of(batch)
        return {"kd": soft_cross_entropy(self.student(x), cached[0].to(x.device), self.T)}

    def param_groups(self, lr: float):
        return _split_student_params(self.student, self.head, lr, self.head_lr_mult)


# --------------------------------------------------------------------------- KD vs CFL over seeds
@dataclasses.dataclass
class Run:
    """One trained student: ``method`` ("KD" or "CFL", plus any ``tag``), architecture, seed, the
    trained ``student``, the CFL method (``cfl``, None for KD), the training history and its
    accuracies on the evaluation split at the best-on-validation epoch (``scores``).
    ``initial()`` rebuilds the method as it was before training (same seed, same weights)."""

    method: str
    arch: str
    seed: int
    student: nn.Module
    cfl: CommonFeatureLearning | None
    history: object
    scores: dict
    initial: Callable[[], nn.Module] | None = dataclasses.field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.method} · {self.arch} · seed {self.seed}"


def run_students(student: str | Callable[[], nn.Module], teachers: Sequence[nn.Module], student_layer: str,
                 teacher_layers: Sequence[str], train_data, val_data, test_data, *, seeds: Sequence[int] = (0, 1),
                 methods: Sequence[str] = ("KD", "CFL"), epochs: int = 30, lr: float = 1e-4, batch_size: int = 64,
                 hidden: int = 128, T: float = 1.0, weights: Mapping[str, float] | None = None,
                 head_lr_mult: float = 10.0, block_lr_mult: float = 5.0, optimizer: str = "adam",
                 weight_decay: float = 1e-4, schedule="step", arch_kwargs: Mapping | None = None,
                 cache_teachers: bool | str = "auto", tag: str = "", device=None, **fit_kwargs) -> list[Run]:
    """Train a KD student and a CFL student per seed with the same budget (epochs, batch, data,
    optimiser, learning rates of the backbone and the head), select each on the validation split by
    task-agnostic accuracy, and score it on ``test_data``. ``student`` is an architecture name for
    :func:`kaviz.models.build` (with ``arch_kwargs``, e.g. ``weights_path``) or a callable returning
    a fresh student. ``cache_teachers``: ``"auto"`` computes the teachers' outputs once
    (:func:`precompute_teachers`) when ``train_data`` has no random augmentation
    (:func:`kaviz.data.has_random_transform`); True forces it (warning on augmented data), False
    runs the teachers on every batch. ``tag`` is appended to the
    method's name in the runs (e.g. ``" (mmd weight 1)"`` for an ablation). KD and CFL students of
    one seed start from the same weights. Returns a list of :class:`Run`.
    """
    from .. import seed_everything
    from ..data import Unlabeled
    from ..models import build
    from ..train import fit

    unknown = [m for m in methods if m not in ("KD", "CFL")]
    if unknown:
        raise ValueError(f"methods must be 'KD' and/or 'CFL', got {unknown}")
    if not seeds:
        raise ValueError("seeds is empty; pass e.g. seeds=[0, 1]")
    num_classes = getattr(train_data, "num_classes", None)
    if isinstance(student, str):
        arch = student
        if num_classes is None:
            raise ValueError("train_data does not say its number of classes (a UnionDataset does); "
                             "pass a callable that builds the student instead of a name")
        make = lambda: build(arch, num_classes, **dict(arch_kwargs or {}))  # noqa: E731
    elif callable(student):
        make, arch = student, None
    else:
        raise TypeError(f"student must be an architecture name or a callable returning a model, got {student!r}")
    for what, d in (("val_data", val_data), ("test_data", test_data)):
        check_teachers(teachers, d, method=f"run_students ({what})")
    if cache_teachers not in (True, False, "auto"):
        raise ValueError(f"cache_teachers must be True, False or 'auto', got {cache_teachers!r}")
    if cache_teachers == "auto":
        from ..data import has_random_transform

        cache_teachers = not has_random_transform(train_data)
    train = precompute_teachers(teachers, teacher_layers, train_data, device=device) if cache_teachers \
        else Unlabeled(train_data)
    runs = []
    common = dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
                  schedule=schedule, device=device, **fit_kwargs)
    common.setdefault("monitor", "val/task_agnostic")
    example = _first_images(train)

    def initial(m, seed):
        seed_everything(int(seed))
        net = make()
        if m == "KD":
            return KDBaseline(net, teachers, T=T, head_lr_mult=head_lr_mult, union=train_data)
        return CommonFeatureLearning(net, teachers, student_layer, teacher_layers, example=example, hidden=hidden,
                                     T=T, head_lr_mult=head_lr_mult, block_lr_mult=block_lr_mult, weights=weights,
                                     union=train_data)

    for seed in seeds:
        for m in methods:
            method = initial(m, seed)
            net = method.student
            history = fit(method, train, val_data, seed=int(seed), **common)
            scores = union_accuracy(net, test_data) if test_data is not None else {}
            runs.append(Run(m + tag, arch or type(net).__name__, int(seed), net.eval(),
                            method if m == "CFL" else None, history, scores,
                            initial=(lambda m=m, seed=seed: initial(m, seed))))
    return runs


def per_seed_table(runs: Sequence[Run]):
    """One row per run: method, student, seed, best epoch (on validation), validation and test
    accuracies (task-agnostic and task-aware)."""
    import pandas as pd

    rows = []
    for r in runs:
        h = r.history
        best = h.attrs.get("best_epoch")
        row = h[h["epoch"] == best].iloc[0] if best is not None else h.iloc[-1]
        rows.append({"method": r.method, "student": r.arch, "seed": r.seed, "best epoch": best,
                     "val task-agnostic": row.get("val/task_agnostic", np.nan),
                     "test task-agnostic": r.scores.get("task_agnostic", np.nan),
                     "test task-aware": r.scores.get("task_aware", np.nan)})
    return pd.DataFrame(rows)


def results_table(runs: Sequence[Run], decimals: int = 3, as_text: bool = True):
    """Mean ± std over seeds of the test accuracies (task-agnostic and task-aware), each student
    taken at its best epoch on validation; one row per (student, method). ``as_text``: the cells
    read ``"0.812 ± 0.010"``; else numeric ``<accuracy> mean`` / ``<accuracy> std`` columns."""
    import pandas as pd

    df = per_seed_table(runs)
    rows = []
    for (arch, method), g in df.groupby(["student", "method"], sort=False):
        row = {"student": arch, "method": method, "seeds": len(g)}
        for col in ("test task-agnostic", "test task-aware"):
            v = g[col].to_numpy(dtype=float)
            sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            if as_text:
                row[col] = f"{v.mean():.{decimals}f} ± {sd:.{decimals}f}"
            else:
                row[f"{col} mean"], row[f"{col} std"] = float(v.mean()), sd
        rows.append(row)
    return pd.DataFrame(rows)


def term_gradients(method: nn.Module, batch, weights: Mapping[str, float] | None = None):
    """How hard each weighted loss term pulls on each parameter group: the L2 norm of
    ``∇ (w_k · term_k)`` over the parameters of every group of ``method.param_groups`` (backbone,
    head, block), one row per term, for one batch (in training mode; nothing is updated).

    Why: with Adam, each parameter's step follows the direction of its summed gradient whatever its
    size, so a term whose gradient on the student's backbone is orders of magnitude larger than the
    KD term's decides where the backbone goes.
    """
    import pandas as pd

    from ..train import to_device

    weights = dict(weights if weights is not None else getattr(method, "loss_weights", {}) or {})
    groups = [g for g in method.param_groups(1.0) if g["params"]]
    batch = to_device(batch, next(method.parameters()).device)
    rows = []
    flags = {m: m.training for m in method.modules()}
    buffers = {n: b.detach().clone() for n, b in method.named_buffers()}  # batch-norm statistics
    try:
        method.train()
        terms = method(batch)
        for k, v in terms.items():
            w = weights.get(k, 1.0)
            row = {"term": k, "weight": w, "value": float(v.detach())}
            for g in groups:
                params = [p for p in g["params"] if p.requires_grad]
                grads = torch.autograd.grad(v * w, params, retain_graph=True, allow_unused=True)
                sq = sum(((gr.double() ** 2).sum() for gr in grads if gr is not None), torch.zeros((), dtype=torch.float64))
                row[g.get("name", "group")] = float(sq.sqrt())
            rows.append(row)
    finally:
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for n, b in method.named_buffers():
                b.copy_(buffers[n])
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------- feature / common space
def pick_per_class(data, per_class: int, seed: int = 0, classes: Sequence[int] | None = None) -> np.ndarray:
    """Sorted indices of at most ``per_class`` samples of each class of ``data`` (its ``targets``),
    drawn with a seeded generator; ``classes`` restricts to some labels."""
    targets = np.asarray(getattr(data, "targets"))
    rng = np.random.default_rng(seed)
    wanted = np.unique(targets) if classes is None else np.asarray(classes)
    out = []
    for c in wanted:
        idx = np.flatnonzero(targets == c)
        if len(idx) == 0:
            raise ValueError(f"class {c} has no sample in the data")
        out.append(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
    return np.sort(np.concatenate(out)).astype(np.int64)


def paired_distance_ratio(codes: Mapping[str, np.ndarray], normalize: bool = True) -> float:
    """Are the codes of the same image closer across networks than codes of different images?

    For every pair of sources (a, b) with rows aligned (row i = image i):
    ``d_pair = mean_i ‖a_i − b_i‖`` and ``d_rand = mean_{i≠j} ‖a_i − b_j‖``; returns
    ``Σ d_pair / Σ d_rand`` over source pairs. Below 1: the networks agree image by image; about
    1: no pairing. Rows are L2-normalised first (``normalize``) so scale differences between
    networks do not count.
    """
    from scipy.spatial.distance import cdist

    names = list(codes)
    if len(names) < 2:
        raise ValueError(f"paired_distance_ratio needs at least two sources, got {names}")
    arrs = {k: np.asarray(v, dtype=np.float64).reshape(len(v), -1) for k, v in codes.items()}
    n = {len(a) for a in arrs.values()}
    dims = {a.shape[1] for a in arrs.values()}
    if len(n) != 1 or len(dims) != 1:
        raise ValueError(f"sources must have the same rows (images) and dimension, got "
                         f"{ {k: a.shape for k, a in arrs.items()} }")
    if n.pop() < 2:
        raise ValueError("paired_distance_ratio needs at least two images")
    if normalize:
        arrs = {k: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12) for k, a in arrs.items()}
    num = den = 0.0
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = cdist(arrs[a], arrs[b])
            m = len(d)
            num += np.trace(d) / m
            den += (d.sum() - np.trace(d)) / (m * m - m)
    return float(num / den)


class Spaces:
    """Features of the students and the teachers for the CFL figure and the explorer.

    For a CFL run: "feature space" = pooled ``(f_s, f_t1, f_t2, …)`` of the chosen layers (one
    map only when the channel counts agree), "common space" = pooled ``(h_s, h_t1, h_t2, …)`` of
    its block. A KD student has no common space: its second panel shows the space KD aligns, the
    comprehensive output space — the student's softmax next to the teachers' concatenated softmax.
    Pooling: ``normalize-avg`` (L2-normalise each flattened map, then average over positions).

    ``runs``: ``{display name: Run}``; ``data``: the images (a UnionDataset split) and ``indices``
    the samples to show; ``layers``: ``{student layer: [teacher layer, …]}`` — the first is the
    CFL layer, others (optional) are further stages to compare in feature space.
    :meth:`compute` has the signature :class:`kaviz.widgets.EmbeddingExplorer` expects.
    """

    def __init__(self, runs: Mapping[str, Run], teachers: Sequence[nn.Module], data, indices,
                 layers: Mapping[str, Sequence[str]], *, teacher_names: Sequence[str] | None = None,
                 pool: str = "normalize-avg", seed: int = 0, batch_size: int = 256):
        if not runs:
            raise ValueError("runs is empty; pass {name: Run} of the students to show")
        if not layers:
            raise ValueError("layers is empty; pass {student layer: [teacher layer per teacher]}")
        for s_layer, t_layers in layers.items():
            if len(t_layers) != len(teachers):
                raise ValueError(f"layers[{s_layer!r}] must name one layer per teacher ({len(teachers)}), "
                                 f"got {list(t_layers)}")
        self.runs = dict(runs)
        self.teachers = list(teachers)
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.layers = {k: list(v) for k, v in layers.items()}
        srcs = getattr(data, "sources", None)
        self.teacher_names = list(teacher_names) if teacher_names is not None else (
            [f"teacher: {s}" for s in srcs] if srcs and len(srcs) == len(teachers)
            else [f"teacher {k + 1}" for k in range(len(teachers))])
        self.pool = pool
        self.seed = seed
        self.batch_size = batch_size
        self.labels = np.asarray(data.targets)[self.indices]
        self._images = data.subset(self.indices) if hasattr(data, "subset") else \
            torch.utils.data.Subset(data, self.indices.tolist())
        self._feat: dict = {}
        self._common: dict = {}

    @property
    def models(self) -> list[str]:
        return list(self.runs)

    def _extract(self, model, layer):
        from ..features import extract

        store = extract(model, self._images, layer, pool=self.pool, batch_size=self.batch_size,
                        progress=False, clone=True)
        return store[layer]

    def feature_space(self, model: str, layer: str) -> dict[str, np.ndarray]:
        """``{source: (N, C)}`` pooled features of the student (at ``layer``) and of the teachers
        (at their layers paired with it); only the student's when the channel counts differ."""
        key = (model, layer)
        if key not in self._feat:
            if layer not in self.layers:
                raise ValueError(f"unknown layer {layer!r}; choose one of {list(self.layers)}")
            out = {"student": self._extract(self.runs[model].student, layer)}
            teach = [self._teacher_feat(t, l) for t, l in zip(self.teachers, self.layers[layer])]
            if all(f.shape[1] == out["student"].shape[1] for f in teach):
                out.update(dict(zip(self.teacher_names, teach)))
            self._feat[key] = out
        return self._feat[key]

    def _teacher_feat(self, k_teacher, layer):
        key = ("teacher", id(k_teacher), layer)
        if key not in self._feat:
            self._feat[key] = self._extract(_unwrap(k_teacher), layer)
        return self._feat[key]

    def common_space(self, model: str) -> dict[str, np.ndarray]:
        """CFL: ``{source: (N, h)}`` pooled codes; KD: ``{"student", "teachers (concatenated)"}``
        softmax outputs over the comprehensive label space."""
        if model in self._common:
            return self._common[model]
        run = self.runs[model]
        loader = torch.utils.data.DataLoader(self._images, batch_size=self.batch_size, shuffle=False)
        parts: dict[str, list] = {}
        if run.cfl is not None:
            method = run.cfl
            names = ["student", *self.teacher_names]
            with eval_mode(method), torch.no_grad():
                for batch in loader:
                    x = images_of(batch).to(next(method.student.parameters()).device)
                    e = method.encode(x)
                    for name, h in zip(names, [e["h_s"], *e["h_t"]]):
                        parts.setdefault(name, []).append(pool_features(h, self.pool).cpu().numpy())
        else:
            student = run.student
            with eval_mode(student), torch.no_grad():
                for batch in loader:
                    x = images_of(batch).to(next(student.parameters()).device)
                    z_t = torch.cat([t(x) for t in self.teachers], 1)
                    parts.setdefault("student", []).append(student(x).softmax(1).cpu().numpy())
                    parts.setdefault("teachers (concatenated)", []).append(z_t.softmax(1).cpu().numpy())
        self._common[model] = {k: np.concatenate(v) for k, v in parts.items()}
        return self._common[model]

    def embed(self, features: Mapping[str, np.ndarray], method: str = "tsne", **params):
        from ..embed import embed

        if method == "tsne":
            # maps of a few hundred points per network: one thread is faster than starting several
            params.setdefault("n_jobs", 1)
        return embed(dict(features), labels=self.labels, index=self.indices, method=method, seed=self.seed,
                     **params)

    def compute(self, model: str, layer: str, method: str, params: Mapping):
        """``(feature-space map, common-space map)`` DataFrames (see :func:`kaviz.embed.embed`)."""
        return (self.embed(self.feature_space(model, layer), method, **params),
                self.embed(self.common_space(model), method, **params))

    def pairing(self, model: str, layer: str | None = None) -> dict:
        """:func:`paired_distance_ratio` in feature space (when the channel counts agree, else NaN)
        and in the common space of ``model`` (the output space for a KD student)."""
        layer = layer or next(iter(self.layers))
        feat = self.feature_space(model, layer)
        return {"feature space": paired_distance_ratio(feat) if len(feat) > 1 else float("nan"),
                "common space": paired_distance_ratio(self.common_space(model))}

    def pairing_table(self, layer: str | None = None):
        """One row per model: the paired-distance ratio (same image across networks vs different
        images; below 1 = paired) in feature space and in the second panel's space."""
        import pandas as pd

        rows = []
        for model in self.models:
            r = self.pairing(model, layer)
            rows.append({"model": model, "feature space": r["feature space"],
                         "second panel": "common space h" if self.runs[model].cfl is not None else "output space (softmax)",
                         "second-panel ratio": r["common space"]})
        return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ data
class PairData(tuple):
    """``(sources, train, val, test)``: ``sources`` = ``{name: Splits}`` per dataset, and the union
    of the datasets (comprehensive label space, SPEC §0.1) per split."""

    __slots__ = ()

    def __new__(cls, sources, train, val, test):
        return super().__new__(cls, (sources, train, val, test))

    sources = property(lambda self: self[0])
    train = property(lambda self: self[1])
    val = property(lambda self: self[2])
    test = property(lambda self: self[3])


def load_data(kind: str = "embedded", *, cub_root=None, dogs_root=None, image_size: int = 32,
              n_shapes: int = 2000, val: float = 0.15, test: float = 0.15, seed: int = 0) -> PairData:
    """Two datasets with disjoint label sets, split per dataset and united per split.

    ``"embedded"``: synthetic shapes (``n_shapes`` images) and scikit-learn's digits, both
    ``image_size``² RGB, each split train/val/test with :func:`kaviz.data.split`.
    ``"cub_dogs"``: CUB-200-2011 (``cub_root``) and Stanford Dogs (``dogs_root``) via
    :mod:`kaviz.data.real`; their official test splits are the test splits, and ``val`` of each
    training split (without augmentation) is held out for model selection.
    """
    from ..data import digits, shapes, split, union

    if kind == "embedded":
        sources = {"shapes": split(shapes(n=n_shapes, seed=seed, size=image_size), val=val, test=test, seed=seed),
                   "digits": split(digits(size=image_size, seed=seed), val=val, test=test, seed=seed)}
    elif kind == "cub_dogs":
        from ..data import Splits, real

        sources = {}
        for name, loader, root in (("cub", real.cub200, cub_root), ("dogs", real.stanford_dogs, dogs_root)):
            aug = loader(root, "train", image_size=image_size)
            plain = loader(root, "train", image_size=image_size, augment=False)
            # same seed and targets: the same indices go to val in both copies
            tr, _, _ = split(aug, val=val, test=0.0, seed=seed)
            _, va, _ = split(plain, val=val, test=0.0, seed=seed)
            sources[name] = Splits(tr, va, loader(root, "test", image_size=image_size))
    else:
        raise ValueError(f"unknown data kind {kind!r}; use 'embedded' (shapes + digits) or 'cub_dogs' "
                         "(CUB-200-2011 + Stanford Dogs, with cub_root=... and dogs_root=...)")
    names = list(sources)
    parts = [union([sources[n][k] for n in names], names=names) for k in range(3)]
    return PairData(sources, *parts)
