"""Features from any named layer: one tap (``FeatureTap``), one extraction path (``extract``).

A *layer* is a dotted path of ``model.named_modules()`` (``layer3``, ``features.30``,
``layer1.0.conv2``). ``"<name>:in"`` taps the module's (first) input instead of its output — the
pooled vector that feeds a classifier is ``"fc:in"`` for any architecture whose classifier is
``fc`` — and :data:`OUTPUT` taps the model's own output (logits).
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import glob
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import time
import warnings
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
    "parse_layer",
    "unknown_layer_error",
    "CorruptStoreError",
    "pool_features",
    "iter_batches",
    "amp_dtype",
    "autocast",
    "loader_options",
    "to_device",
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


def parse_layer(spec: str) -> tuple[str, str]:
    """``"layer3"`` -> ("layer3", "out"); ``"fc:in"`` -> ("fc", "in"); OUTPUT -> ("", "out")."""
    if spec == OUTPUT:
        return "", "out"
    if not isinstance(spec, str) or not spec:
        raise LayerError(f"a layer must be a non-empty string (a dotted module path), got {spec!r}")
    name, where = spec, "out"
    if spec.endswith(":in"):
        name, where = spec[:-3], "in"
    elif spec.endswith(":out"):
        name, where = spec[:-4], "out"
    if not name:
        # an empty module name is the root: ":in" would silently tap the model's own input
        raise LayerError(
            f"layer {spec!r} names no module: put a module name before {spec!r} (e.g. 'fc:in', the input of "
            "the module 'fc'); the model's own output is kaviz.features.OUTPUT, and its input is the data you pass.")
    return name, where


def _layer_list(layers, who: str) -> list[str]:
    """``layers`` as a de-duplicated list of names; a clear TypeError for anything else."""
    how = ("layers must be a layer name (str) or a list of names, e.g. 'fc:in' or ['layer3', "
           "kaviz.features.OUTPUT] (kaviz.features.list_layers(model) lists the names)")
    if isinstance(layers, str):
        return [layers]
    if isinstance(layers, (bytes, Mapping)) or not isinstance(layers, Iterable):
        raise TypeError(f"{who}: {how}; got {type(layers).__name__} {layers!r}")
    layers = list(layers)
    bad = [l for l in layers if not isinstance(l, str)]
    if bad:
        raise TypeError(f"{who}: {how}; got {type(bad[0]).__name__} {bad[0]!r} in the list")
    return list(dict.fromkeys(layers))


def unknown_layer_error(model: nn.Module, name: str) -> LayerError:
    """The error for a layer ``name`` ``model`` does not have, listing the closest valid names."""
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
        self.layers = _layer_list(layers, "FeatureTap")
        if not self.layers:
            raise LayerError("FeatureTap needs at least one layer name")
        self.model = model
        self.detach = detach
        self.clone = clone
        self.on_repeat = on_repeat
        modules = dict(model.named_modules())
        self._targets = []
        for spec in self.layers:
            name, where = parse_layer(spec)
            if name not in modules:
                raise unknown_layer_error(model, name)
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
                    "functional call). Pick a module that the forward pass uses (see "
                    "kaviz.features.layer_table(model, x))."
                )
            self._check_versions()

    def _check_versions(self):
        for spec, v in self._versions.items():
            t = self.features.get(spec)
            if torch.is_tensor(t) and t._version != v:
                raise LayerError(
                    f"the output of layer {spec!r} was modified in place after it was captured (typically by a "
                    "following nn.ReLU(inplace=True)); the captured values would be wrong. Use FeatureTap(..., "
                    "clone=True) "
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
STORE_FORMAT = 2  # 2: meta.json records size and sha256 of every array file, and its own sha256
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_CHUNK = 1 << 20


class CorruptStoreError(ValueError):
    """A feature store on disk fails its checks (a truncated or altered ``.npy``, an invalid or
    altered ``meta.json``, a file entry outside the folder). The message names the file;
    ``extract(..., store=<folder>)`` reports it and recomputes the store."""


def _meta_digest(meta: dict) -> str:
    """sha256 of ``meta`` as JSON (sorted keys) without its own ``meta_sha256`` entry."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _OldFormat(CorruptStoreError):
    """A complete store written before content hashes: stale like a store of another key, not corrupt."""


