"""In-memory image datasets, the comprehensive label space (union), splits, fingerprints, loaders.

Only torch and NumPy are imported here (pandas only when a ``meta`` table is built), so loaders
of real datasets can build on these conventions without pulling anything heavy in:

- an image dataset yields ``(image float32 (C, H, W) in [0, 1], target)``;
- it exposes ``get_image(i)`` (the image alone, the target never touched), ``image_array(i)``
  (uint8 (H, W, 3) for display), ``subset(indices)`` and a ``fingerprint`` string that identifies
  exactly its data, so caches keyed on it are never stale.
"""
from __future__ import annotations

import hashlib
import operator
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ImageDataset",
    "Unlabeled",
    "UnionDataset",
    "union",
    "Splits",
    "split",
    "fingerprint",
    "loader",
]


# --- fingerprints --------------------------------------------------------------------------------

def _feed(h, obj, path="obj"):
    """Feed ``obj`` into hash ``h`` unambiguously (type tags, shapes and lengths included)."""
    if obj is None:
        h.update(b"N;")
    elif isinstance(obj, bool):
        h.update(b"b1;" if obj else b"b0;")
    elif isinstance(obj, (int, np.integer)):
        h.update(b"i" + str(int(obj)).encode() + b";")
    elif isinstance(obj, (float, np.floating)):
        h.update(b"f" + float(obj).hex().encode() + b";")
    elif isinstance(obj, str):
        b = obj.encode()
        h.update(b"s%d:" % len(b) + b)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        b = bytes(obj)
        h.update(b"y%d:" % len(b) + b)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"fingerprint: {path} is a NumPy array of Python objects; pass numeric arrays")
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype.str}{a.shape}:".encode())
        h.update(a.tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d[" % len(obj))
        for k, item in enumerate(obj):
            _feed(h, item, f"{path}[{k}]")
        h.update(b"]")
    elif isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
        h.update(b"D%d{" % len(items))
        for k, v in items:
            _feed(h, repr(k), path)
            _feed(h, v, f"{path}[{k!r}]")
        h.update(b"}")
    elif isinstance(getattr(obj, "fingerprint", None), str):
        h.update(b"F" + obj.fingerprint.encode() + b";")
    else:
        raise TypeError(
            f"fingerprint: cannot fingerprint {path} of type {type(obj).__name__}. Pass an "
            "ImageDataset/UnionDataset (they carry .fingerprint), a torch tensor or NumPy array "
            "(content hash), numbers/strings, or lists/dicts of these; for your own dataset class, "
            "give it a `fingerprint` string attribute that identifies exactly its data."
        )


def digest(obj) -> str:
    """SHA-256 (first 128 bits, 32 hex digits) of ``obj``'s content: tensors and arrays by dtype, shape and
    bytes (so ``x`` and ``x.reshape(...)`` differ), also inside lists, tuples and dicts, with numbers and strings.
    The one content hash of kaviz: :func:`fingerprint` and the fingerprints of every dataset use it."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:32]


def fingerprint(obj) -> str:
    """A stable hex digest identifying exactly ``obj``'s data, for cache keys.

    ``obj.fingerprint`` when the object carries one (``ImageDataset``, ``UnionDataset``,
    ``Unlabeled``...); otherwise a content hash (:func:`digest`: SHA-256 over dtype, shape and bytes) of tensors
    and arrays, also inside lists, tuples and dicts (numbers and strings allowed there). Anything
    else raises ``TypeError`` saying what to pass.
    """
    fp = getattr(obj, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    return digest(obj)


def images_of(batch) -> torch.Tensor:
    """The images of a batch that is either images alone or ``(images, anything)``; the second
    element (labels) is never looked at."""
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    raise TypeError(f"a batch must be an image tensor or (images, ...), got {type(batch).__name__}")


# --- helpers -------------------------------------------------------------------------------------

def _as_images(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a uint8 torch tensor (N, C, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"images must be uint8 (N, C, H, W) in 0..255, got dtype {images.dtype}; convert float "
            "images in [0, 1] with (x * 255).round().to(torch.uint8)"
        )
    if images.ndim != 4:
        raise ValueError(
            f"images must have shape (N, C, H, W), got {tuple(images.shape)}; add a channel axis "
            "for grey images (x[:, None]) or move channels first (x.permute(0, 3, 1, 2))"
        )
    c, last = images.shape[1], images.shape[3]
    if last in (1, 3, 4) and c > 4 and images.shape[2] > 4:
        # (N, H, W, 3) read as channels-first would be images of H channels, 3 pixels wide
        raise ValueError(
            f"images have shape {tuple(images.shape)}, which looks channels-last (N, H, W, {last}); "
            f"ImageDataset takes (N, C, H, W). Move channels first: images.permute(0, 3, 1, 2) "
            f"(torch) or np.moveaxis(images, -1, 1) (NumPy)"
        )
    return images


def _as_target(t, n, key="targets"):
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(t))
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{key} must be a tensor (or a dict of tensors), got {type(t).__name__}")
    if t.ndim == 0 or t.shape[0] != n:
        raise ValueError(f"{key} must have first dimension N = {n} (one entry per image), got shape {tuple(t.shape)}")
    if t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        # never keep class ids in a small int type (SPEC.md §0.1: uint8 aliases classes >= 256)
        t = t.to(torch.int64)
    return t


def _is_class_ids(targets) -> bool:
    return (isinstance(targets, torch.Tensor) and targets.ndim == 1
            and not targets.dtype.is_floating_point and targets.dtype != torch.bool)


def _normalise_indices(indices, n: int) -> torch.Tensor:
    """Indices as an int64 tensor in [0, n): from a slice, range, sequence, array, tensor or bool mask."""
    if isinstance(indices, slice):
        return torch.arange(n, dtype=torch.int64)[indices]
    if isinstance(indices, range):
        indices = list(indices)
    if isinstance(indices, (int, np.integer)) and not isinstance(indices, bool):
        raise TypeError("subset needs a sequence of indices, not a single int; use [i]")
    t = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
    if t.dtype == torch.bool:
        if t.ndim != 1 or t.shape[0] != n:
            raise ValueError(f"a boolean mask must have shape ({n},), got {tuple(t.shape)}")
        return torch.nonzero(t).reshape(-1)
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"indices must be integers, got dtype {t.dtype}")
    t = t.reshape(-1).to(torch.int64)
    if int(t.min()) < -n or int(t.max()) >= n:
        raise IndexError(f"indices must lie in [-{n}, {n}) for a dataset of {n} samples, "
                         f"got min {int(t.min())}, max {int(t.max())}")
    return torch.where(t < 0, t + n, t)


def _index(i, n):
    try:
        i = operator.index(i)
    except TypeError:
        if isinstance(i, torch.Tensor) and i.numel() == 1:
            i = int(i)
        else:
            raise TypeError(f"dataset index must be an int, got {type(i).__name__}; use .subset(indices) "
                            "for several") from None
    if not -n <= i < n:
        raise IndexError(f"index {i} out of range for a dataset of {n} samples")
    return i % n if n else i


def _to_display(chw: torch.Tensor) -> np.ndarray:
    c = chw.shape[0]
    if c == 1:
        chw = chw.expand(3, -1, -1)
    elif c != 3:
        raise ValueError(f"image_array shows 1- or 3-channel images, this one has {c} channels")
    return chw.permute(1, 2, 0).contiguous().numpy()


# --- ImageDataset --------------------------------------------------------------------------------

class ImageDataset(Dataset):
    """In-memory image dataset.

    ``images``: uint8 tensor (N, C, H, W) (channels-last arrays (N, H, W, 1|3|4) are refused with
    the permutation to use, not silently misread); ``targets``: a tensor whose first dim is N (int64 class
    ids (N,), or (N, A) attribute bits, or multi-hot (N, K) float) OR a dict of such tensors
    (dense/scene targets). ``dataset[i]`` returns ``(image float32 (C, H, W) in [0, 1], target)``
    where target is ``targets[i]`` (a 0-dim int64 tensor for class ids) or ``{k: v[i]}``.
    An optional ``transform`` (a callable on the float image tensor) is applied in ``__getitem__``
    and ``get_image``; it sees only the image, so use it for photometric changes (dense targets are
    not transformed with it).

    ``fingerprint``: pass one when the data is defined by a generator configuration; otherwise the
    content (images, targets, classes) is hashed on first use. A transform changes the fingerprint
    through its ``repr`` (give transforms a deterministic repr, or caches will simply miss).
    """

    def __init__(self, images, targets, *, classes=None, name="", meta=None, fingerprint=None,
                 transform=None, info=None):
        self.images = _as_images(images)
        n = self.images.shape[0]
        if isinstance(targets, Mapping):
            if not targets:
                raise ValueError("targets dict is empty; pass at least one tensor")
            self.targets = {str(k): _as_target(v, n, f"targets[{k!r}]") for k, v in targets.items()}
        else:
            self.targets = _as_target(targets, n)
        self.classes = None if classes is None else [str(c) for c in classes]
        if self.classes is not None and _is_class_ids(self.targets) and n:
            lo, hi = int(self.targets.min()), int(self.targets.max())
            if lo < 0 or hi >= len(self.classes):
                raise ValueError(f"class ids must lie in [0, {len(self.classes)}) for {len(self.classes)} "
                                 f"classes, got min {lo}, max {hi}")
        if meta is not None and len(meta) != n:
            raise ValueError(f"meta must have one row per image ({n}), got {len(meta)} rows")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (image tensor -> image tensor), got {transform!r}")
        self.name = str(name)
        self.meta = meta
        self.transform = transform
        self.info = dict(info) if info else {}
        if "task" not in self.info:
            if isinstance(self.targets, dict):
                self.info["task"] = "dense"
            elif _is_class_ids(self.targets):
                self.info["task"] = "classification"
            else:
                self.info["task"] = "multilabel"
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be a str (hex digest), got {type(fingerprint).__name__}")
        self._base_fingerprint = fingerprint

    # data identity ----------------------------------------------------------------------------
    @property
    def data_fingerprint(self) -> str:
        """Fingerprint of the images and targets, without the transform."""
        if self._base_fingerprint is None:
            self._base_fingerprint = digest(("ImageDataset", self.images, self.targets, self.classes))
        return self._base_fingerprint

    @property
    def fingerprint(self) -> str:
        if self.transform is None:
            return self.data_fingerprint
        return digest(("transform", self.data_fingerprint, repr(self.transform)))

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    # access -----------------------------------------------------------------------------------
    def __len__(self):
        return self.images.shape[0]

    def get_image(self, i) -> torch.Tensor:
        """The image alone, as ``__getitem__`` returns it (transform applied); targets untouched."""
        x = self.images[_index(i, len(self))].float().div_(255.0)
        return x if self.transform is None else self.transform(x)

    def get_target(self, i):
        i = _index(i, len(self))
        if isinstance(self.targets, dict):
            return {k: v[i] for k, v in self.targets.items()}
        return self.targets[i]

    def __getitem__(self, i):
        return self.get_image(i), self.get_target(i)

    def image_array(self, i) -> np.ndarray:
        """uint8 (H, W, 3) for display (grey repeated to 3 channels; no transform applied)."""
        return _to_display(self.images[_index(i, len(self))])

    # derived datasets -------------------------------------------------------------------------
    def _derived(self, images, targets, meta, fp, transform):
        new = ImageDataset.__new__(type(self))
        new.__dict__.update(self.__dict__)  # keeps subclass attributes too
        new.images, new.targets, new.meta = images, targets, meta
        new._base_fingerprint, new.transform = fp, transform
        new.info = dict(self.info)
        return new

    def subset(self, indices) -> "ImageDataset":
        """The samples at ``indices`` (order kept, repeats allowed), same name/classes/transform.
        Its fingerprint is derived from the parent's and the indices."""
        idx = _normalise_indices(indices, len(self))
        if isinstance(self.targets, dict):
            targets = {k: v[idx] for k, v in self.targets.items()}
        else:
            targets = self.targets[idx]
        meta = None if self.meta is None else self.meta.iloc[idx.numpy()].reset_index(drop=True)
        fp = digest(("subset", self.data_fingerprint, idx))
        return self._derived(self.images[idx], targets, meta, fp, self.transform)

    def with_transform(self, transform) -> "ImageDataset":
        """The same data with ``transform`` (replacing any previous one; None removes it)."""
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (image tensor -> image tensor), got {transform!r}")
        return self._derived(self.images, self.targets, self.meta, self._base_fingerprint, transform)

    def __repr__(self):
        c, h, w = self.images.shape[1:] if len(self.images.shape) == 4 else ("?",) * 3
        k = "" if self.classes is None else f", classes={len(self.classes)}"
        t = "" if self.transform is None else f", transform={self.transform!r}"
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, image=({c}, {h}, {w}), "
                f"task={self.info.get('task')!r}{k}{t})")


# --- Unlabeled -----------------------------------------------------------------------------------

class Unlabeled(Dataset):
    """Wraps a dataset and yields only its images (for label-free distillation, SPEC.md §0.1).

    Uses ``dataset.get_image(i)`` (kaviz datasets), so targets are never read; a plain dataset
    without ``get_image`` falls back to ``dataset[i][0]``.
    """

    def __init__(self, dataset):
        if isinstance(dataset, Unlabeled):
            dataset = dataset.dataset
        self.dataset = dataset
        self.name = getattr(dataset, "name", "")

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        get = getattr(self.dataset, "get_image", None)
        return get(i) if get is not None else self.dataset[i][0]

    @property
    def fingerprint(self) -> str:
        return digest(("unlabeled", fingerprint(self.dataset)))

    def image_array(self, i):
        return self.dataset.image_array(i)

    def subset(self, indices) -> "Unlabeled":
        return Unlabeled(self.dataset.subset(indices))

    def __repr__(self):
        return f"Unlabeled({self.dataset!r})"


# --- union ---------------------------------------------------------------------------------------

def _image_shape(ds):
    if isinstance(getattr(ds, "images", None), torch.Tensor):
        return tuple(ds.images.shape[1:])
    if len(ds) == 0:
        return None
    return tuple(ds.get_image(0).shape)


class UnionDataset(Dataset):
    """SPEC.md §0.1: the union of several classification datasets in one comprehensive label space.

    Sources keep their order (teacher order): source t's classes occupy labels
    ``offsets[t] .. offsets[t] + class_counts[t] - 1``. Item i -> ``(image, offset_label)`` with
    ``offset_label = local label + offsets[origin[i]]``, a 0-dim int64 tensor.

    Attributes: ``datasets``, ``sources`` (names), ``offsets``, ``class_counts``, ``classes``
    (prefixed, ``'shapes/circle'``, ``'digits/3'``), ``num_classes`` (the sum), ``slices`` (each
    source's label slice, for task-aware accuracy), ``origin`` (int64 (N,), source of each sample),
    ``local_index`` (int64 (N,), index inside its source), ``targets`` (int64 (N,) offset labels),
    ``fingerprint``.
    """

    def __init__(self, datasets, names=None, *, _origin=None, _local_index=None):
        datasets = list(datasets)
        if not datasets:
            raise ValueError("union needs at least one dataset")
        if names is None:
            names = [getattr(ds, "name", "") for ds in datasets]
        names = [str(s) for s in names]
        if len(names) != len(datasets):
            raise ValueError(f"got {len(names)} names for {len(datasets)} datasets")
        if any(not s for s in names) or len(set(names)) != len(names):
            raise ValueError(
                f"union needs a distinct, non-empty name per dataset, got {names}; pass "
                "names=['shapes', 'digits', ...]"
            )
        counts, local_targets = [], []
        for ds, nm in zip(datasets, names):
            t = getattr(ds, "targets", None)
            if not _is_class_ids(t):
                raise ValueError(
                    f"union combines classification datasets (targets = int class ids of shape (N,)); "
                    f"{nm!r} has targets of type {type(t).__name__}"
                    + (f" with shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else "")
                )
            k = getattr(ds, "num_classes", None)
            if k is None:
                raise ValueError(f"dataset {nm!r} has no classes; pass classes=[...] when building it")
            if len(t) and (int(t.min()) < 0 or int(t.max()) >= k):
                raise ValueError(f"dataset {nm!r} has labels outside [0, {k})")
            counts.append(int(k))
            local_targets.append(t.to(torch.int64))
        shapes = {nm: _image_shape(ds) for ds, nm in zip(datasets, names)}
        distinct = {s for s in shapes.values() if s is not None}
        if len(distinct) > 1:
            raise ValueError(
                f"union needs images of one shape, got {shapes}; render them alike, e.g. "
                "shapes(size=32) with digits(size=32) (both 3 channels)"
            )
        self.datasets = datasets
        self.sources = names
        self.class_counts = counts
        self.offsets = [int(v) for v in np.cumsum([0] + counts[:-1])]
        self.num_classes = int(sum(counts))
        self.slices = [slice(o, o + k) for o, k in zip(self.offsets, counts)]
        self.classes = [
            f"{nm}/{c}"
            for ds, nm, k in zip(datasets, names, counts)
            for c in (getattr(ds, "classes", None) or [str(j) for j in range(k)])
        ]
        if _origin is None:
            _origin = torch.cat([torch.full((len(ds),), s, dtype=torch.int64) for s, ds in enumerate(datasets)])
            _local_index = torch.cat([torch.arange(len(ds), dtype=torch.int64) for ds in datasets])
        self.origin = _origin
        self.local_index = _local_index
        offsets = torch.tensor(self.offsets, dtype=torch.int64)
        targets = torch.empty(len(_origin), dtype=torch.int64)
        for s, t in enumerate(local_targets):
            m = _origin == s
            targets[m] = t[_local_index[m]] + offsets[s]
        self.targets = targets
        self.name = "+".join(names)
        self.info = {"task": "classification", "sources": list(names)}
        self._fingerprint = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = digest((
                "union", [fingerprint(ds) for ds in self.datasets], self.sources,
                self.origin, self.local_index,
            ))
        return self._fingerprint

    def __len__(self):
        return len(self.origin)

    def _locate(self, i):
        i = _index(i, len(self))
        return i, int(self.origin[i]), int(self.local_index[i])

    def get_image(self, i) -> torch.Tensor:
        _, s, j = self._locate(i)
        ds = self.datasets[s]
        get = getattr(ds, "get_image", None)
        return get(j) if get is not None else ds[j][0]

    def get_target(self, i):
        return self.targets[_index(i, len(self))]

    def __getitem__(self, i):
        return self.get_image(i), self.get_target(i)

    def image_array(self, i) -> np.ndarray:
        _, s, j = self._locate(i)
        return self.datasets[s].image_array(j)

    def source_name(self, i) -> str:
        return self.sources[self._locate(i)[1]]

    def subset(self, indices) -> "UnionDataset":
        idx = _normalise_indices(indices, len(self))
        new = UnionDataset(self.datasets, self.sources, _origin=self.origin[idx],
                           _local_index=self.local_index[idx])
        return new

    @property
    def meta(self):
        """One row per sample: source, local index, offset label and class name (pandas)."""
        import pandas as pd

        return pd.DataFrame({
            "source": [self.sources[s] for s in self.origin.tolist()],
            "local_index": self.local_index.numpy(),
            "label": self.targets.numpy(),
            "class": [self.classes[t] for t in self.targets.tolist()],
        })

    def __repr__(self):
        parts = ", ".join(f"{s}: {k} classes" for s, k in zip(self.sources, self.class_counts))
        return f"UnionDataset(n={len(self)}, {parts}, num_classes={self.num_classes})"


def union(datasets, names=None) -> UnionDataset:
    """The union of classification datasets in one comprehensive label space (SPEC.md §0.1):
    source t's local label y becomes ``y + offsets[t]``. ``names`` default to ``ds.name``."""
    return UnionDataset(datasets, names)


# --- splits --------------------------------------------------------------------------------------

class Splits(NamedTuple):
    train: Dataset
    val: Dataset
    test: Dataset


def _fraction(v, name):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not 0 <= v < 1:
        raise ValueError(f"{name} must be a fraction in [0, 1), got {v!r}")
    return float(v)


def split(dataset, val=0.15, test=0.15, seed=0, stratify=True, min_per_class=0) -> Splits:
    """Deterministic train/val/test split (disjoint, together covering every sample once).

    Stratified by class when the targets are class ids (each class split in the same proportions,
    rounded per class); otherwise a seeded random split. The parts are ``dataset.subset(...)``
    (indices in increasing order), or ``torch.utils.data.Subset`` for datasets without ``subset``.
    Select models on ``val``; keep ``test`` for the final numbers.

    ``min_per_class`` (stratified splits only): a class whose rounded share would give ``val`` (or
    ``test``, when its fraction is > 0) fewer than this many samples gets this many, as long as one
    sample of the class stays in the training split. With 4 images per class and ``val=0.1`` the
    rounded share is 0: ``min_per_class=1`` keeps one validation image of every class.
    """
    val, test = _fraction(val, "val"), _fraction(test, "test")
    if val + test >= 1:
        raise ValueError(f"val + test must be < 1 (the rest is the training split), got {val} + {test}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot split an empty dataset")
    rng = np.random.default_rng(int(seed))
    targets = getattr(dataset, "targets", None)
    stratified = bool(stratify and _is_class_ids(targets))
    if stratified:
        y = targets.numpy()
        groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    else:
        groups = [np.arange(n)]
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, (int, np.integer)) or min_per_class < 0:
        raise ValueError(f"min_per_class must be an int >= 0, got {min_per_class!r}")
    floor = int(min_per_class) if stratified else 0
    parts = ([], [], [])
    for g in groups:
        g = rng.permutation(g)
        n_test = int(round(test * len(g)))
        n_val = int(round(val * len(g)))
        if floor:  # raise the small shares, never taking a class's last training sample
            if test > 0 and n_test < floor:
                n_test = max(n_test, min(floor, len(g) - n_val - 1))
            if val > 0 and n_val < floor:
                n_val = max(n_val, min(floor, len(g) - n_test - 1))
        parts[2].append(g[:n_test])
        parts[1].append(g[n_test:n_test + n_val])
        parts[0].append(g[n_test + n_val:])
    idx = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    if len(idx[0]) == 0:
        raise ValueError(f"the training split is empty ({n} samples, val={val}, test={test}); "
                         "use smaller fractions or more data")
    if hasattr(dataset, "subset"):
        return Splits(*(dataset.subset(i) for i in idx))
    return Splits(*(torch.utils.data.Subset(dataset, i.tolist()) for i in idx))


def limit(dataset, n=None, seed=0):
    """At most ``n`` samples of ``dataset``, deterministic (``n=None``: the dataset itself).

    With class-id targets the choice is class-balanced: every class's samples in a seeded order
    (``numpy.random.default_rng(seed)``), then the first of each class, the second of each class, ...
    until ``n`` are taken, so every class is represented while ``n`` ≥ the number of classes. Other
    targets (masks, multi-hot labels): the first ``n`` of a seeded permutation. The result is
    ``dataset.subset(indices)`` (indices in increasing order), or a ``torch.utils.data.Subset``.
    Used for smoke runs of the real-data paths (``max_per_split=`` of the methods' ``load_data``).
    """
    if n is None:
        return dataset
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"max_per_split / n must be a positive int or None (everything), got {n!r}")
    total = len(dataset)
    if total <= n:
        return dataset
    rng = np.random.default_rng(int(seed))
    targets = getattr(dataset, "targets", None)
    if _is_class_ids(targets) and len(targets) == total:
        y = targets.numpy()
        ranked = []  # (rank within its class, class position, index)
        for ci, c in enumerate(np.unique(y)):
            for rank, i in enumerate(rng.permutation(np.flatnonzero(y == c))):
                ranked.append((rank, ci, int(i)))
        ranked.sort()
        idx = np.sort(np.array([i for _, _, i in ranked[:int(n)]], dtype=np.int64))
    else:
        idx = np.sort(rng.permutation(total)[:int(n)]).astype(np.int64)
    if hasattr(dataset, "subset"):
        return dataset.subset(idx)
    return torch.utils.data.Subset(dataset, idx.tolist())


# --- loaders -------------------------------------------------------------------------------------

def loader(dataset, batch_size=64, shuffle=False, seed=0, drop_last=False, num_workers=0) -> DataLoader:
    """A DataLoader whose shuffling is seeded through ``torch.Generator().manual_seed(seed)``, so
    the batch order depends on ``seed`` only (not on the global torch RNG)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=bool(shuffle), generator=g,
                      drop_last=bool(drop_last), num_workers=int(num_workers))
