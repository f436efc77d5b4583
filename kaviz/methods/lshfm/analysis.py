"""Evaluation tables and feature analyses of trained students (agreement with the teacher, angle vs Hamming)."""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...features import OUTPUT, extract
from .heads import adapted_layer, feature_layer, pooled_layer
from .loss import LSHLoss, as_features
from .teachers import TeacherOutputs, teacher_pooled_features


def evaluate_model(model: nn.Module, data, *, target_key: str = "labels", threshold: float = 0.5,
                   batch_size: int = 256) -> dict:
    """Multi-label scores of ``model`` on ``data`` (targets ``{target_key, "difficult"}``):
    ``mAP``, per-class ``ap`` (NaN and listed in ``missing`` for classes without positives) and
    CP/CR/CF1/OP/OR/OF1 at ``threshold`` (see :func:`kaviz.metrics.multilabel_report`)."""
    from ... import metrics

    store = extract(model, data, OUTPUT, pool="none", batch_size=batch_size, progress=False)
    targets = store.targets
    if not isinstance(targets, dict) or target_key not in targets:
        raise KeyError(f"the data's targets have no {target_key!r} entry (multi-hot labels)")
    return metrics.multilabel_report(store[OUTPUT], targets[target_key], difficult=targets.get("difficult"),
                                     threshold=threshold, class_names=getattr(data, "classes", None))


def results_table(runs: Mapping, test_data, teacher: nn.Module | None = None, *, target_key: str = "labels",
                  threshold: float = 0.5, agreement: Mapping | None = None):
    """One row per variant (``runs``: ``{(variant, seed): RunResult}``), teacher on top: test mAP,
    CF1 and OF1 as mean and std over seeds (each student at its best-on-validation epoch), plus the
    mean cosine to the teacher's feature when ``agreement`` (``{(variant, seed): dict}`` from
    :func:`feature_agreement`) is given. Returns ``(table, scores)``; ``scores`` has one row per
    run with the per-class AP (``ap/<class>``)."""
    import pandas as pd

    classes = list(getattr(test_data, "classes", None) or [])
    rows = []
    if teacher is not None:
        r = evaluate_model(teacher, test_data, target_key=target_key, threshold=threshold)
        rows.append({"model": "teacher", "variant": "teacher", "seed": None, **_flat(r, classes)})
    for (variant, seed), res in runs.items():
        r = evaluate_model(res.student, test_data, target_key=target_key, threshold=threshold)
        row = {"model": "student", "variant": variant, "seed": seed, **_flat(r, classes),
               "best_epoch": res.history.attrs.get("best_epoch")}
        if agreement is not None and (variant, seed) in agreement:
            row.update({k: v for k, v in agreement[(variant, seed)].items()})
        rows.append(row)
    scores = pd.DataFrame(rows)
    metrics_cols = [c for c in ("mAP", "CF1", "OF1", "cos", "cos_linear") if c in scores.columns]
    order = list(dict.fromkeys(scores["variant"]))
    g = scores.groupby("variant", sort=False)
    table = pd.DataFrame(index=pd.Index(order, name="variant"))
    table["seeds"] = g.size().reindex(order)
    for c in metrics_cols:
        table[f"{c} mean"] = g[c].mean().reindex(order)
        table[f"{c} std"] = g[c].std(ddof=1).reindex(order) if len(scores) else np.nan
    return table, scores


