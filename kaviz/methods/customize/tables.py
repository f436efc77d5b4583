"""Accuracy, assignment, selection and coverage tables of the customisation notebook."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...train import unfrozen
from .multihead import attribute_columns, check_head_names
from .selection import Assignment, predict


def attribute_accuracy(model: nn.Module, data, attributes: Sequence[str] | None = None,
                       logits: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy of each head of a :class:`MultiHead` on the matching column of ``data``'s attribute
    targets (matched by name through ``data.classes``): ``{attribute: accuracy}``."""
    net = unfrozen(model)
    attributes = net.attributes if attributes is None else check_head_names(attributes)
    cols = attribute_columns(getattr(data, "classes", None), attributes)
    targets = getattr(data, "targets", None)
    if not torch.is_tensor(targets) or targets.dim() != 2:
        raise ValueError("attribute accuracy needs data whose targets are (N, A) attribute bits")
    if logits is None:
        logits = predict(net, data)
    pred = np.asarray(logits).argmax(-1)
    y = targets.numpy()
    return {a: float(np.mean(pred[:, net.head_index(a)] == y[:, c])) for a, c in zip(attributes, cols)}


def accuracy_table(models: Mapping[str, nn.Module], data, attributes: Sequence[str] | None = None):
    """Per-attribute accuracy of several multi-head models on ``data``: one row per model, one column
    per attribute (NaN where a model has no head for it)."""
    import pandas as pd

    rows = {}
    for name, m in models.items():
        have = [a for a in unfrozen(m).attributes if attributes is None or a in attributes]
        rows[name] = attribute_accuracy(m, data, have) if have else {}
    df = pd.DataFrame.from_dict(rows, orient="index")
    if attributes is not None:
        df = df.reindex(columns=list(attributes))
    df.index.name = "model"
    return df


def summarize(table, decimals: int = 3):
    """Mean ± std over seeds of the per-attribute accuracy: rows = model, columns = (attribute, mean |
    std), plus ``group mean`` (the mean over the attributes, per seed, then over seeds) for the models
    that have every attribute of the table (a source covering part of the group gets NaN there)."""

    t = table.copy()
    attrs = list(dict.fromkeys(t["attribute"]))
    stats = t.groupby(["model", "attribute"], sort=False)["accuracy"].agg(["mean", "std"]).unstack("attribute")
    full = t.groupby("model")["attribute"].nunique() == len(attrs)
    per_seed = t[t["model"].isin(full[full].index)].groupby(["model", "seed"])["accuracy"].mean()
    grp = per_seed.groupby("model").agg(["mean", "std"])
    for stat in ("mean", "std"):
        stats[(stat, "group mean")] = grp[stat].reindex(stats.index)
    out = stats.swaplevel(axis=1)
    out = out.reindex(columns=[(a, s) for a in attrs + ["group mean"] for s in ("mean", "std")])
    out = out.reindex(list(dict.fromkeys(t["model"])))
    return out.round(decimals)


