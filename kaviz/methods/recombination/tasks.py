"""Recombination tasks: the task kinds (reconstruction, segmentation) and the checks on SegNet teachers."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ...models.dense import EncoderBlock
from .network import DECODER_BLOCKS, ENCODER_BLOCKS

TASK_KINDS = ("reconstruction", "segmentation")
IGNORE_INDEX = 255

#: Recombination's SSIM window: 7×7, narrower than the standard 11×11 of :data:`kaviz.metrics.SSIM_WINDOW`,
#: kept so that the trained teachers, students and stored numbers of the notebook do not move (and a
#: 7×7 window still fits the 8×8 maps of the smallest test images).
SSIM_WINDOW = 7


def mask_of(batch) -> torch.Tensor:
    target = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
    if isinstance(target, Mapping) and "mask" in target:
        return target["mask"]
    if torch.is_tensor(target) and target.dim() == 3:
        return target
    raise KeyError("segmentation needs per-pixel class ids: batches (image, {'mask': (B, H, W)}) as "
                   "kaviz.data.scenes and kaviz.data.real.camvid give, or (image, mask (B, H, W))")


def is_segnet(m) -> bool:
    return (all(isinstance(getattr(m, b, None), EncoderBlock) for b in ENCODER_BLOCKS)
            and all(hasattr(m, d) for d in (*DECODER_BLOCKS, "head")))


def check_segnet_teachers(teachers) -> dict:
    from ...train import unfrozen

    if not isinstance(teachers, Mapping) or not teachers:
        raise TypeError("teachers must be a non-empty dict {task name: teacher}, e.g. "
                        "{'reconstruction': autoencoder, 'segmentation': segmenter}")
    out = {}
    for name, t in teachers.items():
        t = unfrozen(t)
        if not is_segnet(t):
            raise TypeError(f"teacher {name!r} ({type(t).__name__}) is not a SegNet-like encoder-decoder with blocks "
                            "enc1..enc3, dec3..dec1 and head; build it with kaviz.models.build('segnet_small', ...)")
        if getattr(t, "skips", False):
            raise ValueError(f"teacher {name!r} has skip connections (skips=True): its decoder needs its own encoder's "
                             "intermediate features, so it cannot sit behind a shared code. Use skips=False teachers.")
        out[str(name)] = t
    return out


def task_kinds(teachers: Mapping[str, nn.Module], kinds: Mapping[str, str] | None) -> dict:
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
