"""Student Becoming the Master (SBM): one student for scene parsing and depth (SPEC.md §4.2).

Ye, Ji, Wang, Ou, Tao and Song, "Student Becoming the Master: Knowledge Amalgamation for Joint
Scene Parsing, Depth Estimation, and More", CVPR 2019.

Two (or more) encoder–decoder teachers, each expert in one dense task, are amalgamated into one
student without labels:

1. The student **trunk** (encoder and decoder blocks, :class:`~kaviz.models.dense.SegNetSmall`) is
   a copy of one teacher (the segmentation teacher by default).
2. For each task t and each candidate **branch point** p (the block after which the task leaves
   the trunk: ``enc3``, ``dec3``, ``dec2`` or ``dec1``) the trunk feature f_p goes through a
   squeeze-and-excitation **adaptor** and a **frozen copy of teacher t's remaining decoder
   blocks and head** (:class:`TeacherTail`), so the student is judged in the teacher's own domain::

       a(f) = f · σ(W₂ ReLU(W₁ GAP(f) + b₁) + b₂),  W₁: C → max(C/4, 16),  GAP = mean over all H×W
       ŷ_{t,p} = tail_{t,p}(a_{t,p}(f_p))

3. Losses against the teachers' predictions (labels are never read): segmentation — cross-entropy
   to the teacher's per-pixel argmax (``seg_loss="ce"``) or per-pixel KL(p_t ‖ p_s) at temperature
   T (``"kl"``); depth — L1 to the teacher's depth. In the *block phase* the trunk and adaptors of
   every candidate branch are trained together while the teacher copies stay frozen.
4. **Branch-out**: each task's loss is measured per branch point on the training data
   (:func:`branch_losses`); the point with the lowest loss is kept (:func:`select_branches`,
   :meth:`SBMStudent.branch_out`), and then everything — trunk, adaptors and the tails — is
   fine-tuned (:func:`run` does all of it with :func:`kaviz.train.fit`).

The tails start as *copies of the teachers' decoders*: one reference implementation built them
fresh by mistake, which costs half the mIoU on NYUv2 (0.52 → 0.28); :func:`check_tails` tells the
two apart, and ``SBMStudent(..., tails="fresh")`` rebuilds that variant as an ablation.

The teachers themselves are trained with :class:`DenseSupervised` (cross-entropy with an ignore
index; L1 over valid depth pixels) through :func:`kaviz.train.train_teacher` (:func:`train_teachers`).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..models.dense import SegNetSmall
from ..train import freeze
from .kd import images_of

__all__ = [
    "KINDS",
    "TARGET_KEYS",
    "BRANCH_POINTS",
    "DenseSupervised",
    "DenseMeter",
    "SEAdaptor",
    "TeacherTail",
    "Branch",
    "SBMStudent",
    "SBM",
    "TeacherTargets",
    "check_tails",
    "branch_losses",
    "select_branches",
    "branch_summary",
    "SBMResult",
    "run",
    "train_teachers",
    "scene_splits",
    "score",
    "score_table",
    "ConstantPredictor",
    "constant_predictor",
    "predict",
]

#: Dense task kinds: per-pixel classes, per-pixel depth.
KINDS = ("segmentation", "depth")
#: Ground-truth entry of a batch's target dict for each kind.
TARGET_KEYS = {"segmentation": "mask", "depth": "depth"}
#: Candidate branch points of a SegNetSmall, shallow to deep: the block after which a task leaves
#: the shared trunk (``enc3``: only the encoder is shared; ``dec1``: all but the head is shared).
BRANCH_POINTS = ("enc3", "dec3", "dec2", "dec1")
_BLOCKS = ("enc1", "enc2", "enc3", "dec3", "dec2", "dec1")
_DECODER = ("dec3", "dec2", "dec1")
IGNORE_INDEX = 255


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"task kind must be one of {KINDS}, got {kind!r}")
    return kind


def _kind_of(model: nn.Module) -> str:
    """A one-channel output is depth; several channels are class logits."""
    return "depth" if getattr(model, "out_channels", None) == 1 else "segmentation"


def _depth_valid(t: torch.Tensor, min_depth: float) -> torch.Tensor:
    return torch.isfinite(t) & (t > min_depth)


# ------------------------------------------------------------------------------------ teachers
class DenseSupervised(nn.Module):
    """Supervised training of one dense model (the SBM teachers), for :func:`kaviz.train.fit`.

    ``task="segmentation"``: ``{"ce": CE(logits, mask)}`` over pixels whose label is not
    ``ignore_index`` (255, void in NYUv2/CamVid). ``task="depth"``: ``{"l1": mean |d̂ − d|}`` over
    valid pixels (finite, > ``min_depth``; NYUv2 stores 0 where the sensor saw nothing).
    ``evaluate(data)`` reports ``pixel_accuracy`` and ``mIoU``, or ``rmse``, ``abs_rel`` and
    ``delta1`` (see :class:`DenseMeter`). ``target_key`` defaults to ``"mask"`` / ``"depth"``.
    """

    def __init__(self, model: nn.Module, task: str = "segmentation", target_key: str | None = None,
                 ignore_index: int = IGNORE_INDEX, min_depth: float = 1e-3):
        super().__init__()
        self.model = model
        self.task = _check_kind(task)
        self.target_key = target_key or TARGET_KEYS[task]
        self.ignore_index = ignore_index
        self.min_depth = min_depth

    def _target(self, batch):
        y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        if not isinstance(y, Mapping) or self.target_key not in y:
            have = list(y) if isinstance(y, Mapping) else type(y).__name__
            raise KeyError(f"DenseSupervised({self.task!r}) needs batches (images, {{{self.target_key!r}: ...}}); "
                           f"the targets are {have}. Pass target_key=... to name the map to learn.")
        return y[self.target_key]

    def forward(self, batch):
        x, y = images_of(batch), self._target(batch)
        out = self.model(x)
        if self.task == "segmentation":
            return {"ce": F.cross_entropy(out, y.long(), ignore_index=self.ignore_index)}
        pred = out[:, 0]
        valid = _depth_valid(y, self.min_depth)
        if not bool(valid.any()):
            return {"l1": (pred * 0).sum()}  # keeps the graph: a batch without depth teaches nothing
        return {"l1": (pred - y).abs()[valid].mean()}

    def evaluate(self, data) -> dict:
        return score(self.model, data, kinds={self.task: self.task}, task=self.task,
                     target_keys={self.task: self.target_key}, prefix=False,
                     ignore_index=self.ignore_index)


class DenseMeter:
    """Streaming dense metrics (batch by batch, so a large test set never sits in memory at once).

    ``kind="segmentation"``: a confusion matrix over pixels whose target is not ``ignore_index``;
    ``result()`` gives ``pixel_accuracy`` and ``mIoU`` as :func:`kaviz.metrics.segmentation_scores`
    (mean IoU over the classes that occur in targets or predictions). ``kind="depth"``: sums over
    valid pixels (finite, > ``min_depth``), predictions clamped below at ``min_depth``; ``result()``
    gives ``rmse``, ``abs_rel`` and ``delta1`` as :func:`kaviz.metrics.depth_scores`.
    """

    def __init__(self, kind: str, num_classes: int | None = None, ignore_index: int = IGNORE_INDEX,
                 min_depth: float = 1e-3):
        self.kind = _check_kind(kind)
        if kind == "segmentation" and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"a segmentation meter needs num_classes >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.min_depth = min_depth
        self.cm = np.zeros((num_classes, num_classes), dtype=np.int64) if kind == "segmentation" else None
        self.sums = {"sq": 0.0, "rel": 0.0, "delta": 0.0, "n": 0}

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """``output``: logits (B, K, H, W) or ids (B, H, W) for segmentation; depth (B, 1, H, W) or
        (B, H, W). ``target``: (B, H, W)."""
        from .. import metrics

        output, target = output.detach().cpu(), target.detach().cpu()
        if self.kind == "segmentation":
            pred = output.argmax(1) if output.dim() == 4 else output
            if pred.shape != target.shape:
                raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
            valid = target != self.ignore_index
            self.cm += metrics.confusion_matrix(pred[valid].numpy(), target[valid].numpy(), self.num_classes)
            return
        pred = output[:, 0] if output.dim() == 4 else output
        if pred.shape != target.shape:
            raise ValueError(f"depth predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
        t = target.double()
        m = _depth_valid(t, self.min_depth)
        p, t = pred.double()[m].clamp_min(self.min_depth), t[m]
        ratio = torch.maximum(p / t, t / p)
        self.sums["sq"] += float(((p - t) ** 2).sum())
        self.sums["rel"] += float(((p - t).abs() / t).sum())
        self.sums["delta"] += float((ratio < 1.25).sum())
        self.sums["n"] += int(m.sum())

    def result(self) -> dict:
        if self.kind == "segmentation":
            cm = self.cm
            if cm.sum() == 0:
                raise ValueError("no labelled pixels were scored (every target pixel is ignore_index?)")
            tp = np.diag(cm).astype(np.float64)
            union = cm.sum(0) + cm.sum(1) - tp
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
            return {"pixel_accuracy": float(tp.sum() / cm.sum()), "mIoU": float(np.nanmean(iou))}
        n = self.sums["n"]
        if n == 0:
            raise ValueError("no valid depth pixels were scored")
        return {"rmse": float(np.sqrt(self.sums["sq"] / n)), "abs_rel": self.sums["rel"] / n,
                "delta1": self.sums["delta"] / n}


# ------------------------------------------------------------------------------------ the student
class SEAdaptor(nn.Module):
    """Squeeze-and-excitation channel gate (Hu et al. 2018) between the trunk and a teacher tail:

    ``a(f) = f · σ(W₂ ReLU(W₁ GAP(f) + b₁) + b₂)`` with 1×1 convolutions W₁: C → max(C/r, m),
    W₂: back to C (r = ``reduction`` = 4, m = ``min_hidden`` = 16), and GAP the mean over *every*
    spatial position — also for non-square maps, where a square pooling window would not cover
    the map.
    """

    def __init__(self, channels: int, reduction: int = 4, min_hidden: int = 16):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.channels = channels
        hidden = max(channels // reduction, min_hidden)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.sigmoid = nn.Sigmoid()

    def gate(self, f: torch.Tensor) -> torch.Tensor:
        """The per-channel gate (B, C, 1, 1) in (0, 1)."""
        if f.dim() != 4 or f.shape[1] != self.channels:
            raise ValueError(f"SEAdaptor({self.channels}) expects feature maps (B, {self.channels}, H, W), "
                             f"got {tuple(f.shape)}")
        s = f.mean(dim=(2, 3), keepdim=True)  # true global average pooling
        return self.sigmoid(self.fc2(self.relu(self.fc1(s))))

    def forward(self, f):
        return f * self.gate(f)


def _check_segnet(name: str, model) -> SegNetSmall:
    if isinstance(model, SegNetSmall):
        return model
    inner = getattr(model, "module", None)  # a Frozen teacher
    if isinstance(inner, SegNetSmall):
        return inner
    raise TypeError(f"teacher {name!r} must be a kaviz segnet_small (SegNetSmall with named blocks enc1..dec1, "
                    f"head), got {type(model).__name__}; build it with kaviz.models.build('segnet_small', ...)")


def _channels_at(model: SegNetSmall, point: str) -> int:
    w1, w2, w3 = model.widths
    return {"enc3": w3, "dec3": w2, "dec2": w1, "dec1": w1}[point]


def _check_point(point) -> str:
    if point not in BRANCH_POINTS:
        raise ValueError(f"unknown branch point {point!r}; the candidates are {list(BRANCH_POINTS)} (the block "
                         "after which a task leaves the shared trunk)")
    return point


def _skip_for(block: str, skips):
    """The encoder feature a SegNetSmall decoder block concatenates (None without skips)."""
    if skips is None:
        return None
    e1, e2 = skips
    return {"dec3": e2, "dec2": e1}.get(block)


class TeacherTail(nn.Module):
    """A copy of a teacher's decoder blocks after ``point``, and its head: ``blocks[...]``.

    ``frozen=True`` (the block phase): no gradients *into* its weights, batch-norm in eval mode
    whatever ``.train()`` says — gradients still flow *through* it to the adaptor and the trunk
    (which is why it is not a :class:`kaviz.train.Frozen`, whose forward runs under ``no_grad``).
    ``fresh=True`` re-initialises the copy (the reference-code bug, kept as an ablation).
    """

    def __init__(self, teacher: SegNetSmall, point: str, fresh: bool = False):
        super().__init__()
        teacher = _check_segnet("tail", teacher)
        self.point = _check_point(point)
        names = [b for b in _DECODER if _BLOCKS.index(b) > _BLOCKS.index(point)] + ["head"]
        # fresh: a newly initialised network of the same configuration (what the reference did)
        source = SegNetSmall(teacher.out_channels, teacher.enc1.conv1.in_channels, teacher.widths,
                             teacher.skips, teacher.output) if fresh else teacher
        self.blocks = nn.ModuleDict({n: copy.deepcopy(getattr(source, n)) for n in names})
        self.skips = teacher.skips
        self.output = teacher.output
        self.out_channels = teacher.out_channels
        self.fresh = bool(fresh)
        self.frozen = False

    @property
    def names(self) -> list[str]:
        return list(self.blocks)

    def set_frozen(self, frozen: bool = True) -> "TeacherTail":
        self.frozen = bool(frozen)
        self.blocks.requires_grad_(not self.frozen)
        self.train(self.training)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.blocks.eval()  # the teacher's batch-norm statistics stay the teacher's
        return self

    def forward(self, f, skips=None, size=None):
        d = f
        for n in self.names[:-1]:
            d = self.blocks[n](d, _skip_for(n, skips if self.skips else None))
        if size is not None and tuple(d.shape[-2:]) != tuple(size):
            d = F.interpolate(d, size=tuple(size), mode="bilinear", align_corners=False)
        out = self.blocks["head"](d)
        return torch.sigmoid(out) if self.output == "sigmoid" else out


class Branch(nn.Module):
    """One task's exit from the trunk: ``tail(adaptor(f))``."""

    def __init__(self, adaptor: nn.Module, tail: TeacherTail):
        super().__init__()
        self.adaptor = adaptor
        self.tail = tail

    def forward(self, f, skips=None, size=None):
        return self.tail(self.adaptor(f), skips, size)