def comparison(table, group: Sequence[str], majority: Mapping[str, float] | None = None):
    """Per attribute of ``group``: the best covering source (name and accuracy), components and target
    (mean and std over seeds), the majority answer when given, and the differences
    ``component − best source`` and ``target − component``. ``table`` is :attr:`CustomizeResult.table`."""
    import pandas as pd

    rows = []
    for a in group:
        t = table[table["attribute"] == a]
        src = t[t["seed"] < 0].set_index("model")["accuracy"]
        row = {"attribute": a}
        if majority is not None:
            row["majority"] = majority[a]
        if len(src):
            row["best source name"] = src.idxmax()
            row["best source"] = float(src.max())
        for m in ("component", "target"):
            acc = t[t["model"] == m]["accuracy"]
            row[m] = float(acc.mean())
            row[f"{m} std"] = float(acc.std()) if len(acc) > 1 else float("nan")
        row["component − best source"] = row["component"] - row.get("best source", float("nan"))
        row["target − component"] = row["target"] - row["component"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("attribute")


def assignment_table(assignments: Mapping[str, Assignment]):
    """Share of training images assigned to each source, per attribute (rows = attribute)."""
    import pandas as pd

    return pd.DataFrame({a: asg.shares() for a, asg in assignments.items()}).T.rename_axis("attribute")


def assigned_examples(assignment: Assignment, source: str, k: int = 16, order: str = "first") -> np.ndarray:
    """Up to ``k`` indices of images assigned to ``source``: the first ones (``order="first"``), or the
    ones its head is most / least sure about (``"confident"`` / ``"unsure"``)."""
    idx = assignment.images_of(source)
    if order == "first":
        return idx[:k]
    if order not in ("confident", "unsure"):
        raise ValueError(f"order must be 'first', 'confident' or 'unsure', got {order!r}")
    H = assignment.entropy[idx, assignment.sources.index(source)]
    rank = np.argsort(H, kind="stable")
    return idx[rank[:k] if order == "confident" else rank[::-1][:k]]


def example_images(assignment: Assignment, data, source: str, k: int = 16, order: str = "first"):
    """``(images, titles)`` of up to ``k`` images assigned to ``source`` (see :func:`assigned_examples`),
    for :func:`kaviz.plots.image_grid`; a title gives the source head's entropy and the attribute's
    true value (read for display only)."""
    idx = assigned_examples(assignment, source, k, order)
    if len(idx) == 0:
        raise ValueError(f"no image of this split was assigned to {source!r} for {assignment.attribute!r}")
    t = assignment.sources.index(source)
    col = attribute_columns(getattr(data, "classes", None), [assignment.attribute])[0]
    titles = [f"H={assignment.entropy[i, t]:.2f} y={int(data.targets[i, col])}" for i in idx]
    return [data.image_array(int(i)) for i in idx], titles


def selection_table(assignments: Mapping[str, Assignment], data):
    """How good the entropy-based choice is, per attribute (labels of ``data`` read for analysis only):
    each covering source's accuracy on all images, the accuracy of the prediction of the source
    each image was assigned to (``selected``), of the best single source, and of an oracle that is
    right whenever any covering source is (``any source right``)."""
    import pandas as pd

    rows = []
    for a, asg in assignments.items():
        y = data.targets[:, attribute_columns(data.classes, [a])[0]].numpy()
        correct = asg.logits.argmax(-1) == y[:, None]  # (N, S)
        row = {"attribute": a}
        row.update({s: float(correct[:, k].mean()) for k, s in enumerate(asg.sources)})
        row["best single"] = float(correct.mean(0).max())
        row["selected"] = float(correct[np.arange(len(y)), asg.index].mean())
        row["any source right"] = float(correct.any(1).mean())
        rows.append(row)
    df = pd.DataFrame(rows).set_index("attribute")
    return df[[c for c in df.columns if c not in _FIXED] + list(_FIXED)]


_FIXED = ("best single", "selected", "any source right")


def selection_controls(assignments: Mapping[str, Assignment], data, *, draws: int = 20, seed: int = 0):
    """The entropy-based choice against two controls, per attribute (labels of ``data`` read for analysis
    only), each as a gain over the mean accuracy of the covering sources (what picking one of them at random
    scores on average): ``selected`` (the lowest-entropy source for every image, as :func:`select_sources`),
    ``least confident (control)`` (the highest-entropy source for every image: an anti-selector, which a
    real selection signal must beat; with two covering sources its gain is exactly minus the selected one's),
    and ``random pick (control)`` / ``random pick std`` (a uniformly random covering source for every image,
    mean and sample std of the gain over ``draws`` seeded draws: how far chance alone moves the gain), and
    ``selected in random-pick std`` (the selected gain in units of that std)."""
    import pandas as pd

    if draws < 2:
        raise ValueError(f"draws must be at least 2 (a sample std), got {draws}")
    rng = np.random.default_rng(seed)
    table = selection_table(assignments, data)

    def gain(index_of):
        picked = {a: Assignment(a, asg.sources, index_of(asg), asg.entropy, asg.logits)
                  for a, asg in assignments.items()}
        t = selection_table(picked, data)
        return t["selected"] - t[[c for c in t.columns if c not in _FIXED]].mean(axis=1)

    selected = gain(lambda asg: asg.index)
    least = gain(lambda asg: np.asarray(asg.entropy).argmax(1).astype(np.int64))
    random = pd.DataFrame([gain(lambda asg: rng.integers(0, len(asg.sources), len(asg.index)))
                           for _ in range(draws)])
    out = pd.DataFrame({"selected": selected, "least confident (control)": least,
                        "random pick (control)": random.mean(), "random pick std": random.std(ddof=1)})
    out["selected in random-pick std"] = (out["selected"] - out["random pick (control)"]) / out["random pick std"]
    out.index.name = table.index.name
    return out


def coverage_table(sources: Mapping[str, Sequence[str]], group: Sequence[str] | None = None):
    """Which source covers which attribute (✓), the group's attributes first."""
    import pandas as pd

    attrs = list(dict.fromkeys(list(group or []) + [a for v in sources.values() for a in v]))
    df = pd.DataFrame({a: ["✓" if a in sources[s] else "" for s in sources] for a in attrs}, index=list(sources))
    df.index.name = "source"
    return df


def majority_baseline(data, attributes: Sequence[str]) -> dict[str, float]:
    """Accuracy of always predicting each attribute's more frequent value on ``data`` (chance level)."""
    cols = attribute_columns(getattr(data, "classes", None), attributes)
    p = data.targets[:, cols].float().mean(0).numpy()
    return {a: float(max(v, 1 - v)) for a, v in zip(attributes, p)}


#: The British spelling the notebooks called first; kaviz spells it ``summarize`` (as ``kaviz.train.summarize``).
summarise = summarize
