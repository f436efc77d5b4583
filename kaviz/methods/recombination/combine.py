"""Combining trained SegNet teachers into one RecombinedNet that reproduces every teacher exactly."""
from __future__ import annotations

import contextlib
import copy
import numbers
from typing import Mapping, Sequence

import torch
from torch import nn

from .network import ENCODER_BLOCKS, REFERENCE_BOTTLENECK, Conv1x1Block, Quantiser, RecombinedNet, TaskDecoder
from .tasks import check_segnet_teachers, task_kinds


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


def bn_factory(bn: nn.BatchNorm2d) -> dict:
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
                         **bn_factory(first))
    with torch.no_grad():
        if first.affine:
            new.weight.copy_(torch.cat([b.weight for b in bns]))
            new.bias.copy_(torch.cat([b.bias for b in bns]))
        if first.track_running_stats:
            new.running_mean.copy_(torch.cat([b.running_mean for b in bns]))
            new.running_var.copy_(torch.cat([b.running_var for b in bns]))
            new.num_batches_tracked.copy_(max(b.num_batches_tracked for b in bns))
    return new


def bottleneck_spec(bottleneck, bottleneck_norm) -> tuple[int | None, bool]:
    """Validate the bottleneck options of :func:`combine` / ``recombine``: ``(channels or None,
    norm)``; ``"reference"`` is ``(REFERENCE_BOTTLENECK, True)``."""
    if not isinstance(bottleneck_norm, bool):
        raise ValueError(f"bottleneck_norm must be True or False, got {bottleneck_norm!r}")
    if isinstance(bottleneck, str):
        if bottleneck != "reference":
            raise ValueError(f"bottleneck must be None (full width), a positive number of channels or 'reference' "
                             f"({REFERENCE_BOTTLENECK} channels with BN and LeakyReLU), got {bottleneck!r}")
        return REFERENCE_BOTTLENECK, True
    if bottleneck is None:
        return None, bottleneck_norm
    if isinstance(bottleneck, float) and bottleneck.is_integer():
        bottleneck = int(bottleneck)
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, numbers.Integral) or bottleneck < 1:
        raise ValueError(f"bottleneck must be a positive number of channels (an int; None for the full width, "
                         f"'reference' for {REFERENCE_BOTTLENECK} channels with BN and LeakyReLU), got {bottleneck!r}")
    return int(bottleneck), bottleneck_norm


def combine(teachers: Mapping[str, nn.Module], *, kinds: Mapping[str, str] | None = None,
            bottleneck: int | str | None = None, quant_step: float | None = 0.05,
            offset_bug: bool = False, bottleneck_norm: bool = False, seed: int | None = None) -> RecombinedNet:
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

    ``bottleneck_norm=True`` builds the reference code's bottleneck instead of one 1×1 conv: a
    :class:`Conv1x1Block` ``ΣC → code → code`` (1×1 conv, BN, LeakyReLU, 1×1 conv; the quantiser
    follows), and as each task's adaptor a block ``code → C_t → C_t`` (C_t: the teacher's last
    encoder width), all randomly initialised (PyTorch's defaults) — nothing reproduces the teachers
    until trained. ``bottleneck="reference"`` is ``bottleneck=16, bottleneck_norm=True``.
    ``seed``: build the network under this seed (the global RNG is restored afterwards); None draws
    from the global RNG, as before.
    """
    code_opt, norm = bottleneck_spec(bottleneck, bottleneck_norm)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int (or None for the global RNG), got {seed!r}")
        with torch.random.fork_rng():  # CPU and every visible CUDA device
            torch.manual_seed(seed)
            return combine(teachers, kinds=kinds, bottleneck=bottleneck, quant_step=quant_step, offset_bug=offset_bug,
                           bottleneck_norm=bottleneck_norm)
    teachers = check_segnet_teachers(teachers)
    kinds = task_kinds(teachers, kinds)
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
    for b in ENCODER_BLOCKS:
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
    code = width if code_opt is None else code_opt
    identity = code == width and not norm
    ref = models[0].enc1.conv1.weight
    if norm:
        f = {"device": ref.device, "dtype": ref.dtype}
        neck = Conv1x1Block(width, code, code, **f)
        adaptors = {task: Conv1x1Block(code, hi - lo, hi - lo, **f)
                    for task, (lo, hi) in zip(teachers, offsets["enc3"])}
    else:
        neck, adaptors = _plain_neck(teachers, offsets["enc3"], width, code, identity, ref)
    decoders = {task: TaskDecoder(t) for task, t in teachers.items()}
    net = RecombinedNet(blocks, neck, Quantiser(quant_step), adaptors, decoders, kinds, cins.pop(), offsets, identity)
    return net.train(any(t.training for t in models))


def _plain_neck(teachers, ranges, width, code, identity, ref):
    """kaviz's default bottleneck (one 1×1 conv with bias) and adaptors (one 1×1 conv per task),
    identity / channel-selecting when the code keeps the full width."""
    neck = nn.Conv2d(width, code, 1, bias=True, device=ref.device, dtype=ref.dtype)
    adaptors = {}
    with torch.no_grad():
        if identity:
            neck.weight.zero_()
            neck.weight[:, :, 0, 0] = torch.eye(width, dtype=ref.dtype)
            neck.bias.zero_()
        for task, (lo, hi) in zip(teachers, ranges):
            a = nn.Conv2d(code, hi - lo, 1, bias=True, device=ref.device, dtype=ref.dtype)
            if identity:
                a.weight.zero_()
                a.weight[:, lo:hi, 0, 0] = torch.eye(hi - lo, dtype=ref.dtype)
                a.bias.zero_()
            adaptors[task] = a
    return neck, adaptors


def reproduction_check(net: RecombinedNet, teachers: Mapping[str, nn.Module], images: torch.Tensor):
    """Compare the combined network with each teacher on ``images`` (eval mode, no gradients).

    One row per teacher and encoder block: channels ``offsets[block][t]`` of the combined block
    against the teacher's block output, ``max_abs_diff``, the feature scale ``max_abs`` and whether
    they are bit-identical (``exact``). When the bottleneck is the identity, one more row per task
    (``layer="output"``): the task output with the quantiser off against the teacher's output.
    Valid before pruning (afterwards the teachers' channels are mixed and removed).
    """
    import pandas as pd

    from ...features import FeatureTap, eval_mode

    teachers = check_segnet_teachers(teachers)
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
        tap = stack.enter_context(FeatureTap(net, list(ENCODER_BLOCKS)))
        out = net(images)
        combined = {b: tap[b] for b in ENCODER_BLOCKS}
        for k, (task, t) in enumerate(teachers.items()):
            with eval_mode(t), FeatureTap(t, list(ENCODER_BLOCKS)) as ttap:
                t_out = t(images)
                feats = {b: ttap[b] for b in ENCODER_BLOCKS}
            pairs = [(b, combined[b][:, slice(*net.offsets[b][k])], feats[b],
                      net.offsets[b][k]) for b in ENCODER_BLOCKS]
            if net.identity_bottleneck:
                pairs.append(("output", out[task], t_out, None))
            for layer, a, b, rng in pairs:
                diff = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
                rows.append({"teacher": task, "layer": layer,
                             "channels": f"{rng[0]}:{rng[1]}" if rng else "",
                             "max_abs_diff": diff, "max_abs": b.abs().max().item(),
                             "exact": bool(a.shape == b.shape and torch.equal(a, b))})
    return pd.DataFrame(rows)
