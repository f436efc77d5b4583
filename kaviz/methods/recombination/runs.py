"""The whole procedure (combine, prune, retrain, evaluate) over rounds, the criteria comparison and summaries."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...models import param_count
from .combine import bottleneck_spec, combine
from .evaluation import evaluate_dense, teacher_scores
from .method import RecombinationLoss
from .network import CRITERIA, DEFAULT_GROUPS, RecombinedNet
from .prune import prune
from .tasks import IGNORE_INDEX, check_segnet_teachers

# the whole procedure
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
        """Image ``index`` of ``data`` through the teachers and round ``round``'s network, as the
        keyword arguments of :func:`kaviz.plots.dense_predictions`: ``image`` (the input, (H, W, 3)
        in [0, 1]), ``rows`` ``{task: {"ground truth" | "teacher" | "round r": map}}`` and ``kinds``
        (``"rgb"`` for reconstructions, whose ground truth is the input; ``"labels"`` for
        segmentation, int64 class maps)."""
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
        image = x[0].permute(1, 2, 0).clamp(0, 1).numpy()
        rows, kinds = {}, {}
        for task, kind in net.kinds.items():
            row = {}
            if kind == "reconstruction":
                row["ground truth"] = image
            elif isinstance(target, Mapping) and "mask" in target:
                row["ground truth"] = target["mask"].numpy().astype(np.int64)
            for who, y in (("teacher", t_out[task]), (f"round {round}", out[task])):
                row[who] = (y[0].permute(1, 2, 0).clamp(0, 1).numpy() if kind == "reconstruction"
                            else y[0].argmax(0).numpy().astype(np.int64))
            rows[task] = row
            kinds[task] = "rgb" if kind == "reconstruction" else "labels"
        return {"image": image, "rows": rows, "kinds": kinds}


def _score_rows(net_or_teachers, stage, rnd, splits, num_classes, ignore_index, batch_size, extra):
    rows = []
    for split_name, data in splits.items():
        if data is None:
            continue
        if isinstance(net_or_teachers, RecombinedNet):
            s = evaluate_dense(net_or_teachers, data, num_classes=num_classes, ignore_index=ignore_index,
                               batch_size=batch_size)
            params, code = param_count(net_or_teachers), net_or_teachers.code_channels()
        else:
            tab = teacher_scores(net_or_teachers, data, num_classes=num_classes, ignore_index=ignore_index,
                                 batch_size=batch_size)
            s = {c: tab[c].dropna().iloc[0] for c in tab.columns if c in _SCORE_COLS and tab[c].notna().any()}
            params = int(tab["params"].sum())
            code = sum(t.enc3.conv2.out_channels for t in net_or_teachers.values())
        rows.append({"round": rnd, "stage": stage, "split": split_name, "params": params, "code_channels": code,
                     **extra, **{k: float(v) for k, v in s.items() if k in _SCORE_COLS}})
    return rows


def recombine(teachers: Mapping[str, nn.Module], train_data, val_data, test_data=None, *,
              net: RecombinedNet | None = None,
              rounds: int = 3, fraction: float = 0.3, epochs: int = 2, finetune_epochs: int | None = None,
              groups: Sequence[str] = DEFAULT_GROUPS, criterion: str = "smallest", min_channels: int = 2,
              quant_step: float | None = 0.05, bottleneck: int | str | None = None, T: float = 1.0,
              weights: Mapping[str, float] | None = None, lr: float = 1e-3, batch_size: int = 32,
              num_classes: int | None = None, ignore_index: int = IGNORE_INDEX, seed: int = 0, device=None,
              progress: bool | None = None, eval_batch_size: int = 128, reconstruction: str = "l1+ssim",
              ms_ssim_weights=None, bottleneck_norm: bool = False) -> RecombinationResult:
    """Combine the teachers, fine-tune, then ``rounds`` times prune ``fraction`` of the filters and
    retrain ``epochs`` epochs (SPEC §4.3). Returns a :class:`RecombinationResult`.

    ``net``: a network from :func:`combine` (else one is built with ``quant_step`` and
    ``bottleneck``); it is trained and pruned in place. Round 0 fine-tunes the combined network for
    ``finetune_epochs`` (default ``epochs``) so that it adapts to the quantiser. Each (re)training is
    :func:`kaviz.train.fit` on :class:`RecombinationLoss` with the best epoch chosen on the
    validation loss (no labels); every stage is scored on ``val_data`` and ``test_data``.
    ``reconstruction`` / ``ms_ssim_weights``: the reconstruction loss (:class:`RecombinationLoss`;
    ``"ms_ssim"`` is the paper's MS-SSIM).
    ``bottleneck_norm=True`` / ``bottleneck="reference"``: the reference code's bottleneck and
    adaptors (:func:`combine`), their random initialisation drawn from ``seed``.
    """
    import pandas as pd

    from ...train import fit

    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if val_data is None:
        raise ValueError("recombine needs val_data: each round's best epoch is chosen on the validation split")
    teachers = check_segnet_teachers(teachers)
    for t in teachers.values():
        t.eval()
    if net is None:
        _, norm = bottleneck_spec(bottleneck, bottleneck_norm)
        # the default path draws nothing from ``seed`` (its numbers are stored in the notebook)
        net = combine(teachers, quant_step=quant_step, bottleneck=bottleneck, bottleneck_norm=bottleneck_norm,
                      **({"seed": seed} if norm else {}))
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
                                   weights=weights, reconstruction=reconstruction, ms_ssim_weights=ms_ssim_weights)
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
        rows.append({"criterion": crit, "params": param_count(trial), **evaluate_dense(trial, data, **eval_kwargs),
                     **{f"share/{t}": v for t, v in kept.items()}})
    return pd.DataFrame(rows)


def summarize(results: Sequence[RecombinationResult], split: str = "test"):
    """Mean and sample std (ddof = 1, :mod:`kaviz.stats`; NaN for one seed) over seeds of
    :meth:`RecombinationResult.table` (one result per seed): ``<score>`` and ``<score>_std`` columns."""
    import pandas as pd

    if not results:
        raise ValueError("summarize needs at least one result")
    tabs = [r.table(split).assign(seed=k) for k, r in enumerate(results)]
    df = pd.concat(tabs, ignore_index=True)
    cols = [c for c in df.columns if c not in ("round", "stage", "seed")]
    g = df.groupby(["round", "stage"], sort=False)[cols]
    mean, std = g.mean(), g.std(ddof=1).add_suffix("_std")
    return mean.join(std).reset_index()


#: The British spelling the notebooks called first; kaviz spells it ``summarize`` (as ``kaviz.train.summarize``).
summarise = summarize
