"""Born-Again chains: a student trained from its teacher's soft targets, generation after generation."""
from __future__ import annotations

from typing import Mapping

import torch.nn.functional as F
from torch import nn

from ...losses import soft_cross_entropy
from ...train import freeze


class BornAgain(nn.Module):
    """Generation g+1 of a Born-Again chain (Furlanello et al. 2018, as used by the Knowledge
    Consistency paper): ``{"ce": CE(s, y), "kd": soft_ce(s, t; τ)}`` weighted ``1`` and ``λ``
    (τ = 1, λ = 0.5), the previous generation ``t`` frozen. ``evaluate`` reports ``accuracy``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, lam: float = 0.5, tau: float = 1.0):
        super().__init__()
        if lam < 0:
            raise ValueError(f"lam (the weight of the soft-target term) must be >= 0, got {lam}")
        if tau <= 0:
            raise ValueError(f"tau (the temperature) must be > 0, got {tau}")
        self.student = student
        self.teacher = freeze(teacher)
        self.tau = float(tau)
        self.loss_weights = {"ce": 1.0, "kd": float(lam)}

    def forward(self, batch):
        x, y = batch[0], batch[1]
        s = self.student(x)
        return {"ce": F.cross_entropy(s, y), "kd": soft_cross_entropy(s, self.teacher(x), self.tau)}

    def evaluate(self, data) -> dict:
        from ...train import Supervised

        return Supervised(self.student).evaluate(data)


def born_again_chain(gen0: nn.Module, train_data, val_data, *, arch: str, generations: int = 3,
                     lam: float = 0.5, tau: float = 1.0, epochs: int = 10, lr: float = 1e-3, seed: int = 0,
                     num_classes: int | None = None, arch_kwargs: Mapping | None = None, cache: bool = True,
                     test_data=None, device=None, progress: bool | None = None, **fit_kwargs):
    """A Born-Again chain: generation 0 is ``gen0`` (trained with labels alone); generation g+1 is a
    fresh ``arch`` (seed ``seed + g + 1``) trained by :class:`BornAgain` against generation g.
    Each generation is cached under ``cache_dir("teachers")`` by a key of everything that
    determines it (previous generation's weights, data, settings, seed).

    Returns ``(models, table)``: the ``generations`` models (generation 0 first) and one row per
    generation with its seed, best epoch, best validation accuracy (and test accuracy of the same
    weights when ``test_data`` is given).
    """
    import pandas as pd

    from ... import seed_everything
    from ...models import build, weights_hash
    from ...train import (
        Supervised,
        cache_dir,
        cached_training,
        fit,
        history_meta,
        teacher_key,
    )

    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ValueError(f"generations must be an int >= 1 (generation 0 included), got {generations!r}")
    num_classes = num_classes or getattr(train_data, "num_classes", None)
    if num_classes is None:
        raise ValueError("num_classes is not given and the training data does not say (data.num_classes)")
    arch_kwargs = dict(arch_kwargs or {})

    models = [gen0.eval()]
    rows = [{"generation": 0, "seed": None, "best_epoch": None,
             "val_accuracy": Supervised(gen0).evaluate(val_data)["accuracy"]}]
    for g in range(1, generations):
        s = seed + g
        settings = dict(born_again_of=weights_hash(models[-1]), lam=lam, tau=tau, epochs=epochs, lr=lr, seed=s,
                        arch_kwargs=arch_kwargs, **{k: v for k, v in fit_kwargs.items()})
        key = teacher_key(arch, num_classes, train_data, val_data, device=device, **settings)

        def train(s=s, teacher=models[-1], settings=settings):
            seed_everything(s)
            student = build(arch, num_classes, **arch_kwargs)
            hist = fit(BornAgain(student, teacher, lam=lam, tau=tau), train_data, val_data, epochs=epochs,
                       lr=lr, seed=s, device=device, progress=progress, **fit_kwargs)
            return student, {"arch": arch, "settings": settings, "best_epoch": hist.attrs["best_epoch"],
                             "best_value": hist.attrs["best_value"], **history_meta(hist)}

        student, meta, _ = cached_training(cache_dir("teachers") if cache else None, f"{arch}-ba{g}", key,
                                           lambda: build(arch, num_classes, **arch_kwargs), train,
                                           what=f"Born-Again generation {g} ({arch})",
                                           required=("history", "best_epoch", "best_value"))
        models.append(student.eval())
        rows.append({"generation": g, "seed": s, "best_epoch": meta["best_epoch"], "val_accuracy": meta["best_value"]})
    table = pd.DataFrame(rows)
    if test_data is not None:
        table["test_accuracy"] = [Supervised(m).evaluate(test_data)["accuracy"] for m in models]
    table.attrs["note"] = ("top-1 accuracy; val_accuracy at the best-on-validation epoch (generation 0: its "
                           "weights as given), test_accuracy of the same weights")
    return models, table