class SBMStudent(nn.Module):
    """The SBM student: a trunk copied from ``teachers[trunk_from]`` and, per task and candidate
    branch point, a :class:`Branch` (SE adaptor + copy of that task's teacher tail).

    ``teachers``: ``{task: segnet_small}`` (same widths and skip setting, so that any trunk feature
    fits any tail). ``points``: ``{task: [candidate points]}`` (default: every point of
    :data:`BRANCH_POINTS` for every task); the trunk keeps the blocks up to the deepest one.
    ``tails``: ``"teacher"`` (copies, frozen until :meth:`freeze_tails` (False)) or ``"fresh"``
    (re-initialised, always trainable — the reference bug, as an ablation).

    ``forward(x)`` → ``{task: output}`` once each task has one branch (after :meth:`branch_out`);
    ``forward_all(x)`` → ``{task: {point: output}}`` for every candidate.
    """

    def __init__(self, teachers: Mapping[str, nn.Module], points: Mapping[str, Sequence[str]] | None = None, *,
                 trunk_from: str | None = None, reduction: int = 4, min_hidden: int = 16, tails: str = "teacher"):
        super().__init__()
        if not isinstance(teachers, Mapping) or not teachers:
            raise ValueError("SBMStudent needs a dict {task: teacher}, e.g. {'seg': seg_teacher, 'depth': depth_teacher}")
        nets = {t: _check_segnet(t, m) for t, m in teachers.items()}
        first = next(iter(nets.values()))
        for t, m in nets.items():
            if m.widths != first.widths or m.skips != first.skips or m.enc1.conv1.in_channels != first.enc1.conv1.in_channels:
                raise ValueError(
                    f"every teacher must have the same widths, skips and input channels so that the trunk's "
                    f"features fit every teacher's decoder; {t!r} has widths {m.widths}, skips {m.skips}, "
                    f"but {next(iter(nets))!r} has widths {first.widths}, skips {first.skips}")
        if tails not in ("teacher", "fresh"):
            raise ValueError(f"tails must be 'teacher' (copies of the teachers' decoders) or 'fresh', got {tails!r}")
        trunk_from = trunk_from if trunk_from is not None else next(iter(nets))
        if trunk_from not in nets:
            raise ValueError(f"trunk_from={trunk_from!r} is not a task; tasks: {list(nets)}")
        if points is None:
            points = {t: list(BRANCH_POINTS) for t in nets}
        unknown = [t for t in points if t not in nets]
        missing = [t for t in nets if t not in points]
        if unknown or missing:
            raise ValueError(f"points must name each task once: unknown {unknown}, missing {missing}; tasks {list(nets)}")
        points = {t: [points[t]] if isinstance(points[t], str) else list(dict.fromkeys(points[t])) for t in nets}
        for t, ps in points.items():
            if not ps:
                raise ValueError(f"task {t!r} has no candidate branch point")
            for p in ps:
                _check_point(p)
        deepest = max((p for ps in points.values() for p in ps), key=_BLOCKS.index)
        base = nets[trunk_from]
        self.trunk = nn.ModuleDict({b: copy.deepcopy(getattr(base, b))
                                    for b in _BLOCKS[:_BLOCKS.index(deepest) + 1]})
        self.branches = nn.ModuleDict({
            t: nn.ModuleDict({p: Branch(SEAdaptor(_channels_at(nets[t], p), reduction, min_hidden),
                                        TeacherTail(nets[t], p, fresh=tails == "fresh"))
                              for p in sorted(points[t], key=_BLOCKS.index)})
            for t in nets})
        # the copies inherit requires_grad=False from frozen teachers: the student's own parts learn
        self.trunk.requires_grad_(True)
        self.branches.requires_grad_(True)
        self.tasks = list(nets)
        self.kinds = {t: _kind_of(m) for t, m in nets.items()}
        self.trunk_from = trunk_from
        self.skips = first.skips
        self.widths = first.widths
        self.tails = tails
        self.reduction, self.min_hidden = reduction, min_hidden
        self.freeze_tails(True)

    # ---------------------------------------------------------------------------------- structure
    @property
    def points(self) -> dict[str, list[str]]:
        """The candidate branch points of each task (shallow to deep)."""
        return {t: list(self.branches[t]) for t in self.tasks}

    def freeze_tails(self, frozen: bool = True) -> "SBMStudent":
        """Freeze (block phase) or release (fine-tuning) the teacher-tail copies. Fresh tails
        (``tails="fresh"``) hold no teacher knowledge and always stay trainable."""
        for t in self.tasks:
            for b in self.branches[t].values():
                b.tail.set_frozen(frozen and not b.tail.fresh)
        return self

    def branch_out(self, points: Mapping[str, str]) -> "SBMStudent":
        """A new student keeping one branch per task (``{task: point}``), with this student's
        current weights (trunk up to the deepest kept point, adaptors, tails); tails stay frozen
        as they are here. Use :meth:`freeze_tails` (False) to fine-tune them."""
        if set(points) != set(self.tasks):
            raise ValueError(f"branch_out needs one point per task {self.tasks}, got {dict(points)}")
        for t, p in points.items():
            if p not in self.branches[t]:
                raise ValueError(f"task {t!r} has no candidate branch at {p!r}; its candidates: {list(self.branches[t])}")
        new = copy.deepcopy(self)
        deepest = max(points.values(), key=_BLOCKS.index)
        for b in list(new.trunk):
            if _BLOCKS.index(b) > _BLOCKS.index(deepest):
                del new.trunk[b]
        for t, p in points.items():
            for q in list(new.branches[t]):
                if q != p:
                    del new.branches[t][q]
        return new

    # ------------------------------------------------------------------------------------ forward
    def _features(self, x):
        if x.dim() != 4 or x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"the SBM student needs images (B, C, H, W) with H and W divisible by 8, "
                             f"got {tuple(x.shape)}")
        feats = {}
        e1 = self.trunk["enc1"](x)
        e2 = self.trunk["enc2"](e1)
        d = self.trunk["enc3"](e2)
        feats["enc3"] = d
        skips = (e1, e2) if self.skips else None
        for b in _DECODER:
            if b not in self.trunk:
                break
            d = self.trunk[b](d, _skip_for(b, skips))
            feats[b] = d
        return feats, skips

    def forward_all(self, x) -> dict[str, dict[str, torch.Tensor]]:
        """``{task: {point: output}}`` for every candidate branch (one pass through the trunk)."""
        feats, skips = self._features(x)
        size = tuple(x.shape[-2:])
        return {t: {p: br(feats[p], skips, size) for p, br in self.branches[t].items()} for t in self.tasks}

    def forward(self, x) -> dict[str, torch.Tensor]:
        several = {t: list(self.branches[t]) for t in self.tasks if len(self.branches[t]) != 1}
        if several:
            raise RuntimeError(f"tasks {several} still have several candidate branches: pick one per task "
                               "with student.branch_out({task: point}) (see select_branches), or call forward_all(x)")
        return {t: next(iter(per.values())) for t, per in self.forward_all(x).items()}


