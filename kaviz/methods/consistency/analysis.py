"""The knowledge-consistency analysis of one layer pair: fit a Trans-Net, keep its results (Consistency)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import nn

from .features import PairedFeatures, cached_features, check_pair
from .transnet import TransNet, TransNetLoss
from .variances import component_correlation, variance_table

CONTROLS = ("untrained", "shuffled")
"""The controls :func:`fit_transnet` can build instead of a fit: ``"untrained"`` (the Trans-Net as
initialised, never trained) and ``"shuffled"`` (trained and evaluated on A's features of *other* images:
the pairing is broken, so nothing A holds about an image can explain B's feature of it)."""


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (one cycle through a random order):
    row ``i`` of B is paired with row ``order[i] != i`` of A. ``n`` must be ≥ 2."""
    if n < 2:
        raise ValueError(f"a shuffled pairing needs at least 2 samples, got {n}")
    cycle = np.random.default_rng(seed).permutation(n)
    order = np.empty(n, dtype=np.int64)
    order[cycle] = np.roll(cycle, 1)
    return order


class Reordered:
    """Rows of ``rows`` (an array, tensor or memory-mapped store array) read in the order ``order``:
    ``Reordered(a, order)[i] == a[order[i]]``, for ints, slices and index arrays, read lazily."""

    def __init__(self, rows, order):
        if len(order) != len(rows):
            raise ValueError(f"order has {len(order)} entries for {len(rows)} rows")
        self.rows, self.order = rows, np.asarray(order, dtype=np.int64)

    def __len__(self):
        return len(self.order)

    @property
    def shape(self):
        return (len(self.order), *tuple(self.rows.shape[1:]))

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self.rows[int(self.order[i])]
        idx = self.order[i]
        up = np.argsort(idx, kind="stable")  # read in increasing order (memory maps), then put back
        part = self.rows[idx[up]] if not torch.is_tensor(self.rows) else self.rows[torch.from_numpy(idx[up])]
        back = np.argsort(up, kind="stable")
        return part[torch.from_numpy(back)] if torch.is_tensor(part) else np.asarray(part)[back]


@dataclass
class Consistency:
    """A trained Trans-Net from A's ``layer_a`` to B's ``layer_b`` and the cached features it was
    trained and evaluated on (``stores[split] = (store_A, store_B)``).

    ``variance(split)`` is the variance table; ``features(split, data)`` adds a split.
    ``history`` is the Trans-Net's training history (one row per epoch; ``restore="last"``: the
    statistics use the last epoch, as the reference does, and the validation split is never used
    to pick it).
    """

    transnet: TransNet
    history: object
    model_a: nn.Module
    model_b: nn.Module
    layer_a: str
    layer_b: str
    stores: dict = field(default_factory=dict)
    names: tuple = ("A", "B")
    example: torch.Tensor | None = None  # a few images, to check B's layers after the cut
    device: object = None  # where the variance pass runs (None: CPU)
    store_layers: tuple = ((), ())  # the layers held by A's and B's stores (new splits extract the same)
    control: str | None = None  # None, or one of CONTROLS (see fit_transnet)
    seed: int = 0  # the seed of the shuffled pairing (control="shuffled")
    pairing: dict = field(default_factory=dict)  # control="shuffled": split → the row of A paired with each row of B

    @property
    def gates(self) -> np.ndarray:
        return self.transnet.gates.numpy()

    def features(self, split: str, data=None):
        """``(store_A, store_B)`` of a split, extracted (once, cached on disk) from ``data``."""
        if data is not None:
            la, lb = (list(ls) or [l] for ls, l in zip(self.store_layers, (self.layer_a, self.layer_b)))
            sa = cached_features(self.model_a, data, la, device=self.device, progress=False)
            sb = cached_features(self.model_b, data, lb, device=self.device, progress=False)
            self.stores[split] = (sa, sb)
        if split not in self.stores:
            raise KeyError(f"no features for split {split!r}; have {sorted(self.stores)}: pass data=...")
        return self.stores[split]

    def pair_arrays(self, split: str = "val"):
        """``(x_A, x_B)`` of a split, aligned row by row (``control="shuffled"``: A's rows in the shuffled
        pairing, a fixed derangement per split)."""
        sa, sb = self.features(split)
        a, b = sa[self.layer_a], sb[self.layer_b]
        if self.control == "shuffled":
            if split not in self.pairing or len(self.pairing[split]) != len(a):
                self.pairing[split] = derangement(len(a), seed=self.seed + sum(map(ord, split)))
            a = Reordered(a, self.pairing[split])
        return a, b

    def variance(self, split: str = "val", batch_size: int = 256):
        """:func:`variance_table` of this Trans-Net on ``split`` (default: validation)."""
        a, b = self.pair_arrays(split)
        return variance_table(self.transnet, a, b, batch_size=batch_size, device=self.device)

    def correlation(self, split: str = "val", batch_size: int = 256):
        """:func:`component_correlation` of this Trans-Net's components on ``split``."""
        return component_correlation(self.transnet, self.pair_arrays(split)[0], batch_size=batch_size)

    def maps(self, indices, split: str = "val") -> dict:
        """For the samples ``indices`` of ``split``: ``a`` (x_A), ``b`` (x_B), ``g`` (g(x_A)),
        ``components`` (K, n, ...) and ``delta`` (x_B − g(x_A)), as float32 NumPy arrays."""
        a, b = self.pair_arrays(split)
        idx = np.asarray(indices, dtype=np.int64)
        xa = torch.from_numpy(np.array(a[idx], dtype=np.float32))
        xb = torch.from_numpy(np.array(b[idx], dtype=np.float32))
        with torch.no_grad():
            comps = self.transnet.decompose(xa)
            g = comps.sum(0)
        return {"a": xa.numpy(), "b": xb.numpy(), "g": g.numpy(), "components": comps.numpy(),
                "delta": (xb - g).numpy()}


