"""Evaluation and analysis: accuracy tables over seeds, reconstruction and layer errors, feature maps,
parameter counts."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...features import FeatureTap, eval_mode
from ..kd import union_accuracy
from .layers import target_device
from .method import FeatureAmalgamation
from .runs import LayerwiseResult


# evaluation and analysis
class _Concat(nn.Module):
    def __init__(self, teachers):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)

    def forward(self, x):
        return torch.cat([t(x) for t in self.teachers], 1)


def accuracy_table(models: Mapping[str, nn.Module], data, teachers: Sequence[nn.Module] | None = None, device=None):
    """Test accuracies of comprehensive-space classifiers on a union split ``data``: one column per
    part (task-aware: argmax over that part's classes, on that part's images), ``task-aware (all)``
    and ``whole`` (task-agnostic: argmax over all classes, SPEC §0.1). With ``teachers``, first a row
    per teacher (its own part only) and one for the concatenated teachers. The models are moved to
    ``device`` (default: CUDA when available, else CPU)."""
    import pandas as pd

    if not hasattr(data, "slices"):
        raise TypeError("accuracy_table needs a union split (kaviz.data.union of the parts' test sets)")
    rows = []

    def row(name, res, only=None):
        r = {"model": name}
        for k, src in enumerate(data.sources):
            r[src] = res.get(f"task_aware/{src}", np.nan) if only in (None, k) else np.nan
        r["task-aware (all)"] = res["task_aware"] if only is None else np.nan
        r["whole"] = res["task_agnostic"] if only is None else np.nan
        return r

    if teachers is not None:
        if len(teachers) != len(data.sources):
            raise ValueError(f"{len(teachers)} teachers for {len(data.sources)} parts")
        res = union_accuracy(_Concat(teachers).to(target_device(device)).eval(), data)
        for k in range(len(teachers)):
            rows.append(row(f"teacher {k + 1}", res, only=k))
        rows.append(row("concatenated teachers", res))
    for name, m in models.items():
        rows.append(row(name, union_accuracy(m.to(target_device(device)), data)))
    return pd.DataFrame(rows)


def seed_stats(tables: Sequence, by: str = "model"):
    """Long form of per-seed tables with identical rows: one row per (``by``, column) with the
    ``mean``, sample ``std`` (ddof = 1, :func:`kaviz.stats.seed_stats`; NaN for one seed) and number of
    ``seeds``; undefined cells (NaN in every seed) dropped; NaN seeds of a cell are left out of it.
    For bar charts with error bars (``kaviz.plots.bar(..., error="std")``)."""
    import pandas as pd

    rows = [{by: r, "column": c, "mean": s.mean, "std": s.std, "seeds": s.n} for r, c, s in _cell_stats(tables, by)]
    return pd.DataFrame(rows)


def _cell_stats(tables: Sequence, by: str):
    """``(row, column, SeedStats)`` of every numeric cell defined in at least one of the per-seed ``tables``."""
    import pandas as pd

    from ...stats import seed_stats

    frame = pd.concat(list(tables), ignore_index=True)
    order = list(dict.fromkeys(frame[by]))
    numeric = [c for c in frame.columns if c != by and pd.api.types.is_numeric_dtype(frame[c])]
    groups = dict(tuple(frame.groupby(by, sort=False)))
    for r in order:
        for c in numeric:
            values = groups[r][c].dropna().astype(float).tolist()
            if values:
                yield r, c, seed_stats(values)


def summarize_seeds(tables: Sequence, by: str = "model", decimals: int = 3):
    """Mean ± std over seeds of tables with identical rows (one table per seed): a DataFrame of
    ``"0.912 ± 0.004"`` strings, rows in first-seen order (sample std, ddof = 1, :mod:`kaviz.stats`;
    "-" where undefined)."""
    import pandas as pd

    frame = pd.concat(list(tables), ignore_index=True)
    order = list(dict.fromkeys(frame[by]))
    g = frame.groupby(by, sort=False)
    columns = [c for c in frame.columns if c != by and pd.api.types.is_numeric_dtype(frame[c])]
    cells = {(r, c): s.format(decimals) for r, c, s in _cell_stats(tables, by)}
    out = pd.DataFrame({c: [cells.get((r, c), "-") for r in order] for c in columns}, index=order)
    out.index.name = by
    out.insert(0, "seeds", [int(g.size().loc[r]) for r in order])
    return out


class _Stats:
    """Running sums for the fraction of unexplained variance per layer,
    ``Σ (pred − target)² / Σ_c Σ (target_c − mean_c)²`` (each channel centred on its own mean)."""

    def __init__(self, n):
        self.err = [0.0] * n
        self.s = [None] * n
        self.s2 = [0.0] * n
        self.count = [0] * n

    def add(self, l, pred, target):
        t = target.double()
        self.err[l] += float(((pred.double() - t) ** 2).sum())
        per_channel = t.transpose(0, 1).reshape(t.shape[1], -1)
        s = per_channel.sum(1)
        self.s[l] = s if self.s[l] is None else self.s[l] + s
        self.s2[l] += float((t ** 2).sum())
        self.count[l] += per_channel.shape[1]

    def fuv(self, l):
        n = self.count[l]
        total = self.s2[l] - float((self.s[l] ** 2).sum()) / n
        return self.err[l] / max(total, 1e-30)


def _batches(data, batch_size):
    from ...data import Unlabeled

    loader = torch.utils.data.DataLoader(Unlabeled(data), batch_size=batch_size, shuffle=False)
    yield from loader


def _pca_floor(cov_sum, mean_sum, n, k):
    """Smallest relative error of any rank-k affine reconstruction (the PCA bound)."""
    mean = mean_sum / n
    cov = cov_sum / n - torch.outer(mean, mean)
    ev = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
    return float(ev[k:].sum() / ev.sum().clamp_min(1e-30))


def reconstruction_errors(amalgamation: FeatureAmalgamation, data, batch_size: int = 256, device=None):
    """Per layer, how well the stage-1 autoencoder reconstructs the concatenated teacher features
    on ``data``: the fraction of unexplained variance ``Σ(D(E(F)) − F)² / Σ(F − mean F)²``, next to
    the smallest value any rank-C_s linear autoencoder can reach (the PCA bound). The autoencoders
    (and the teachers inside) are moved to ``device`` (default: CUDA when available, else CPU)."""
    import pandas as pd

    plan = amalgamation.plan
    L = plan.depth
    stats = _Stats(L - 1)
    dims = [sum(tc[l] for tc in plan.teacher_channels) for l in range(L - 1)]
    cov = [torch.zeros(d, d, dtype=torch.float64) for d in dims]
    mean = [torch.zeros(d, dtype=torch.float64) for d in dims]
    count = [0] * (L - 1)
    device = target_device(device)
    amalgamation.to(device)
    with eval_mode(amalgamation), torch.no_grad():
        for x in _batches(data, batch_size):
            feats, _ = amalgamation.features(x.to(device))
            for l, f in enumerate(feats):
                stats.add(l, amalgamation.decoders[l](amalgamation.encoders[l](f)), f)
                v = (f.movedim(1, -1) if f.dim() == 4 else f).reshape(-1, f.shape[1]).double().cpu()
                cov[l] += v.T @ v
                mean[l] += v.sum(0)
                count[l] += v.shape[0]
    rows = []
    for l in range(L - 1):
        rows.append({"layer": l + 1, "student layer": plan.segments[l].name,
                     "teacher channels": dims[l], "code channels": plan.student_channels[l],
                     "unexplained variance": stats.fuv(l),
                     "PCA bound": _pca_floor(cov[l], mean[l], count[l], plan.student_channels[l])})
    return pd.DataFrame(rows)


def layer_errors(result: LayerwiseResult, data, students: Mapping[str, nn.Module] | None = None,
                 batch_size: int = 256, device=None):
    """Per student layer, the fraction of unexplained variance of the amalgamated feature (the last
    layer: of the concatenated logits) on ``data``:

    - ``layer-wise``: the stage-2 layer given the *amalgamated* input (its training objective);
    - one column per student in ``students`` (default: ``result.students``): that network run end
      to end, its own layer-l feature against ``F_a^l`` — how the layers' errors compound, and how
      far fine-tuning moves the features away from the amalgamated ones.

    With the paper's placement (``placement="input"``) each auxiliary map ``A_{l+1}`` is folded
    backwards into layer l, so a folded student's own layer-l feature stands for ``A_{l+1}(F_a^l)``;
    the end-to-end columns compare it with that (the ``layer-wise`` column and the logits are as
    above).

    The networks are moved to ``device`` (default: CUDA when available, else CPU).
    """
    import pandas as pd

    students = dict(result.students if students is None else students)
    device = target_device(device)
    method = result.layerwise.to(device)  # with the stage-1 autoencoders and the teachers inside
    for s in students.values():
        s.to(device)
    plan = result.plan
    L = plan.depth
    names = [s.name for s in plan.segments]
    own = _Stats(L)
    ends = {k: _Stats(L) for k in students}
    amalg = result.amalgamation
    with eval_mode(method), torch.no_grad():
        for x in _batches(data, batch_size):
            x = x.to(device)
            targets = amalg.targets(x)
            inputs = [x] + targets[:-1]
            for l in range(L):
                own.add(l, method.run_layer(l, inputs[l]), targets[l])
            if getattr(method, "placement", "output") == "input":
                targets = [a(t) for a, t in zip(method.aux, targets[:-1])] + targets[-1:]
            for k, s in students.items():
                with eval_mode(s), FeatureTap(s, names[:-1]) as tap:
                    out = s(x)
                    feats = [tap[n] for n in names[:-1]] + [out]
                for l in range(L):
                    ends[k].add(l, feats[l], targets[l])
    rows = []
    for l in range(L):
        r = {"layer": l + 1, "student layer": names[l], "target": "logits" if l == L - 1 else "F_a",
             "layer-wise": own.fuv(l)}
        for k in students:
            r[f"end-to-end: {k}"] = ends[k].fuv(l)
        rows.append(r)
    return pd.DataFrame(rows)


def feature_maps(result: LayerwiseResult, data, index: int, layer: int, channels: Sequence[int] = (0,),
                 students: Mapping[str, nn.Module] | None = None, device=None):
    """Maps of image ``index`` at student layer ``layer`` (1-based, a conv layer), for
    :func:`kaviz.plots.feature_grid`: one row per student channel c with the image (first row only), each teacher's
    channel with the largest encoder weight |E[c, ·]| into code channel c, the amalgamated map
    ``F_a[c]`` and each student's own map c (end to end). Channels are taken modulo the layer's
    width. Returns ``(rows, titles)`` (NumPy arrays); the networks are moved to ``device``.
    With ``placement="input"`` a folded student's layer-l map carries the next layer's auxiliary
    map (it stands for ``A_{l+1}(F_a^l)``), so its channel c mixes the amalgamated channels."""
    plan = result.plan
    if not 1 <= layer <= plan.depth - 1 or not plan.sizes[layer - 1]:
        convs = [l + 1 for l in range(plan.depth - 1) if plan.sizes[l]]
        raise ValueError(f"layer must be a spatial (conv) layer, one of {convs}; got {layer}")
    l = layer - 1
    students = dict(result.students if students is None else students)
    device = target_device(device)
    x = torch.stack([data.get_image(index) if hasattr(data, "get_image") else data[index][0]]).to(device)
    amalg = result.amalgamation.to(device)
    with eval_mode(amalg), torch.no_grad():
        feats, _ = amalg.features(x)
        code = amalg.encoders[l](feats[l])[0].cpu()
        feats = [f.cpu() for f in feats]
    s_maps = {}
    for k, s in students.items():
        with eval_mode(s.to(device)), torch.no_grad(), FeatureTap(s, plan.segments[l].name) as tap:
            s(x)
            s_maps[k] = tap[plan.segments[l].name][0].cpu()
    image = data.image_array(index) if hasattr(data, "image_array") else x[0].cpu()
    E = amalg.encoders[l].weight.detach().cpu()
    offsets = np.cumsum([0] + [tc[l] for tc in plan.teacher_channels])
    rows, titles = [], []
    C = plan.student_channels[l]
    for r, c in enumerate(channels):
        c = int(c) % C
        row, title = ([image], ["image"]) if r == 0 else ([None], [None])
        for t in range(len(plan.teacher_channels)):
            w = E[c, offsets[t]:offsets[t + 1]].abs()
            j = int(w.argmax())
            row.append(feats[l][0, offsets[t] + j].numpy())
            title.append(f"teacher {t + 1} ch {j}")
        row.append(code[c].numpy())
        title.append(f"amalgamated ch {c}")
        for k, m in s_maps.items():
            row.append(m[c].numpy())
            title.append(f"{k} ch {c}")
        rows.append(row)
        titles.append(title)
    return rows, titles


def param_table(teachers: Sequence[nn.Module], students: Mapping[str, nn.Module]):
    """Parameter counts of the teachers, their sum, and the students (with their share of the sum)."""
    import pandas as pd

    from ...models import param_count

    counts = [param_count(t) for t in teachers]
    total = sum(counts)
    rows = [{"model": f"teacher {k + 1}", "parameters": c, "share of teachers": c / total} for k,
            c in enumerate(counts)]
    rows.append({"model": "teachers combined", "parameters": total, "share of teachers": 1.0})
    for name, s in students.items():
        c = param_count(s)
        rows.append({"model": name, "parameters": c, "share of teachers": c / total})
    return pd.DataFrame(rows)