def check_tails(student: SBMStudent, teachers: Mapping[str, nn.Module]):
    """Does every branch tail hold its teacher's decoder weights? A DataFrame with one row per
    (task, point): ``max_abs_diff`` over the tail's parameters and batch-norm buffers against the
    teacher's blocks of the same names, and ``equal`` (exactly equal). A student whose tails were
    built fresh (the reference-code bug) shows large differences."""
    import pandas as pd

    rows = []
    for t in student.tasks:
        teacher = _check_segnet(t, teachers[t])
        for p, br in student.branches[t].items():
            diff = 0.0
            for name in br.tail.names:
                mine = br.tail.blocks[name].state_dict()
                theirs = getattr(teacher, name).state_dict()
                for k, v in mine.items():
                    if v.is_floating_point():
                        diff = max(diff, float((v.detach().cpu() - theirs[k].detach().cpu()).abs().max()))
                    elif not torch.equal(v.cpu(), theirs[k].cpu()):
                        diff = max(diff, float("inf"))
            rows.append({"task": t, "point": p, "blocks": "+".join(br.tail.names), "max_abs_diff": diff,
                         "equal": diff == 0.0})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ the method
class TeacherTargets(torch.utils.data.Dataset):
    """``data``'s items with the frozen teachers' targets computed once: the target dict gains
    ``"teacher": {task: target}`` (class ids for ``seg_loss="ce"``, logits for ``"kl"``, depth).

    Only valid when ``data`` has no random augmentation (the same image every epoch); build it with
    :meth:`SBM.precompute`.
    """

    def __init__(self, data, targets: Mapping[str, torch.Tensor], key: str):
        self.data = data
        self.targets = dict(targets)
        self.key = key
        for t, v in self.targets.items():
            if len(v) != len(data):
                raise ValueError(f"teacher targets for {t!r} have {len(v)} rows for {len(data)} images")

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        y = dict(y) if isinstance(y, Mapping) else {"target": y}
        y["teacher"] = {t: v[i] for t, v in self.targets.items()}
        return x, y

    def get_image(self, i):
        get = getattr(self.data, "get_image", None)
        return get(i) if get is not None else self.data[i][0]

    def image_array(self, i):
        return self.data.image_array(i)

    @property
    def fingerprint(self) -> str:
        from ..data import fingerprint

        return fingerprint(("teacher-targets", fingerprint(self.data), self.key))