def fit_transnet(model_a: nn.Module, model_b: nn.Module, train_data, val_data=None, *, layer_a: str,
                 layer_b: str | None = None, orders: int = 3, alpha=0.1, epochs: int = 100, lr: float = 1e-4,
                 batch_size: int = 64, weight_decay: float = 1e-4, schedule="loglinear", max_train: int | None = None,
                 seed: int = 0, names=("A", "B"), store_layers=None, device=None,
                 progress: bool | None = None, init: str = "default", control: str | None = None) -> Consistency:
    """Explain B's ``layer_b`` feature from A's ``layer_a`` feature (SPEC §3).

    1. Features of both networks are extracted once (``pool="none"``) into on-disk stores for the
       training split (and the validation split), keyed by weights, layer and data
       (:func:`cached_features`); the two layers must have the same shape (:func:`check_pair`).
    2. A :class:`TransNet` is trained on the training features (``max_train`` samples drawn with
       ``seed`` when given) with :class:`TransNetLoss` — ``MSE(g(x_A), x_B) + Σ α p²`` — by
       :func:`kaviz.train.fit`: Adam, weight decay 1e-4, batch 64, lr decaying log-linearly by 100×
       over the epochs (the paper: 1e-4 → 1e-6 over hundreds of epochs), last epoch kept.
    ``init``: the Trans-Net's initialisation (:class:`TransNet`; ``"kaiming"`` as the reference code).
    ``store_layers``: the layers each network's store holds (default: just the one used), so that
    Trans-Nets at several layers share one extraction pass per network and split.
    ``control``: build a control instead of the analysis (:data:`CONTROLS`): ``"untrained"`` returns the
    Trans-Net as initialised with ``seed`` (``history`` is None); ``"shuffled"`` trains and evaluates it on
    A's features of other images (each split's rows of A in a seeded :func:`derangement`). A claim about
    consistency that also holds for these is a property of the construction, not of the two networks.
    Returns a :class:`Consistency`; ``.variance()`` is the variance table on the validation split.
    """
    from ... import seed_everything
    from ...train import fit

    if control is not None and control not in CONTROLS:
        raise ValueError(f"control must be None or one of {CONTROLS}, got {control!r}")
    layer_b = layer_a if layer_b is None else layer_b
    example = _first_images(train_data)
    shape = check_pair(model_a, model_b, layer_a, layer_b, example)
    store_layers = [store_layers] if isinstance(store_layers, str) else list(store_layers or [])
    layers_a = list(dict.fromkeys(store_layers + [layer_a]))
    layers_b = list(dict.fromkeys(store_layers + [layer_b]))
    stores = {}
    for split, data in (("train", train_data), ("val", val_data)):
        if data is not None:
            stores[split] = (cached_features(model_a, data, layers_a, device=device, progress=progress),
                             cached_features(model_b, data, layers_b, device=device, progress=progress))
    cons = Consistency(None, None, model_a, model_b, layer_a, layer_b, stores, tuple(names), example, device,
                       (layers_a, layers_b), control, seed)
    a, b = cons.pair_arrays("train")
    indices = None
    if max_train is not None and max_train < len(a):
        if max_train < 1:
            raise ValueError(f"max_train must be >= 1, got {max_train}")
        indices = np.sort(np.random.default_rng(seed).choice(len(a), size=int(max_train), replace=False))
    train_pairs = PairedFeatures(a, b, indices)
    val_pairs = PairedFeatures(*cons.pair_arrays("val")) if "val" in stores else None
    seed_everything(seed)
    transnet = TransNet(shape[0], orders, init=init)
    if control != "untrained":
        method = TransNetLoss(transnet, alpha)
        cons.history = fit(method, train_pairs, val_pairs, epochs=epochs, lr=lr, batch_size=batch_size,
                           optimizer="adam", weight_decay=weight_decay, schedule=schedule, restore="last", seed=seed,
                           device=device, progress=progress)
    cons.transnet = transnet.cpu().eval()
    return cons


def _first_images(data, n: int = 2) -> torch.Tensor:
    items = [data[i] for i in range(min(n, len(data)))]
    xs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    return torch.stack(xs)


def compare(results: Mapping[str, Consistency], split: str = "val"):
    """One row per pair (``results``: name → :class:`Consistency`): the share of Var(x_B) of each
    order, of g(x_A) and of x^Δ, the absolute Var(x_B), and the learned gates."""
    import pandas as pd

    rows = []
    for name, res in results.items():
        t = res.variance(split).set_index("component")
        row = {"pair": name}
        for comp in t.index:
            if comp != "x_B":
                row[f"share {comp.split(' =')[0]}"] = t.loc[comp, "share"]
        row["Var(x_B)"] = t.loc["x_B", "variance"]
        for k, p in enumerate(res.gates):
            row[f"p{k}"] = float(p)
        rows.append(row)
    return pd.DataFrame(rows).set_index("pair")
