"""Recombination: combine distinct-task teachers into one network, then prune it (SPEC.md §4.3).

The method of "Learning Semantic Image Compression from Distinct-task Teachers" (Zhejiang
University VIPA group; released as the *Recombination* example of KAmalEngine, which gives no
paper link). Re-implemented from SPEC.md §4.3; nothing of the reference code is used.

Teachers are SegNet-like encoder–decoders (:mod:`kaviz.models.dense`, ``skips=False``): an image
autoencoder (reconstruction, ``output="sigmoid"``) and a segmentation network.

1. **Combine** (:func:`combine`). Each encoder conv ``W_t`` of shape ``(C_out^t, C_in^t, k, k)`` is
   written into a zero tensor ``W`` of shape ``(ΣC_out, ΣC_in, k, k)`` at its own output *and*
   input offsets, ``W[o_t:o_t+C_out^t, i_t:i_t+C_in^t] = W_t`` with ``o_t = Σ_{s<t} C_out^s`` and
   ``i_t = Σ_{s<t} C_in^s``; batch-norm weights, biases and running statistics are concatenated;
   the image is repeated once per teacher on the channel axis (``i_t = 3t`` for the first conv).
   Per-channel operations (BN, ReLU, max-pooling) then keep the teachers apart, so channels
   ``o_t:o_t+C^t`` of every combined block are teacher t's features (:func:`reproduction_check`).
   (A reference version puts every teacher at input offset 0, so teacher 2 reads teacher 1's
   channels from the second conv on: ``combine(..., offset_bug=True)`` reproduces that for
   comparison.)
2. **Shared bottleneck and adaptors** (:class:`RecombinedNet`). A 1×1 conv over the combined code
   (identity-initialised when it keeps all ΣC channels), a uniform scalar quantiser
   ``q(z) = Δ·round(z/Δ)`` (:class:`Quantiser`; straight-through estimator: the backward pass
   treats rounding as the identity, Bengio et al. 2013, as in Theis et al. 2017), then per task a
   1×1 adaptor (initialised to select that teacher's channels) into a copy of the teacher's own
   decoder. Before any training, with the quantiser off, every task output equals its teacher's.
3. **Prune and retrain** (:func:`prune`, :func:`recombine`). Each round removes from every
   prunable conv (by default those of the combined encoder and the shared bottleneck; the task
   decoders can be included) the ``fraction`` of filters with the **smallest** L1 norm
   ``‖W[o]‖₁`` (Li et al., ICLR 2017; one reference version removes the largest), together with
   their batch-norm channels and the next layer's input channels, then retrains with the
   label-free loss

   ``L = L1(x̂, x) + (1 − SSIM(x̂, x)) + soft_ce(s_seg, t_seg; T)``  (per pixel, T = 1)

   where x̂ is the reconstruction of the image x and ``t_seg`` the segmentation teacher's logits.

Everything is measured per round (:class:`RecombinationResult`): reconstruction PSNR/SSIM,
segmentation mIoU and pixel accuracy against the ground-truth masks, the number of parameters,
the code width and an empirical rate (bits per pixel, zeroth-order entropy of the quantised code).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..losses import soft_cross_entropy
from ..models.dense import EncoderBlock, SegNetSmall
from ..train import freeze
from .kd import images_of

__all__ = [
    "TASK_KINDS",
    "PRUNE_GROUPS",
    "DEFAULT_GROUPS",
    "CRITERIA",
    "IGNORE_INDEX",
    "ssim_loss",
    "Reconstruction",
    "Segmentation",
    "train_dense_teacher",
    "load_splits",
    "Quantiser",
    "TaskDecoder",
    "RecombinedNet",
    "combine",
    "reproduction_check",
    "PruneUnit",
    "filter_l1",
    "prune",
    "RecombinationLoss",
    "evaluate_dense",
    "teacher_scores",
    "recombine",
    "RecombinationResult",
    "compare_criteria",
    "summarise",
]

TASK_KINDS = ("reconstruction", "segmentation")
#: Groups of convs that :func:`prune` can thin out.
PRUNE_GROUPS = ("encoder", "bottleneck", "adaptors", "decoders")
#: Filter choices of :func:`prune` (``"smallest"`` is the method; the others are for comparison).
CRITERIA = ("smallest", "largest", "random", "bn-scaled")
#: What :func:`prune` thins out by default: the combined part (the block-diagonal encoder, where the
#: two teachers' filters overlap, and the shared code); the task decoders stay the teachers' own.
DEFAULT_GROUPS = ("encoder", "bottleneck")
IGNORE_INDEX = 255


# ------------------------------------------------------------------------------------------------
# losses and teacher training
# ------------------------------------------------------------------------------------------------
def _gauss_kernel(channels: int, window: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()


def ssim_loss(images: torch.Tensor, references: torch.Tensor, data_range: float = 1.0, window: int = 7,
              sigma: float = 1.5) -> torch.Tensor:
    """``1 − SSIM(images, references)``, differentiable (Wang et al. 2004; Gaussian window, the same
    constants as :func:`kaviz.metrics.ssim`: c1 = (0.01·L)², c2 = (0.03·L)², mean over channels,
    positions and images)."""
    if images.shape != references.shape or images.dim() != 4:
        raise ValueError(f"ssim_loss needs two (N, C, H, W) tensors of one shape, got {tuple(images.shape)} "
                         f"and {tuple(references.shape)}")
    if min(images.shape[-2:]) < window:
        raise ValueError(f"images of {tuple(images.shape[-2:])} are smaller than the {window}×{window} SSIM window")
    c = images.shape[1]
    k = _gauss_kernel(c, window, sigma, images.dtype, images.device)

    def blur(z):
        return F.conv2d(z, k, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(images), blur(references)
    var_a = blur(images * images) - mu_a ** 2
    var_b = blur(references * references) - mu_b ** 2
    cov = blur(images * references) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return 1.0 - s.mean()


def _mask_of(batch) -> torch.Tensor:
    target = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
    if isinstance(target, Mapping) and "mask" in target:
        return target["mask"]
    if torch.is_tensor(target) and target.dim() == 3:
        return target
    raise KeyError("segmentation needs per-pixel class ids: batches (image, {'mask': (B, H, W)}) as "
                   "kaviz.data.scenes and kaviz.data.real.camvid give, or (image, mask (B, H, W))")


class Reconstruction(nn.Module):
    """Train an autoencoder teacher: ``{"l1": mean |x̂ − x|, "ssim_loss": 1 − SSIM(x̂, x)}`` (labels
    never read); ``evaluate`` reports ``psnr`` and ``ssim`` on the given data."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        x = images_of(batch)
        y = self.model(x)
        if y.shape != x.shape:
            raise ValueError(f"a reconstruction teacher must output the image's shape {tuple(x.shape)}, got "
                             f"{tuple(y.shape)} (build it with 3 output channels and output='sigmoid')")
        return {"l1": (y - x).abs().mean(), "ssim_loss": ssim_loss(y, x)}

    def evaluate(self, data) -> dict:
        return evaluate_dense(self.model, data, kinds={"out": "reconstruction"})


