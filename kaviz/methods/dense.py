"""The one supervised method for dense models (per-pixel classes, depth or surface normals), shared by
the papers that train dense teachers (SBM, Recombination).

``DenseSupervised(model, task)``: ``{"ce": CE(logits, mask)}`` over the pixels whose label is not
``ignore_index`` (segmentation), ``{"l1": mean |d̂ − d|}`` over valid depth pixels (finite,
> ``min_depth``; NYUv2 stores 0 where the sensor saw nothing), or ``{"cos": mean (1 − cos(n̂, n))}``
over valid normal pixels (:func:`normals_loss`; the model's three output channels are a direction,
normalised only inside the loss). ``evaluate(data)`` streams the ground truth through
:class:`kaviz.metrics.SegmentationMeter` / :class:`kaviz.metrics.DepthMeter` /
:class:`kaviz.metrics.NormalMeter`.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..data import images_of
from ..metrics import dense_meter, depth_valid, normal_valid

__all__ = ["DENSE_KINDS", "DENSE_TARGET_KEYS", "IGNORE_INDEX", "DenseSupervised", "dense_scores", "normals_loss"]

#: Dense task kinds: per-pixel classes, per-pixel depth, per-pixel surface normals.
DENSE_KINDS = ("segmentation", "depth", "normals")
#: Ground-truth entry of a batch's target dict for each kind.
DENSE_TARGET_KEYS = {"segmentation": "mask", "depth": "depth", "normals": "normals"}
#: Void pixels (NYUv2, CamVid, VOC): never scored, never learnt.
IGNORE_INDEX = 255


def normals_loss(predictions: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``1 − cos(p, t)`` over the valid pixels (:func:`kaviz.metrics.normal_valid` of the
    targets, and ``valid`` (B, H, W) if given) between predicted and target normal maps (B, 3, H, W);
    neither needs unit length (both are normalised here, so a teacher's raw output is a target as it
    is). 0 for equal directions, 1 at 90°, 2 for opposite ones. Without a valid pixel: a zero that
    keeps the graph."""
    if predictions.dim() != 4 or predictions.shape[1] != 3:
        raise ValueError(f"normal predictions must be (B, 3, H, W), got {tuple(predictions.shape)}; a normals model "
                         "has three output channels")
    if targets.shape != predictions.shape:
        raise ValueError(f"normal targets {tuple(targets.shape)} must match the predictions "
                         f"{tuple(predictions.shape)}")
    m = normal_valid(targets)
    if valid is not None:
        m = m & valid.bool().reshape(m.shape)
    if not bool(m.any()):
        return (predictions * 0).sum()
    cos = F.cosine_similarity(predictions, torch.nan_to_num(targets.to(predictions.dtype)), dim=1, eps=1e-8)
    return (1 - cos)[m].mean()


def dense_scores(model: nn.Module, data, task: str, *, target_key: str | None = None, ignore_index: int = IGNORE_INDEX,
                 min_depth: float = 1e-3, batch_size: int = 64, device=None) -> dict:
    """The dense metrics of ``model`` (one map, or ``{task: map}``) against the ground truth of ``data``:
    ``pixel_accuracy`` and ``mIoU`` (segmentation), ``rmse``, ``abs_rel`` and ``delta1`` (depth) or
    :data:`kaviz.metrics.NORMAL_METRICS` (normals: mean / median angle, shares within 11.25°, 22.5°,
    30°), streamed batch by batch (eval mode, ``no_grad``, the mode restored)."""
    from ..features import eval_mode

    if task not in DENSE_KINDS:
        raise ValueError(f"task must be one of {DENSE_KINDS}, got {task!r}")
    target_key = target_key or DENSE_TARGET_KEYS[task]
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    meter = None
    with eval_mode(model), torch.no_grad():
        for batch in torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False):
            y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
            if not isinstance(y, Mapping) or target_key not in y:
                raise TypeError(f"dense scores need dense targets: batches (images, {{{target_key!r}: ...}})")
            out = model(images_of(batch).to(device))
            out = out[task] if isinstance(out, Mapping) else out
            if meter is None:
                meter = dense_meter(task, num_classes=out.shape[1] if task == "segmentation" else None,
                                    ignore_index=ignore_index, min_depth=min_depth)
            meter.update(out, y[target_key].cpu())
    if meter is None:
        raise ValueError("dense scores got empty data")
    return meter.result()


class DenseSupervised(nn.Module):
    """Supervised training of one dense model, for :func:`kaviz.train.fit` (see the module docstring).
    ``target_key`` defaults to ``"mask"`` / ``"depth"`` / ``"normals"``; for segmentation a plain ``(B, H, W)`` target
    (batches ``(images, mask)``) is accepted too. ``num_classes``, when given, is checked against the
    model's output channels."""

    def __init__(self, model: nn.Module, task: str = "segmentation", target_key: str | None = None,
                 ignore_index: int = IGNORE_INDEX, min_depth: float = 1e-3, num_classes: int | None = None):
        super().__init__()
        if task not in DENSE_KINDS:
            raise ValueError(f"task kind must be one of {DENSE_KINDS}, got {task!r}")
        self.model = model
        self.task = task
        self.target_key = target_key or DENSE_TARGET_KEYS[task]
        self.ignore_index = ignore_index
        self.min_depth = min_depth
        self.num_classes = None if num_classes is None else int(num_classes)

    def _target(self, batch):
        y = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        if isinstance(y, Mapping) and self.target_key in y:
            return y[self.target_key]
        if self.task == "segmentation" and torch.is_tensor(y) and y.dim() == 3:
            return y
        have = list(y) if isinstance(y, Mapping) else type(y).__name__
        raise KeyError(f"DenseSupervised({self.task!r}) needs batches (images, {{{self.target_key!r}: ...}}) or, for "
                       f"segmentation, (images, mask (B, H, W)); the targets are {have}. Pass target_key=... to name "
                       "the map to learn (kaviz.data.scenes and kaviz.data.real.camvid give {'mask': ...}).")

    def forward(self, batch):
        x, y = images_of(batch), self._target(batch)
        out = self.model(x)
        if self.task == "segmentation":
            if self.num_classes is not None and out.shape[1] != self.num_classes:
                raise ValueError(f"the model outputs {out.shape[1]} channels but num_classes is {self.num_classes}")
            return {"ce": F.cross_entropy(out, y.long(), ignore_index=self.ignore_index)}
        if self.task == "normals":
            if out.shape[1] != 3:
                raise ValueError(f"a normals model must output 3 channels (x, y, z), this one outputs {out.shape[1]}; "
                                 "build it with 3 output channels (segnet_small num_classes=3)")
            return {"cos": normals_loss(out, y)}
        pred = out[:, 0]
        valid = depth_valid(y, self.min_depth)
        if not bool(valid.any()):
            return {"l1": (pred * 0).sum()}  # keeps the graph: a batch without depth teaches nothing
        return {"l1": (pred - y).abs()[valid].mean()}

    def evaluate(self, data) -> dict:
        return dense_scores(self.model, data, self.task, target_key=self.target_key, ignore_index=self.ignore_index)
