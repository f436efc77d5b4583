"""The SBM student (SPEC §5): a shared SegNet trunk with per-task branches, SE adaptors and teacher tails."""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...models.dense import SegNetSmall
from .tasks import BRANCH_POINTS, check_kind, kind_channels

_BLOCKS = ("enc1", "enc2", "enc3", "dec3", "dec2", "dec1")
_DECODER = ("dec3", "dec2", "dec1")


def _kind_of(model: nn.Module) -> str:
    """A one-channel output is depth; several channels are class logits."""
    return "depth" if getattr(model, "out_channels", None) == 1 else "segmentation"


def _task_kinds(nets: Mapping[str, nn.Module], kinds: Mapping[str, str] | None) -> dict[str, str]:
    """Each task's kind: as ``kinds`` names it, else from the teacher's output channels (1: depth, several:
    segmentation). A normals teacher (3 channels, like a 3-class segmenter) must be named:
    ``kinds={"normals": "normals"}``."""
    kinds = dict(kinds or {})
    unknown = [t for t in kinds if t not in nets]
    if unknown:
        raise ValueError(f"kinds names tasks that have no teacher: {unknown}; tasks: {list(nets)}")
    out = {}
    for t, m in nets.items():
        kind = check_kind(kinds[t]) if t in kinds else _kind_of(m)
        if kind != "segmentation" and m.out_channels != kind_channels(kind):
            raise ValueError(f"task {t!r} is named {kind!r}, which needs {kind_channels(kind)} output channel(s), "
                             f"but its teacher has {m.out_channels}")
        out[t] = kind
    return out


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


def _indices_for(block: str, indices):
    """The pooling indices a SegNetSmall decoder block max-unpools with (None without ``unpool="indices"``)."""
    if indices is None:
        return None
    i1, i2, i3 = indices
    return {"dec3": i3, "dec2": i2, "dec1": i1}[block]


def _decode_block(block: nn.Module, name: str, d, skips, indices):
    if indices is None:
        return block(d, _skip_for(name, skips))
    return block(d, _skip_for(name, skips), indices=_indices_for(name, indices))