class Segmentation(nn.Module):
    """Train a segmentation teacher: ``{"ce": per-pixel cross-entropy}`` (``ignore_index`` pixels
    skipped); ``evaluate`` reports ``mIoU`` and ``pixel_accuracy``."""

    def __init__(self, model: nn.Module, num_classes: int, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.model = model
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index

    def forward(self, batch):
        x, mask = images_of(batch), _mask_of(batch)
        logits = self.model(x)
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"the model outputs {logits.shape[1]} channels but num_classes is {self.num_classes}")
        return {"ce": F.cross_entropy(logits, mask.long(), ignore_index=self.ignore_index)}

    def evaluate(self, data) -> dict:
        return evaluate_dense(self.model, data, kinds={"out": "segmentation"}, num_classes=self.num_classes,
                              ignore_index=self.ignore_index)


def train_dense_teacher(kind: str, train_data, val_data=None, *, num_classes: int | None = None,
                        widths=(16, 32, 64), epochs: int = 5, lr: float = 2e-3, batch_size: int = 32,
                        weight_decay: float = 0.0, schedule: str | None = "cosine", seed: int = 0,
                        ignore_index: int = IGNORE_INDEX, cache=True, device=None, progress=None):
    """Train (or load from the teacher cache) a ``segnet_small`` teacher; returns ``(model, history)``.

    ``kind="reconstruction"``: an autoencoder ``segnet_small(3, output="sigmoid")`` trained with
    :class:`Reconstruction` (best epoch on ``val/loss``); ``kind="segmentation"``: a
    ``segnet_small(num_classes)`` trained with :class:`Segmentation` (best epoch on ``val/mIoU``).
    Both go through :func:`kaviz.train.train_teacher` with ``method=``, so they are cached like any
    teacher (keyed by the loss, the data fingerprints, every setting, the device type and the CPU
    thread count).
    """
    import functools

    from ..train import train_teacher

    if kind not in TASK_KINDS:
        raise ValueError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    if kind == "segmentation":
        num_classes = num_classes if num_classes is not None else getattr(train_data, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"a segmentation teacher needs num_classes >= 2 (the number of mask classes), got "
                             f"{num_classes!r}")
        out, arch_kwargs = num_classes, {"widths": list(widths)}
        method, monitor = functools.partial(Segmentation, num_classes=num_classes, ignore_index=ignore_index), "val/mIoU"
    else:
        out, arch_kwargs = 3, {"widths": list(widths), "output": "sigmoid"}
        method, monitor = Reconstruction, "val/loss"
    return train_teacher("segnet_small", train_data, val_data, num_classes=out, epochs=epochs, lr=lr,
                         batch_size=batch_size, optimizer="adam", weight_decay=weight_decay, schedule=schedule,
                         seed=seed, arch_kwargs=arch_kwargs, cache=cache, device=device, progress=progress,
                         method=method, monitor=monitor if val_data is not None else "train/loss")


def load_splits(data: str = "embedded", *, root=None, n: int = 1200, size=32, seed: int = 0,
                val: float = 0.15, test: float = 0.15) -> dict:
    """Train/val/test splits for the recombination notebook, and what the metrics need.

    ``data="embedded"``: :func:`kaviz.data.scenes` (``n`` images of ``size``² px, 11 mask classes:
    background + 10 shapes), split at random by ``seed``. ``data="camvid"``: the CamVid folder
    ``root`` (SegNet layout, 11 classes, void → 255) with its own train/val/test splits, images
    resized to ``size`` (an int or (H, W); both divisible by 8) and **not** ImageNet-normalised
    (the autoencoder reconstructs pixels in [0, 1]); random crop + flip on ``train`` only.
    Returns ``{"train", "val", "test", "num_classes", "class_names", "ignore_index"}``.
    """
    from ..data import scenes, split

    if data == "embedded":
        if not isinstance(size, int):
            raise ValueError(f"the embedded scenes are square: size must be an int, got {size!r}")
        ds = scenes(n=n, seed=seed, size=size)
        parts = split(ds, val=val, test=test, seed=seed)
        names = list(ds.info["mask_classes"])
        return {"train": parts.train, "val": parts.val, "test": parts.test, "num_classes": len(names),
                "class_names": names, "ignore_index": IGNORE_INDEX}
    if data == "camvid":
        from ..data.real import CAMVID_CLASSES, JointTransform, camvid

        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or any(s % 8 for s in hw):
            raise ValueError(f"size must be divisible by 8 (three ×½ stages), got {size!r}")
        out = {s: camvid(root, s, image_size=hw, transform=JointTransform(hw, train=s == "train", normalize=False))
               for s in ("train", "val", "test")}
        return {**out, "num_classes": len(CAMVID_CLASSES), "class_names": list(CAMVID_CLASSES),
                "ignore_index": IGNORE_INDEX}
    raise ValueError(f"data must be 'embedded' or 'camvid', got {data!r}")


# ------------------------------------------------------------------------------------------------
# the combined network
# ------------------------------------------------------------------------------------------------
class Quantiser(nn.Module):
    """Uniform scalar quantiser with a straight-through gradient.

    Forward: ``q(z) = Δ·round(z/Δ)`` (integer symbols ``round(z/Δ)``); backward: ``∂q/∂z = 1``
    (the identity straight-through estimator, Bengio et al. 2013, used for learned compression by
    Theis et al. 2017). ``step=None`` or 0 disables it; :meth:`disabled` turns it off temporarily.
    """

    def __init__(self, step: float | None = 0.05):
        super().__init__()
        if step is not None and (not isinstance(step, (int, float)) or isinstance(step, bool) or step < 0):
            raise ValueError(f"quantiser step must be a number >= 0 (or None for no quantisation), got {step!r}")
        self.step = float(step) if step else 0.0
        self.enabled = True

    @property
    def active(self) -> bool:
        return self.enabled and self.step > 0

    def forward(self, z):
        if not self.active:
            return z
        q = torch.round(z / self.step) * self.step
        return z + (q - z).detach()

    def symbols(self, z) -> torch.Tensor:
        """The integer symbols an entropy coder would transmit (``z`` itself rounded when off)."""
        return torch.round(z / self.step).long() if self.step > 0 else torch.round(z).long()

    @contextlib.contextmanager
    def disabled(self):
        old = self.enabled
        try:
            self.enabled = False
            yield self
        finally:
            self.enabled = old

    def extra_repr(self):
        return f"step={self.step}"


