"""Dense evaluation of recombined networks and teachers: PSNR, SSIM, mIoU, pixel accuracy, bits per pixel."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from ...data import images_of
from ...models import param_count
from .network import RecombinedNet
from .tasks import (
    IGNORE_INDEX,
    SSIM_WINDOW,
    TASK_KINDS,
    check_segnet_teachers,
    mask_of,
    task_kinds,
)


def _batches(data, batch_size):
    from torch.utils.data import DataLoader

    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in loader:
        x = images_of(batch)
        try:
            mask = mask_of(batch)
        except KeyError:
            mask = None
        yield x, mask


def _entropy_bits(hist: dict) -> float:
    bits = 0.0
    for counts in hist.values():
        c = np.fromiter(counts.values(), dtype=np.float64)
        p = c / c.sum()
        bits += float(-(p * np.log2(p)).sum())
    return bits


def evaluate_dense(model: nn.Module, data, *, kinds: Mapping[str, str] | None = None, num_classes: int | None = None,
                   ignore_index: int = IGNORE_INDEX, batch_size: int = 64, device=None,
                   per_class: bool = False, ms_ssim_weights=None) -> dict:
    """Dense scores of ``model`` on ``data`` (eval mode, no gradients, mode restored).

    ``model`` returns ``{task: output}`` (a :class:`RecombinedNet`, kinds taken from it) or one
    tensor (pass ``kinds={"out": "reconstruction" | "segmentation"}``). Reconstruction: ``psnr``
    (dB, mean over images) and ``ssim`` (7×7 window, :data:`SSIM_WINDOW`) against the input image; segmentation:
    ``mIoU`` and
    ``pixel_accuracy`` against the ground-truth masks (:class:`kaviz.metrics.SegmentationMeter`) (``ignore_index``
    pixels left out; the
    confusion matrix is summed over batches). A :class:`RecombinedNet` also gets ``bpp``: the
    zeroth-order empirical entropy of its quantised code symbols (per channel, over ``data``) in
    bits per image pixel — the rate an ideal per-channel entropy coder would approach (no entropy
    model is learned). With two tasks of one kind the keys are prefixed ``<task>/``.
    ``ms_ssim_weights`` (e.g. ``kaviz.metrics.MS_SSIM_WEIGHTS[:3]`` for small images): also report
    ``ms_ssim`` (:func:`kaviz.metrics.ms_ssim`, same 7×7 window) with these scale weights.
    """
    from ... import metrics
    from ...features import eval_mode

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
    sums = {t: {"psnr": 0.0, "ssim": 0.0, **({"ms_ssim": 0.0} if ms_ssim_weights is not None else {})}
            for t, k in kinds.items() if k == "reconstruction"}
    meters = {t: metrics.SegmentationMeter(num_classes, ignore_index) for t in seg_tasks}
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
                    sums[task]["ssim"] += metrics.ssim(yc, x, window=SSIM_WINDOW) * b
                    if ms_ssim_weights is not None:
                        sums[task]["ms_ssim"] += metrics.ms_ssim(yc, x, window=SSIM_WINDOW, weights=ms_ssim_weights) * b
                else:
                    if mask is None:
                        raise KeyError("segmentation scores need ground-truth masks in the data "
                                       "(items (image, {'mask': ...}))")
                    meters[task].update(y.argmax(1).cpu(), mask.cpu())
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
        for k, v in s.items():
            out[f"{pre}{k}"] = v / n
    for task, meter in meters.items():
        pre = f"{task}/" if counts["segmentation"] > 1 else ""
        sc = meter.result(per_class=True)
        out[f"{pre}mIoU"] = sc["mIoU"]
        out[f"{pre}pixel_accuracy"] = sc["pixel_accuracy"]
        if per_class:
            out[f"{pre}iou"] = sc["iou"]
    if hist:
        # symbols per image: every channel at every code position; bits = Σ_c H_c · positions
        positions = sum(sum(h.values()) for h in hist.values()) / len(hist)
        out["bpp"] = _entropy_bits(hist) * positions / pixels
    return out


def teacher_scores(teachers: Mapping[str, nn.Module], data, *, num_classes: int | None = None,
                   ignore_index: int = IGNORE_INDEX, batch_size: int = 64):
    """One row per teacher: its task, kind, parameter count and :func:`evaluate_dense` scores."""
    import pandas as pd

    teachers = check_segnet_teachers(teachers)
    kinds = task_kinds(teachers, None)
    rows = []
    for task, t in teachers.items():
        s = evaluate_dense(t, data, kinds={"out": kinds[task]}, num_classes=num_classes,
                           ignore_index=ignore_index, batch_size=batch_size)
        rows.append({"teacher": task, "kind": kinds[task], "params": param_count(t), **s})
    return pd.DataFrame(rows)


class ConstantDense(nn.Module):
    """The input-blind baseline of a recombined network: the same image (``image``, e.g. the mean
    training image) for every reconstruction task and the same class (``majority``) at every pixel
    for every segmentation task. ``forward(x)`` → ``{task: output}``."""

    def __init__(self, kinds: Mapping[str, str], image: torch.Tensor | None, num_classes: int | None,
                 majority: int | None):
        super().__init__()
        self.kinds = dict(kinds)
        self.register_buffer("image", image if image is not None else torch.zeros(0))
        self.num_classes, self.majority = num_classes, majority

    def forward(self, x):
        b, _, h, w = x.shape
        out = {}
        for task, kind in self.kinds.items():
            if kind == "reconstruction":
                if tuple(self.image.shape[-2:]) != (h, w):
                    raise ValueError(f"the constant image is {tuple(self.image.shape[-2:])}, the input {h}×{w}: "
                                     "score the constant baseline on images of the training size")
                out[task] = self.image.to(x.dtype).expand(b, *self.image.shape)
            else:
                logits = x.new_zeros(b, self.num_classes, h, w)
                logits[:, self.majority] = 1.0
                out[task] = logits
        return out


def constant_baseline(train_data, data, *, kinds: Mapping[str, str] | None = None, num_classes: int | None = None,
                      ignore_index: int = IGNORE_INDEX, batch_size: int = 64) -> dict:
    """What a network that ignores its input scores on ``data`` — the floor to show next to weak
    teachers: the **mean training image** (per pixel and channel, over ``train_data``) as every
    reconstruction (``psnr``, ``ssim``) and the **majority training class** (void pixels left out)
    at every pixel as every segmentation (``mIoU``, ``pixel_accuracy``), scored by
    :func:`evaluate_dense`. ``kinds`` default: ``{"reconstruction": "reconstruction",
    "segmentation": "segmentation"}`` (segmentation only when ``num_classes`` is given). Returns the
    scores and ``majority`` (the class id)."""
    from torch.utils.data import DataLoader

    if kinds is None:
        kinds = {"reconstruction": "reconstruction", **({"segmentation": "segmentation"} if num_classes else {})}
    kinds = {t: k for t, k in kinds.items()}
    bad = [k for k in kinds.values() if k not in TASK_KINDS]
    if bad:
        raise ValueError(f"kinds must be among {TASK_KINDS}, got {bad}")
    seg = "segmentation" in kinds.values()
    if seg and num_classes is None:
        raise ValueError("pass num_classes= for the majority-class segmentation baseline")
    total, n = None, 0
    counts = np.zeros(num_classes or 0, dtype=np.int64)
    for batch in DataLoader(train_data, batch_size=batch_size, shuffle=False):
        x = images_of(batch).double()
        total = x.sum(0) if total is None else total + x.sum(0)
        n += x.shape[0]
        if seg:
            m = mask_of(batch)
            m = m[m != ignore_index].reshape(-1).long()
            if len(m) and int(m.max()) >= num_classes:
                raise ValueError(f"a training mask holds class {int(m.max())} but num_classes is {num_classes}")
            counts += np.bincount(m.numpy(), minlength=num_classes)[:num_classes]
    if n == 0:
        raise ValueError("constant_baseline got empty training data")
    majority = int(counts.argmax()) if seg else None
    model = ConstantDense(kinds, (total / n).float(), num_classes, majority)
    scores = evaluate_dense(model, data, kinds=kinds, num_classes=num_classes, ignore_index=ignore_index,
                            batch_size=batch_size)
    return {**scores, "majority": majority}
