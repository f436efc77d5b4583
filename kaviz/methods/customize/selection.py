"""Choosing, for each image and attribute, the source whose head is most confident (lowest entropy)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .multihead import MultiHead, check_head_names


def head_entropy(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Entropy of softmax over the last axis, ``H = -Σ_k p_k log p_k`` with ``log p = log_softmax``.

    Computed from ``log_softmax`` so that it stays finite for any finite logits (``softmax`` then
    ``log`` gives ``0 · log 0 = nan`` once a probability underflows)."""
    z = torch.as_tensor(logits).float()
    logp = F.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def predict(model: nn.Module, data, batch_size: int = 256) -> np.ndarray:
    """The model's outputs on every sample of ``data`` in order (``(N, A, 2)`` for a MultiHead)."""
    from ...features import OUTPUT, extract

    return extract(model, data, OUTPUT, pool="none", batch_size=batch_size, progress=False)[OUTPUT]


def select_from_logits(logits) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` (N, S, K): the K-way logits of the same attribute head from S sources. Returns
    ``(index (N,), entropy (N, S))``: per image, the source whose head has the lowest entropy
    (the first one on ties)."""
    z = torch.as_tensor(np.asarray(logits)).float()
    if z.dim() != 3 or z.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, sources, classes), got {tuple(z.shape)}")
    H = head_entropy(z)
    return H.argmin(dim=1).numpy().astype(np.int64), H.numpy()


@dataclass
class Assignment:
    """Which source teaches attribute ``attribute`` on each image (SPEC §5, step 1).

    ``sources``: names of the sources covering the attribute (in the given order); ``index`` (N,):
    position in ``sources`` of the source assigned to each image; ``entropy`` (N, S) and ``logits``
    (N, S, 2): each source's head on each image."""

    attribute: str
    sources: list[str]
    index: np.ndarray
    entropy: np.ndarray
    logits: np.ndarray

    def shares(self):
        """Share of images assigned to each source (a pandas Series)."""
        import pandas as pd

        counts = np.bincount(self.index, minlength=len(self.sources))
        return pd.Series(counts / max(len(self.index), 1), index=self.sources, name=self.attribute)

    def images_of(self, source: str) -> np.ndarray:
        """Indices of the images assigned to ``source``."""
        if source not in self.sources:
            raise KeyError(f"source {source!r} does not cover {self.attribute!r}; the sources that do: {self.sources}")
        return np.flatnonzero(self.index == self.sources.index(source))

    def __len__(self):
        return len(self.index)


def select_sources(sources: Mapping[str, MultiHead], attributes: str | Sequence[str], data, *,
                   batch_size: int = 256, logits: Mapping[str, np.ndarray] | None = None) -> dict[str, Assignment]:
    """Entropy-based selective learning for each attribute: ``{attribute: Assignment}``.

    Every source's outputs on ``data`` are computed once (or taken from ``logits``, ``{source name:
    (N, A_t, 2)}``, e.g. from :func:`predict`) and shared by the attributes. Labels are not read.
    """
    from ...data import Unlabeled

    attributes = check_head_names(attributes)
    if not sources:
        raise ValueError("select_sources needs at least one source")
    logits = dict(logits or {})
    out = {}
    for a in attributes:
        names = [s for s, m in sources.items() if a in m.attributes]
        if not names:
            cover = {s: m.attributes for s, m in sources.items()}
            raise ValueError(f"no source covers attribute {a!r}; the sources cover {cover}")
        for s in names:
            if s not in logits:
                logits[s] = predict(sources[s], Unlabeled(data), batch_size)
        z = np.stack([logits[s][:, sources[s].head_index(a)] for s in names], axis=1)
        index, H = select_from_logits(z)
        out[a] = Assignment(a, names, index, H, z)
    return out


class AssignedImages(torch.utils.data.Dataset):
    """``(image, assigned source index)`` for every image of ``data`` (its targets are never read)."""

    def __init__(self, data, index):
        index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        if index.dim() != 1 or len(index) != len(data):
            raise ValueError(f"the assignment has {tuple(index.shape)} entries for {len(data)} images; "
                             "select on the same data you train on")
        from ...data import Unlabeled

        self.images = Unlabeled(data)
        self.index = index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.images[i], self.index[i]

    @property
    def fingerprint(self) -> str:
        from ...data import digest, fingerprint

        return digest(("assigned", fingerprint(self.images), self.index))