class TeacherTail(nn.Module):
    """A copy of a teacher's decoder blocks after ``point``, and its head: ``blocks[...]``.

    ``frozen=True`` (the block phase): no gradients *into* its weights, batch-norm in eval mode
    whatever ``.train()`` says — gradients still flow *through* it to the adaptor and the trunk
    (which is why it is not a :class:`kaviz.train.Frozen`, whose forward runs under ``no_grad``).
    ``fresh=True`` re-initialises the copy (the reference-code bug, kept as an ablation).
    A teacher built with ``unpool="indices"`` gives a tail that max-unpools with the pooling indices
    passed to ``forward`` (in the student: those of the student's own trunk).
    """

    def __init__(self, teacher: SegNetSmall, point: str, fresh: bool = False):
        super().__init__()
        teacher = _check_segnet("tail", teacher)
        self.point = _check_point(point)
        names = [b for b in _DECODER if _BLOCKS.index(b) > _BLOCKS.index(point)] + ["head"]
        # fresh: a newly initialised network of the same configuration (what the reference did)
        source = SegNetSmall(teacher.out_channels, teacher.enc1.conv1.in_channels, teacher.widths,
                             teacher.skips, teacher.output, teacher.unpool) if fresh else teacher
        self.blocks = nn.ModuleDict({n: copy.deepcopy(getattr(source, n)) for n in names})
        self.skips = teacher.skips
        self.output = teacher.output
        self.unpool = teacher.unpool
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

    def forward(self, f, skips=None, size=None, indices=None):
        if self.unpool == "indices" and indices is None and len(self.names) > 1:
            raise ValueError("this tail max-unpools (its teacher has unpool='indices'): pass the trunk's pooling "
                             "indices (i1, i2, i3), tail(f, skips, size, indices=...)")
        d = f
        for n in self.names[:-1]:
            d = _decode_block(self.blocks[n], n, d, skips if self.skips else None,
                              indices if self.unpool == "indices" else None)
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

    def forward(self, f, skips=None, size=None, indices=None):
        if indices is None:
            return self.tail(self.adaptor(f), skips, size)
        return self.tail(self.adaptor(f), skips, size, indices=indices)


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

    Teachers built with ``segnet_small(..., unpool="indices")`` (SegNet max-unpooling) give a trunk
    whose encoder blocks return their pooling indices; every tail then max-unpools with the indices
    of the *student's* trunk (the teacher's decoder runs on the student's features and argmax
    positions). :meth:`set_stage` restricts training to one stage of the blockwise schedule
    (:func:`run` with ``schedule="blockwise"``).
    """

    def __init__(self, teachers: Mapping[str, nn.Module], points: Mapping[str, Sequence[str]] | None = None, *,
                 trunk_from: str | None = None, reduction: int = 4, min_hidden: int = 16, tails: str = "teacher",
                 kinds: Mapping[str, str] | None = None):
        super().__init__()
        if not isinstance(teachers, Mapping) or not teachers:
            raise ValueError("SBMStudent needs a dict {task: teacher}, e.g. {'seg': seg_teacher, 'depth': "
                             "depth_teacher}")
        nets = {t: _check_segnet(t, m) for t, m in teachers.items()}
        first = next(iter(nets.values()))
        for t, m in nets.items():
            if (m.widths != first.widths or m.skips != first.skips or m.unpool != first.unpool
                    or m.enc1.conv1.in_channels != first.enc1.conv1.in_channels):
                raise ValueError(
                    f"every teacher must have the same widths, skips, unpool and input channels so that the "
                    f"trunk's features fit every teacher's decoder; {t!r} has widths {m.widths}, skips {m.skips}, "
                    f"unpool {m.unpool!r}, but {next(iter(nets))!r} has widths {first.widths}, skips "
                    f"{first.skips}, unpool {first.unpool!r}")
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
            raise ValueError(f"points must name each task once: unknown {unknown}, missing {missing}; tasks "
                             f"{list(nets)}")
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
        self.kinds = _task_kinds(nets, kinds)
        self.trunk_from = trunk_from
        self.skips = first.skips
        self.unpool = first.unpool
        self.widths = first.widths
        self.tails = tails
        self.stage = None
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

    # ------------------------------------------------------------------------ blockwise schedule
    @property
    def stage_points(self) -> list[str]:
        """Every task's candidate branch points together, shallow to deep: the stages of the
        blockwise schedule (:meth:`set_stage`)."""
        return sorted({p for ps in self.points.values() for p in ps}, key=_BLOCKS.index)

    def stage_blocks(self, point: str) -> list[str]:
        """The trunk blocks the stage of ``point`` trains: those after the previous stage's point
        up to ``point`` itself (from ``enc1`` for the first stage)."""
        pts = self.stage_points
        if point not in pts:
            raise ValueError(f"no task has a candidate branch at {point!r}, so it is no stage; the stages are {pts}")
        k = pts.index(point)
        start = 0 if k == 0 else _BLOCKS.index(pts[k - 1]) + 1
        return list(_BLOCKS[start:_BLOCKS.index(point) + 1])

    def set_stage(self, point: str | None) -> "SBMStudent":
        """Train one stage of the blockwise schedule (``point``) or everything again (``None``).

        In the stage of ``point`` only :meth:`stage_blocks` (point) of the trunk and the adaptors of
        the branches at ``point`` (their tails too if they are trainable, i.e. fresh) have
        ``requires_grad``; every other block, adaptor and tail is frozen and kept in eval mode by
        :meth:`train`, so its batch-norm statistics do not move either. The SBM method then
        computes only the branches at ``point`` (``forward_all(x, points=[point])``).
        ``set_stage(None)`` restores the joint setting: trunk and adaptors trainable, each tail as
        :meth:`freeze_tails` left it."""
        blocks = self.stage_blocks(point) if point is not None else None
        self.stage = point
        if point is None:
            self.trunk.requires_grad_(True)
            for per in self.branches.values():
                for br in per.values():
                    br.adaptor.requires_grad_(True)
                    br.tail.set_frozen(br.tail.frozen)
        else:
            self.requires_grad_(False)
            for b in blocks:
                self.trunk[b].requires_grad_(True)
            for t in self.tasks:
                if point in self.branches[t]:
                    br = self.branches[t][point]
                    br.adaptor.requires_grad_(True)
                    br.tail.blocks.requires_grad_(not br.tail.frozen)
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "stage", None) is not None:  # frozen blocks keep their batch-norm statistics
            active = self.stage_blocks(self.stage)
            for b, m in self.trunk.items():
                if b not in active:
                    m.eval()
            for per in self.branches.values():
                for p, br in per.items():
                    if p != self.stage:
                        br.eval()
        return self

    def branch_out(self, points: Mapping[str, str]) -> "SBMStudent":
        """A new student keeping one branch per task (``{task: point}``), with this student's
        current weights (trunk up to the deepest kept point, adaptors, tails); tails stay frozen
        as they are here. Use :meth:`freeze_tails` (False) to fine-tune them."""
        if self.stage is not None:
            raise ValueError(f"this student is in the blockwise stage {self.stage!r}: call set_stage(None) before "
                             "branch_out")
        if set(points) != set(self.tasks):
            raise ValueError(f"branch_out needs one point per task {self.tasks}, got {dict(points)}")
        for t, p in points.items():
            if p not in self.branches[t]:
                raise ValueError(f"task {t!r} has no candidate branch at {p!r}; its candidates: "
                                 f"{list(self.branches[t])}")
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
    def _features(self, x, until: str | None = None):
        if x.dim() != 4 or x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"the SBM student needs images (B, C, H, W) with H and W divisible by 8, "
                             f"got {tuple(x.shape)}")
        feats = {}
        indices = None
        if self.unpool == "indices":
            e1, i1 = self.trunk["enc1"](x)
            e2, i2 = self.trunk["enc2"](e1)
            d, i3 = self.trunk["enc3"](e2)
            indices = (i1, i2, i3)
        else:
            e1 = self.trunk["enc1"](x)
            e2 = self.trunk["enc2"](e1)
            d = self.trunk["enc3"](e2)
        feats["enc3"] = d
        skips = (e1, e2) if self.skips else None
        for b in _DECODER:
            if b not in self.trunk or until == next(reversed(feats)):
                break
            d = _decode_block(self.trunk[b], b, d, skips, indices)
            feats[b] = d
        return feats, skips, indices

    def forward_all(self, x, points: str | Sequence[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """``{task: {point: output}}`` for every candidate branch (one pass through the trunk);
        ``points``: only the branches at these points (the trunk runs up to the deepest of them; a
        task without a branch there maps to ``{}``)."""
        wanted = None
        if points is not None:
            wanted = [points] if isinstance(points, str) else list(points)
            for p in wanted:
                if p not in self.stage_points:
                    raise ValueError(f"no task has a candidate branch at {p!r}; the candidates are {self.stage_points}")
        until = None if wanted is None else max(wanted, key=_BLOCKS.index)
        feats, skips, indices = self._features(x, until)
        size = tuple(x.shape[-2:])
        if indices is None:
            return {t: {p: br(feats[p], skips, size) for p, br in self.branches[t].items()
                        if wanted is None or p in wanted} for t in self.tasks}
        return {t: {p: br(feats[p], skips, size, indices=indices) for p, br in self.branches[t].items()
                    if wanted is None or p in wanted} for t in self.tasks}

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
    built fresh (the reference-code bug) shows large differences. A tail that upsamples otherwise
    than its teacher (``unpool`` "indices" vs "bilinear": the same weights, another function) counts
    as ``max_abs_diff = inf``."""
    import pandas as pd

    rows = []
    for t in student.tasks:
        teacher = _check_segnet(t, teachers[t])
        for p, br in student.branches[t].items():
            diff = 0.0 if br.tail.unpool == teacher.unpool else float("inf")
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
