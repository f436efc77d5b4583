"""Source networks: multi-head classifiers trained on their own attribute sets (cached)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .multihead import MultiHead, attribute_columns, check_head_names
from .tables import attribute_accuracy


class MultiHeadSupervised(nn.Module):
    """Supervised training of a :class:`MultiHead` on attribute targets (N, A_data) of 0/1:
    ``{"ce": mean over heads of the cross-entropy}``. ``classes`` (the data's attribute names) maps
    each head to its target column. ``evaluate`` reports ``accuracy`` (mean over heads) and
    ``accuracy/<attribute>``."""

    def __init__(self, model: MultiHead, classes: Sequence[str]):
        super().__init__()
        self.model = model
        self.columns = attribute_columns(classes, model.attributes)

    def forward(self, batch):
        x, y = batch[0], batch[1]
        if not torch.is_tensor(y) or y.dim() != 2:
            raise TypeError("MultiHeadSupervised needs attribute targets of shape (B, A) (0/1 per attribute), "
                            f"got {type(y).__name__} {tuple(y.shape) if torch.is_tensor(y) else ''}")
        logits = self.model(x)
        target = y[:, self.columns].long()
        return {"ce": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))}

    def evaluate(self, data) -> dict:
        acc = attribute_accuracy(self.model, data)
        return {"accuracy": float(np.mean(list(acc.values()))), **{f"accuracy/{k}": v for k, v in acc.items()}}


def train_source(arch: str, attributes: Sequence[str], train_data, val_data=None, *, epochs: int = 5,
                 lr: float = 1e-3, batch_size: int = 64, optimizer: str = "adam", weight_decay: float = 5e-4,
                 schedule: str | None = "cosine", seed: int = 0, arch_kwargs: Mapping | None = None,
                 cache: bool | str | os.PathLike = True, device=None, progress: bool | None = None):
    """Train (or load from the teacher cache) a multi-head source net; returns ``(model, history)``.

    Like :func:`kaviz.train.train_teacher` (same cache folder, same key ingredients: architecture,
    heads, data fingerprints, every setting, the seed), for a :class:`MultiHead` trained with
    :class:`MultiHeadSupervised` on the columns of ``attributes``. The model is returned in eval mode.
    """
    from ... import seed_everything
    from ...train import cached_training, fit, history_frame, history_meta, teacher_cache_folder, teacher_key

    attributes = check_head_names(attributes)
    attribute_columns(getattr(train_data, "classes", None), attributes, "training data")
    arch_kwargs = dict(arch_kwargs or {})
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
                    schedule=schedule, seed=seed, heads=list(attributes), classes=list(train_data.classes),
                    arch_kwargs=arch_kwargs)
    key = teacher_key(f"multihead:{arch}", len(attributes), train_data, val_data, device=device, **settings)
    folder = teacher_cache_folder(cache)
    fresh = {}

    def train():
        seed_everything(seed)
        model = MultiHead(arch, attributes, **arch_kwargs)
        history = fresh["history"] = fit(
            MultiHeadSupervised(model, train_data.classes), train_data, val_data, epochs=epochs, lr=lr,
            batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, schedule=schedule, seed=seed,
            device=device, progress=progress)
        return model, {"arch": arch, "heads": attributes, "settings": settings, **history_meta(history)}

    model, meta, cached = cached_training(folder, f"multihead-{arch}", key,
                                          lambda: MultiHead(arch, attributes, **arch_kwargs), train,
                                          what=f"source net {arch!r} {list(attributes)}")
    return model, history_frame(meta, cached, fresh.get("history"))
