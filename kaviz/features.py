"""Features from any named layer: one tap (``FeatureTap``), one extraction path (``extract``).

A *layer* is a dotted path of ``model.named_modules()`` (``layer3``, ``features.30``,
``layer1.0.conv2``). ``"<name>:in"`` taps the module's (first) input instead of its output — the
pooled vector that feeds a classifier is ``"fc:in"`` for any architecture whose classifier is
``fc`` — and :data:`OUTPUT` taps the model's own output (logits).
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = [
    "OUTPUT",
    "list_layers",
    "layer_table",
    "FeatureTap",
    "extract",
    "FeatureStore",
    "eval_mode",
    "LayerError",
    "pool_features",
]

OUTPUT = "<output>"
POOLS = ("none", "avg", "normalize-avg")


class LayerError(KeyError, ValueError):
    """A requested layer is unknown, never fired, fired twice, or was modified after capture."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def list_layers(model: nn.Module, leaves_only: bool = False) -> list[str]:
    """Dotted names of ``model``'s modules (``named_modules`` order), without the root."""
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if leaves_only and next(module.children(), None) is not None:
            continue
        names.append(name)
    return names


def layer_table(model: nn.Module, example: torch.Tensor | tuple | None = None):
    """A DataFrame of the model's layers: name, type, parameters; with ``example`` (a batch, or the
    shape of one input such as ``(3, 32, 32)``), also each layer's output shape and how many times
    it fires per forward pass."""
    import pandas as pd

    if isinstance(example, (tuple, list, torch.Size)):
        if not all(isinstance(d, int) and d > 0 for d in example):
            raise ValueError(f"example shape {tuple(example)} must be positive integers, e.g. (3, 32, 32)")
        param = next(model.parameters(), None)
        example = torch.zeros((1, *example), device=param.device if param is not None else "cpu")
    elif example is not None and not torch.is_tensor(example):
        raise TypeError(f"example must be a batch tensor or an input shape like (3, 32, 32), "
                        f"got {type(example).__name__}")

    rows = []
    modules = dict(model.named_modules())
    shapes: dict[str, str] = {}
    calls: dict[str, int] = {}
    if example is not None:
        hooks = []

        def make(name):
            def hook(_m, _inp, out):
                calls[name] = calls.get(name, 0) + 1
                shapes[name] = str(tuple(out.shape[1:])) if torch.is_tensor(out) else type(out).__name__

            return hook

        try:
            for name, m in modules.items():
                if name:
                    hooks.append(m.register_forward_hook(make(name)))
            with eval_mode(model), torch.no_grad():
                model(example)
        finally:
            for h in hooks:
                h.remove()
    for name, m in modules.items():
        if not name:
            continue
        row = {
            "name": name,
            "type": type(m).__name__,
            "params": sum(p.numel() for p in m.parameters()),
            "leaf": next(m.children(), None) is None,
        }
        if example is not None:
            row["shape"] = shapes.get(name, "")
            row["calls"] = calls.get(name, 0)
        rows.append(row)
    return pd.DataFrame(rows)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` (all submodules) in eval mode; restore every module's own flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def _parse(spec: str) -> tuple[str, str]:
    """``"layer3"`` -> ("layer3", "out"); ``"fc:in"`` -> ("fc", "in"); OUTPUT -> ("", "out")."""
    if spec == OUTPUT:
        return "", "out"
    if not isinstance(spec, str) or not spec:
        raise LayerError(f"a layer must be a non-empty string (a dotted module path), got {spec!r}")
    if spec.endswith(":in"):
        return spec[:-3], "in"
    if spec.endswith(":out"):
        return spec[:-4], "out"
    return spec, "out"


def _unknown(model: nn.Module, name: str) -> LayerError:
    valid = list_layers(model)
    close = difflib.get_close_matches(name, valid, n=6, cutoff=0.4)
    if not close:
        close = [v for v in valid if v.startswith(name.split(".")[0])][:6] or valid[:6]
    return LayerError(
        f"{type(model).__name__} has no layer {name!r}. Closest valid names: {', '.join(close)}. "
        f"(kaviz.features.list_layers(model) lists all {len(valid)}; append ':in' to tap a module's input, "
        f"or use kaviz.features.OUTPUT for the model output.)"
    )


class FeatureTap:
    """Context manager capturing the features of named layers during forward passes.

    ``with FeatureTap(model, ["layer3", "fc:in"]) as tap: logits = model(x); f = tap["layer3"]``

    - Hooks are registered on entry and removed on exit (also on error).
    - The tap does not change the model's mode; :func:`extract` does, and restores it.
    - Each forward of ``model`` (the root) starts a fresh capture; when it returns, every requested
      layer must have fired (else :class:`LayerError`: it is not used in ``forward``).
    - A module that fires more than once in one forward (torchvision's BasicBlock calls its single
      ReLU twice) is reported: ``on_repeat="error"`` (default) raises; ``"first"``/``"last"`` keep
      that call; ``"all"`` keeps a list of every call.
    - ``detach=True`` (default) stores detached tensors; ``detach=False`` keeps the graph, so a loss
      on the features back-propagates (methods use this for the student).
    - A captured tensor that a later in-place operation modifies (e.g. ``nn.ReLU(inplace=True)``
      right after the tapped layer) is caught through the tensor's version counter; pass
      ``clone=True`` to keep a copy instead.
    """

    def __init__(self, model: nn.Module, layers: str | Iterable[str], *, detach: bool = True,
                 on_repeat: str = "error", clone: bool = False):
        if on_repeat not in ("error", "first", "last", "all"):
            raise ValueError(f"on_repeat must be 'error', 'first', 'last' or 'all', got {on_repeat!r}")
        if isinstance(layers, str):
            layers = [layers]
        self.layers = list(dict.fromkeys(layers))
        if not self.layers:
            raise LayerError("FeatureTap needs at least one layer name")
        self.model = model
        self.detach = detach
        self.clone = clone
        self.on_repeat = on_repeat
        modules = dict(model.named_modules())
        self._targets = []
        for spec in self.layers:
            name, where = _parse(spec)
            if name not in modules:
                raise _unknown(model, name)
            self._targets.append((spec, modules[name], where))
        self._handles: list = []
        self.features: dict[str, torch.Tensor | list] = {}
        self._versions: dict[str, int] = {}
        self._calls: dict[str, int] = {}
        self._depth = 0
        self._active = False

    # --- hooks --------------------------------------------------------------------------------
    def _root_pre(self, _m, _inp):
        if self._depth == 0:
            self.features = {}
            self._versions = {}
            self._calls = {spec: 0 for spec in self.layers}
        self._depth += 1

    def _root_exit(self, _m, _inp, _out):
        # registered with always_call=True: runs even when forward raised, so depth stays right
        self._depth = max(0, self._depth - 1)

    def _root_post(self, _m, _inp, out):
        if self._depth == 1:
            if OUTPUT in self._calls:
                self._store(OUTPUT, out)
            missing = [s for s, n in self._calls.items() if n == 0]
            if missing:
                raise LayerError(
                    f"layer(s) {', '.join(map(repr, missing))} never fired during {type(self.model).__name__}.forward: "
                    "the module exists but its forward is not called (e.g. defined but unused, or replaced by a "
                    "functional call). Pick a module that the forward pass uses (see kaviz.features.layer_table(model, x))."
                )
            self._check_versions()

    def _check_versions(self):
        for spec, v in self._versions.items():
            t = self.features.get(spec)
            if torch.is_tensor(t) and t._version != v:
                raise LayerError(
                    f"the output of layer {spec!r} was modified in place after it was captured (typically by a "
                    "following nn.ReLU(inplace=True)); the captured values would be wrong. Use FeatureTap(..., clone=True) "
                    "or extract(..., clone=True), or tap the in-place module itself."
                )

    def _store(self, spec, value):
        if torch.is_tensor(value):
            if self.detach:
                value = value.detach()
            if self.clone:
                value = value.clone()
        n = self._calls.get(spec, 0) + 1
        self._calls[spec] = n
        if n == 1:
            self.features[spec] = [value] if self.on_repeat == "all" else value
            if torch.is_tensor(value) and not self.clone:
                self._versions[spec] = value._version
            return
        if self.on_repeat == "error":
            raise LayerError(
                f"layer {spec!r} fired {n} times in one forward pass (its module is reused, e.g. torchvision's "
                "BasicBlock applies one ReLU twice), so 'its feature' is ambiguous. Tap a module that runs once "
                "(e.g. the preceding bn layer or the block itself), or pass on_repeat='first' | 'last' | 'all'."
            )
        if self.on_repeat == "last":
            self.features[spec] = value
            if torch.is_tensor(value) and not self.clone:
                self._versions[spec] = value._version
        elif self.on_repeat == "all":
            self.features[spec].append(value)

    def _make_hook(self, spec, where):
        if where == "in":
            def hook(_m, inp):
                self._store(spec, inp[0] if isinstance(inp, tuple) and inp else inp)
            return hook

        def hook(_m, _inp, out):
            self._store(spec, out)
        return hook

    # --- context manager ----------------------------------------------------------------------
    def __enter__(self):
        if self._active:
            raise RuntimeError("this FeatureTap is already active")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._root_pre))
            for spec, module, where in self._targets:
                if spec == OUTPUT:
                    continue
                if where == "in":
                    self._handles.append(module.register_forward_pre_hook(self._make_hook(spec, where)))
                else:
                    self._handles.append(module.register_forward_hook(self._make_hook(spec, where)))
            # registered last so that it runs after the layer hooks of a module tapped at the root
            self._handles.append(self.model.register_forward_hook(self._root_post))
            self._handles.append(self.model.register_forward_hook(self._root_exit, always_call=True))
        except BaseException:
            self.remove()
            raise
        self._active = True
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._depth = 0
        self._active = False

    def __getitem__(self, spec: str):
        if spec not in self.features:
            if spec not in self.layers:
                raise LayerError(f"{spec!r} is not tapped; this tap has {self.layers}")
            raise LayerError(f"{spec!r} has not been captured yet: run a forward pass of the model inside the tap")
        return self.features[spec]

    def __contains__(self, spec):
        return spec in self.features


# ------------------------------------------------------------------------------------------ pooling
def pool_features(x: torch.Tensor, pool: str) -> torch.Tensor:
    """``none``: as is; ``avg``: mean over spatial positions; ``normalize-avg``: L2-normalise each
    sample's flattened map, then average over positions (the pooling of CFL's t-SNE, SPEC §0.4).
    Vectors (N, D) are returned unchanged by every pooling."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "none" or x.dim() <= 2:
        return x
    if pool == "normalize-avg":
        flat = x.flatten(1)
        x = (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).view_as(x)
    return x.flatten(2).mean(2)


# --------------------------------------------------------------------------------------- the store
class FeatureStore:
    """Features of one model on one dataset: ``store[layer]`` is an (N, ...) NumPy array.

    In memory (``path=None``) or on disk (a folder with ``meta.json`` and one ``.npy`` per array,
    read back as memory maps, so datasets larger than RAM work). ``meta`` says which model, weights,
    layers, data and pooling produced it; ``targets`` holds per-sample labels when the data had them.
    """

    META = "meta.json"

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict, path: Path | None = None):
        self._arrays = arrays
        self.meta = meta
        self.path = Path(path) if path is not None else None

    @property
    def layers(self) -> list[str]:
        return list(self.meta.get("layers", []))

    def __len__(self) -> int:
        return int(self.meta.get("n", 0))

    def __getitem__(self, layer: str) -> np.ndarray:
        key = _key(layer)
        if key not in self._arrays:
            raise LayerError(f"{layer!r} is not in this store; it holds {self.layers} and targets {self.target_names}")
        return self._arrays[key]

    def __contains__(self, layer):
        return _key(layer) in self._arrays

    def tensor(self, layer: str, dtype=torch.float32) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self[layer])).to(dtype)

    @property
    def target_names(self) -> list[str]:
        return list(self.meta.get("targets", []))

    @property
    def targets(self):
        """The target array (or a dict of arrays when the data's targets were dicts), or None."""
        names = self.target_names
        if not names:
            return None
        if names == ["target"]:
            return self._arrays[_key("target", prefix="targets")]
        return {n: self._arrays[_key(n, prefix="targets")] for n in names}

    @classmethod
    def open(cls, path) -> "FeatureStore":
        path = Path(path)
        meta_file = path / cls.META
        if not meta_file.exists():
            raise FileNotFoundError(f"no feature store at {path} (missing {cls.META})")
        meta = json.loads(meta_file.read_text())
        if not meta.get("complete"):
            raise FileNotFoundError(f"the feature store at {path} is incomplete (extraction was interrupted); extract again")
        arrays = {}
        for key in meta["files"]:
            arrays[key] = np.load(path / f"{key}.npy", mmap_mode="r")
        return cls(arrays, meta, path)

    def __repr__(self):
        where = f"at {self.path}" if self.path else "in memory"
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._arrays.items())
        return f"FeatureStore({where}; {shapes})"


def _key(name: str, prefix: str = "layer") -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return f"{prefix}__{safe}"


# -------------------------------------------------------------------------------------- extraction
def _iter_batches(data, batch_size: int):
    from torch.utils.data import DataLoader, Dataset

    if torch.is_tensor(data):
        for i in range(0, len(data), batch_size):
            yield data[i:i + batch_size], None
        return
    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    else:
        raise TypeError(f"extract() takes a Dataset, a DataLoader or a tensor of images, not {type(data).__name__}")
    for batch in loader:
        if isinstance(batch, (list, tuple)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def _data_fingerprint(data) -> str:
    from .data import fingerprint

    target = data.dataset if hasattr(data, "dataset") and not hasattr(data, "fingerprint") else data
    if torch.is_tensor(target):
        t = target.detach().cpu().contiguous()
        return hashlib.sha1(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    return fingerprint(target)


def _try_fingerprint(data) -> str | None:
    try:
        return _data_fingerprint(data)
    except TypeError:
        return None


def _targets_to_numpy(target) -> dict[str, np.ndarray] | None:
    if target is None:
        return None
    if isinstance(target, Mapping):
        out = {}
        for k, v in target.items():
            if torch.is_tensor(v) and v.dim() >= 1 and v[0].numel() <= 1024:
                out[k] = v.cpu().numpy()
            elif torch.is_tensor(v) and v.dim() == 1:
                out[k] = v.cpu().numpy()
        return out or None
    if torch.is_tensor(target):
        return {"target": target.cpu().numpy()}
    return None


class _NpyWriter:
    """Writes an ``.npy`` file row block by row block, in order, with plain file writes.

    A writable memmap would do the same, but every page written through it stays mapped and counts
    in the process's resident memory until the kernel evicts it, so peak memory would grow with the
    dataset; written with ``write()`` the data only passes through the page cache."""

    def __init__(self, file: Path, shape: tuple, dtype):
        self.shape, self.dtype, self.row = tuple(shape), np.dtype(dtype), 0
        self._f = open(file, "wb")
        np.lib.format.write_array_header_1_0(
            self._f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape})

    def __setitem__(self, rows: slice, values):
        if rows.start != self.row:
            raise RuntimeError(f"rows must be written in order: expected row {self.row}, got {rows.start}")
        block = np.ascontiguousarray(values, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"block of shape {block.shape} does not fit an array of shape {self.shape}")
        self._f.write(block.tobytes())
        self.row += block.shape[0]

    def close(self):
        self._f.close()
        if self.row != self.shape[0]:
            raise RuntimeError(f"wrote {self.row} of {self.shape[0]} rows")


def extract(model: nn.Module, data, layers: str | Iterable[str], *, pool: str | Mapping[str, str] = "avg",
            batch_size: int = 256, store: str | os.PathLike | None = None, dtype: str = "float32",
            device=None, progress: bool | None = None, clone: bool = False, on_repeat: str = "error",
            overwrite: bool = False) -> FeatureStore:
    """Features of ``layers`` for every sample of ``data``, in dataset order.

    ``pool`` (one mode or a dict layer -> mode): ``none``, ``avg``, ``normalize-avg`` (see
    :func:`pool_features`). ``store=None`` keeps everything in memory; ``store=<folder>`` writes
    memory-mapped ``.npy`` files batch by batch (peak memory independent of the dataset size),
    optionally as ``dtype="float16"``. A folder that already holds a complete store of the same
    model weights, layers, data, pooling and dtype is reused without recomputation (``overwrite=True``
    recomputes). The model runs in eval mode under ``torch.no_grad`` and its mode is restored.
    """
    from . import default_device
    from .models import spec, weights_hash

    if isinstance(layers, str):
        layers = [layers]
    layers = list(dict.fromkeys(layers))
    pools = {l: (pool[l] if isinstance(pool, Mapping) else pool) for l in layers}
    if isinstance(pool, Mapping):
        missing = [l for l in layers if l not in pool]
        if missing:
            raise ValueError(f"pool dict has no entry for {missing}")
    for p in pools.values():
        if p not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {p!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(data.dataset) if hasattr(data, "dataset") and hasattr(data, "batch_size") else len(data)
    if n == 0:
        raise ValueError("extract() got an empty dataset")
    device = default_device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    meta = {
        "model": spec(model),
        # hashing the weights only matters for a cache on disk; skip it for in-memory extraction
        "weights": weights_hash(model) if store is not None else None,
        "layers": layers,
        "pool": pools,
        "dtype": dtype,
        "data": _data_fingerprint(data) if store is not None else _try_fingerprint(data),
        "n": n,
    }
    path = Path(store) if store is not None else None
    if path is not None and not overwrite and (path / FeatureStore.META).exists():
        try:
            old = FeatureStore.open(path)
        except FileNotFoundError:
            old = None
        if old is not None and all(old.meta.get(k) == v for k, v in meta.items()):
            return old

    _FeatureTap = FeatureTap(model, layers, clone=clone, on_repeat=on_repeat)
    arrays: dict[str, np.ndarray] = {}
    target_names: list[str] = []
    np_dtype = np.float16 if dtype == "float16" else np.float32
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        if (path / FeatureStore.META).exists():
            (path / FeatureStore.META).unlink()

    def allocate(key, shape, dt):
        if path is None:
            return np.empty(shape, dtype=dt)
        return _NpyWriter(path / f"{key}.npy", shape, dt)

    from tqdm.auto import tqdm

    show = progress if progress is not None else not os.environ.get("CI")
    bar = tqdm(total=n, desc=f"extract {', '.join(layers)}", disable=not show, leave=False)
    start = 0
    t0 = time.perf_counter()
    with eval_mode(model), torch.no_grad(), _FeatureTap as tap:
        for images, target in _iter_batches(data, batch_size):
            b = images.shape[0]
            model(images.to(device, non_blocking=True))
            for l in layers:
                feat = pool_features(tap[l], pools[l]).float().cpu()
                key = _key(l)
                if key not in arrays:
                    arrays[key] = allocate(key, (n, *feat.shape[1:]), np_dtype)
                arrays[key][start:start + b] = feat.numpy()
            tnp = _targets_to_numpy(target)
            if tnp is not None:
                for k, v in tnp.items():
                    key = _key(k, prefix="targets")
                    if key not in arrays:
                        if start != 0:
                            continue
                        arrays[key] = allocate(key, (n, *v.shape[1:]), v.dtype)
                        target_names.append(k)
                    arrays[key][start:start + b] = v
            start += b
            bar.update(b)
    bar.close()
    if start != n:
        raise RuntimeError(f"the data yielded {start} samples, but its length is {n}")
    meta["targets"] = target_names
    meta["files"] = list(arrays)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    meta["complete"] = True
    if path is not None:
        for a in arrays.values():
            a.close()
        tmp = path / (FeatureStore.META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1, default=str))
        os.replace(tmp, path / FeatureStore.META)
        return FeatureStore.open(path)
    return FeatureStore(arrays, meta, None)
