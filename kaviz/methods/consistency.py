"""Knowledge consistency between two networks (Liang, Li, Li, Wang & Zhang, "Knowledge Consistency
between Neural Networks and Beyond", ICLR 2020; SPEC.md §3).

Explain network B's intermediate feature ``x_B`` from network A's feature ``x_A`` with a small
"Trans-Net" ``g`` whose output splits *exactly* into components of increasing non-linearity
("fuzziness"): ``x_B ≈ x⁽⁰⁾ + x⁽¹⁾ + … + x⁽ᴷ⁻¹⁾ = g(x_A)``, and ``x^Δ = x_B − g(x_A)`` is the part of
B's knowledge that A does not hold (the inconsistent part).

What is here:

- :class:`TransNet` (any number of orders K ≥ 1), its loss :class:`TransNetLoss` (MSE + the α
  penalty on the gates) and :func:`fit_transnet`, which extracts both networks' features ONCE into
  on-disk :class:`kaviz.features.FeatureStore`\\ s (training and validation splits) and trains the
  Trans-Net on them with :func:`kaviz.train.fit` (Adam, log-linear lr decay);
- the variance analysis (:func:`component_variance`, :func:`variance_table`, :func:`compare`);
- trans-classification (:func:`tail_after`, :class:`TransClassifier`, :func:`trans_classification`):
  A's consistent components, chosen by an order mask, are fed into B's layers after the cut;
- Born-Again chains (:class:`BornAgain`, :func:`born_again_chain`);
- what the notebook's "visual contract" widget shows (:func:`contract_view`), and the data the
  notebook runs on (:func:`load_data`, :func:`coarse_task`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..losses import soft_cross_entropy
from ..train import freeze

__all__ = [
    "TransNet",
    "ReluState",
    "spatial_scale",
    "TransNetLoss",
    "PairedFeatures",
    "FeatureLabels",
    "cached_features",
    "check_pair",
    "fit_transnet",
    "Consistency",
    "component_variance",
    "component_correlation",
    "variance_table",
    "compare",
    "tail_after",
    "TransClassifier",
    "trans_classification",
    "BornAgain",
    "born_again_chain",
    "ContractView",
    "contract_view",
    "Relabelled",
    "coarse_task",
    "default_coarse_groups",
    "NotebookData",
    "load_data",
    "halves",
]

_SUP = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def order_name(k: int) -> str:
    """``x⁽ᵏ⁾`` with a superscript order (``x⁽⁰⁾``, ``x⁽¹⁾``, ...)."""
    return f"x⁽{str(k).translate(_SUP)}⁾"


# ------------------------------------------------------------------------------------- Trans-Net
def spatial_scale(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``n(z)`` of SPEC §3: per sample and channel, the unbiased standard deviation over spatial
    positions plus ``eps``, computed without gradient and without subtracting anything from ``z``;
    1 for 1×1 maps (an FC feature seen as C×1×1). Shape (B, C, 1, 1)."""
    if z.dim() != 4:
        raise ValueError(f"spatial_scale expects (B, C, H, W), got shape {tuple(z.shape)}")
    if z.shape[-1] * z.shape[-2] == 1:
        return torch.ones(z.shape[0], z.shape[1], 1, 1, dtype=z.dtype, device=z.device)
    with torch.no_grad():
        return z.detach().flatten(2).std(dim=2, correction=1).add(eps)[..., None, None]


class ReluState(NamedTuple):
    """The linearisation point of a :class:`TransNet` pass: the ReLU masks ``M_k = 1[h_k > 0]`` and
    the scales ``n(h_k)`` of its K−1 gated non-linearities (each (B, C, H, W) / (B, C, 1, 1))."""

    masks: tuple
    scales: tuple


