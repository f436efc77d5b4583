"""One call per variant (run) returning the trained student and its history."""
from __future__ import annotations

from typing import Mapping, NamedTuple

from torch import nn

from .loss import check_int
from .method import MIMIC_VARIANTS, VARIANTS, FeatureMimic
from .teachers import forced_cache, teacher_outputs, teacher_pooled_features


class RunResult(NamedTuple):
    """What :func:`run` returns: the trained (adapted) student, the method, and the history of both
    stages (``stage`` column; ``epoch`` runs on across stages; ``attrs["best_epoch"]`` is the
    stage-2 epoch selected on validation, in that numbering)."""

    student: nn.Module
    method: FeatureMimic
    history: "object"


def run(variant: str, student: nn.Module | str, teacher: nn.Module, train_data, val_data, *, epochs: int,
        stage1_epochs: int = 0, num_classes: int | None = None, arch_kwargs: Mapping | None = None,
        seed: int = 0, beta: float = 0.5, beta1: float = 1.0, n_hashes: int | None = None, std: float | None = None,
        bias: str = "median", kd_weight: float = 1.0, T: float = 1.0, loss: str = "bce",
        target_key: str | None = "labels", lr: float = 1e-3, stage1_lr: float | None = None,
        cache_teacher: bool | str = "auto", monitor: str | None = None, kd: str = "sigmoid",
        stage1: str | None = None, l2_weight: float | None = None, adaptation: bool = True,
        ap: str = "all_point", **fit_kwargs) -> RunResult:
    """Train one student variant: stage 1 (mimicking variants, ``stage1_epochs`` > 0) then stage 2.

    ``student``: a model, or an architecture name built (after ``kaviz.seed_everything(seed)``) with
    ``num_classes`` and ``arch_kwargs``. Stage 1 keeps its best epoch by validation loss
    (the mimicking loss); stage 2 by ``monitor`` (default ``val/mAP`` for ``loss="bce"``, else
    ``val/accuracy``) — never on a test split. The LSH bias is fitted on the teacher's training
    features before each stage (SPEC §2: re-fitted before stage 2; with cached teacher outputs the
    re-fit gives the same bias, with augmentation a fresh pass). ``cache_teacher``: ``"auto"``
    caches the teacher's outputs (:func:`teacher_outputs`) when the data has no random
    augmentation (:func:`kaviz.data.has_random_transform`); True forces the cache (with a warning
    on augmented data), False never caches. Other keywords go to :func:`kaviz.train.fit` (``batch_size``,
    ``optimizer="sgd"``, ``schedule="cosine"``, ``weight_decay``, ``device``...).

    Recipe options (``kd``, ``stage1``, ``l2_weight``, ``adaptation``, ``ap``) go to
    :class:`FeatureMimic`; the reference code's KD baseline is ``run("kd", ..., stage1_epochs=<the L2
    run's>, **REFERENCE_SOFTMAX_KD)``: its stage 1 is then the L2 variant's stage 1 of the same seed
    (same student initialisation, same data order), so stage 2 starts from that checkpoint.

    Epoch numbers: stage 1 is epochs ``1..stage1_epochs``, stage 2 starts at
    ``stage1_epochs + 1`` for *every* variant (also the baselines, which have no stage 1), so the
    curves of all variants line up on stage 2.
    """
    import pandas as pd

    from ... import seed_everything
    from ...train import fit

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    check_int("epochs", epochs)
    check_int("stage1_epochs", stage1_epochs, minimum=0)
    seed_everything(seed)
    if isinstance(student, str):
        from ...models import build

        num_classes = num_classes or getattr(train_data, "num_classes", None)
        if num_classes is None:
            raise ValueError("num_classes is not given and the training data does not say (data.num_classes)")
        student = build(student, num_classes, **dict(arch_kwargs or {}))
    if cache_teacher == "auto":
        train_data, val_data = teacher_outputs(train_data, teacher), teacher_outputs(val_data, teacher)
    elif cache_teacher:
        train_data, val_data = forced_cache(train_data, teacher), forced_cache(val_data, teacher)
    method = FeatureMimic(student, teacher, variant, beta=beta, beta1=beta1, n_hashes=n_hashes, std=std,
                          bias=bias, kd_weight=kd_weight, T=T, loss=loss, target_key=target_key, lsh_seed=seed,
                          kd=kd, stage1=stage1, l2_weight=l2_weight, adaptation=adaptation, ap=ap)
    t_train = (teacher_pooled_features(method.teacher.module, train_data, method.teacher_layer)
               if method.lsh is not None else None)
    parts = []
    offset = stage1_epochs
    if stage1_epochs and method.stage1_terms:
        method.stage = 1
        method.fit_bias(t_train)
        h1 = fit(method, train_data, val_data, epochs=stage1_epochs, lr=stage1_lr or lr, seed=seed,
                 monitor="val/loss" if val_data is not None else "train/loss", **fit_kwargs)
        h1.insert(0, "stage", 1)
        parts.append(h1)
    method.stage = 2
    if t_train is not None and variant in MIMIC_VARIANTS:
        if parts and getattr(train_data, "transform", None) is not None:
            t_train = teacher_pooled_features(method.teacher.module, train_data, method.teacher_layer)
        method.fit_bias(t_train)
    if monitor is None:
        monitor = ("val/mAP" if loss == "bce" else "val/accuracy") if val_data is not None else "train/loss"
    h2 = fit(method, train_data, val_data, epochs=epochs, lr=lr, seed=seed, monitor=monitor, **fit_kwargs)
    h2.insert(0, "stage", 2)
    best = h2.attrs.get("best_epoch")
    h2["epoch"] = h2["epoch"] + offset
    parts.append(h2)
    history = pd.concat(parts, ignore_index=True)
    history.attrs.update({"best_epoch": None if best is None else best + offset, "monitor": monitor,
                          "best_value": h2.attrs.get("best_value"), "variant": variant, "seed": seed,
                          "stage1_epochs": offset if len(parts) > 1 else 0,
                          "stage1_best_epoch": parts[0].attrs.get("best_epoch") if len(parts) > 1 else None})
    student.eval()
    return RunResult(student, method, history)
