"""Feature space vs common space of trained students (for EmbeddingExplorer) and the paired-distance ratio."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...data import images_of
from ...features import eval_mode, pool_features
from ...train import unfrozen
from .runs import Run


def pick_per_class(data, per_class: int, seed: int = 0, classes: Sequence[int] | None = None) -> np.ndarray:
    """Sorted indices of at most ``per_class`` samples of each class of ``data`` (its ``targets``),
    drawn with a seeded generator; ``classes`` restricts to some labels."""
    targets = np.asarray(data.targets)
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
        from ...features import extract

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
            self._feat[key] = self._extract(unfrozen(k_teacher), layer)
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
        from ...embed import embed

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
                         "second panel": "common space h" if self.runs[model].cfl is not None else "output space "
                         "(softmax)",
                         "second-panel ratio": r["common space"]})
        return pd.DataFrame(rows)