class _Moved(Exception):
    """The store folder was replaced by a concurrent extraction while it was being opened."""


class FeatureStore:
    """Features of one model on one dataset: ``store[layer]`` is an (N, ...) NumPy array.

    In memory (``path=None``) or on disk (a folder with ``meta.json`` and one ``.npy`` per array,
    read back as memory maps, so datasets larger than RAM work). ``meta`` says which model, weights,
    layers, data and pooling produced it; ``targets`` holds per-sample labels when the data had them.

    On disk, ``meta.json`` records the size and sha256 of every array file (and its own sha256);
    :meth:`open` checks them, so a truncated or altered store is reported (:class:`CorruptStoreError`,
    naming the file), never silently read. A store on disk is never modified after it is written:
    :func:`extract` replaces the whole folder, so an open store keeps its data.
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
    def open(cls, path, *, verify: bool = True) -> "FeatureStore":
        """Open the store in folder ``path``, checking every file against ``meta.json``: its size
        always, its sha256 too with ``verify=True`` (reads every file once).

        Raises ``FileNotFoundError`` when there is no complete store, :class:`CorruptStoreError`
        (naming the file) when a file fails a check."""
        path = Path(path)
        for _ in range(5):
            try:
                return cls._open_once(path, verify)
            except _Moved:  # another process swapped a new store in while we read: read that one
                continue
        raise CorruptStoreError(f"the feature store at {path} kept changing while it was opened (another process "
                                "is extracting into it); open it again when that extraction has finished")

    @classmethod
    def _open_once(cls, path: Path, verify: bool) -> "FeatureStore":
        try:
            # every file is opened relative to this descriptor, so all of them come from one generation of
            # the folder even if extract() swaps a new store in meanwhile
            dfd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"no feature store at {path} (missing {cls.META})") from None
        try:
            meta = cls._read_meta(path, dfd)
            files = meta["files"]
            arrays = {}
            for key, info in files.items():
                arrays[key] = _open_array(path, dfd, key, info, int(meta["n"]), verify)
        finally:
            os.close(dfd)
        return cls(arrays, meta, path)

    @classmethod
    def _read_meta(cls, path: Path, dfd: int) -> dict:
        meta_file = path / cls.META
        try:
            fd = os.open(cls.META, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        except FileNotFoundError:
            if not _same_folder(path, dfd):
                raise _Moved() from None
            raise FileNotFoundError(f"no feature store at {path} (missing {cls.META})") from None
        except OSError as e:  # ELOOP: a symbolic link
            raise CorruptStoreError(f"{meta_file} cannot be read as a plain file ({e}); delete the folder "
                                    "or extract again with store=... to recompute it") from None
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        again = "; extract(..., store=...) recomputes the store (or delete the folder)"
        try:
            meta = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptStoreError(f"{meta_file} is not valid JSON ({e}){again}") from None
        if not isinstance(meta, dict):
            raise CorruptStoreError(f"{meta_file} does not hold a JSON object{again}")
        if not meta.get("complete"):
            raise FileNotFoundError(f"the feature store at {path} is incomplete (extraction was interrupted); extract "
                                    f"again")
        if meta.get("format") != STORE_FORMAT:
            raise _OldFormat(f"{meta_file} has store format {meta.get('format')!r}, not {STORE_FORMAT} (written by "
                                    f"an older kaviz, without content hashes){again}")
        files = meta.get("files")
        if not isinstance(files, dict) or not isinstance(meta.get("n"), int):
            raise CorruptStoreError(f"{meta_file} lacks a valid 'files' table or 'n'{again}")
        for key, info in files.items():
            if not _SAFE_KEY.match(key) or ".." in key:
                raise CorruptStoreError(
                    f"{meta_file} lists the file {key!r}, which is not a plain name inside {path}; refusing to read "
                    f"outside the store folder{again}")
            if not (isinstance(info, dict) and isinstance(info.get("size"), int)
                    and isinstance(info.get("sha256"), str)):
                raise CorruptStoreError(f"{meta_file}: the entry for {key}.npy has no size and sha256{again}")
        if meta.get("meta_sha256") != _meta_digest(meta):
            raise CorruptStoreError(f"{meta_file} was altered after it was written (its sha256 does not match){again}")
        return meta

    def __repr__(self):
        where = f"at {self.path}" if self.path else "in memory"
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._arrays.items())
        return f"FeatureStore({where}; {shapes})"


def _same_folder(path: Path, dfd: int) -> bool:
    """Is ``path`` still the folder opened as ``dfd`` (not swapped out by a concurrent extraction)?"""
    try:
        st, fst = os.stat(path), os.fstat(dfd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _open_array(path: Path, dfd: int, key: str, info: dict, n: int, verify: bool) -> np.memmap:
    """Memory-map ``<key>.npy`` (opened relative to the folder descriptor ``dfd``) after checking it."""
    name = f"{key}.npy"
    file = path / name
    again = "; extract(..., store=...) recomputes the store (or delete the folder)"
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
    except FileNotFoundError:
        if not _same_folder(path, dfd):
            raise _Moved() from None
        raise CorruptStoreError(f"{file} is missing (meta.json lists it){again}") from None
    except OSError as e:  # ELOOP: a symbolic link, which could point outside the folder
        raise CorruptStoreError(
            f"{file} is not a plain file inside the store ({e}); refusing to read it{again}") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != info["size"]:
            raise CorruptStoreError(f"{file} is {size} bytes but meta.json records {info['size']} "
                                    f"({'truncated' if size < info['size'] else 'grown'}){again}")
        if verify:
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
            if h.hexdigest() != info["sha256"]:
                raise CorruptStoreError(f"{file} does not match the sha256 in meta.json (the file was altered){again}")
            f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as e:
            raise CorruptStoreError(f"{file} has no valid .npy header ({e}){again}") from None
        offset = f.tell()
        if dtype.hasobject or fortran or not shape or shape[0] != n \
                or offset + int(np.prod(shape)) * dtype.itemsize != size:
            raise CorruptStoreError(f"{file} holds {shape} {dtype} (fortran={fortran}), which does not fit a store "
                                    f"of {n} samples in {size} bytes{again}")
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)


def _key(name: str, prefix: str = "layer") -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return f"{prefix}__{safe}"


# ------------------------------------------------------------------------- writing a store on disk
def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}"


@contextlib.contextmanager
def _store_lock(path: Path):
    """An exclusive lock per store folder (``flock`` on the sibling ``.<name>.lock``): one process
    extracts, the others wait and then find its complete store. Released by the kernel if the holder
    dies. Yields whether the lock is held: not where ``fcntl`` does not exist (Windows) or the lock
    file cannot be created (a read-only folder, where a complete store can still be reused)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield False
        return
    lock = _sibling(path, "lock")
    try:
        f = open(lock, "a+b")
    except OSError:  # a read-only folder: a complete store there can still be reused; writing fails anyway
        yield False
        return
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(f"another process is extracting into {path}; waiting for it to finish (lock file {lock})",
                          stacklevel=4)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _clean_stale(path: Path) -> None:
    """Under the store's lock: remove temporary folders left by killed extractions, and put the old
    store back if an extraction died between moving it away and moving the new one in."""
    name = glob.escape(path.name)
    stale = sorted(path.parent.glob(f".{name}.tmp-*")) + \
        sorted(path.parent.glob(f".{name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not path.exists():
        olds = [p for p in stale if ".old-" in p.name and (p / FeatureStore.META).exists()]
        if olds:
            os.rename(olds[-1], path)
            stale.remove(olds[-1])
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)


def _check_replaceable(path: Path) -> None:
    """extract() replaces the whole folder: refuse when it holds anything that is not a store."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"store={str(path)!r} is a file, not a folder; pass a new or empty folder as store=")
    other = [
        e for e in os.listdir(path) if not (e.endswith(".npy") or e in (FeatureStore.META, FeatureStore.META + ".tmp"))]
    if other:
        raise FileExistsError(
            f"the folder {path} holds files that are not part of a feature store ({', '.join(sorted(other)[:5])}); "
            "extract() replaces the whole store folder, so pass a new or empty folder as store=")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _swap_in(tmp: Path, path: Path) -> None:
    """Make the complete store in ``tmp`` the one at ``path``. The old folder is renamed away, not
    rewritten, so memory maps of an earlier :class:`FeatureStore` keep their (deleted) files."""
    if not path.exists():
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):  # tmp now holds the old store
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _sibling(path, f"old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, old)
    os.rename(tmp, path)  # a kill between the two renames is repaired by _clean_stale
    shutil.rmtree(old, ignore_errors=True)


def _reusable(path: Path, meta: dict) -> FeatureStore | None:
    """The complete store at ``path`` if it has the same key as ``meta``; a corrupt store is
    reported (warning naming the file) and None returned, so that it is recomputed."""
    if not path.exists():
        return None
    try:
        old = FeatureStore.open(path)
    except (FileNotFoundError, _OldFormat):  # no store, or one from before content hashes: just recompute
        return None
    except CorruptStoreError as e:
        warnings.warn(f"recomputing the feature store at {path}: {e}", stacklevel=3)
        return None
    if all(old.meta.get(k) == v for k, v in meta.items()):
        return old
    return None


# -------------------------------------------------------------------------------------- extraction
def _check_order(data) -> None:
    """Refuse a DataLoader that does not yield its dataset in order (rows would not match indices)."""
    from torch.utils.data import (
        BatchSampler,
        DataLoader,
        IterableDataset,
        SequentialSampler,
    )

    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        return
    sampler = data.sampler
    batch_sampler = data.batch_sampler
    if batch_sampler is not None and not isinstance(batch_sampler, BatchSampler):
        culprit = type(batch_sampler).__name__
    elif batch_sampler is not None and not isinstance(batch_sampler.sampler, SequentialSampler):
        culprit = type(batch_sampler.sampler).__name__
    elif not isinstance(sampler, SequentialSampler):
        culprit = type(sampler).__name__
    else:
        return
    raise ValueError(
        f"extract() writes row i for sample i of the dataset, but this DataLoader does not yield its dataset in "
        f"order (its sampler is a {culprit}, e.g. from shuffle=True). Pass the dataset itself "
        "(extract(model, loader.dataset, ...)) or an unshuffled loader (DataLoader(dataset, shuffle=False))."
    )


# ------------------------------------------------------------------ GPU-ready options (one set for fit and extract)
_AMP_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def amp_dtype(amp, device) -> torch.dtype | None:
    """The autocast dtype that ``amp`` asks for on ``device``: ``False``/``None`` → ``None`` (full
    float32, today's numbers); ``True`` → ``torch.float16`` on CUDA (fit adds a gradient scaler) and
    ``torch.bfloat16`` elsewhere (CPU autocast runs in bf16, which needs no scaler);
    ``"bf16"``/``"fp16"`` (or ``"bfloat16"``/``"float16"``, or the torch dtypes) choose explicitly."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if amp is None or amp is False:
        return None
    if amp is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if isinstance(amp, str) and amp.lower() in _AMP_NAMES:
        return _AMP_NAMES[amp.lower()]
    if amp in (torch.bfloat16, torch.float16):
        return amp
    raise ValueError(f"amp={amp!r} is not a mixed-precision mode: pass amp=False (float32), amp=True (bf16 on CPU, "
                     "fp16 with a gradient scaler on CUDA), amp='bf16' or amp='fp16'")


def autocast(device, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type in ``dtype``; a no-op context for ``dtype=None``."""
    if dtype is None:
        return contextlib.nullcontext()
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return torch.autocast(device_type=device.type, dtype=dtype)


def loader_options(device, num_workers: int = 0, pin_memory: bool | None = None,
                   persistent_workers: bool | None = None) -> dict:
    """DataLoader keywords for reading data towards ``device``: ``num_workers`` worker processes,
    ``pin_memory`` (default: the device is CUDA, so host→GPU copies can be asynchronous; without CUDA
    there is nothing to pin for and it is off) and ``persistent_workers`` (default: when there are
    workers, so they are started once, not every epoch)."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0 (0: read in the main process), got {num_workers!r}")
    if persistent_workers and not num_workers:
        raise ValueError("persistent_workers=True needs num_workers > 0 (there are no workers to keep); "
                         "pass num_workers=2 (or more), or leave persistent_workers=None")
    return {"num_workers": int(num_workers),
            "pin_memory": bool(device.type == "cuda" if pin_memory is None else pin_memory)
            and torch.cuda.is_available(),
            "persistent_workers": bool(num_workers > 0 if persistent_workers is None else persistent_workers)}


def to_device(batch, device, channels_last: bool = False):
    """``batch`` (a tensor, or dicts / lists / tuples of them) on ``device`` with non-blocking copies
    (asynchronous from pinned memory); ``channels_last=True`` also stores 4-d float tensors (images)
    in the channels-last layout (same values, NHWC strides)."""
    if torch.is_tensor(batch):
        if channels_last and batch.dim() == 4 and batch.is_floating_point():
            return batch.to(device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def iter_batches(data, batch_size: int, who: str = "extract()", *, num_workers: int = 0, pin_memory: bool = False):
    """``(images, targets)`` batches, in order, of a tensor of images (targets None), a DataLoader or a Dataset
    of ``(image, ...)`` items (read through an unshuffled DataLoader of ``batch_size`` with ``num_workers``
    workers and ``pin_memory``; a DataLoader passed in is used as it is)."""
    from torch.utils.data import DataLoader, Dataset

    if torch.is_tensor(data):
        for i in range(0, len(data), batch_size):
            x = data[i:i + batch_size]
            yield (x.pin_memory() if pin_memory else x), None
        return
    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=pin_memory)
    else:
        raise TypeError(f"{who} takes a Dataset, a DataLoader or a tensor of images, not {type(data).__name__}")
    for batch in loader:
        if isinstance(batch, (list, tuple)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def _fingerprint_data(data) -> str:
    """kaviz.data.fingerprint of what ``data`` yields (a DataLoader: its dataset); torch's
    ``TensorDataset`` and ``Subset`` are fingerprinted through their tensors and indices."""
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from .data import fingerprint

    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(getattr(data, "fingerprint", None), str):
        return data.fingerprint
    if isinstance(data, TensorDataset):
        return fingerprint(("TensorDataset", list(data.tensors)))
    if isinstance(data, Subset):
        return fingerprint(("Subset", _fingerprint_data(data.dataset), np.asarray(data.indices, dtype=np.int64)))
    return fingerprint(data)


def _try_fingerprint(data) -> str | None:
    try:
        return _fingerprint_data(data)
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


def _check_images(images) -> None:
    if torch.is_tensor(images) and images.dtype == torch.uint8:
        raise TypeError(
            "extract() got uint8 images (0..255); models take float images in [0, 1]. Convert them with "
            "x.float() / 255 (or wrap them in kaviz.data.ImageDataset, which does this), then extract again.")


class _NpyWriter:
    """Writes an ``.npy`` file row block by row block, in order, with plain file writes, hashing
    (sha256) every byte as it goes: after :meth:`close`, ``size`` and ``sha256`` describe the file.

    A writable memmap would do the same, but every page written through it stays mapped and counts
    in the process's resident memory until the kernel evicts it, so peak memory would grow with the
    dataset; written with ``write()`` the data only passes through the page cache."""

    def __init__(self, file: Path, shape: tuple, dtype):
        self.shape, self.dtype, self.row = tuple(shape), np.dtype(dtype), 0
        self._hash = hashlib.sha256()
        self.size = 0
        self.sha256 = None
        self._f = open(file, "xb")  # never an existing file: a store on disk is never rewritten in place
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape})
        self._write(header.getvalue())

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._hash.update(b)
        self.size += len(b)

    def __setitem__(self, rows: slice, values):
        if rows.start != self.row:
            raise RuntimeError(f"rows must be written in order: expected row {self.row}, got {rows.start}")
        block = np.ascontiguousarray(values, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:]:
            raise ValueError(f"block of shape {block.shape} does not fit an array of shape {self.shape}")
        self._write(block.tobytes())
        self.row += block.shape[0]

    def close(self):
        self._f.close()
        if self.row != self.shape[0]:
            raise RuntimeError(f"wrote {self.row} of {self.shape[0]} rows")
        self.sha256 = self._hash.hexdigest()


def extract(model: nn.Module, data, layers: str | Iterable[str], *, pool: str | Mapping[str, str] = "avg",
            batch_size: int = 256, store: str | os.PathLike | None = None, dtype: str = "float32",
            device=None, progress: bool | None = None, clone: bool = False, on_repeat: str = "error",
            overwrite: bool = False, amp=False, channels_last: bool = False, num_workers: int = 0,
            pin_memory: bool | None = None) -> FeatureStore:
    """Features of ``layers`` for every sample of ``data``, in dataset order.

    ``data``: a Dataset, a tensor of float images, or a DataLoader that yields its dataset in order
    (a shuffled loader is refused: pass its dataset). uint8 images are refused with a TypeError:
    convert them with ``x.float() / 255`` first. ``layers``: a name or a list of names.

    ``pool`` (one mode or a dict layer -> mode): ``none``, ``avg``, ``normalize-avg`` (see
    :func:`pool_features`). ``store=None`` keeps everything in memory; ``store=<folder>`` writes
    ``.npy`` files batch by batch (peak memory independent of the dataset size), read back as
    memory maps, optionally as ``dtype="float16"``. A folder that already holds a complete store of
    the same model weights, layers, data, pooling and dtype is reused without recomputation
    (``overwrite=True`` recomputes). The model runs in eval mode under ``torch.no_grad`` and its
    mode is restored.

    On disk, a store is written into a new sibling folder and then swapped in whole, under a lock
    per folder (``.<name>.lock`` beside it): a :class:`FeatureStore` returned earlier keeps its
    data, an interrupted extraction leaves the previous store intact, and a second process waits
    and reuses the first one's store. ``meta.json`` records the size and sha256 of every file; a
    store that fails its checks is reported (a warning naming the file) and recomputed.

    For a GPU: ``amp`` runs the forward passes under autocast (``True``: bf16 on CPU, fp16 on CUDA;
    ``"bf16"``/``"fp16"``; features are stored as float32 either way), ``channels_last=True`` puts the
    model and the images in the channels-last layout (the model's layout is restored afterwards),
    ``num_workers`` reads a Dataset with that many DataLoader workers and ``pin_memory`` (default: the
    device is CUDA) pins the batches for non-blocking copies. The defaults give today's exact
    numbers; amp and channels_last are part of an on-disk store's key (their features differ).
    """
    from . import default_device

    layers, pools, n = _validate_extract(data, layers, pool, dtype, batch_size)
    device = default_device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    run = {"amp": amp_dtype(amp, device), "channels_last": bool(channels_last),
           **loader_options(device, num_workers, pin_memory, persistent_workers=False)}
    meta = _store_meta(model, data, layers, pools, dtype, n, on_disk=store is not None)
    if run["amp"] is not None:  # absent by default: stores written before these options stay valid
        meta["amp"] = str(run["amp"]).replace("torch.", "")
    if run["channels_last"]:
        meta["channels_last"] = True
    tap = FeatureTap(model, layers, clone=clone, on_repeat=on_repeat)  # unknown layers fail before any file

    def compute(folder):
        return _compute(model, data, tap, layers, pools, meta, n, batch_size, dtype, device, progress, folder, run)

    if store is None:
        return compute(None)
    return _extract_to_folder(store, meta, overwrite, compute)


def _validate_extract(data, layers, pool, dtype, batch_size) -> tuple[list[str], dict, int]:
    """extract()'s arguments checked: ``(layers, {layer: pool}, number of samples)``."""
    layers = _layer_list(layers, "extract()")
    if not layers:
        raise LayerError("extract() needs at least one layer name")
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
    _check_order(data)
    if torch.is_tensor(data):
        _check_images(data)
    n = len(data.dataset) if hasattr(data, "dataset") and hasattr(data, "batch_size") else len(data)
    if n == 0:
        raise ValueError("extract() got an empty dataset")
    return layers, pools, n


def _store_meta(model, data, layers, pools, dtype, n, on_disk: bool) -> dict:
    """What identifies a store: the model and its weights, the layers, pooling, dtype and data."""
    from .models import spec, weights_hash

    return {
        "model": spec(model),
        # hashing the weights only matters for a cache on disk; skip it for in-memory extraction
        "weights": weights_hash(model) if on_disk else None,
        "layers": layers,
        "pool": pools,
        "dtype": dtype,
        "data": _fingerprint_data(data) if on_disk else _try_fingerprint(data),
        "n": n,
    }


def _extract_to_folder(store, meta: dict, overwrite: bool, compute) -> FeatureStore:
    """Under the folder's lock: reuse a complete store of the same ``meta``, else ``compute`` into a new
    sibling folder and swap it in whole."""
    path = Path(os.path.abspath(store))
    if not path.name:
        raise ValueError(f"store={str(store)!r} must name a folder for the store, e.g. 'data/features/resnet_layer3'")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a JSON round trip makes the key compare equal to what meta.json gives back
    meta.update(json.loads(json.dumps(meta, default=str)))
    with _store_lock(path) as locked:
        if locked:  # without the lock, a temporary folder could be another process's live one
            _clean_stale(path)
        if not overwrite:
            old = _reusable(path, meta)
            if old is not None:
                return old
        _check_replaceable(path)
        tmp = _sibling(path, f"tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            compute(tmp)
            _swap_in(tmp, path)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in _NO_ROOM:
                raise OSError(e.errno, (
                    f"no room to write the feature store {path} ({os.strerror(e.errno)}); nothing was changed there "
                    "(a store it held before is intact). Free disk space, or pass store= a folder on another disk, "
                    "and extract again")) from e
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return FeatureStore.open(path, verify=False)  # just written and hashed; sizes are still checked


_NO_ROOM = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _compute(model, data, tap: FeatureTap, layers, pools, meta, n, batch_size, dtype, device, progress,
             folder: Path | None, run: Mapping | None = None) -> FeatureStore | None:
    """Run the extraction; in memory (``folder=None``) return the store, else write a complete store
    (arrays, then ``meta.json``) into ``folder``."""
    from tqdm.auto import tqdm

    arrays = _Arrays(folder, n, np.float16 if dtype == "float16" else np.float32)
    show = progress if progress is not None else not os.environ.get("CI")
    bar = tqdm(total=n, desc=f"extract {', '.join(layers)}", disable=not show, leave=False)
    t0 = time.perf_counter()
    try:
        seen = _extract_loop(model, data, tap, layers, pools, batch_size, device, arrays, bar, run or {})
    finally:
        bar.close()
        arrays.release()
    if seen != n:
        raise RuntimeError(f"the data yielded {seen} samples, but its length is {n}")
    meta["targets"] = arrays.target_names
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    meta["complete"] = True
    return _finish_store(arrays, meta, folder)


class _Arrays:
    """The store's arrays, allocated at the first batch: in memory, or ``.npy`` writers in ``folder``."""

    def __init__(self, folder: Path | None, n: int, dtype):
        self.folder, self.n, self.dtype = folder, n, dtype
        self.items: dict = {}
        self.target_names: list[str] = []

    def put(self, key: str, start: int, values: np.ndarray, dtype=None) -> None:
        if key not in self.items:
            shape, dt = (self.n, *values.shape[1:]), (dtype or self.dtype)
            self.items[key] = (np.empty(shape, dtype=dt) if self.folder is None
                               else _NpyWriter(self.folder / f"{key}.npy", shape, dt))
        self.items[key][start:start + len(values)] = values

    def release(self) -> None:
        if self.folder is not None:
            for a in self.items.values():
                a._f.close()


@contextlib.contextmanager
def _channels_last(model: nn.Module, enabled: bool):
    """The model's 4-d parameters and buffers in channels-last layout for the block, restored afterwards."""
    if not enabled:
        yield
        return
    saved = {k: t for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.dim() == 4}
    formats = {k: t.is_contiguous() for k, t in saved.items()}
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        if all(formats.values()):
            model.to(memory_format=torch.contiguous_format)


def _extract_loop(model, data, tap: FeatureTap, layers, pools, batch_size, device, arrays: _Arrays, bar,
                  run: Mapping) -> int:
    """One forward pass per batch (eval mode, ``no_grad``; autocast and channels-last when ``run`` asks),
    each layer pooled into its array; the targets of the first batch decide which target arrays are kept.
    Returns the samples seen."""
    start = 0
    cl = bool(run.get("channels_last"))
    with eval_mode(model), torch.no_grad(), tap, _channels_last(model, cl):
        for images, target in iter_batches(data, batch_size, num_workers=run.get("num_workers", 0),
                                           pin_memory=run.get("pin_memory", False)):
            if start == 0:
                _check_images(images)
            b = images.shape[0]
            with autocast(device, run.get("amp")):
                model(to_device(images, device, channels_last=cl))
            for l in layers:
                arrays.put(_key(l), start, pool_features(tap[l], pools[l]).float().cpu().numpy())
            for k, v in (_targets_to_numpy(target) or {}).items():
                key = _key(k, prefix="targets")
                if key not in arrays.items:
                    if start != 0:
                        continue
                    arrays.target_names.append(k)
                arrays.put(key, start, v, dtype=v.dtype)
            start += b
            bar.update(b)
    return start


def _finish_store(arrays: _Arrays, meta: dict, folder: Path | None) -> FeatureStore | None:
    if folder is None:
        meta["files"] = {k: {"shape": list(a.shape), "dtype": a.dtype.str} for k, a in arrays.items.items()}
        return FeatureStore(arrays.items, meta, None)
    for a in arrays.items.values():
        a.close()
    meta["files"] = {k: {"shape": list(a.shape), "dtype": a.dtype.str, "size": a.size, "sha256": a.sha256}
                     for k, a in arrays.items.items()}
    meta["format"] = STORE_FORMAT
    meta["meta_sha256"] = _meta_digest(meta)
    with open(folder / FeatureStore.META, "x") as f:
        f.write(json.dumps(meta, indent=1))
    return None
