"""Paired features of two networks, cached once per (model, data, layers), and the pair check."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


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
    from ...data import fingerprint

    try:
        return fingerprint(data)
    except TypeError as e:
        raise TypeError(f"features are cached on disk by a key of the data, and this data cannot be "
                        f"fingerprinted: {e}") from None


def cached_features(model: nn.Module, data, layers, *, batch_size: int = 256, device=None,
                    progress: bool | None = None):
    """``kaviz.features.extract(model, data, layers, pool="none", store=<folder>)`` with the folder
    under ``cache_dir("features", "consistency")`` named by a :func:`kaviz.cache.key` of the weights, the
    layers and the data (and the environment: device, threads, floating-point path), so each (model,
    layers, data) has its own store, computed once and reused. Data with a random transform
    (:func:`kaviz.data.has_random_transform`) is extracted in memory every time, never cached."""
    from ... import default_device
    from ...cache import key as cache_key
    from ...cache import safe_name
    from ...data import has_random_transform
    from ...features import extract
    from ...models import spec, weights_hash
    from ...train import cache_dir

    layers = [layers] if isinstance(layers, str) else list(layers)
    folder = None
    if not has_random_transform(data):
        key = cache_key("consistency-features", device=device, weights=weights_hash(model), layers=layers,
                        data=_data_key(data))[:16]
        name = safe_name(str(spec(model).get("name", "model")))
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
    from ...features import FeatureTap, eval_mode

    with eval_mode(model), torch.no_grad(), FeatureTap(model, [layer], clone=True) as tap:
        model(example)
        return tuple(tap[layer].shape[1:])


def check_pair(model_a: nn.Module, model_b: nn.Module, layer_a: str, layer_b: str, example: torch.Tensor):
    """Raise when A's ``layer_a`` and B's ``layer_b`` give features of different shapes (one forward
    pass on ``example``, a batch of images); the error lists B's layers that have A's shape."""
    sa, sb = _probe_shapes(model_a, layer_a, example), _probe_shapes(model_b, layer_b, example)
    if sa != sb:
        from ...features import layer_table

        table = layer_table(model_b, example)
        fits = [r for r, s in zip(table["name"], table["shape"]) if s == str(sa)]
        fits = fits[:12] + (["..."] if len(fits) > 12 else [])
        hint = (f"B's layers with A's shape {sa}: {', '.join(fits)}" if fits else
                f"B has no layer of shape {sa}")
        raise ValueError(
            f"A's feature {layer_a!r} has shape {sa} but B's {layer_b!r} has {sb}: a Trans-Net maps a feature to "
            f"one of the same shape. {hint}. (kaviz.features.layer_table(model, images) lists every layer's shape.)")
    return sa