def _flat(report: dict, classes) -> dict:
    out = {k: report[k] for k in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")}
    for k, v in enumerate(report["ap"]):
        out[f"ap/{classes[k] if k < len(classes) else k}"] = float(v)
    return out


def per_class_table(scores):
    """Per-class test AP (mean over seeds) of every variant, classes as rows (from
    :func:`results_table`'s ``scores``)."""
    cols = [c for c in scores.columns if c.startswith("ap/")]
    t = scores.groupby("variant", sort=False)[cols].mean().T
    t.index = [c[3:] for c in cols]
    t.index.name = "class"
    return t


def _lstsq_map(x_train: torch.Tensor, y_train: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine map x -> y (ridge-regularised), in float64."""
    x = x_train.double()
    y = y_train.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    a = xc.T @ xc
    a = a + ridge * a.diagonal().mean().clamp_min(1e-12) * torch.eye(a.shape[0], dtype=a.dtype)
    w = torch.linalg.solve(a, xc.T @ yc)
    return w, my - mx @ w


def feature_agreement(student: nn.Module, teacher: nn.Module, test_data, train_data=None, *,
                      teacher_layer: str | None = None, batch_size: int = 256) -> dict:
    """How close the student's feature is to the teacher's on ``test_data``:

    - ``cos``: mean cosine between the student's adapted feature (``feat_fc``'s output) and the
      teacher's pooled feature, image by image;
    - ``cos_linear`` (with ``train_data``): the same after the best affine map from the student's
      own pooled feature to the teacher's, fitted (least squares) on ``train_data`` — it asks
      whether the teacher's feature is *linearly recoverable* from the student's, whatever basis
      the student uses (fair to students trained without mimicking).
    """
    layer_t = teacher_layer or feature_layer(teacher)
    s_layers = [adapted_layer(student), pooled_layer(student)]
    s_test = extract(student, test_data, s_layers, pool="none", batch_size=batch_size, progress=False)
    t_test = teacher_pooled_features(teacher, test_data, layer_t, batch_size)
    f_s = s_test.tensor(s_layers[0])
    out = {"cos": float(F.cosine_similarity(f_s, t_test, dim=1).mean())}
    if train_data is not None:
        s_train = extract(student, train_data, s_layers[1], pool="none", batch_size=batch_size,
                          progress=False).tensor(s_layers[1])
        t_train = teacher_pooled_features(teacher, train_data, layer_t, batch_size)
        w, b = _lstsq_map(s_train, t_train)
        pred = s_test.tensor(s_layers[1]).double() @ w + b
        out["cos_linear"] = float(F.cosine_similarity(pred, t_test.double(), dim=1).mean())
    return out


def mean_feature_cosine(teacher: nn.Module, train_data, test_data, *, layer: str | None = None) -> float:
    """Reference for ``cos``: the mean cosine between each test feature of the teacher and the
    teacher's *mean* training feature (a constant "student"). Post-ReLU pooled features share a
    large common direction, so a cosine must be read against this number, not against 0."""
    layer = layer or feature_layer(teacher)
    mean = teacher_pooled_features(teacher, train_data, layer).mean(0, keepdim=True)
    t_test = teacher_pooled_features(teacher, test_data, layer)
    return float(F.cosine_similarity(t_test, mean.expand_as(t_test), dim=1).mean())


def feature_sets(students: Mapping[str, nn.Module], teacher: nn.Module, data, *,
                 teacher_name: str = "teacher") -> dict:
    """``{name: (N, D) array}``: each student's adapted feature and the teacher's pooled feature
    (``teacher_name`` first) on ``data``, for maps and angle–Hamming pairs."""
    out = {teacher_name: teacher_pooled_features(teacher, data, feature_layer(teacher)).numpy()}
    for name, st in students.items():
        layer = adapted_layer(st)
        out[name] = extract(st, data, layer, pool="none", progress=False)[layer]
    return out


def angle_hamming(pairs: Mapping[str, tuple], *, n_hashes: int, std: float, bias: str = "zero",
                  fit_on=None, seed: int = 0, max_pairs: int | None = 400):
    """The angle–Hamming relation of random-hyperplane LSH, measured (SPEC §2).

    ``pairs``: ``{name: (f_a, f_b)}`` with two (M, D) arrays of paired features (e.g. a student's
    adapted features and the teacher's, for the same images). For each pair the fraction of the
    ``n_hashes`` bits that differ is measured with a fresh :class:`LSHLoss` (``std``, ``bias``
    fitted on ``fit_on``, the teacher's training features, unless ``bias="zero"``); for
    ``bias="zero"`` its expectation is θ/π. Returns a DataFrame with columns ``pair``,
    ``angle/π`` (θ/π), ``differing bits`` and ``lsh`` (the LSH loss of that pair, ``f_a``
    mimicking ``f_b``); ``attrs``: ``mean_abs_dev`` (mean |differing − θ/π|), ``lsh`` (mean loss).
    """
    import pandas as pd

    if not pairs:
        raise ValueError("pairs is empty: give {name: (features_a, features_b)}")
    dims = {name: as_features(a, f"pairs[{name!r}][0]").shape[1] for name, (a, _b) in pairs.items()}
    dim = next(iter(dims.values()))
    if len(set(dims.values())) > 1:
        raise ValueError(f"all pairs must have one feature dimension, got {dims}")
    lsh = LSHLoss(dim, n_hashes, std, bias=bias, with_l2=False, seed=seed)
    if bias != "zero":
        if fit_on is None:
            raise ValueError(f"bias={bias!r} is fitted on teacher features: pass fit_on=<(N, {dim}) features>")
        lsh.fit_bias(fit_on)
    frames = []
    rng = np.random.default_rng(seed)
    for name, (a, b) in pairs.items():
        a = as_features(a, f"pairs[{name!r}][0]").float()
        b = as_features(b, f"pairs[{name!r}][1]").float()
        if a.shape != b.shape:
            raise ValueError(f"pairs[{name!r}]: the two feature arrays differ in shape, {tuple(a.shape)} vs "
                             f"{tuple(b.shape)}")
        idx = np.arange(len(a))
        if max_pairs is not None and len(idx) > max_pairs:
            idx = np.sort(rng.choice(len(a), size=max_pairs, replace=False))
        a, b = a[idx], b[idx]
        with torch.no_grad():
            cos = F.cosine_similarity(a, b, dim=1).clamp(-1, 1).double()
            differ = (lsh.bits(a) != lsh.bits(b)).double().mean(1)
            y = lsh.bits(b).float()
            loss = F.binary_cross_entropy_with_logits(lsh.hash(a), y, reduction="none").mean(1)
        frames.append(pd.DataFrame({"pair": name, "index": idx, "angle/π": (torch.arccos(cos) / math.pi).numpy(),
                                    "differing bits": differ.numpy(), "lsh": loss.double().numpy()}))
    df = pd.concat(frames, ignore_index=True)
    df.attrs.update({"mean_abs_dev": float((df["differing bits"] - df["angle/π"]).abs().mean()),
                     "lsh": float(df["lsh"].mean()), "n_hashes": n_hashes, "std": float(std), "bias": bias})
    return df


def primary_labels(dataset) -> np.ndarray:
    """One class per image for colouring maps of multi-label data: for the synthetic scenes the
    most visible object (largest visible area, ``info["objects"]``), otherwise the first class
    present in the multi-hot labels (-1 for an image without labels)."""
    base = dataset.dataset if isinstance(dataset, TeacherOutputs) else dataset
    info = getattr(base, "info", {}) or {}
    meta = getattr(base, "meta", None)
    objects = info.get("objects")
    classes = list(getattr(base, "classes", None) or [])
    if objects is not None and meta is not None and "index" in getattr(meta, "columns", []) and classes:
        obj = objects.assign(area=objects["radius"] ** 2 * objects["visible_fraction"])
        top = obj.sort_values(["index", "area"], ascending=[True, False]).drop_duplicates("index")
        lookup = dict(zip(top["index"].to_numpy(), top["shape"].to_numpy()))
        pos = {c: k for k, c in enumerate(classes)}
        return np.array([pos.get(lookup.get(int(i)), -1) for i in meta["index"].to_numpy()], dtype=np.int64)
    targets = getattr(base, "targets", None)
    labels = targets["labels"] if isinstance(targets, Mapping) else targets
    if labels is None:
        raise ValueError("the dataset has no targets to take a label from")
    lab = np.asarray(labels.numpy() if torch.is_tensor(labels) else labels)
    if lab.ndim == 1:
        return lab.astype(np.int64)
    has = lab.any(1)
    return np.where(has, lab.argmax(1), -1).astype(np.int64)