class TransNet(nn.Module):
    """The normalised, gated Trans-Net ``g`` of Knowledge Consistency (ICLR 2020; SPEC §3).

    With K = ``orders`` convolutions ``W_0 … W_{K−1}`` (C→C, 3×3, padding 1, no bias) and K−1 gates
    ``p_k = sigmoid(θ_k)`` (θ initialised to 0, so p = 0.5)::

        x̄ = x / n(x);   z_0 = x̄
        h_{k+1} = W_k ∗ z_k,   a_{k+1} = p_k · ReLU(h_{k+1} / n(h_{k+1})),   z_{k+1} = x̄ + a_{k+1}
        g(x) = W_{K−1} ∗ z_{K−1}

    (K = 3: ``h1 = W0∗x̄; a1 = p0·ReLU(h1/n(h1)); h2 = W1∗(x̄+a1); a2 = p1·ReLU(h2/n(h2));
    g = W2∗(x̄+a2)``.) With the masks ``M_k`` and the scales of the full pass held fixed, each path
    through the net is linear in x̄, and :meth:`decompose` returns the component of every order
    k = 0 … K−1 (the number of gated non-linearities on the path); they sum to ``g(x)``. The
    component of order k ≥ 1 uses the last k gates ``p_{K−1−k} … p_{K−2}`` (:meth:`gates_used`) and
    is proportional to each of them.

    ``n`` makes ``g`` (almost exactly: up to ``eps``) invariant to a positive rescaling of its input.
    Inputs are feature maps (B, C, H, W) or FC features (B, C), treated as C×1×1.
    """

    def __init__(self, channels: int, orders: int = 3, *, kernel_size: int = 3, eps: float = 1e-5):
        super().__init__()
        for name, v, lo in (("channels", channels, 1), ("orders", orders, 1), ("kernel_size", kernel_size, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"TransNet: {name} must be an int >= {lo}, got {v!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"TransNet: kernel_size must be odd (so that 'same' padding keeps H×W), got {kernel_size}")
        self.channels = int(channels)
        self.orders = int(orders)
        self.eps = float(eps)
        self.convs = nn.ModuleList(
            nn.Conv2d(self.channels, self.channels, kernel_size, padding=kernel_size // 2, bias=False)
            for _ in range(self.orders))
        self.theta = nn.Parameter(torch.zeros(self.orders - 1))

    # --- gates -----------------------------------------------------------------------------------
    @property
    def gates(self) -> torch.Tensor:
        """p = sigmoid(θ), a detached copy (K−1 values)."""
        return torch.sigmoid(self.theta.detach()).clone()

    def set_gates(self, p) -> None:
        """Set the gates to given values in (0, 1) (θ = logit p), e.g. to ablate a path."""
        p = torch.as_tensor(p, dtype=self.theta.dtype).reshape(-1)
        if p.numel() != self.orders - 1:
            raise ValueError(f"this TransNet has {self.orders - 1} gates, got {p.numel()} values")
        if not bool(((p > 0) & (p < 1)).all()):
            raise ValueError(f"gate values must lie strictly between 0 and 1, got {p.tolist()}")
        with torch.no_grad():
            self.theta.copy_(torch.logit(p))

    def gates_used(self, order: int) -> list[int]:
        """Indices of the gates on the path of component ``order``: the last ``order`` gates."""
        if not 0 <= order < self.orders:
            raise ValueError(f"order must be in 0..{self.orders - 1}, got {order}")
        return list(range(self.orders - 1 - order, self.orders - 1))

    def gate_penalty(self, alpha=0.1) -> torch.Tensor:
        """``Σ_k α_k p_k²`` (with gradient); ``alpha`` a number or one value per gate."""
        p = torch.sigmoid(self.theta)
        a = _alpha(alpha, self.orders - 1).to(p)
        return (a * p * p).sum()

    # --- passes ----------------------------------------------------------------------------------
    def _as_maps(self, x: torch.Tensor):
        if not torch.is_tensor(x) or x.dim() not in (2, 4):
            raise ValueError(f"TransNet expects features (B, C, H, W) or (B, C), got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        if x.shape[1] != self.channels:
            raise ValueError(f"TransNet(channels={self.channels}) got features with {x.shape[1]} channels; "
                             "build it with TransNet(channels=<the feature's channel count>)")
        return (x[:, :, None, None], True) if x.dim() == 2 else (x, False)

    def _run(self, x4: torch.Tensor, record: bool):
        xbar = x4 / spatial_scale(x4, self.eps)
        p = torch.sigmoid(self.theta)
        z = xbar
        masks, scales = [], []
        for k in range(self.orders - 1):
            h = self.convs[k](z)
            s = spatial_scale(h, self.eps)
            if record:
                masks.append((h > 0).detach())
                scales.append(s)
            z = xbar + p[k] * F.relu(h / s)
        return self.convs[-1](z), xbar, ReluState(tuple(masks), tuple(scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """g(x), same shape as x."""
        x4, flat = self._as_maps(x)
        out = self._run(x4, record=False)[0]
        return out.flatten(1) if flat else out

    def relu_state(self, x: torch.Tensor) -> ReluState:
        """The masks and scales of the full pass on ``x`` (pass to :meth:`decompose` to hold them
        fixed while, e.g., the gates change)."""
        with torch.no_grad():
            return self._run(self._as_maps(x)[0], record=True)[2]

    def decompose(self, x: torch.Tensor, state: ReluState | None = None) -> torch.Tensor:
        """The components ``x⁽⁰⁾ … x⁽ᴷ⁻¹⁾``, stacked: shape (K, *x.shape); they sum to ``g(x)``.

        With the masks and scales of the full pass fixed (or those of ``state``),
        ``x⁽ᵏ⁾ = W_{K−1} ∗ L_{K−1}(… L_{K−k}(x̄))`` with ``L_j(z) = p_{j−1}·M_j ⊙ (W_{j−1} ∗ z) / n(h_j)``;
        for K = 3: ``x⁽⁰⁾ = W2∗x̄``, ``x⁽¹⁾ = W2∗(p1·M2⊙(W1∗x̄)/n(h2))``,
        ``x⁽²⁾ = W2∗(p1·M2⊙(W1∗(p0·M1⊙(W0∗x̄)/n(h1)))/n(h2))``.
        """
        x4, flat = self._as_maps(x)
        if state is None:
            with torch.no_grad():
                state = self._run(x4, record=True)[2]
        elif len(state.masks) != self.orders - 1 or len(state.scales) != self.orders - 1:
            raise ValueError(f"state has {len(state.masks)} masks for a TransNet with {self.orders - 1} gates")
        elif state.masks and tuple(state.masks[0].shape) != tuple(x4.shape):
            raise ValueError(f"state was computed for features of shape {tuple(state.masks[0].shape)}, "
                             f"not {tuple(x4.shape)}; call relu_state on the same batch")
        xbar = x4 / spatial_scale(x4, self.eps)
        p = torch.sigmoid(self.theta)
        b = x4.shape[0]
        comps = xbar[None]  # components of z_k by order: (k + 1, B, C, H, W)
        for k in range(self.orders - 1):
            h = self.convs[k](comps.flatten(0, 1)).unflatten(0, (comps.shape[0], b))
            lin = h * (p[k] * state.masks[k].to(h.dtype) / state.scales[k])
            comps = torch.cat([xbar[None], lin], 0)
        out = self.convs[-1](comps.flatten(0, 1)).unflatten(0, (self.orders, b))
        return out.flatten(2) if flat else out


def _alpha(alpha, n: int) -> torch.Tensor:
    a = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
    if a.numel() == 1:
        a = a.expand(n)
    if a.numel() != n:
        raise ValueError(f"alpha must be one number or one value per gate ({n}), got {a.numel()} values")
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError(f"alpha must be finite and >= 0, got {a.tolist()}")
    return a.clone()


class TransNetLoss(nn.Module):
    """Trains a :class:`TransNet` on paired features ``(x_A, x_B)`` (SPEC §3):
    ``{"mse": MSE(g(x_A), x_B), "gate_penalty": Σ_k α_k p_k²}`` (α = 0.1 per gate by default; the
    paper uses 8.0 for AlexNet). ``evaluate`` logs the gates ``p0, p1, …`` every epoch."""

    def __init__(self, transnet: TransNet, alpha=0.1):
        super().__init__()
        self.transnet = transnet
        self.register_buffer("alpha", _alpha(alpha, transnet.orders - 1), persistent=False)

    def forward(self, batch):
        xa, xb = batch[0], batch[1]
        out = self.transnet(xa)
        if out.shape != xb.shape:
            raise ValueError(f"g(x_A) has shape {tuple(out.shape)} but x_B has {tuple(xb.shape)}: the Trans-Net "
                             "maps a feature to one of the same shape; pick layers of equal shape")
        return {"mse": F.mse_loss(out, xb), "gate_penalty": self.transnet.gate_penalty(self.alpha)}

    def evaluate(self, data) -> dict:
        return {f"p{k}": float(v) for k, v in enumerate(self.transnet.gates)}


# ------------------------------------------------------------------------------------- features
class PairedFeatures(Dataset):
    """``(x_A[i], x_B[i])`` from two aligned feature arrays (memory-mapped store arrays work; a
    sample is read only when asked for). ``indices`` selects a subset."""

    def __init__(self, a, b, indices=None):
        if len(a) != len(b):
            raise ValueError(f"the two feature arrays have {len(a)} and {len(b)} samples; they must be aligned "
                             "(features of the same images, in the same order)")
        self.a, self.b = a, b
        self.indices = np.arange(len(a)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        return _row(self.a, j), _row(self.b, j)


class FeatureLabels(Dataset):
    """``(feature[i], label[i])`` from a feature array and class ids (for trans-classification)."""

    def __init__(self, features, targets, indices=None):
        if targets is None:
            raise ValueError("trans-classification needs class labels, but the feature store holds no targets "
                             "(extract features from a dataset that yields (image, label))")
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} features but {len(targets)} labels")
        self.features, self.targets_all = features, np.asarray(targets)
        self.indices = np.arange(len(features)) if indices is None else np.asarray(indices, dtype=np.int64)

    @property
    def targets(self):
        return torch.from_numpy(self.targets_all[self.indices].astype(np.int64))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        return _row(self.features, j), torch.tensor(int(self.targets_all[j]), dtype=torch.int64)


def _row(a, j):
    if torch.is_tensor(a):
        return a[j].float()
    return torch.from_numpy(np.array(a[j], dtype=np.float32))


def _data_key(data) -> str:
    from ..data import fingerprint

    try:
        return fingerprint(data)
    except TypeError as e:
        raise TypeError(f"features are cached on disk by a key of the data, and this data cannot be "
                        f"fingerprinted: {e}") from None


def cached_features(model: nn.Module, data, layers, *, batch_size: int = 256, device=None,
                    progress: bool | None = None):
    """``kaviz.features.extract(model, data, layers, pool="none", store=<folder>)`` with the folder
    under ``cache_dir("features", "consistency")`` named by a key of the weights, the layers and the
    data, so each (model, layers, data) has its own store, computed once and reused."""
    from ..features import extract
    from ..models import spec, weights_hash
    from ..train import cache_dir

    from .. import default_device

    layers = [layers] if isinstance(layers, str) else list(layers)
    key = hashlib.sha1(json.dumps([weights_hash(model), layers, _data_key(data)]).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(spec(model).get("name", "model")))
    folder = cache_dir("features", "consistency") / f"{name}-{key}"
    home = next((p.device for p in model.parameters()), torch.device("cpu"))
    dev = default_device(device) if device is not None else home
    try:
        model.to(dev)  # extract runs where the model is; put it back afterwards
        return extract(model, data, layers, pool="none", store=folder, batch_size=batch_size, device=dev,
                       progress=progress, clone=True)
    finally:
        model.to(home)


def _probe_shapes(model, layer, example):
    from ..features import FeatureTap, eval_mode

    with eval_mode(model), torch.no_grad(), FeatureTap(model, [layer], clone=True) as tap:
        model(example)
        return tuple(tap[layer].shape[1:])


def check_pair(model_a: nn.Module, model_b: nn.Module, layer_a: str, layer_b: str, example: torch.Tensor):
    """Raise when A's ``layer_a`` and B's ``layer_b`` give features of different shapes (one forward
    pass on ``example``, a batch of images); the error lists B's layers that have A's shape."""
    sa, sb = _probe_shapes(model_a, layer_a, example), _probe_shapes(model_b, layer_b, example)
    if sa != sb:
        from ..features import layer_table

        table = layer_table(model_b, example)
        fits = [r for r, s in zip(table["name"], table["shape"]) if s == str(sa)]
        fits = fits[:12] + (["..."] if len(fits) > 12 else [])
        hint = (f"B's layers with A's shape {sa}: {', '.join(fits)}" if fits else
                f"B has no layer of shape {sa}")
        raise ValueError(
            f"A's feature {layer_a!r} has shape {sa} but B's {layer_b!r} has {sb}: a Trans-Net maps a feature to "
            f"one of the same shape. {hint}. (kaviz.features.layer_table(model, images) lists every layer's shape.)")
    return sa


# ---------------------------------------------------------------------------------- the analysis
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
        sa, sb = self.features(split)
        return sa[self.layer_a], sb[self.layer_b]

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
                 progress: bool | None = None) -> Consistency:
    """Explain B's ``layer_b`` feature from A's ``layer_a`` feature (SPEC §3).

    1. Features of both networks are extracted once (``pool="none"``) into on-disk stores for the
       training split (and the validation split), keyed by weights, layer and data
       (:func:`cached_features`); the two layers must have the same shape (:func:`check_pair`).
    2. A :class:`TransNet` is trained on the training features (``max_train`` samples drawn with
       ``seed`` when given) with :class:`TransNetLoss` — ``MSE(g(x_A), x_B) + Σ α p²`` — by
       :func:`kaviz.train.fit`: Adam, weight decay 1e-4, batch 64, lr decaying log-linearly by 100×
       over the epochs (the paper: 1e-4 → 1e-6 over hundreds of epochs), last epoch kept.
    ``store_layers``: the layers each network's store holds (default: just the one used), so that
    Trans-Nets at several layers share one extraction pass per network and split.
    Returns a :class:`Consistency`; ``.variance()`` is the variance table on the validation split.
    """
    from .. import seed_everything
    from ..train import fit

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
    a, b = stores["train"][0][layer_a], stores["train"][1][layer_b]
    indices = None
    if max_train is not None and max_train < len(a):
        if max_train < 1:
            raise ValueError(f"max_train must be >= 1, got {max_train}")
        indices = np.sort(np.random.default_rng(seed).choice(len(a), size=int(max_train), replace=False))
    train_pairs = PairedFeatures(a, b, indices)
    val_pairs = PairedFeatures(stores["val"][0][layer_a], stores["val"][1][layer_b]) if "val" in stores else None
    seed_everything(seed)
    transnet = TransNet(shape[0], orders)
    method = TransNetLoss(transnet, alpha)
    history = fit(method, train_pairs, val_pairs, epochs=epochs, lr=lr, batch_size=batch_size, optimizer="adam",
                  weight_decay=weight_decay, schedule=schedule, restore="last", seed=seed, device=device,
                  progress=progress)
    transnet.cpu().eval()
    return Consistency(transnet, history, model_a, model_b, layer_a, layer_b, stores, tuple(names), example, device,
                       (layers_a, layers_b))


def _first_images(data, n: int = 2) -> torch.Tensor:
    items = [data[i] for i in range(min(n, len(data)))]
    xs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    return torch.stack(xs)


# ------------------------------------------------------------------------------------- variances
def component_variance(x) -> float:
    """SPEC §3: centre ``x`` per channel (mean over samples and positions), then the mean of the
    squared deviations over samples, channels and positions. ``x``: (N, C, H, W) or (N, C)."""
    t = x.double() if torch.is_tensor(x) else torch.from_numpy(np.array(x, dtype=np.float64))
    if t.dim() < 2:
        raise ValueError(f"component_variance expects (N, C, ...) features, got shape {tuple(t.shape)}")
    dims = [0] + list(range(2, t.dim()))
    return float((t - t.mean(dim=dims, keepdim=True)).pow(2).mean())


class _Moments:
    """Per-channel running sums (float64) for :func:`component_variance` over batches."""

    def __init__(self):
        self.s = self.ss = None
        self.n = 0

    def add(self, t: torch.Tensor):
        t = t.double().transpose(0, 1).reshape(t.shape[1], -1)  # (C, samples·positions)
        s, ss = t.sum(1).cpu(), t.pow(2).sum(1).cpu()
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += t.shape[1]

    def variance(self) -> float:
        mean = self.s / self.n
        return float((self.ss / self.n - mean * mean).clamp_min(0).mean())


def variance_table(transnet: TransNet, xa, xb, *, batch_size: int = 256, device=None):
    """The variance analysis of SPEC §3 over paired features ``(x_A, x_B)`` (use the validation split).

    Rows: each order's component ``x⁽ᵏ⁾``, their sum ``g(x_A)`` (all consistent knowledge), the
    inconsistent part ``x^Δ = x_B − g(x_A)`` and the target ``x_B``. Columns: ``variance`` (as
    :func:`component_variance` defines it — the reference script's number, not normalised) and
    ``share`` = variance / Var(x_B) (kaviz's addition; the paper's exact normaliser is not
    confirmed). Shares need not add up to 1: the components are correlated.
    """
    import pandas as pd

    if len(xa) != len(xb):
        raise ValueError(f"x_A has {len(xa)} samples and x_B {len(xb)}; they must be aligned")
    if len(xa) < 2:
        raise ValueError("the variance analysis needs at least 2 samples")
    from .. import default_device

    K = transnet.orders
    acc = {k: _Moments() for k in range(K)}
    acc_g, acc_d, acc_b = _Moments(), _Moments(), _Moments()
    dev = default_device(device) if device is not None else next(transnet.parameters()).device
    home = next(transnet.parameters()).device
    transnet.to(dev)
    with torch.no_grad():
        for i in range(0, len(xa), batch_size):
            a = _batch(xa, i, batch_size).to(dev)
            b = _batch(xb, i, batch_size).to(dev)
            comps = transnet.decompose(a)
            if comps.shape[1:] != b.shape:
                raise ValueError(f"g(x_A) has shape {tuple(comps.shape[1:])} but x_B has {tuple(b.shape)}")
            g = comps.sum(0)
            for k in range(K):
                acc[k].add(comps[k])
            acc_g.add(g)
            acc_d.add(b - g)
            acc_b.add(b)
    transnet.to(home)
    var_b = acc_b.variance()
    rows = [(order_name(k), f"consistent, order {k}", acc[k].variance()) for k in range(K)]
    rows += [("g(x_A) = Σ x⁽ᵏ⁾", "consistent, all orders", acc_g.variance()),
             ("x^Δ = x_B − g(x_A)", "inconsistent", acc_d.variance()),
             ("x_B", "target", var_b)]
    df = pd.DataFrame(rows, columns=["component", "kind", "variance"])
    df["share"] = df["variance"] / var_b if var_b > 0 else np.nan
    df.attrs["definition"] = ("variance: centred per channel, mean of squares over samples, channels and "
                              "positions; share: variance / Var(x_B)")
    return df


def _batch(x, i, n):
    part = x[i:i + n]
    if torch.is_tensor(part):
        return part.float()
    return torch.from_numpy(np.array(part, dtype=np.float32))


def component_correlation(transnet: TransNet, xa, *, batch_size: int = 256):
    """Correlation between the components ``x⁽ᵏ⁾`` over ``xa`` (each centred per channel, as in the
    variance analysis; then pooled over samples, channels and positions): a K×K DataFrame. Strongly
    negative off-diagonal values mean that one order cancels another, so their variances overlap."""
    import pandas as pd

    K = transnet.orders
    n, s, gram = 0, None, None
    with torch.no_grad():
        for i in range(0, len(xa), batch_size):
            comps = transnet.decompose(_batch(xa, i, batch_size)).double()
            flat = comps.transpose(1, 2).reshape(K, comps.shape[2], -1)  # (K, C, samples·positions)
            s = flat.sum(2) if s is None else s + flat.sum(2)
            g = torch.einsum("kcn,lcn->klc", flat, flat)
            gram = g if gram is None else gram + g
            n += flat.shape[2]
    mean = s / n
    cov = (gram / n - mean[:, None, :] * mean[None, :, :]).mean(2)  # per-channel centred, averaged over channels
    d = cov.diagonal().clamp_min(1e-300).sqrt()
    names = [order_name(k) for k in range(K)]
    return pd.DataFrame((cov / d[:, None] / d[None, :]).numpy(), index=names, columns=names)


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


# ---------------------------------------------------------------------------- trans-classification
_FLATTEN = "<flatten>"


def _chain(parent: nn.Module) -> list | None:
    """The children of ``parent`` in the order its forward applies them (``_FLATTEN`` for a
    functional ``torch.flatten``), or None when its forward is not a plain chain."""
    from ..models.small import BasicBlock, CifarResNet, InvertedResidual, SmallMobileNet, SmallVGG

    names = [n for n, _ in parent.named_children()]
    if isinstance(parent, (CifarResNet, SmallVGG, SmallMobileNet)):
        return names
    if isinstance(parent, BasicBlock):
        return None
    if isinstance(parent, InvertedResidual):
        return None if parent.residual else names
    cls = type(parent)
    if cls.__module__.startswith("torchvision.models"):
        if cls.__name__ == "ResNet":
            return ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool",
                    _FLATTEN, "fc"]
        if cls.__name__ == "VGG":
            return ["features", "avgpool", _FLATTEN, "classifier"]
    if type(parent) is nn.Sequential or (isinstance(parent, nn.Sequential)
                                         and type(parent).forward is nn.Sequential.forward):
        return names
    return None


def tail_after(model: nn.Module, layer: str) -> nn.Sequential:
    """B's layers after the cut: an ``nn.Sequential`` that maps the feature of ``layer`` (a dotted
    module name; ``"<name>:in"`` cuts before that module) to the model's output.

    Works for kaviz's small families (``cifar_resnet*`` also at ``layerK.i.merge``, the residual sum
    before the block's last ReLU), torchvision ResNets (at block boundaries) and VGGs, and any
    plain ``nn.Sequential``; other places raise an error that says where a cut is possible.
    The modules are shared with ``model`` (deep-copy the result before fine-tuning it).
    """
    from ..features import _parse, _unknown
    from ..models.small import BasicBlock

    name, where = _parse(layer)
    modules = dict(model.named_modules())
    if name not in modules:
        raise _unknown(model, name)
    if name == "":
        return nn.Sequential()
    parts = name.split(".")
    after: list[nn.Module] = [modules[name]] if where == "in" else []
    for depth in range(len(parts), 0, -1):
        parent_name = ".".join(parts[:depth - 1])
        parent = modules[parent_name]
        child = parts[depth - 1]
        if isinstance(parent, BasicBlock) and child in ("merge", "relu2"):
            after += [parent.relu2] if child == "merge" else []
            continue
        order = _chain(parent)
        if order is None or child not in order:
            where_ok = parent_name or type(model).__name__
            raise ValueError(
                f"cannot run {type(model).__name__} from the feature of {layer!r}: {where_ok!r} "
                f"({type(parent).__name__}) does not apply its children as a plain chain (e.g. a residual block), "
                "so the layers after the cut are not known. Cut at a block boundary (e.g. 'layer3' or 'layer3.1'), "
                "at 'layerK.i.merge' in kaviz's cifar_resnet, at 'features.N' of a VGG; or pass your own tail module.")
        own = dict(parent.named_children())
        for n in order[order.index(child) + 1:]:
            after.append(nn.Flatten() if n == _FLATTEN else own[n])
    return nn.Sequential(*after)


def _check_tail(model, layer, tail, example):
    from ..features import FeatureTap, eval_mode

    with eval_mode(model), eval_mode(tail), torch.no_grad():
        with FeatureTap(model, [layer], clone=True) as tap:  # the tail shares modules: run it outside the tap
            out = model(example)
            feature = tap[layer]
        try:
            again = tail(feature)
        except RuntimeError:  # e.g. a shape mismatch inside the tail
            again = None
    if again is None or again.shape != out.shape or not torch.allclose(again, out, rtol=1e-4, atol=1e-5):
        raise ValueError(f"the layers after {layer!r} do not reproduce {type(model).__name__}'s output from the "
                         "tapped feature (its forward is not the chain kaviz assumed); cut at another layer")


class TransClassifier(nn.Module):
    """B's layers after the cut (``tail``, trainable), fed ``Σ_k mask_k · x⁽ᵏ⁾(x_A)`` from a frozen
    Trans-Net — or B's own feature when ``transnet`` is None. ``{"ce": cross-entropy}``;
    ``evaluate`` reports ``accuracy``. Batches are ``(feature, label)``."""

    def __init__(self, tail: nn.Module, transnet: TransNet | None = None, mask=None):
        super().__init__()
        self.tail = tail
        self.transnet = freeze(transnet) if transnet is not None else None
        if transnet is None:
            if mask is not None:
                raise ValueError("a mask selects Trans-Net components: pass transnet= too")
            self.mask = None
        else:
            m = torch.ones(transnet.orders) if mask is None else torch.as_tensor(mask, dtype=torch.float32).reshape(-1)
            if m.numel() != transnet.orders:
                raise ValueError(f"mask has {m.numel()} entries for a Trans-Net with {transnet.orders} orders "
                                 f"(one 0/1 per order, e.g. {[1] * transnet.orders})")
            self.mask = m.tolist()

    def inputs(self, f: torch.Tensor) -> torch.Tensor:
        if self.transnet is None:
            return f
        with torch.no_grad():
            comps = self.transnet.module.decompose(f)
            m = torch.tensor(self.mask, dtype=comps.dtype, device=comps.device)
            return (comps * m.view(-1, *([1] * (comps.dim() - 1)))).sum(0)

    def forward(self, batch):
        f, y = batch[0], batch[1]
        return {"ce": F.cross_entropy(self.tail(self.inputs(f)), y)}

    def evaluate(self, data, batch_size: int = 256) -> dict:
        from .. import metrics
        from ..features import eval_mode

        dev = next(self.tail.parameters()).device
        logits, ys = [], []
        with eval_mode(self), torch.no_grad():
            for f, y in torch.utils.data.DataLoader(data, batch_size=batch_size):
                logits.append(self.tail(self.inputs(f.to(dev))).cpu())
                ys.append(y)
        return {"accuracy": metrics.accuracy(torch.cat(logits), torch.cat(ys))}


def trans_classification(cons: Consistency, test_data=None, *, masks=((1, 1, 1), (1, 0, 0)), epochs: int = 10,
                         lr: float = 1e-5, batch_size: int = 64, schedule="loglinear", weight_decay: float = 0.0,
                         control: bool = True, max_train: int | None = None, precompute: bool = True,
                         tail: nn.Module | None = None, seed: int = 0, device=None, progress: bool | None = None):
    """Feature refinement (SPEC §3): feed A's consistent components chosen by each order mask into B's
    layers after the cut and fine-tune those layers (Adam, lr decaying log-linearly by 100×: the
    paper's 1e-5 → 1e-7); compare with B alone.

    Rows: B alone (its own feature, not fine-tuned); B's tail fine-tuned on its own feature with the
    same schedule (``control``: any gain that is only due to the extra fine-tuning shows here); for
    each mask, the masked components before and after fine-tuning. Accuracies on the validation
    split (best epoch, which also selects the test number) and, when ``test_data`` is given, on the
    test split. ``max_train`` fine-tunes on a seeded subset of the training split; ``precompute``
    computes each split's masked inputs once (in memory: N·C·H·W floats per split) instead of every
    epoch; ``tail`` replaces :func:`tail_after` for architectures it does not know.
    Returns ``(table, histories)``.
    """
    import pandas as pd

    from ..train import fit

    for mask in masks:
        if len(mask) != cons.transnet.orders:
            raise ValueError(f"mask {list(mask)} has {len(mask)} entries for a Trans-Net with "
                             f"{cons.transnet.orders} orders")
    splits = {"train": cons.features("train"), "val": cons.features("val")}
    if test_data is not None:
        splits["test"] = cons.features("test", test_data)
    la, lb = cons.layer_a, cons.layer_b
    base_tail = tail if tail is not None else tail_after(cons.model_b, lb)
    if cons.example is not None:
        _check_tail(cons.model_b, lb, base_tail, cons.example)
    n_train = len(splits["train"][1])
    keep = {"train": None if max_train is None or max_train >= n_train else
            np.sort(np.random.default_rng(seed).choice(n_train, size=int(max_train), replace=False))}

    def datasets(mask):
        out = {}
        for name, (sa, sb) in splits.items():
            idx = keep.get(name)
            if mask is None:
                out[name] = FeatureLabels(sb[lb], sb.targets, idx)
            elif precompute:
                feats = sa[la] if idx is None else sa[la][idx]
                out[name] = FeatureLabels(_masked(cons.transnet, feats, mask, device=device), np.asarray(sb.targets)[
                    slice(None) if idx is None else idx])
            else:
                out[name] = FeatureLabels(sa[la], sb.targets, idx)
        return out

    rows, histories = [], {}

    def record(label, method, data, mask, tuned, best_epoch):
        row = {"input": label, "mask": "—" if mask is None else str(list(mask)), "fine_tuned": tuned,
               "val_accuracy": method.evaluate(data["val"])["accuracy"]}
        if "test" in data:
            row["test_accuracy"] = method.evaluate(data["test"])["accuracy"]
        row["epoch"] = best_epoch
        rows.append(row)

    def classifier(mask):
        if mask is None or precompute:
            return TransClassifier(copy.deepcopy(base_tail))
        return TransClassifier(copy.deepcopy(base_tail), cons.transnet, mask)

    plain = datasets(None)
    record("B alone: x_B", classifier(None), plain, None, False, 0)
    runs = ([("x_B, B's layers fine-tuned (control)", None)] if control else []) + \
        [("Σ mask·x⁽ᵏ⁾(x_A)", tuple(m)) for m in masks]
    for label, mask in runs:
        data = plain if mask is None else datasets(mask)
        if mask is not None:
            record(label, classifier(mask), data, mask, False, 0)
        method = classifier(mask)
        hist = fit(method, data["train"], data["val"], epochs=epochs, lr=lr, batch_size=batch_size,
                   optimizer="adam", weight_decay=weight_decay, schedule=schedule, monitor="val/accuracy",
                   restore="best", seed=seed, device=device, progress=progress, val_losses=False)
        method.cpu()
        record(label, method, data, mask, True, int(hist.attrs["best_epoch"]))
        histories["control" if mask is None else f"mask {list(mask)}"] = hist
    table = pd.DataFrame(rows)
    table.attrs["note"] = ("accuracy = top-1 on the split; epoch = best on validation (0: no fine-tuning); "
                           "the test number is at that epoch")
    return table, histories


def _masked(transnet: TransNet, feats, mask, batch_size: int = 256, device=None) -> torch.Tensor:
    """``Σ_k mask_k · x⁽ᵏ⁾`` for every row of ``feats``, computed once (on ``device``; kept on the CPU)."""
    from .. import default_device

    dev = default_device(device) if device is not None else torch.device("cpu")
    home = next(transnet.parameters()).device
    transnet.to(dev)
    m = torch.tensor(list(mask), dtype=torch.float32, device=dev)
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(feats), batch_size):
                comps = transnet.decompose(_batch(feats, i, batch_size).to(dev))
                out.append((comps * m.view(-1, *([1] * (comps.dim() - 1)))).sum(0).cpu())
    finally:
        transnet.to(home)
    return torch.cat(out)


# ----------------------------------------------------------------------------------- Born-Again
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
        from ..train import Supervised

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

    from .. import seed_everything
    from ..models import build, weights_hash
    from ..train import Supervised, cache_dir, cached_training, fit, history_meta, teacher_key

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

        def train(s=s, teacher=models[-1]):
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


# ------------------------------------------------------------------------------ visual contract
@dataclass
class ContractView:
    """What the visual contract shows for a few images of one pair and layer (precomputed, so a
    widget callback only indexes arrays): ``images`` (n, H, W, 3) uint8, ``a``, ``b``, ``g``,
    ``delta`` (n, C, h, w), ``components`` (K, n, C, h, w), ``gates``, and ``channel_order`` /
    ``channel_order_a`` (B's / A's channels by decreasing variance over these images: A's channels
    do not correspond to B's, so the input panel shows A's channel of the same variance rank)."""

    images: np.ndarray
    a: np.ndarray
    b: np.ndarray
    g: np.ndarray
    components: np.ndarray
    delta: np.ndarray
    gates: np.ndarray
    channel_order: np.ndarray
    channel_order_a: np.ndarray
    indices: np.ndarray
    title: str = ""

    def channel(self, rank: int) -> int:
        """B's channel of variance rank ``rank`` (0 = the most variable)."""
        if not 0 <= rank < len(self.channel_order):
            raise ValueError(f"channel rank must be in 0..{len(self.channel_order) - 1}, got {rank}")
        return int(self.channel_order[rank])

    def grid(self, image: int, rank: int) -> dict:
        """Keyword arguments for :func:`kaviz.plots.feature_grid` (``symmetric="row"``): row 1 the
        image and A's feature ("in"), its last cell left empty (titled "gates") for a bar chart of the
        gates; row 2, on one colour range symmetric about 0, B's feature ("target"), g(x_A)
        ("output"), each component, and target − output."""
        if not 0 <= image < len(self.images):
            raise ValueError(f"image must be in 0..{len(self.images) - 1}, got {image}")
        c = self.channel(rank)
        ca = int(self.channel_order_a[min(rank, len(self.channel_order_a) - 1)])
        K = self.components.shape[0]
        row2 = [self.b[image, c], self.g[image, c]] + [self.components[k, image, c] for k in range(K)] + \
            [self.delta[image, c]]
        row1 = [self.images[image], self.a[image, ca]] + [None] * (len(row2) - 2)
        t2 = ["x_B (target)", "g(x_A) (output)"] + [order_name(k) for k in range(K)] + ["target − output"]
        t1 = [f"image {int(self.indices[image])}", f"x_A (in), ch {ca}"] + [""] * (len(row2) - 3) + ["gates"]
        return {"maps": [row1, row2], "titles": [t1, t2], "row_titles": ["A", f"B, channel {c}"],
                "symmetric": "row"}


def contract_view(cons: Consistency, data, indices, *, split: str = "val", title: str = "") -> ContractView:
    """Precompute the visual contract (SPEC §3) of ``cons`` for the samples ``indices`` of
    ``split``; ``data`` is that split's dataset (for the images, via ``image_array``)."""
    idx = np.asarray(indices, dtype=np.int64)
    m = cons.maps(idx, split)
    if m["b"].ndim != 4:
        raise ValueError("the visual contract shows feature maps (C, H, W); this layer gives vectors")
    if hasattr(data, "image_array"):
        images = np.stack([data.image_array(int(i)) for i in idx])
    else:  # a dataset of float (C, H, W) images in [0, 1] (methods do not import plots)
        chw = [torch.as_tensor(data[int(i)][0]).float().clamp(0, 1) for i in idx]
        images = np.stack([(x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]).permute(1, 2, 0).mul(255).round()
                           .to(torch.uint8).numpy() for x in chw])
    def by_variance(x):
        return np.argsort(-x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).var(axis=1), kind="stable")

    return ContractView(images, m["a"], m["b"], m["g"], m["components"], m["delta"], cons.gates, by_variance(m["b"]),
                        by_variance(m["a"]), idx, title)


# ------------------------------------------------------------------------------------------ data
class Relabelled(Dataset):
    """``dataset`` with its class ids mapped through ``mapping`` (a fine → coarse task):
    ``(image, mapping[y])``, ``targets``, ``classes``, ``num_classes``, ``fingerprint``,
    ``get_image``, ``image_array`` and ``subset``."""

    def __init__(self, dataset, mapping, classes, name: str = ""):
        self.dataset = dataset
        self.mapping = torch.as_tensor(np.asarray(mapping), dtype=torch.int64)
        self.classes = list(classes)
        if int(self.mapping.min()) < 0 or int(self.mapping.max()) >= len(self.classes):
            raise ValueError(f"mapping values must lie in 0..{len(self.classes) - 1}")
        base = getattr(dataset, "targets", None)
        if base is None:
            raise ValueError("Relabelled needs a dataset with a `targets` tensor of class ids")
        self._fine = torch.as_tensor(base)
        if int(self._fine.max()) >= len(self.mapping):
            raise ValueError(f"the dataset has class ids up to {int(self._fine.max())} but the mapping covers "
                             f"{len(self.mapping)} classes")
        self.name = name or f"{getattr(dataset, 'name', 'data')}-coarse"

    @property
    def targets(self):
        return self.mapping[self._fine]

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def fingerprint(self):
        from ..data import fingerprint

        return hashlib.sha1(json.dumps([fingerprint(self.dataset), self.mapping.tolist(), self.classes]).encode()
                            ).hexdigest()

    def __len__(self):
        return len(self.dataset)

    def get_image(self, i):
        return self.dataset.get_image(i) if hasattr(self.dataset, "get_image") else self.dataset[i][0]

    def image_array(self, i):
        return self.dataset.image_array(i)

    def __getitem__(self, i):
        return self.get_image(i), self.targets[i]

    def subset(self, indices):
        return Relabelled(self.dataset.subset(indices), self.mapping, self.classes, self.name)


def coarse_task(dataset, groups: Mapping[str, Sequence[str]]) -> Relabelled:
    """A narrower task on the same images: each fine class (by name) is mapped to its group
    (``{"round": ["circle", "ring", ...], ...}``); every class must be in exactly one group."""
    classes = list(getattr(dataset, "classes", None) or [])
    if not classes:
        raise ValueError("coarse_task needs a dataset with named classes (dataset.classes)")
    where = {}
    for gi, (gname, members) in enumerate(groups.items()):
        for c in members:
            if c in where:
                raise ValueError(f"class {c!r} is in two groups")
            where[c] = gi
    unknown = [c for c in where if c not in classes]
    missing = [c for c in classes if c not in where]
    if unknown or missing:
        raise ValueError(f"groups must cover every class exactly once: unknown {unknown[:5]}, "
                         f"missing {missing[:5]} (classes: {classes[:12]}{' ...' if len(classes) > 12 else ''})")
    return Relabelled(dataset, [where[c] for c in classes], list(groups))


def default_coarse_groups(classes: Sequence[str]) -> dict:
    """A narrower task for the diagnosis pair. The synthetic shapes: round / pointy / straight
    outlines. Other class lists (e.g. CUB-200's ``Black_footed_Albatross``): grouped by the last
    word of the class name (the bird family)."""
    from ..data.synthetic import SHAPES

    if sorted(classes) == sorted(SHAPES):
        round_, pointy = ["circle", "ring", "ellipse", "crescent"], ["triangle", "diamond", "star"]
        return {"round": round_, "pointy": pointy,
                "straight": [c for c in classes if c not in round_ + pointy]}
    groups: dict[str, list] = {}
    for c in classes:
        groups.setdefault(str(c).replace("-", "_").split("_")[-1].lower(), []).append(c)
    return groups


class NotebookData(NamedTuple):
    """The splits the notebook uses: ``train`` (to train networks; augmented for real data),
    ``train_features`` (the same images without augmentation, for cached features), ``val``, ``test``."""

    train: Dataset
    train_features: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    name: str


def load_data(source: str = "embedded", *, root=None, n: int = 3000, seed: int = 0, size: int = 32,
              image_size: int = 224, val: float = 0.15, test: float = 0.15) -> NotebookData:
    """``"embedded"``: ``kaviz.data.shapes(n, seed, size)`` split train/val/test (stratified).
    ``"cub200"``: CUB-200-2011 from ``root`` (the official train split, 10 % of it held out for
    validation, the official test split); ``root=None`` raises the loader's layout error."""
    from .. import data as kdata

    if source == "embedded":
        ds = kdata.shapes(n, seed=seed, size=size)
        sp = kdata.split(ds, val=val, test=test, seed=seed)
        return NotebookData(sp.train, sp.train, sp.val, sp.test, ds.num_classes, "shapes")
    if source == "cub200":
        from ..data import real

        plain = real.cub200(root, split="train", image_size=image_size, augment=False)
        sp = kdata.split(plain, val=0.1, test=0.0, seed=seed)
        train = sp.train.with_transform(real.default_transform(image_size, train=True))
        test_ds = real.cub200(root, split="test", image_size=image_size, augment=False)
        return NotebookData(train, sp.train, sp.val, test_ds, plain.num_classes, "cub200")
    raise ValueError(f"source must be 'embedded' or 'cub200', got {source!r}")


def halves(dataset, seed: int = 0):
    """Two disjoint halves of ``dataset`` (stratified by class when the targets are class ids), for
    the "same architecture, different data" pair."""
    from .. import data as kdata

    sp = kdata.split(dataset, val=0.5, test=0.0, seed=seed)
    return sp.train, sp.val

