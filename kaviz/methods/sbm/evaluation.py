"""SBM evaluation: scoring students, teachers and the constant control; prediction panels."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...data import images_of
from .student import SBMStudent
from .tasks import IGNORE_INDEX, TARGET_KEYS, check_kind, depth_valid, normal_valid


def _outputs(model, x, task=None) -> dict[str, torch.Tensor]:
    out = model(x)
    if isinstance(out, Mapping):
        return dict(out)
    if task is None:
        raise ValueError("this model returns one map: say which task it solves (task=...)")
    return {task: out}


class ConstantPredictor(nn.Module):
    """The trivial baseline a dense model must beat: the same class (``majority``) at every pixel,
    the same depth (``mean_depth``) and, for normals tasks, the same unit normal (``mean_normal``,
    (x, y, z)) everywhere. ``forward(x)`` → ``{task: output}``."""

    def __init__(self, tasks: Mapping[str, str], num_classes: int, majority: int, mean_depth: float, *,
                 mean_normal=None):
        super().__init__()
        self.tasks = {t: check_kind(k) for t, k in tasks.items()}
        self.num_classes, self.majority, self.mean_depth = int(num_classes), int(majority), float(mean_depth)
        self.mean_normal = None
        if mean_normal is not None:
            v = torch.as_tensor(mean_normal, dtype=torch.float64).flatten()
            if v.numel() != 3 or not bool(torch.isfinite(v).all()) or float(v.norm()) == 0:
                raise ValueError(f"mean_normal must be a finite non-zero 3-vector (x, y, z), got {mean_normal!r}")
            self.mean_normal = tuple(float(c) for c in v / v.norm())
        if self.mean_normal is None and "normals" in self.tasks.values():
            raise ValueError("a normals task needs mean_normal=(x, y, z); constant_predictor(...) fits it")

    def forward(self, x):
        b, _, h, w = x.shape
        out = {}
        for t, k in self.tasks.items():
            if k == "segmentation":
                logits = x.new_zeros(b, self.num_classes, h, w)
                logits[:, self.majority] = 1.0
                out[t] = logits
            elif k == "normals":
                out[t] = x.new_tensor(self.mean_normal).view(1, 3, 1, 1).expand(b, 3, h, w).contiguous()
            else:
                out[t] = x.new_full((b, 1, h, w), self.mean_depth)
        return out


def constant_predictor(train_data, tasks: Mapping[str, str], num_classes: int, *, ignore_index: int = IGNORE_INDEX,
                       min_depth: float = 1e-3, batch_size: int = 128) -> ConstantPredictor:
    """:class:`ConstantPredictor` fitted on ``train_data``: its most frequent class (void pixels left
    out), its mean depth over valid pixels and, when ``tasks`` has a normals task, the direction of
    the sum of its unit normals over valid pixels (the constant normal with the largest mean cosine
    to the data)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    depth_sum, depth_n = 0.0, 0
    normals = "normals" in tasks.values()
    normal_sum = torch.zeros(3, dtype=torch.float64)
    for _, y in torch.utils.data.DataLoader(train_data, batch_size=batch_size, shuffle=False):
        m = y[TARGET_KEYS["segmentation"]]
        m = m[m != ignore_index]
        counts += np.bincount(m.numpy().ravel(), minlength=num_classes)[:num_classes]
        d = y[TARGET_KEYS["depth"]].double()
        v = depth_valid(d, min_depth)
        depth_sum, depth_n = depth_sum + float(d[v].sum()), depth_n + int(v.sum())
        if normals:
            nm = y[TARGET_KEYS["normals"]].double()
            unit = torch.nn.functional.normalize(torch.nan_to_num(nm), dim=1)
            normal_sum += unit.permute(0, 2, 3, 1)[normal_valid(nm)].sum(0)
    if not normals:
        return ConstantPredictor(tasks, num_classes, int(counts.argmax()), depth_sum / max(depth_n, 1))
    if float(normal_sum.norm()) == 0:
        raise ValueError("constant_predictor: the training data has no valid normal pixel (or they cancel out)")
    return ConstantPredictor(tasks, num_classes, int(counts.argmax()), depth_sum / max(depth_n, 1),
                             mean_normal=normal_sum.tolist())


def score(model, data, *, kinds: Mapping[str, str], task: str | None = None,
          target_keys: Mapping[str, str] | None = None,
          all_branches: bool = False, prefix: bool = True, batch_size: int = 64, ignore_index: int = IGNORE_INDEX,
          device=None, full_depth: bool = False) -> dict:
    """Dense metrics of ``model`` against the ground truth of ``data`` (streamed:
    :class:`kaviz.metrics.SegmentationMeter`, :class:`kaviz.metrics.DepthMeter`).

    ``model``: an :class:`SBMStudent` (dict outputs), a ``{task: model}`` dict (one model per task,
    e.g. the teachers), or one model solving ``task``. ``kinds``: ``{task: "segmentation" | "depth" |
    "normals"}`` (normals: :data:`kaviz.metrics.NORMAL_METRICS`, :class:`kaviz.metrics.NormalMeter`).
    Keys ``"<task>/<metric>"`` (``prefix=False``: ``"<metric>"``, one task only); with
    ``all_branches`` an SBMStudent is scored at every candidate branch: ``"<task>@<point>/<metric>"``.
    ``full_depth``: depth tasks get the standard full depth set (Eigen et al. 2014;
    :data:`kaviz.metrics.DEPTH_METRICS_FULL`: abs-rel, sq-rel, RMSE, log-RMSE, δ<1.25, δ<1.25², δ<1.25³)
    instead of RMSE, abs-rel and δ<1.25.
    """
    from ...features import eval_mode
    from ...train import to_device

    target_keys = {t: (target_keys or {}).get(t, TARGET_KEYS[check_kind(k)]) for t, k in kinds.items()}
    if isinstance(model, Mapping):
        modules = dict(model)
    else:
        modules = {"_": model}
    if device is None:
        p = next((q for m in modules.values() for q in m.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    from ... import metrics

    meters: dict = {}

    def meter(name, t, out):
        if name not in meters:
            k = kinds[t]
            meters[name] = metrics.dense_meter(k, num_classes=out.shape[1] if k == "segmentation" else None,
                                               ignore_index=ignore_index, full_depth=full_depth)
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
    name: {task: maps}}`` where segmentation maps are class ids (n, H, W), depth maps (n, H, W) and
    normal maps unit vectors (n, H, W, 3) (truth as stored, predictions normalised)."""
    from ...features import eval_mode

    target_keys = {t: (target_keys or {}).get(t, TARGET_KEYS[check_kind(k)]) for t, k in kinds.items()}
    items = [data[int(i)] for i in indices]
    x = torch.stack([it[0] for it in items])
    out = {"image": np.stack([data.image_array(int(i)) for i in indices]),
           "truth": {t: torch.stack([torch.as_tensor(it[1][target_keys[t]]) for it in items]).numpy() for t in kinds}}
    for t, k in kinds.items():
        if k == "normals":
            out["truth"][t] = out["truth"][t].transpose(0, 2, 3, 1)
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
                    if kinds[t] == "normals":
                        res[t] = torch.nn.functional.normalize(v, dim=1).permute(0, 2, 3, 1).numpy()
                    else:
                        res[t] = (v.argmax(1) if kinds[t] == "segmentation" else v[:, 0]).numpy()
        out[name] = res
    return out