class TaskDecoder(nn.Module):
    """A teacher's own decoder (``dec3 dec2 dec1 head``, copied) behind the shared code:
    ``TaskDecoder(teacher)(teacher.encode(x)[0], size) == teacher(x)``."""

    def __init__(self, teacher: SegNetSmall):
        super().__init__()
        self.dec3 = copy.deepcopy(teacher.dec3)
        self.dec2 = copy.deepcopy(teacher.dec2)
        self.dec1 = copy.deepcopy(teacher.dec1)
        self.head = copy.deepcopy(teacher.head)
        self.output = teacher.output

    def forward(self, z, size=None):
        d = self.dec1(self.dec2(self.dec3(z)))
        if size is not None and tuple(d.shape[-2:]) != tuple(size):
            d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        out = self.head(d)
        return torch.sigmoid(out) if self.output == "sigmoid" else out


_BLOCKS = ("enc1", "enc2", "enc3")
_DEC = ("dec3", "dec2", "dec1")


@dataclass(frozen=True)
class PruneUnit:
    """A prunable conv (dotted name), its batch norm (or None) and the convs reading its output."""

    conv: str
    bn: str | None
    consumers: tuple[str, ...]
    group: str


class RecombinedNet(nn.Module):
    """Block-diagonally combined encoder → shared 1×1 bottleneck → quantiser → per-task 1×1
    adaptor → the teacher's decoder. Built by :func:`combine`; ``forward(x)`` returns
    ``{task: output}`` (reconstruction in [0, 1], segmentation logits).

    ``offsets[block][t]`` is teacher t's channel range in a combined encoder block (valid until
    the first pruning round); ``kinds`` maps each task to ``"reconstruction"``/``"segmentation"``.
    """

    def __init__(self, blocks: Mapping[str, EncoderBlock], bottleneck: nn.Conv2d, quantiser: Quantiser,
                 adaptors: Mapping[str, nn.Conv2d], decoders: Mapping[str, TaskDecoder], kinds: Mapping[str, str],
                 in_channels: int, offsets: Mapping[str, list], identity_bottleneck: bool):
        super().__init__()
        for name in _BLOCKS:
            self.add_module(name, blocks[name])
        self.bottleneck = bottleneck
        self.quantiser = quantiser
        self.adaptors = nn.ModuleDict(dict(adaptors))
        self.decoders = nn.ModuleDict(dict(decoders))
        self.kinds = dict(kinds)
        self.tasks = list(kinds)
        self.in_channels = int(in_channels)
        self.offsets = {k: list(v) for k, v in offsets.items()}
        self.identity_bottleneck = bool(identity_bottleneck)
        self.pruned_rounds = 0
        # which teacher each output channel of the combined convs came from (kept through pruning);
        # a teacher's encoder block has conv1 and conv2 of one width, so both share the block's ranges
        self.origins: dict[str, torch.Tensor] = {}
        for b, ranges in self.offsets.items():
            sizes = torch.tensor([hi - lo for lo, hi in ranges])
            for conv in ("conv1", "conv2"):
                self.origins[f"{b}.{conv}"] = torch.repeat_interleave(torch.arange(len(ranges)), sizes)
        if self.identity_bottleneck:
            self.origins["bottleneck"] = self.origins["enc3.conv2"].clone()

    @property
    def n_teachers(self) -> int:
        return len(self.tasks)

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got {tuple(x.shape)}; the network "
                             "repeats the image once per teacher itself, so pass the plain image")
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"height and width must be divisible by 8 (three ×½ stages), got {tuple(x.shape[-2:])}")

    def encode(self, x):
        """The combined encoder's output (before the bottleneck) for plain images ``x``."""
        self._check_input(x)
        h = x.repeat(1, self.n_teachers, 1, 1)  # teacher t reads input channels 3t..3t+2
        for name in _BLOCKS:
            h = getattr(self, name)(h)
        return h

    def code(self, x):
        """The quantised shared code ``q(bottleneck(encode(x)))``."""
        return self.quantiser(self.bottleneck(self.encode(x)))

    def decode(self, code, size=None):
        """``{task: decoder_t(adaptor_t(code))}``, resized to ``size`` (H, W) when given."""
        return {t: self.decoders[t](self.adaptors[t](code), size=size) for t in self.tasks}

    def forward(self, x):
        return self.decode(self.code(x), size=x.shape[-2:])

    def prune_units(self, groups: Sequence[str] = PRUNE_GROUPS) -> list[PruneUnit]:
        """The prunable convs of the given groups, in forward order (see :data:`PRUNE_GROUPS`)."""
        unknown = [g for g in groups if g not in PRUNE_GROUPS]
        if unknown:
            raise ValueError(f"unknown prune groups {unknown}; choose among {PRUNE_GROUPS}")
        units = []
        if "encoder" in groups:
            for i, b in enumerate(_BLOCKS):
                nxt = f"{_BLOCKS[i + 1]}.conv1" if i + 1 < len(_BLOCKS) else "bottleneck"
                units.append(PruneUnit(f"{b}.conv1", f"{b}.bn1", (f"{b}.conv2",), "encoder"))
                units.append(PruneUnit(f"{b}.conv2", f"{b}.bn2", (nxt,), "encoder"))
        if "bottleneck" in groups:
            units.append(PruneUnit("bottleneck", None, tuple(f"adaptors.{t}" for t in self.tasks), "bottleneck"))
        if "adaptors" in groups:
            for t in self.tasks:
                units.append(PruneUnit(f"adaptors.{t}", None, (f"decoders.{t}.dec3.conv1",), "adaptors"))
        if "decoders" in groups:
            for t in self.tasks:
                for i, d in enumerate(_DEC):
                    nxt = f"decoders.{t}.{_DEC[i + 1]}.conv1" if i + 1 < len(_DEC) else f"decoders.{t}.head"
                    p = f"decoders.{t}.{d}"
                    units.append(PruneUnit(f"{p}.conv1", f"{p}.bn1", (f"{p}.conv2",), "decoders"))
                    units.append(PruneUnit(f"{p}.conv2", f"{p}.bn2", (nxt,), "decoders"))
        return units

    def widths(self) -> dict:
        """Output channels of every prunable conv (``{dotted name: channels}``)."""
        return {u.conv: self.get_submodule(u.conv).out_channels for u in self.prune_units()}

    def code_channels(self) -> int:
        return self.bottleneck.out_channels


def _is_segnet(m) -> bool:
    return (all(isinstance(getattr(m, b, None), EncoderBlock) for b in _BLOCKS)
            and all(hasattr(m, d) for d in (*_DEC, "head")))


def _check_teachers(teachers) -> dict:
    from ..train import Frozen

    if not isinstance(teachers, Mapping) or not teachers:
        raise TypeError("teachers must be a non-empty dict {task name: teacher}, e.g. "
                        "{'reconstruction': autoencoder, 'segmentation': segmenter}")
    out = {}
    for name, t in teachers.items():
        t = t.module if isinstance(t, Frozen) else t
        if not _is_segnet(t):
            raise TypeError(f"teacher {name!r} ({type(t).__name__}) is not a SegNet-like encoder-decoder with blocks "
                            "enc1..enc3, dec3..dec1 and head; build it with kaviz.models.build('segnet_small', ...)")
        if getattr(t, "skips", False):
            raise ValueError(f"teacher {name!r} has skip connections (skips=True): its decoder needs its own encoder's "
                             "intermediate features, so it cannot sit behind a shared code. Use skips=False teachers.")
        out[str(name)] = t
    return out