class SBM(nn.Module):
    """The SBM training method for :func:`kaviz.train.fit`: ``forward(batch)`` returns one loss term
    per task and branch point of the student, named ``"<task>@<point>"`` (``"<task>"`` once each
    task has a single branch).

    - segmentation, ``seg_loss="ce"``: ``CE(ŷ, argmax p_t)`` per pixel; ``"kl"``:
      ``T² · mean_pixels KL(softmax(z_t/T) ‖ softmax(ŷ/T))``;
    - depth: ``mean |ŷ − d_t|``.

    The teachers are frozen (:func:`kaviz.train.freeze`); their predictions come from the batch
    (``y["teacher"]``, see :meth:`precompute`) or are computed on the fly. Labels are never read for
    training. ``evaluate(data)`` scores every branch against the ground truth (logging only:
    ``fit`` selects the epoch on the validation *loss*, i.e. agreement with the teachers).
    """

    def __init__(self, student: SBMStudent, teachers: Mapping[str, nn.Module], *, seg_loss: str = "ce",
                 T: float = 1.0, weights: Mapping[str, float] | None = None, metrics: bool = True,
                 target_keys: Mapping[str, str] | None = None):
        super().__init__()
        if not isinstance(student, SBMStudent):
            raise TypeError(f"student must be an SBMStudent, got {type(student).__name__}")
        if set(teachers) != set(student.tasks):
            raise ValueError(f"teachers {list(teachers)} must match the student's tasks {student.tasks}")
        if seg_loss not in ("ce", "kl"):
            raise ValueError(f"seg_loss must be 'ce' (to the teacher's argmax) or 'kl' (to its soft output), got {seg_loss!r}")
        if T <= 0:
            raise ValueError(f"temperature T must be positive, got {T}")
        self.student = student
        self.teachers = nn.ModuleDict({t: freeze(teachers[t]) for t in student.tasks})
        self.kinds = dict(student.kinds)
        self.seg_loss = seg_loss
        self.T = float(T)
        self.metrics = metrics
        self.target_keys = {t: (target_keys or {}).get(t, TARGET_KEYS[k]) for t, k in self.kinds.items()}
        w = dict(weights or {})
        unknown = [t for t in w if t not in student.tasks]
        if unknown:
            raise ValueError(f"weights name unknown tasks {unknown}; tasks: {student.tasks}")
        self.task_weights = {t: float(w.get(t, 1.0)) for t in student.tasks}

    @property
    def loss_weights(self) -> dict:
        return {self.term(t, p): self.task_weights[t] for t in self.student.tasks for p in self.student.branches[t]}

    def term(self, task: str, point: str) -> str:
        return task if len(self.student.branches[task]) == 1 else f"{task}@{point}"

    # -------------------------------------------------------------------------- teacher targets
    def teacher_target(self, task: str, x: torch.Tensor) -> torch.Tensor:
        """Teacher ``task``'s target for images ``x``: argmax ids (``"ce"``), logits (``"kl"``) or depth."""
        with torch.no_grad():
            out = self.teachers[task](x)
        if self.kinds[task] == "segmentation":
            return out.argmax(1) if self.seg_loss == "ce" else out
        return out[:, 0]

    def precompute(self, data, batch_size: int = 128) -> TeacherTargets:
        """The teachers' targets for every item of ``data``, computed once (:class:`TeacherTargets`).
        Refuses data with a random (training) transform (:func:`kaviz.data.has_random_transform`):
        its images change every epoch."""
        from ..data import has_random_transform
        from ..features import eval_mode

        if has_random_transform(data):
            raise ValueError("this data applies a random transform (augmentation), so the teachers' predictions "
                             "change every epoch and cannot be computed once; train on it directly "
                             "(run(..., precompute=False)) or load it with augment=False")
        device = next(self.teachers.parameters()).device
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        parts: dict[str, list] = {t: [] for t in self.student.tasks}
        with eval_mode(self), torch.no_grad():
            for batch in loader:
                x = images_of(batch).to(device)
                for t in self.student.tasks:
                    parts[t].append(self.teacher_target(t, x).cpu())
        targets = {t: torch.cat(v) for t, v in parts.items()}
        return TeacherTargets(data, targets, key=f"{self.seg_loss}:{self.T}:" + ":".join(
            _weights_id(self.teachers[t].module) for t in self.student.tasks))

    def _targets(self, batch, x):
        y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        pre = y.get("teacher") if isinstance(y, Mapping) else None
        if pre is not None:
            return pre
        return {t: self.teacher_target(t, x) for t in self.student.tasks}

    # ---------------------------------------------------------------------------------- losses
    def task_loss(self, task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kinds[task] == "depth":
            return (output[:, 0] - target).abs().mean()
        if self.seg_loss == "ce":
            return F.cross_entropy(output, target.long())
        T = self.T
        log_ps = F.log_softmax(output / T, dim=1)
        log_pt = F.log_softmax(target.detach() / T, dim=1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean() * (T * T)

    def forward(self, batch):
        x = images_of(batch)
        targets = self._targets(batch, x)
        outs = self.student.forward_all(x)
        return {self.term(t, p): self.task_loss(t, out, targets[t]) for t, per in outs.items() for p, out in per.items()}

    def evaluate(self, data) -> dict:
        if not self.metrics:
            return {}
        return score(self.student, data, kinds=self.kinds, target_keys=self.target_keys, all_branches=True)


def _weights_id(model: nn.Module) -> str:
    from ..models import weights_hash

    return weights_hash(model)[:12]


# ----------------------------------------------------------------------------------- branch-out
def branch_losses(method: SBM, data, batch_size: int = 128):
    """Each task's loss per candidate branch point, averaged over ``data`` (the training data, as
    the paper measures it), with the student in eval mode. A DataFrame (task, point, loss, best)."""
    import pandas as pd

    from ..features import eval_mode
    from ..train import to_device

    device = next(method.student.parameters()).device
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    sums: dict[str, float] = {}
    n = 0
    with eval_mode(method), torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            b = images_of(batch).shape[0]
            for k, v in method(batch).items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
            n += b
    if n == 0:
        raise ValueError("branch_losses got empty data")
    rows = []
    for t in method.student.tasks:
        for p in method.student.branches[t]:
            rows.append({"task": t, "point": p, "loss": sums[method.term(t, p)] / n})
    df = pd.DataFrame(rows)
    df["best"] = df["loss"] == df.groupby("task")["loss"].transform("min")
    return df


def select_branches(losses) -> dict[str, str]:
    """``{task: point}`` with the lowest loss per task (ties: the shallower point, i.e. the first
    row, which shares fewer blocks)."""
    if not {"task", "point", "loss"} <= set(losses.columns):
        raise ValueError(f"losses must have columns task, point, loss (from branch_losses), got {list(losses.columns)}")
    out = {}
    for t, part in losses.groupby("task", sort=False):
        if part["loss"].isna().all():
            raise ValueError(f"every branch loss of task {t!r} is NaN")
        out[t] = str(part.loc[part["loss"].idxmin(), "point"])
    return out


def branch_summary(result: "SBMResult"):
    """One row per (task, branch point): the loss against the teacher on the training data (what
    branch-out ranks by), ``chosen``, and for reading only the ground-truth score of that branch on
    the validation split at the block phase's best epoch (``val mIoU`` for segmentation, ``val rmse``
    for depth) — labels never enter the choice."""
    h = result.search_history
    best = h.attrs.get("best_epoch") or int(h["epoch"].iloc[-1])
    row = h[h["epoch"] == best].iloc[0]
    df = result.branch_losses.rename(columns={"loss": "train loss"}).drop(columns=["best"])
    df["chosen"] = [result.points.get(t) == p for t, p in zip(df["task"], df["point"])]
    kinds = result.search_student.kinds

    def val_metric(t, p, metric):
        name = f"val/{t}@{p}/{metric}" if len(result.search_student.branches[t]) > 1 else f"val/{t}/{metric}"
        return float(row[name]) if name in row.index else float("nan")

    df["val mIoU"] = [val_metric(t, p, "mIoU") if kinds[t] == "segmentation" else np.nan for t, p in zip(df["task"], df["point"])]
    df["val rmse"] = [val_metric(t, p, "rmse") if kinds[t] == "depth" else np.nan for t, p in zip(df["task"], df["point"])]
    return df


@dataclass
class SBMResult:
    """What :func:`run` returns: the final student (one branch per task, fine-tuned), the search
    student (every candidate branch, after the block phase), the branch-point losses, the chosen
    points and both training histories."""

    student: SBMStudent
    search_student: SBMStudent
    branch_losses: object
    points: dict
    search_history: object
    finetune_history: object
    settings: dict = field(default_factory=dict)


def run(teachers: Mapping[str, nn.Module], train_data, val_data=None, *, points: Mapping[str, Sequence[str]] | None = None,
        trunk_from: str | None = None, seg_loss: str = "ce", T: float = 1.0, tails: str = "teacher",
        search_epochs: int = 3, finetune_epochs: int = 3, lr: float = 1e-3, finetune_lr: float = 3e-4,
        batch_size: int = 32, seed: int = 0, precompute: bool = True, metrics: bool = True,
        device=None, progress: bool | None = None, **fit_kwargs) -> SBMResult:
    """The whole SBM pipeline with :func:`kaviz.train.fit` (labels are never read for training):

    1. block phase: student with every candidate branch (``points``, default all of
       :data:`BRANCH_POINTS` per task), teacher tails frozen, ``search_epochs`` at ``lr``;
    2. branch-out: :func:`branch_losses` on ``train_data``, :func:`select_branches`;
    3. fine-tuning of everything (tails released) for ``finetune_epochs`` at ``finetune_lr``.

    Both phases keep the epoch with the lowest validation loss. ``precompute`` computes the
    teachers' predictions once (only without random augmentation). ``finetune_epochs=0`` skips 3.
    """
    from .. import seed_everything
    from ..train import fit

    seed_everything(seed)
    student = SBMStudent(teachers, points, trunk_from=trunk_from, tails=tails)
    method = SBM(student, teachers, seg_loss=seg_loss, T=T, metrics=metrics)
    if device is not None:
        method.to(device)
    train = method.precompute(train_data) if precompute else train_data
    val = method.precompute(val_data) if (precompute and val_data is not None) else val_data
    common = dict(batch_size=batch_size, seed=seed, device=device, progress=progress, **fit_kwargs)
    search_history = fit(method, train, val, epochs=search_epochs, lr=lr, **common)
    losses = branch_losses(method, train)
    chosen = select_branches(losses)
    final = student.branch_out(chosen).freeze_tails(False)
    finetune_history = None
    if finetune_epochs:
        method2 = SBM(final, teachers, seg_loss=seg_loss, T=T, metrics=metrics)
        finetune_history = fit(method2, train, val, epochs=finetune_epochs, lr=finetune_lr, **common)
    settings = dict(seg_loss=seg_loss, T=T, tails=tails, search_epochs=search_epochs, finetune_epochs=finetune_epochs,
                    lr=lr, finetune_lr=finetune_lr, batch_size=batch_size, seed=seed, trunk_from=student.trunk_from)
    return SBMResult(final.eval(), student.eval(), losses, chosen, search_history, finetune_history, settings)


# ----------------------------------------------------------------------------------- data, teachers
def scene_splits(data: str = "embedded", *, root=None, image_size=32, n: int = 1500, max_objects: int = 4,
                 seed: int = 0, val: float = 0.15, test: float = 0.15, augment: bool = False):
    """Train / validation / test data and what the notebook needs to know about it.

    ``data="embedded"``: :func:`kaviz.data.scenes` (``n`` square images of side ``image_size``,
    classes = background + the shapes, depth 1..10) split at random into ``val``/``test`` fractions.
    ``data="nyuv2"``: :func:`kaviz.data.real.nyuv2` from ``root`` (13 classes, depth in metres) at
    ``image_size`` (an int or ``(height, width)``, e.g. ``(288, 384)``): validation = a ``val``
    fraction of the train split (never augmented), test = the test split; ``augment=True`` keeps
    the random crops and flips on the training part (the teachers' predictions are then computed
    on the fly). Returns ``(Splits(train, val, test), info)`` with ``info = {"num_classes",
    "class_names", "size", "source"}``.
    """
    from ..data import Splits, split

    if data == "embedded":
        from ..data import scenes

        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise ValueError(f"the embedded scenes are square: image_size must be an int, got {image_size!r}")
        ds = scenes(n=n, seed=seed, size=image_size, max_objects=max_objects)
        parts = split(ds, val=val, test=test, seed=seed)
        names = list(ds.info["mask_classes"])
        return parts, {"num_classes": len(names), "class_names": names, "size": (image_size, image_size),
                       "source": "scenes"}
    if data == "nyuv2":
        from ..data.real import nyuv2

        fixed = nyuv2(root, "train", image_size=image_size, augment=False)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(fixed))
        n_val = max(1, int(round(val * len(fixed))))
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        train_src = nyuv2(root, "train", image_size=image_size, augment=augment)
        parts = Splits(train_src.subset(train_idx), fixed.subset(val_idx),
                       nyuv2(root, "test", image_size=image_size, augment=False))
        names = list(fixed.classes)
        return parts, {"num_classes": len(names), "class_names": names, "size": tuple(fixed.image_size),
                       "source": "nyuv2"}
    raise ValueError(f"data must be 'embedded' (synthetic scenes) or 'nyuv2' (with root=...), got {data!r}")


def train_teachers(train_data, val_data, *, num_classes: int, epochs: int = 8, widths=(16, 32, 64),
                   lr: float = 2e-3, batch_size: int = 32, seed: int = 0, tasks: Mapping[str, str] | None = None,
                   cache=True, device=None, progress: bool | None = None):
    """A segmentation and a depth ``segnet_small`` trained with :class:`DenseSupervised` through
    :func:`kaviz.train.train_teacher` (cached by everything that determines them; the epoch with
    the lowest validation loss is kept). ``tasks`` maps task names to kinds (default
    ``{"seg": "segmentation", "depth": "depth"}``). Returns ``({task: model}, {task: history})``."""
    from ..train import train_teacher

    tasks = dict(tasks or {"seg": "segmentation", "depth": "depth"})
    models, histories = {}, {}
    for t, kind in tasks.items():
        _check_kind(kind)
        model, hist = train_teacher(
            "segnet_small", train_data, val_data, num_classes=num_classes if kind == "segmentation" else 1,
            epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, arch_kwargs={"widths": tuple(widths)},
            method=functools.partial(DenseSupervised, task=kind), cache=cache, device=device, progress=progress)
        models[t], histories[t] = model.eval(), hist
    return models, histories


# ----------------------------------------------------------------------------------- evaluation
def _outputs(model, x, task=None) -> dict[str, torch.Tensor]:
    out = model(x)
    if isinstance(out, Mapping):
        return dict(out)
    if task is None:
        raise ValueError("this model returns one map: say which task it solves (task=...)")
    return {task: out}


class ConstantPredictor(nn.Module):
    """The trivial baseline a dense model must beat: the same class (``majority``) at every pixel
    and the same depth (``mean_depth``) everywhere. ``forward(x)`` → ``{task: output}``."""

    def __init__(self, tasks: Mapping[str, str], num_classes: int, majority: int, mean_depth: float):
        super().__init__()
        self.tasks = {t: _check_kind(k) for t, k in tasks.items()}
        self.num_classes, self.majority, self.mean_depth = int(num_classes), int(majority), float(mean_depth)

    def forward(self, x):
        b, _, h, w = x.shape
        out = {}
        for t, k in self.tasks.items():
            if k == "segmentation":
                logits = x.new_zeros(b, self.num_classes, h, w)
                logits[:, self.majority] = 1.0
                out[t] = logits
            else:
                out[t] = x.new_full((b, 1, h, w), self.mean_depth)
        return out


def constant_predictor(train_data, tasks: Mapping[str, str], num_classes: int, *, ignore_index: int = IGNORE_INDEX,
                       min_depth: float = 1e-3, batch_size: int = 128) -> ConstantPredictor:
    """:class:`ConstantPredictor` fitted on ``train_data``: its most frequent class (void pixels left
    out) and its mean depth over valid pixels."""
    counts = np.zeros(num_classes, dtype=np.int64)
    depth_sum, depth_n = 0.0, 0
    for _, y in torch.utils.data.DataLoader(train_data, batch_size=batch_size, shuffle=False):
        m = y[TARGET_KEYS["segmentation"]]
        m = m[m != ignore_index]
        counts += np.bincount(m.numpy().ravel(), minlength=num_classes)[:num_classes]
        d = y[TARGET_KEYS["depth"]].double()
        v = _depth_valid(d, min_depth)
        depth_sum, depth_n = depth_sum + float(d[v].sum()), depth_n + int(v.sum())
    return ConstantPredictor(tasks, num_classes, int(counts.argmax()), depth_sum / max(depth_n, 1))


def score(model, data, *, kinds: Mapping[str, str], task: str | None = None, target_keys: Mapping[str, str] | None = None,
          all_branches: bool = False, prefix: bool = True, batch_size: int = 64, ignore_index: int = IGNORE_INDEX,
          device=None) -> dict:
    """Dense metrics of ``model`` against the ground truth of ``data`` (streamed, see :class:`DenseMeter`).

    ``model``: an :class:`SBMStudent` (dict outputs), a ``{task: model}`` dict (one model per task,
    e.g. the teachers), or one model solving ``task``. ``kinds``: ``{task: "segmentation" | "depth"}``.
    Keys ``"<task>/<metric>"`` (``prefix=False``: ``"<metric>"``, one task only); with
    ``all_branches`` an SBMStudent is scored at every candidate branch: ``"<task>@<point>/<metric>"``.
    """
    from ..features import eval_mode
    from ..train import to_device

    target_keys = {t: (target_keys or {}).get(t, TARGET_KEYS[_check_kind(k)]) for t, k in kinds.items()}
    if isinstance(model, Mapping):
        modules = dict(model)
    else:
        modules = {"_": model}
    if device is None:
        p = next((q for m in modules.values() for q in m.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    meters: dict[str, DenseMeter] = {}

    def meter(name, t, out):
        if name not in meters:
            k = kinds[t]
            meters[name] = DenseMeter(k, num_classes=out.shape[1] if k == "segmentation" else None,
                                      ignore_index=ignore_index)
        return meters[name]

    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    stack = [eval_mode(m) for m in modules.values()]
    for s in stack:
        s.__enter__()
    try:
        with torch.no_grad():
            for batch in loader:
                x = images_of(batch).to(device)
                y = batch[1]
                if not isinstance(y, Mapping):
                    raise TypeError("score needs dense targets: batches (images, {'mask': ..., 'depth': ...})")
                y = to_device(y, "cpu")
                for key, m in modules.items():
                    if isinstance(model, Mapping):
                        outs = {key: {"": m(x)}}
                    elif all_branches and isinstance(m, SBMStudent):
                        outs = m.forward_all(x)
                    else:
                        outs = {t: {"": o} for t, o in _outputs(m, x, task).items()}
                    for t, per in outs.items():
                        if t not in kinds:
                            continue
                        for p, out in per.items():
                            name = t if (not p or len(per) == 1) else f"{t}@{p}"
                            meter(name, t, out).update(out, y[target_keys[t]])
    finally:
        for s in reversed(stack):
            s.__exit__(None, None, None)
    res = {}
    for name, mt in meters.items():
        for k, v in mt.result().items():
            res[f"{name}/{k}" if prefix else k] = v
    return res


def score_table(models: Mapping[str, object], data, *, kinds: Mapping[str, str], **kwargs):
    """One row per model (``{name: model or {task: model}}``), columns ``"<task>/<metric>"``."""
    import pandas as pd

    rows = {name: score(m, data, kinds=kinds, **kwargs) for name, m in models.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def predict(models: Mapping[str, object], data, indices: Sequence[int], *, kinds: Mapping[str, str],
            target_keys: Mapping[str, str] | None = None) -> dict:
    """Predictions for a few items, for figures: ``{"image": uint8 (n, H, W, 3), "truth": {task: maps},
    name: {task: maps}}`` where segmentation maps are class ids (n, H, W) and depth maps (n, H, W)."""
    from ..features import eval_mode

    target_keys = {t: (target_keys or {}).get(t, TARGET_KEYS[_check_kind(k)]) for t, k in kinds.items()}
    items = [data[int(i)] for i in indices]
    x = torch.stack([it[0] for it in items])
    out = {"image": np.stack([data.image_array(int(i)) for i in indices]),
           "truth": {t: torch.stack([torch.as_tensor(it[1][target_keys[t]]) for it in items]).numpy() for t in kinds}}
    for name, m in models.items():
        res = {}
        modules = dict(m) if isinstance(m, Mapping) else {"_": m}
        for key, mod in modules.items():
            dev = next(mod.parameters()).device
            with eval_mode(mod), torch.no_grad():
                o = mod(x.to(dev))
            o = {key: o} if not isinstance(o, Mapping) else o
            for t, v in o.items():
                if t in kinds:
                    v = v.cpu()
                    res[t] = (v.argmax(1) if kinds[t] == "segmentation" else v[:, 0]).numpy()
        out[name] = res
    return out