def _kinds(teachers: Mapping[str, nn.Module], kinds: Mapping[str, str] | None) -> dict:
    out = {}
    kinds = dict(kinds or {})
    unknown = [k for k in kinds if k not in teachers]
    if unknown:
        raise ValueError(f"kinds names tasks {unknown} that are not among the teachers {list(teachers)}")
    for name, t in teachers.items():
        kind = kinds.get(name) or ("reconstruction" if getattr(t, "output", None) == "sigmoid" else "segmentation")
        if kind not in TASK_KINDS:
            raise ValueError(f"task {name!r}: kind must be one of {TASK_KINDS}, got {kind!r}")
        if kind == "segmentation" and t.head.out_channels < 2:
            raise ValueError(f"teacher {name!r} has {t.head.out_channels} output channel: not a segmentation teacher "
                             "(class logits). Only reconstruction and segmentation teachers are supported.")
        if kind == "reconstruction" and t.head.out_channels != t.enc1.conv1.in_channels:
            raise ValueError(f"teacher {name!r} outputs {t.head.out_channels} channels for "
                             f"{t.enc1.conv1.in_channels}-channel images: not an autoencoder")
        out[name] = kind
    return out


def _block_diagonal_conv(convs: Sequence[nn.Conv2d], offset_bug: bool = False) -> nn.Conv2d:
    """One conv whose weight holds each ``convs[t].weight`` at output offset Σ_{s<t} C_out^s and input
    offset Σ_{s<t} C_in^s (0 for every teacher when ``offset_bug``), zeros elsewhere."""
    first = convs[0]
    for c in convs[1:]:
        for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
            if getattr(c, attr) != getattr(first, attr):
                raise ValueError(f"teacher convs differ in {attr} ({getattr(first, attr)} vs {getattr(c, attr)}); "
                                 "block-diagonal combination needs the same layer hyper-parameters")
        if (c.bias is None) != (first.bias is None):
            raise ValueError("some teacher convs have a bias and others not; cannot combine them")
    if first.groups != 1:
        raise ValueError("grouped convolutions are not supported by the block-diagonal combination")
    cin, cout = sum(c.in_channels for c in convs), sum(c.out_channels for c in convs)
    new = nn.Conv2d(cin, cout, first.kernel_size, first.stride, first.padding, first.dilation,
                    bias=first.bias is not None, padding_mode=first.padding_mode,
                    device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        o = i = 0
        for c in convs:
            i0 = 0 if offset_bug else i
            new.weight[o:o + c.out_channels, i0:i0 + c.in_channels] = c.weight
            if c.bias is not None:
                new.bias[o:o + c.out_channels] = c.bias
            o += c.out_channels
            i += c.in_channels
    return new


def _factory(bn: nn.BatchNorm2d) -> dict:
    """``device``/``dtype`` of a batch norm's floating tensors, so a new one matches it (a float64
    network stays float64: combine() and prune() on ``.double()`` teachers)."""
    ref = bn.weight if bn.affine else bn.running_mean
    return {} if ref is None else {"device": ref.device, "dtype": ref.dtype}


def _concat_bn(bns: Sequence[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    first = bns[0]
    for b in bns[1:]:
        if b.eps != first.eps or b.affine != first.affine or b.track_running_stats != first.track_running_stats:
            raise ValueError("teacher batch norms differ in eps/affine/track_running_stats; cannot concatenate them")
    new = nn.BatchNorm2d(sum(b.num_features for b in bns), eps=first.eps, momentum=first.momentum,
                         affine=first.affine, track_running_stats=first.track_running_stats,
                         **_factory(first))
    with torch.no_grad():
        if first.affine:
            new.weight.copy_(torch.cat([b.weight for b in bns]))
            new.bias.copy_(torch.cat([b.bias for b in bns]))
        if first.track_running_stats:
            new.running_mean.copy_(torch.cat([b.running_mean for b in bns]))
            new.running_var.copy_(torch.cat([b.running_var for b in bns]))
            new.num_batches_tracked.copy_(max(b.num_batches_tracked for b in bns))
    return new


def combine(teachers: Mapping[str, nn.Module], *, kinds: Mapping[str, str] | None = None,
            bottleneck: int | None = None, quant_step: float | None = 0.05,
            offset_bug: bool = False) -> RecombinedNet:
    """Combine SegNet-like teachers ``{task: teacher}`` into one :class:`RecombinedNet` (SPEC §4.3).

    The encoders are combined block-diagonally at each teacher's output and input offsets (BN
    concatenated, image repeated per teacher); ``bottleneck`` is the shared code width (default
    ΣC of the last encoder block, identity-initialised; a smaller width is randomly initialised and
    must be learned); ``quant_step`` is the quantiser's Δ (None: no quantisation); each task gets a
    1×1 adaptor (selecting its teacher's channels when the bottleneck is the identity) and a copy of
    its teacher's decoder. ``kinds`` overrides the task kind inferred from each teacher
    (``output="sigmoid"`` → reconstruction, else segmentation). The teachers are not modified.
    ``offset_bug=True`` reproduces the reference's input-offset bug (every teacher at input offset
    0), for the reproduction check only.
    """
    teachers = _check_teachers(teachers)
    kinds = _kinds(teachers, kinds)
    models = list(teachers.values())
    cins = {t.enc1.conv1.in_channels for t in models}
    if len(cins) != 1:
        raise ValueError(f"the teachers read images with different channel counts {sorted(cins)}; they must see the "
                         "same image")
    dtypes = {name: t.enc1.conv1.weight.dtype for name, t in teachers.items()}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"the teachers hold different dtypes {dtypes}; convert them alike first "
                         "(e.g. teacher.float() or teacher.double())")
    blocks, offsets = {}, {}
    for b in _BLOCKS:
        src = [getattr(t, b) for t in models]
        blk = copy.deepcopy(src[0])  # keeps the block's ReLU and pooling modules
        blk.conv1 = _block_diagonal_conv([s.conv1 for s in src], offset_bug)
        blk.bn1 = _concat_bn([s.bn1 for s in src])
        blk.conv2 = _block_diagonal_conv([s.conv2 for s in src], offset_bug)
        blk.bn2 = _concat_bn([s.bn2 for s in src])
        blocks[b] = blk
        o, rng = 0, []
        for s in src:
            rng.append((o, o + s.conv2.out_channels))
            o += s.conv2.out_channels
        offsets[b] = rng
    width = blocks["enc3"].conv2.out_channels
    code = width if bottleneck is None else int(bottleneck)
    if code < 1:
        raise ValueError(f"bottleneck must be a positive number of channels, got {bottleneck!r}")
    identity = code == width
    ref = models[0].enc1.conv1.weight
    neck = nn.Conv2d(width, code, 1, bias=True, device=ref.device, dtype=ref.dtype)
    adaptors = {}
    with torch.no_grad():
        if identity:
            neck.weight.zero_()
            neck.weight[:, :, 0, 0] = torch.eye(width, dtype=ref.dtype)
            neck.bias.zero_()
        for (task, t), (lo, hi) in zip(teachers.items(), offsets["enc3"]):
            a = nn.Conv2d(code, hi - lo, 1, bias=True, device=ref.device, dtype=ref.dtype)
            if identity:
                a.weight.zero_()
                a.weight[:, lo:hi, 0, 0] = torch.eye(hi - lo, dtype=ref.dtype)
                a.bias.zero_()
            adaptors[task] = a
    decoders = {task: TaskDecoder(t) for task, t in teachers.items()}
    net = RecombinedNet(blocks, neck, Quantiser(quant_step), adaptors, decoders, kinds, cins.pop(), offsets, identity)
    return net.train(any(t.training for t in models))


def reproduction_check(net: RecombinedNet, teachers: Mapping[str, nn.Module], images: torch.Tensor):
    """Compare the combined network with each teacher on ``images`` (eval mode, no gradients).

    One row per teacher and encoder block: channels ``offsets[block][t]`` of the combined block
    against the teacher's block output, ``max_abs_diff``, the feature scale ``max_abs`` and whether
    they are bit-identical (``exact``). When the bottleneck is the identity, one more row per task
    (``layer="output"``): the task output with the quantiser off against the teacher's output.
    Valid before pruning (afterwards the teachers' channels are mixed and removed).
    """
    import pandas as pd

    from ..features import FeatureTap, eval_mode

    teachers = _check_teachers(teachers)
    if list(teachers) != net.tasks:
        raise ValueError(f"teachers {list(teachers)} must be the tasks the network was combined from, in order: "
                         f"{net.tasks}")
    if net.pruned_rounds:
        raise ValueError("the network has been pruned: its channels no longer correspond to the teachers' "
                         "(run the check right after combine())")
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(eval_mode(net))
        stack.enter_context(net.quantiser.disabled())
        tap = stack.enter_context(FeatureTap(net, list(_BLOCKS)))
        out = net(images)
        combined = {b: tap[b] for b in _BLOCKS}
        for k, (task, t) in enumerate(teachers.items()):
            with eval_mode(t), FeatureTap(t, list(_BLOCKS)) as ttap:
                t_out = t(images)
                feats = {b: ttap[b] for b in _BLOCKS}
            pairs = [(b, combined[b][:, slice(*net.offsets[b][k])], feats[b], net.offsets[b][k]) for b in _BLOCKS]
            if net.identity_bottleneck:
                pairs.append(("output", out[task], t_out, None))
            for layer, a, b, rng in pairs:
                diff = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
                rows.append({"teacher": task, "layer": layer,
                             "channels": f"{rng[0]}:{rng[1]}" if rng else "",
                             "max_abs_diff": diff, "max_abs": b.abs().max().item(),
                             "exact": bool(a.shape == b.shape and torch.equal(a, b))})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# pruning
# ------------------------------------------------------------------------------------------------
def filter_l1(conv: nn.Conv2d) -> torch.Tensor:
    """L1 norm of every filter (output channel) of a conv: ``Σ_{i,h,w} |W[o, i, h, w]|``."""
    return conv.weight.detach().abs().sum(dim=(1, 2, 3))


def _set(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _conv_like(old: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    new = nn.Conv2d(weight.shape[1], weight.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=bias is not None, padding_mode=old.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
    return new


def _bn_like(old: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=old.eps, momentum=old.momentum, affine=old.affine,
                         track_running_stats=old.track_running_stats, **_factory(old))
    with torch.no_grad():
        if old.affine:
            new.weight.copy_(old.weight[keep])
            new.bias.copy_(old.bias[keep])
        if old.track_running_stats:
            new.running_mean.copy_(old.running_mean[keep])
            new.running_var.copy_(old.running_var[keep])
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.train(old.training)
    return new


def prune(net: RecombinedNet, fraction: float, *, groups: Sequence[str] = DEFAULT_GROUPS, criterion: str = "smallest",
          min_channels: int = 2, seed: int = 0):
    """One pruning round, in place: in every prunable conv of ``groups``, remove
    ``round(fraction · C)`` of its C filters (never going below ``min_channels``), chosen by L1 norm
    — ``criterion="smallest"`` (the method), ``"largest"`` (a reference version's bug),
    ``"random"`` (a baseline) or ``"bn-scaled"`` (the smallest L1 norm of the filter with its batch
    norm folded in, ``‖W_o‖₁·|γ_o|/√(σ²_o+ε)``: a batch norm after the conv undoes any scale of
    ``W_o``, so the raw norm says little about what the channel contributes) — together with the
    dependent batch-norm channels and the input channels of the convs that read them. All norms
    are measured before anything is removed.

    Returns a DataFrame, one row per conv: ``layer, group, before, after, max_removed_l1,
    min_kept_l1`` (for ``"smallest"``: ``max_removed_l1 <= min_kept_l1``) and, for the combined
    encoder convs (and an identity-initialised bottleneck), ``kept/<task>``: how many of the kept
    filters descend from each teacher's filters (``net.origins`` follows them through the rounds).
    """
    import pandas as pd

    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1) (the share of filters removed per round), got {fraction!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
    units = net.prune_units(groups)
    gen = torch.Generator().manual_seed(seed)
    plan = []
    for u in units:
        conv = net.get_submodule(u.conv)
        norms = filter_l1(conv).cpu()
        if criterion == "bn-scaled" and u.bn is not None:
            bn = net.get_submodule(u.bn)
            norms = norms * (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).cpu()
        c = len(norms)
        n_remove = min(int(math.floor(fraction * c + 0.5)), max(0, c - min_channels))
        if criterion == "random":
            order = torch.randperm(c, generator=gen)
        else:
            # stable sort: among equal norms the earlier filter goes first
            order = torch.sort(norms, stable=True, descending=criterion == "largest").indices
        removed = order[:n_remove]
        keep = torch.sort(order[n_remove:]).values
        plan.append((u, keep, norms, removed))
    rows = []
    # two passes: consumers are sliced with the plan of their producer (and a conv can be both)
    new_weights = {u.conv: net.get_submodule(u.conv).weight.detach()[keep] for u, keep, _, _ in plan}
    new_bias = {u.conv: (net.get_submodule(u.conv).bias.detach()[keep]
                         if net.get_submodule(u.conv).bias is not None else None) for u, keep, _, _ in plan}
    for u, keep, _, _ in plan:
        for cname in u.consumers:
            w = new_weights.get(cname)
            if w is None:
                w = net.get_submodule(cname).weight.detach()
                new_bias[cname] = net.get_submodule(cname).bias.detach() if net.get_submodule(cname).bias is not None else None
            new_weights[cname] = w[:, keep.to(w.device)]
    for name, w in new_weights.items():
        _set(net, name, _conv_like(net.get_submodule(name), w, new_bias[name]))
    for u, keep, norms, removed in plan:
        if u.bn is not None:
            _set(net, u.bn, _bn_like(net.get_submodule(u.bn), keep.to(net.get_submodule(u.bn).running_mean.device)))
        row = {"layer": u.conv, "group": u.group, "before": len(norms), "after": len(keep),
               "max_removed_l1": float(norms[removed].max()) if len(removed) else float("nan"),
               "min_kept_l1": float(norms[keep].min()) if len(keep) else float("nan")}
        origin = net.origins.get(u.conv)
        if origin is not None:
            for k, task in enumerate(net.tasks):
                row[f"kept/{task}"] = int((origin[keep] == k).sum())
            net.origins[u.conv] = origin[keep]
        rows.append(row)
    net.pruned_rounds += 1
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# retraining and evaluation
# ------------------------------------------------------------------------------------------------
class RecombinationLoss(nn.Module):
    """The retraining objective of a :class:`RecombinedNet` (label-free).

    Reconstruction tasks: ``l1 = mean |x̂ − x|`` and ``ssim_loss = 1 − SSIM(x̂, x)``; segmentation tasks:
    ``kd = soft_ce`` per pixel against the frozen segmentation teacher's logits at temperature
    ``T``. Term names get a ``<task>_`` prefix when two tasks share a kind. ``evaluate`` reports
    :func:`evaluate_dense` on the given data (ground-truth masks, for monitoring only: the default
    model selection is on ``val/loss``, which needs no labels).
    """

    def __init__(self, net: RecombinedNet, teachers: Mapping[str, nn.Module], *, T: float = 1.0,
                 num_classes: int | None = None, ignore_index: int = IGNORE_INDEX,
                 weights: Mapping[str, float] | None = None):
        super().__init__()
        teachers = _check_teachers(teachers)
        missing = [t for t, k in net.kinds.items() if k == "segmentation" and t not in teachers]
        if missing:
            raise ValueError(f"segmentation tasks {missing} need their teacher for the soft targets")
        if T <= 0:
            raise ValueError(f"temperature T must be positive, got {T}")
        self.net = net
        self.teachers = nn.ModuleDict({t: freeze(m) for t, m in teachers.items() if net.kinds.get(t) == "segmentation"})
        self.T = float(T)
        seg = [t for t, k in net.kinds.items() if k == "segmentation"]
        self.num_classes = num_classes if num_classes is not None else (
            net.decoders[seg[0]].head.out_channels if seg else None)
        self.ignore_index = ignore_index
        counts = {k: list(net.kinds.values()).count(k) for k in TASK_KINDS}
        self._names = {}
        for task, kind in net.kinds.items():
            terms = ("l1", "ssim_loss") if kind == "reconstruction" else ("kd",)
            self._names[task] = {t: (f"{task}_{t}" if counts[kind] > 1 else t) for t in terms}
        self.loss_weights = {n: 1.0 for names in self._names.values() for n in names.values()}
        if weights:
            unknown = [k for k in weights if k not in self.loss_weights]
            if unknown:
                raise ValueError(f"unknown loss terms {unknown}; terms are {list(self.loss_weights)}")
            self.loss_weights.update({k: float(v) for k, v in weights.items()})

    def forward(self, batch):
        x = images_of(batch)
        out = self.net(x)
        terms = {}
        for task, kind in self.net.kinds.items():
            names = self._names[task]
            if kind == "reconstruction":
                terms[names["l1"]] = (out[task] - x).abs().mean()
                terms[names["ssim_loss"]] = ssim_loss(out[task], x)
            else:
                s = out[task]
                t = self.teachers[task](x)
                k = s.shape[1]
                terms[names["kd"]] = soft_cross_entropy(s.permute(0, 2, 3, 1).reshape(-1, k),
                                                        t.permute(0, 2, 3, 1).reshape(-1, k), self.T)
        return terms

    def evaluate(self, data) -> dict:
        return evaluate_dense(self.net, data, num_classes=self.num_classes, ignore_index=self.ignore_index)


def _batches(data, batch_size):
    from torch.utils.data import DataLoader

    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in loader:
        x = images_of(batch)
        try:
            mask = _mask_of(batch)
        except KeyError:
            mask = None
        yield x, mask


def _iou_from_confusion(cm: np.ndarray) -> dict:
    # same definitions as kaviz.metrics.segmentation_scores, from a confusion matrix summed over batches
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"pixel_accuracy": float(tp.sum() / max(cm.sum(), 1)), "mIoU": float(np.nanmean(iou)), "iou": iou}


def _entropy_bits(hist: dict) -> float:
    bits = 0.0
    for counts in hist.values():
        c = np.fromiter(counts.values(), dtype=np.float64)
        p = c / c.sum()
        bits += float(-(p * np.log2(p)).sum())
    return bits


def evaluate_dense(model: nn.Module, data, *, kinds: Mapping[str, str] | None = None, num_classes: int | None = None,
                   ignore_index: int = IGNORE_INDEX, batch_size: int = 64, device=None, per_class: bool = False) -> dict:
    """Dense scores of ``model`` on ``data`` (eval mode, no gradients, mode restored).

    ``model`` returns ``{task: output}`` (a :class:`RecombinedNet`, kinds taken from it) or one
    tensor (pass ``kinds={"out": "reconstruction" | "segmentation"}``). Reconstruction: ``psnr``
    (dB, mean over images) and ``ssim`` against the input image; segmentation: ``mIoU`` and
    ``pixel_accuracy`` against the ground-truth masks (``ignore_index`` pixels left out; the
    confusion matrix is summed over batches). A :class:`RecombinedNet` also gets ``bpp``: the
    zeroth-order empirical entropy of its quantised code symbols (per channel, over ``data``) in
    bits per image pixel — the rate an ideal per-channel entropy coder would approach (no entropy
    model is learned). With two tasks of one kind the keys are prefixed ``<task>/``.
    """
    from .. import metrics
    from ..features import eval_mode

    if isinstance(model, RecombinedNet):
        kinds = dict(model.kinds)
    elif not kinds:
        raise ValueError("a single-output model needs kinds={'out': 'reconstruction' | 'segmentation'}")
    counts = {k: list(kinds.values()).count(k) for k in TASK_KINDS}
    seg_tasks = [t for t, k in kinds.items() if k == "segmentation"]
    if seg_tasks and num_classes is None:
        num_classes = (model.decoders[seg_tasks[0]].head.out_channels if isinstance(model, RecombinedNet)
                       else getattr(getattr(model, "head", None), "out_channels", None))
        if num_classes is None:
            raise ValueError("pass num_classes= for segmentation scores")
    dev = device if device is not None else next((p.device for p in model.parameters()), torch.device("cpu"))
    sums = {t: {"psnr": 0.0, "ssim": 0.0} for t, k in kinds.items() if k == "reconstruction"}
    cms = {t: np.zeros((num_classes, num_classes), dtype=np.int64) for t in seg_tasks}
    hist: dict = {}
    n = 0
    pixels = 0
    with eval_mode(model), torch.no_grad():
        for x, mask in _batches(data, batch_size):
            x = x.to(dev)
            if isinstance(model, RecombinedNet):
                z = model.bottleneck(model.encode(x))
                out = model.decode(model.quantiser(z), size=x.shape[-2:])
            else:
                out = model(x)
            if not isinstance(out, Mapping):
                if len(kinds) != 1:
                    raise ValueError(f"the model returns one tensor but kinds names {len(kinds)} tasks")
                out = {next(iter(kinds)): out}
            b = x.shape[0]
            for task, kind in kinds.items():
                y = out[task]
                if kind == "reconstruction":
                    yc = y.clamp(0, 1)
                    sums[task]["psnr"] += metrics.psnr(yc, x) * b
                    sums[task]["ssim"] += metrics.ssim(yc, x) * b
                else:
                    if mask is None:
                        raise KeyError("segmentation scores need ground-truth masks in the data "
                                       "(items (image, {'mask': ...}))")
                    pred = y.argmax(1).cpu().numpy().ravel()
                    t = mask.cpu().numpy().astype(np.int64).ravel()
                    valid = t != ignore_index
                    cms[task] += metrics.confusion_matrix(pred[valid], t[valid], num_classes)
            if isinstance(model, RecombinedNet) and model.quantiser.step > 0:
                sym = model.quantiser.symbols(z).cpu()
                flat = sym.transpose(0, 1).reshape(sym.shape[1], -1).numpy()
                for c in range(flat.shape[0]):
                    vals, cnt = np.unique(flat[c], return_counts=True)
                    h = hist.setdefault(c, {})
                    for v, k in zip(vals.tolist(), cnt.tolist()):
                        h[v] = h.get(v, 0) + k
                pixels += b * x.shape[-2] * x.shape[-1]
            n += b
    if n == 0:
        raise ValueError("evaluate_dense got empty data")
    out: dict = {}
    for task, s in sums.items():
        pre = f"{task}/" if counts["reconstruction"] > 1 else ""
        out[f"{pre}psnr"] = s["psnr"] / n
        out[f"{pre}ssim"] = s["ssim"] / n
    for task, cm in cms.items():
        pre = f"{task}/" if counts["segmentation"] > 1 else ""
        sc = _iou_from_confusion(cm)
        out[f"{pre}mIoU"] = sc["mIoU"]
        out[f"{pre}pixel_accuracy"] = sc["pixel_accuracy"]
        if per_class:
            out[f"{pre}iou"] = sc["iou"]
    if hist:
        # symbols per image: every channel at every code position; bits = Σ_c H_c · positions
        positions = sum(sum(h.values()) for h in hist.values()) / len(hist)
        out["bpp"] = _entropy_bits(hist) * positions / pixels
    return out


def _param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def teacher_scores(teachers: Mapping[str, nn.Module], data, *, num_classes: int | None = None,
                   ignore_index: int = IGNORE_INDEX, batch_size: int = 64):
    """One row per teacher: its task, kind, parameter count and :func:`evaluate_dense` scores."""
    import pandas as pd

    teachers = _check_teachers(teachers)
    kinds = _kinds(teachers, None)
    rows = []
    for task, t in teachers.items():
        s = evaluate_dense(t, data, kinds={"out": kinds[task]}, num_classes=num_classes,
                           ignore_index=ignore_index, batch_size=batch_size)
        rows.append({"teacher": task, "kind": kinds[task], "params": _param_count(t), **s})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------
# the whole procedure
# ------------------------------------------------------------------------------------------------
_SCORE_COLS = ("psnr", "ssim", "mIoU", "pixel_accuracy", "bpp")


@dataclass
class RecombinationResult:
    """What :func:`recombine` produced.

    ``scores``: one row per (stage, split) — ``round`` (0 = before pruning), ``stage``
    (``teachers``, ``combined``, ``fine-tuned``, ``pruned``, ``retrained``), ``split``, ``params``,
    ``code_channels``, ``best_epoch`` and the scores of :func:`evaluate_dense`. ``nets[r]``: the
    network after round r's (re)training (CPU); ``histories[r]``: its training history;
    ``pruning``: one row per pruned conv and round (see :func:`prune`).
    """

    scores: "object"
    nets: dict = field(default_factory=dict)
    histories: dict = field(default_factory=dict)
    pruning: "object" = None
    teachers: dict = field(default_factory=dict)
    num_classes: int | None = None

    def table(self, split: str = "test", stages: Sequence[str] | None = None):
        """The scores of one split, one row per stage, with a ``params_ratio`` column (parameters
        relative to the teachers together)."""
        s = self.scores
        if split not in set(s["split"]):
            raise ValueError(f"no scores for split {split!r}; have {sorted(set(s['split']))}")
        t = s[s["split"] == split].drop(columns="split").reset_index(drop=True)
        if stages is not None:
            t = t[t["stage"].isin(stages)].reset_index(drop=True)
        ref = s.loc[(s["stage"] == "teachers"), "params"]
        if len(ref):
            t.insert(t.columns.get_loc("params") + 1, "params_ratio", t["params"] / float(ref.iloc[0]))
        return t

    def panels(self, round: int, index: int, data) -> dict:
        """Input, ground truth, the teachers' and round ``round``'s outputs for image ``index`` of
        ``data``: ``{title: array}`` with RGB images (H, W, 3) in [0, 1] and label maps (H, W) int."""
        if round not in self.nets:
            raise KeyError(f"no network for round {round}; rounds: {sorted(self.nets)}")
        if not 0 <= index < len(data):
            raise IndexError(f"image index {index} out of range for {len(data)} images")
        x, target = data[index]
        x = x[None]
        net = self.nets[round]
        with torch.no_grad():
            out = net.eval()(x)
            t_out = {task: t.eval()(x) for task, t in self.teachers.items()}
        panels = {"input": x[0].permute(1, 2, 0).clamp(0, 1).numpy()}
        if isinstance(target, Mapping) and "mask" in target:
            panels["ground truth"] = target["mask"].numpy().astype(np.int64)
        for task, kind in net.kinds.items():
            for who, y in ((f"teacher {task}", t_out[task]), (f"round {round} {task}", out[task])):
                panels[who] = (y[0].permute(1, 2, 0).clamp(0, 1).numpy() if kind == "reconstruction"
                               else y[0].argmax(0).numpy().astype(np.int64))
        return panels


def _score_rows(net_or_teachers, stage, rnd, splits, num_classes, ignore_index, batch_size, extra):
    rows = []
    for split_name, data in splits.items():
        if data is None:
            continue
        if isinstance(net_or_teachers, RecombinedNet):
            s = evaluate_dense(net_or_teachers, data, num_classes=num_classes, ignore_index=ignore_index,
                               batch_size=batch_size)
            params, code = _param_count(net_or_teachers), net_or_teachers.code_channels()
        else:
            tab = teacher_scores(net_or_teachers, data, num_classes=num_classes, ignore_index=ignore_index,
                                 batch_size=batch_size)
            s = {c: tab[c].dropna().iloc[0] for c in tab.columns if c in _SCORE_COLS and tab[c].notna().any()}
            params = int(tab["params"].sum())
            code = sum(t.enc3.conv2.out_channels for t in net_or_teachers.values())
        rows.append({"round": rnd, "stage": stage, "split": split_name, "params": params, "code_channels": code,
                     **extra, **{k: float(v) for k, v in s.items() if k in _SCORE_COLS}})
    return rows


def recombine(teachers: Mapping[str, nn.Module], train_data, val_data, test_data=None, *, net: RecombinedNet | None = None,
              rounds: int = 3, fraction: float = 0.3, epochs: int = 2, finetune_epochs: int | None = None,
              groups: Sequence[str] = DEFAULT_GROUPS, criterion: str = "smallest", min_channels: int = 2,
              quant_step: float | None = 0.05, bottleneck: int | None = None, T: float = 1.0,
              weights: Mapping[str, float] | None = None, lr: float = 1e-3, batch_size: int = 32,
              num_classes: int | None = None, ignore_index: int = IGNORE_INDEX, seed: int = 0, device=None,
              progress: bool | None = None, eval_batch_size: int = 128) -> RecombinationResult:
    """Combine the teachers, fine-tune, then ``rounds`` times prune ``fraction`` of the filters and
    retrain ``epochs`` epochs (SPEC §4.3). Returns a :class:`RecombinationResult`.

    ``net``: a network from :func:`combine` (else one is built with ``quant_step`` and
    ``bottleneck``); it is trained and pruned in place. Round 0 fine-tunes the combined network for
    ``finetune_epochs`` (default ``epochs``) so that it adapts to the quantiser. Each (re)training is
    :func:`kaviz.train.fit` on :class:`RecombinationLoss` with the best epoch chosen on the
    validation loss (no labels); every stage is scored on ``val_data`` and ``test_data``.
    """
    import pandas as pd

    from ..train import fit

    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if val_data is None:
        raise ValueError("recombine needs val_data: each round's best epoch is chosen on the validation split")
    teachers = _check_teachers(teachers)
    for t in teachers.values():
        t.eval()
    if net is None:
        net = combine(teachers, quant_step=quant_step, bottleneck=bottleneck)
    elif list(net.kinds) != list(teachers):
        raise ValueError(f"net was combined from tasks {list(net.kinds)} but the teachers are {list(teachers)}")
    seg = [t for t, k in net.kinds.items() if k == "segmentation"]
    if seg and num_classes is None:
        num_classes = net.decoders[seg[0]].head.out_channels
    splits = {"val": val_data, "test": test_data}
    ev = dict(num_classes=num_classes, ignore_index=ignore_index, batch_size=eval_batch_size)
    rows = _score_rows(teachers, "teachers", 0, splits, extra={"best_epoch": np.nan}, **ev)
    rows += _score_rows(net, "combined", 0, splits, extra={"best_epoch": np.nan}, **ev)
    result = RecombinationResult(scores=None, teachers=dict(teachers), num_classes=num_classes)
    prune_logs = []

    def train(rnd, n_epochs):
        method = RecombinationLoss(net, teachers, T=T, num_classes=num_classes, ignore_index=ignore_index,
                                   weights=weights)
        hist = fit(method, train_data, val_data, epochs=n_epochs, lr=lr, batch_size=batch_size, seed=seed + rnd,
                   device=device, progress=progress, monitor="val/loss")
        result.histories[rnd] = hist
        result.nets[rnd] = copy.deepcopy(net).cpu().eval()
        return hist.attrs.get("best_epoch")

    best = train(0, finetune_epochs if finetune_epochs is not None else epochs)
    rows += _score_rows(net, "fine-tuned", 0, splits, extra={"best_epoch": best}, **ev)
    for r in range(1, rounds + 1):
        log = prune(net, fraction, groups=groups, criterion=criterion, min_channels=min_channels, seed=seed + r)
        prune_logs.append(log.assign(round=r))
        rows += _score_rows(net, "pruned", r, splits, extra={"best_epoch": np.nan}, **ev)
        best = train(r, epochs)
        rows += _score_rows(net, "retrained", r, splits, extra={"best_epoch": best}, **ev)
    result.scores = pd.DataFrame(rows)
    result.pruning = pd.concat(prune_logs, ignore_index=True) if prune_logs else pd.DataFrame()
    return result


def compare_criteria(net: RecombinedNet, data, fraction: float, *, criteria: Sequence[str] = CRITERIA,
                     groups: Sequence[str] = DEFAULT_GROUPS, min_channels: int = 2, seed: int = 0, **eval_kwargs):
    """One pruning step from copies of ``net`` with each criterion (no retraining), scored on ``data``
    with :func:`evaluate_dense`: how much each choice of filters breaks at once, and ``share/<task>``:
    the share of the kept combined-encoder filters that descend from each teacher. ``net`` is
    unchanged."""
    import pandas as pd

    rows = []
    for crit in criteria:
        trial = copy.deepcopy(net)
        log = prune(trial, fraction, groups=groups, criterion=crit, min_channels=min_channels, seed=seed)
        kept = {c.split("/", 1)[1]: log[c].sum() / log["after"][log[c].notna()].sum()
                for c in log.columns if c.startswith("kept/")}
        rows.append({"criterion": crit, "params": _param_count(trial), **evaluate_dense(trial, data, **eval_kwargs),
                     **{f"share/{t}": v for t, v in kept.items()}})
    return pd.DataFrame(rows)


def summarise(results: Sequence[RecombinationResult], split: str = "test"):
    """Mean ± std over seeds of :meth:`RecombinationResult.table` (one result per seed)."""
    import pandas as pd

    if not results:
        raise ValueError("summarise needs at least one result")
    tabs = [r.table(split).assign(seed=k) for k, r in enumerate(results)]
    df = pd.concat(tabs, ignore_index=True)
    cols = [c for c in df.columns if c not in ("round", "stage", "seed")]
    g = df.groupby(["round", "stage"], sort=False)[cols]
    mean, std = g.mean(), g.std(ddof=0).add_suffix("_std")
    return mean.join(std).reset_index()
