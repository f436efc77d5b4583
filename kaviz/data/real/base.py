"""Common base of the real-dataset loaders: file list, PIL loading, transforms, layout errors.

Every loader in :mod:`kaviz.data.real` parses its dataset's index files into a list of image paths
(relative to ``root``) plus targets, and hands them to :class:`RealImageDataset` (classification,
attributes, multi-label) or :class:`DenseDataset` (segmentation masks and depth maps). Items are
``(image, target)`` with ``image`` a float32 tensor (3, H, W) after the transform, as for the embedded
datasets. Nothing is ever downloaded: a missing or incomplete folder raises
:class:`DatasetLayoutError` with the expected tree.
"""
from __future__ import annotations

import copy
import hashlib
import json
import operator
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "DatasetLayoutError",
    "DatasetFormatError",
    "RealImageDataset",
    "DenseDataset",
    "JointTransform",
    "ResizeCover",
    "default_transform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IGNORE_INDEX",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Label value of pixels that losses and metrics must skip (void, unlabelled, padding).
IGNORE_INDEX = 255

_NO_DOWNLOAD = "Download it yourself from the dataset's site and pass root=... (kaviz never downloads)."


# --------------------------------------------------------------------------------------------------
# Layout errors


class DatasetLayoutError(FileNotFoundError):
    """A real dataset's folder is missing, incomplete or malformed.

    The message names the dataset, what is missing, and shows the expected folder tree.
    """


class DatasetFormatError(DatasetLayoutError, ValueError):
    """A file of a real dataset is there but its content is wrong: a malformed line (named by its
    number), a path that leaves the dataset folder, an unreadable or truncated image. A
    :class:`DatasetLayoutError` (so existing handlers still catch it) and a ``ValueError``."""


def _find_nested(root: Path, marker: str, depth: int = 2, max_dirs: int = 64) -> Path | None:
    """A folder up to ``depth`` levels below ``root`` that holds ``marker`` (for a 'did you mean')."""
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for folder in frontier[:max_dirs]:
            try:
                with os.scandir(folder) as it:
                    subdirs = sorted(Path(e.path) for e in it if e.is_dir())
            except OSError:
                continue
            for sub in subdirs:
                if (sub / marker).exists():
                    return sub
            nxt.extend(subdirs)
        frontier = nxt
    return None


def layout_error(title: str, root: Path, problem: str, layout: str, marker: str | None = None):
    """Build the :class:`DatasetLayoutError` every loader raises (message format shared by all)."""
    hint = ""
    if marker is not None and root.is_dir():
        nested = _find_nested(root, marker)
        if nested is not None:
            hint = f"\nDid you mean root={str(nested)!r}? It holds {marker}."
    return DatasetLayoutError(
        f"{title} not found at {root}: {problem}.{hint}\nExpected layout:\n{layout.rstrip()}\n{_NO_DOWNLOAD}"
    )


def malformed_error(title: str, root: Path, file: str, problem: str, layout: str | None = None,
                    line: int | None = None) -> DatasetFormatError:
    """The error for a present but malformed file: ``<title> at <root>: <file> is malformed at line
    N: <problem>`` (no "not found": the file was found, its content is wrong)."""
    where = f" at line {line}" if line is not None else ""
    tail = f"\nExpected layout:\n{layout.rstrip()}" if layout else ""
    return DatasetFormatError(
        f"{title} at {root}: {file} is malformed{where}: {problem}. Fix or re-extract that file from the "
        f"dataset's archive.{tail}")


def safe_relpath(title: str, root: Path, rel: str, source: str, line: int | None = None,
                 prefix: str = "") -> str:
    """``prefix + rel`` after checking that ``rel`` (a file name read from ``source``, an index file
    of the dataset) stays inside the dataset folder: no absolute path, no ``..`` component, no
    drive. A name like ``../../x.png`` is refused with the line named (a crafted index file must
    not make kaviz read files elsewhere)."""
    text = str(rel)
    if text and ".." not in text and not text.startswith(("/", "\\")) and ":" not in text and "\0" not in text:
        return prefix + text  # the common case, checked fast (CelebA lists 200k names)
    parts = re.split(r"[\\/]+", text)
    bad = (not text or text.startswith(("/", "\\")) or os.path.isabs(text) or re.match(r"^[A-Za-z]:", text)
           or any(p == ".." for p in parts) or "\0" in text)
    if bad:
        raise malformed_error(title, root, source, f"the file name {text!r} leaves the dataset folder "
                              "(absolute, or with '..'); index files must name files inside it", line=line)
    return prefix + text


def check_root(title: str, root, layout: str, required: Sequence[str]) -> Path:
    """Return ``root`` as a Path after checking that it holds every path in ``required``."""
    if root is None:
        raise TypeError(f"{title}: root=None; pass the folder where you put the dataset (root=...).")
    root = Path(root).expanduser()
    if not root.exists():
        raise layout_error(title, root, "the folder does not exist", layout)
    if not root.is_dir():
        raise layout_error(title, root, "this is a file, not a folder", layout)
    missing = [p for p in required if not (root / p).exists()]
    if missing:
        raise layout_error(title, root, "missing " + ", ".join(missing), layout, marker=missing[0])
    return root


def check_files(title: str, root: Path, layout: str, files: Sequence[str], what: str = "images") -> None:
    """Raise when some of ``files`` (relative to ``root``) are absent: an incomplete extraction.

    One directory listing per folder instead of one ``stat`` per file, so that checking COCO's 80k
    images or CelebA's 200k takes a fraction of a second.
    """
    by_dir: dict[str, list[str]] = {}
    for f in files:
        d, _, base = f.rpartition("/")
        by_dir.setdefault(d, []).append(base)
    missing = []
    for d, names in by_dir.items():
        try:
            with os.scandir(root / d if d else root) as it:
                present = {e.name for e in it}
        except OSError:
            present = set()
        missing.extend(f"{d}/{n}" if d else n for n in names if n not in present)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise layout_error(
            title, root, f"{len(missing)} of {len(files)} listed {what} are missing ({shown}); "
            "the extraction looks incomplete", layout)


def check_split(title: str, split, valid: Sequence[str]) -> str:
    if split not in valid:
        raise ValueError(f"{title}: unknown split {split!r}; valid splits are {list(valid)}.")
    return split


def natural_key(s: str):
    """Sort key that puts ``img2`` before ``img10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


def read_lines(path: Path) -> list[list[str]]:
    """Whitespace-split non-empty lines of a text index file."""
    return [fields for _, fields in read_numbered_lines(path)]


def read_numbered_lines(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of the non-empty lines of a text index file (numbers from 1, as an
    editor shows them). A file that is not UTF-8 text raises :class:`DatasetFormatError`."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [(n, line.split()) for n, line in enumerate(fh, 1) if line.strip()]
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not a UTF-8 text file ({e}); re-extract it from the dataset's "
                                 "archive.") from None


# --------------------------------------------------------------------------------------------------
# Transforms


def _size2(image_size) -> tuple[int, int]:
    if isinstance(image_size, bool):
        raise TypeError(f"image_size must be an int or a (height, width) pair, got {image_size!r}")
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        try:
            size = tuple(int(s) for s in image_size)
        except TypeError:
            raise TypeError(f"image_size must be an int or a (height, width) pair, got {image_size!r}") from None
        if len(size) != 2:
            raise ValueError(f"image_size must be an int or a (height, width) pair, got {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return size


class ResizeCover(v2.Transform):
    """Resize (keeping the aspect ratio) to the smallest size that covers ``size`` = (h, w).

    For a square ``size`` this is ``Resize(side)`` on the shorter side; for a non-square size it also
    makes sure the following ``CenterCrop(size)`` never pads (padding would invent label-0 pixels in a
    mask). Masks use nearest-neighbour interpolation, as in every v2 geometric transform.
    """

    def __init__(self, size, interpolation=v2.InterpolationMode.BILINEAR):
        super().__init__()
        self.size = _size2(size)
        self.interpolation = v2.InterpolationMode(interpolation)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        s = max(self.size[0] / h, self.size[1] / w)
        return {"size": [max(self.size[0], round(h * s)), max(self.size[1], round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=self.interpolation,
                                 antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}, interpolation={self.interpolation.value}"


def _geometry(size: tuple[int, int], train: bool, scale=(0.5, 1.0), hflip: bool = True,
              interpolation=v2.InterpolationMode.BILINEAR) -> list:
    interpolation = v2.InterpolationMode(interpolation)
    if train:
        ops = [v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interpolation, antialias=True)]
        if hflip:
            ops.append(v2.RandomHorizontalFlip(0.5))
        return ops
    return [ResizeCover(size, interpolation), v2.CenterCrop(size)]


def default_transform(image_size=224, train: bool = False, scale=(0.5, 1.0), normalize: bool = True):
    """The loaders' default image transform (torchvision.transforms.v2), PIL image -> float32 (3,H,W).

    ``train``: ``RandomResizedCrop(image_size, scale=scale)`` + horizontal flip; otherwise resize
    (shorter side, covering ``image_size``) + ``CenterCrop(image_size)``. Then scaling to [0, 1] and,
    if ``normalize``, ImageNet normalisation.
    """
    ops = _geometry(_size2(image_size), train, scale) + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        ops.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(ops)


def _unwrap(x):
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


class JointTransform:
    """Apply the same random geometry to an image and its dense maps (mask, depth, ...).

    ``JointTransform(image_size, train=True)(image, {"mask": m, "depth": d})`` returns
    ``(image, {"mask": m', "depth": d'})``: the image becomes float32 (3, h, w), scaled to [0, 1] and
    (if ``normalize``) ImageNet-normalised; every map keeps its dtype and is resampled with
    nearest-neighbour interpolation (no blended labels, no depth averaged across an object edge), so a
    pixel's label and depth stay those of the image pixel under it.

    ``train=True``: ``RandomResizedCrop(image_size, scale=scale)`` + horizontal flip (if ``hflip``);
    ``train=False``: resize to cover ``image_size`` + centre crop. ``image`` may be a PIL image, a
    uint8 (H, W, 3) array, or a (3, H, W) tensor (uint8, or float in [0, 1]); maps are the 2-D
    (H, W) arrays or tensors of ``target``, of the image's size; any other entry (a multi-hot
    ``labels`` vector, ``difficult`` flags) is returned unchanged, so a whole scene target can be
    passed. ``image_size`` is an int or a (height, width) pair. ``interpolation``
    ("bilinear", "nearest", ... or a ``v2.InterpolationMode``) applies to the image only.
    """

    def __init__(self, image_size=224, train: bool = True, scale=(0.5, 1.0), hflip: bool = True,
                 normalize: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear"):
        self.image_size = _size2(image_size)
        self.train = bool(train)
        ops = _geometry(self.image_size, self.train, scale, hflip, interpolation)
        ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
        if normalize:
            ops.append(v2.Normalize(list(mean), list(std)))
        self.pipeline = v2.Compose(ops)

    def __call__(self, image, target: Mapping[str, Any] | None = None):
        img = tv_tensors.Image(F.to_image(image))
        if target is None:
            return _unwrap(self.pipeline(img))
        maps, rest = {}, {}
        for key, m in target.items():
            if isinstance(m, (torch.Tensor, np.ndarray)) and m.ndim == 2:
                m = torch.as_tensor(m) if not isinstance(m, torch.Tensor) else _unwrap(m)
                if m.shape != img.shape[-2:]:
                    raise ValueError(
                        f"JointTransform: map {key!r} has shape {tuple(m.shape)} but the image is "
                        f"{tuple(img.shape[-2:])} (H, W); dense maps must match the image.")
                maps[key] = tv_tensors.Mask(m)
            else:
                rest[key] = m  # per-image labels (multi-hot, flags) are not spatial
        out_img, out_maps = self.pipeline(img, maps)
        return _unwrap(out_img), {**{k: _unwrap(v) for k, v in out_maps.items()}, **rest}

    def __repr__(self) -> str:
        return f"JointTransform({self.pipeline!r})"


# --------------------------------------------------------------------------------------------------
# Datasets


def _load_rgb(path: Path):
    """The image at ``path`` as an RGB PIL image, upright: the EXIF orientation tag (phone pictures) is
    applied, grayscale and CMYK become RGB. ``.npy`` images (MTAN's NYUv2 folders) are read too: uint8
    as stored, floats as values in [0, 1]; (H, W, 3) or (3, H, W)."""
    from PIL import Image, ImageOps

    try:
        if path.suffix.lower() == ".npy":
            return Image.fromarray(_npy_image(path), "RGB")
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found (moved or deleted since the dataset was "
                                "loaded?); check the dataset folder, or rebuild the dataset.") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated, corrupt, not an image (PIL's errors)
        raise DatasetFormatError(f"{path}: cannot read this image ({type(e).__name__}: {e}); the file is "
                                 "truncated or corrupt. Re-extract it from the dataset's archive, or "
                                 "leave it out with dataset.subset(...).") from e


def _npy_image(path: Path) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"an image .npy must be (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(np.rint(arr * 255.0), 0, 255)
    return np.ascontiguousarray(arr.astype(np.uint8))


_JPEG = (".jpg", ".jpeg")


def _load_image(path: Path, as_tensor: bool):
    """``as_tensor``: JPEGs are decoded by ``torchvision.io.decode_jpeg`` straight into a uint8
    (3, H, W) tensor (libjpeg-turbo, EXIF orientation applied, grayscale/CMYK converted to RGB: the same
    pixels as the PIL path): with the default 224 px training transform, 1.3-1.4x the images per second
    of PIL decoding plus PIL resizing, measured on 375x500 JPEGs (bench/bench_data.py). Everything else, and any JPEG decode_jpeg refuses, goes
    through PIL (which raises the teaching error for a truncated file)."""
    if as_tensor and path.suffix.lower() in _JPEG:
        from torchvision.io import ImageReadMode, decode_jpeg, read_file

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                data = read_file(str(path))
        except RuntimeError:
            data = None  # missing or unreadable: the PIL path raises the error that names the fix
        if data is not None:
            try:
                with warnings.catch_warnings():  # torchvision 0.29 points at torchcodec; decode_jpeg works
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return tv_tensors.Image(decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True))
            except RuntimeError:
                pass  # an unusual JPEG (e.g. arithmetic coding, truncated): PIL decides
    return _load_rgb(path)


def _hw(img) -> tuple[int, int]:
    """(height, width) of a PIL image or a (..., H, W) tensor."""
    return tuple(img.shape[-2:]) if isinstance(img, torch.Tensor) else (img.height, img.width)


def _as_indices(indices, n: int) -> list[int]:
    if isinstance(indices, slice):
        return list(range(n))[indices]
    arr = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"a boolean subset mask must have shape ({n},), got {arr.shape}")
        return np.flatnonzero(arr).tolist()
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"subset() takes a 1-D sequence of int indices or a boolean mask, got {indices!r}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < -n) | (arr >= n)]
    if bad.size:
        raise IndexError(f"subset(): indices {bad[:5].tolist()} out of range for a dataset of {n} items")
    return (arr % n).tolist() if n else []


def _take(value, idx: list[int]):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[torch.as_tensor(idx, dtype=torch.long)]
    if isinstance(value, dict):
        return {k: _take(v, idx) for k, v in value.items()}
    return [value[j] for j in idx]


class RealImageDataset(torch.utils.data.Dataset):
    """A dataset read from a user-supplied folder: a file list, targets, and a transform.

    Items are ``(image, target)``; ``image`` is the transformed image (float32 (3, H, W) with the
    default transforms); ``target`` is ``targets[i]`` (a 0-dim int64 class id, an int64 (A,) row of
    0/1 attributes) or, for dict targets, ``{key: targets[key][i]}``.

    Attributes: ``name``, ``root``, ``split``, ``files`` (paths relative to ``root``), ``classes``,
    ``num_classes``, ``targets`` (all labels, available without loading an image), ``boxes`` (float
    (N, 4) ``x0, y0, x1, y1`` in pixels, or None), ``crop_to_box``, ``transform``, ``info``,
    ``fingerprint``. Like the embedded datasets (``kaviz.data.core``) it has ``get_image(i)``,
    ``get_target(i)``, ``image_array(i)``, ``subset(indices)`` and ``with_transform(t)``, so
    ``kaviz.data.union``/``split``/``Unlabeled`` accept it.
    """

    #: Per-item attributes that :meth:`subset` slices.
    _per_item = ("files", "targets", "boxes")

    def __init__(self, *, name: str, root: Path, split: str, files: Sequence[str], targets, classes,
                 image_size=224, transform: Callable | None = None, train: bool = False,
                 augment: bool = True, boxes: torch.Tensor | None = None, crop_to_box: bool = False,
                 options: Mapping[str, Any] | None = None, task: str = "classification"):
        self.name = name
        self.root = Path(root)
        self.split = split
        self.files = list(files)
        self.targets = targets
        self.classes = list(classes)
        self.image_size = _size2(image_size)
        if crop_to_box and boxes is None:
            raise ValueError(f"{name}: crop_to_box=True needs bounding boxes, and none were loaded")
        self.boxes = boxes
        self.crop_to_box = bool(crop_to_box)
        self.augment = bool(augment)
        self.transform = transform if transform is not None else self._default_transform(train and augment)
        # The default transforms (torchvision v2) take tensors as well as PIL images, so JPEGs are
        # decoded to tensors for them; a transform of the user's own gets PIL images, as usual.
        self._tensor_input = transform is None
        self._options = dict(options or {})
        #: As for the embedded datasets: ``task`` is "classification", "attributes", "multilabel" or
        #: "dense"; the rest says where the data came from.
        self.info = {"task": task, "source": name, "root": str(self.root), "split": split, **self._options}
        self._fingerprint: str | None = None
        self._display = v2.Compose(_geometry(self.image_size, train=False))

    def _default_transform(self, train: bool):
        return default_transform(self.image_size, train=train)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        """sha256 of the dataset name, absolute root, split, file list, options and transform repr.

        Stable across runs and machines with the same root path; a transform whose repr embeds a
        memory address (a bare lambda) gives a new fingerprint each run, which only costs cache misses.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            head = {"name": self.name, "root": str(self.root.resolve()), "split": self.split,
                    "crop_to_box": self.crop_to_box, "options": self._options,
                    "transform": repr(self.transform), "decoder": "tensor" if self._tensor_input else "pil"}
            h.update(json.dumps(head, sort_keys=True, default=str).encode())
            for files in self._file_lists():
                h.update(b"\0" + "\n".join(files).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _file_lists(self) -> list[list[str]]:
        return [self.files]

    def __len__(self) -> int:
        return len(self.files)

    def _check_index(self, i) -> int:
        n = len(self)
        try:
            i = operator.index(i)
        except TypeError:
            if not (isinstance(i, torch.Tensor) and i.numel() == 1 and not i.is_floating_point()):
                raise TypeError(f"dataset index must be an int, got {type(i).__name__}; use .subset(indices) "
                                "for several") from None
            i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} ({self.split}) with {n} items")
        return i % n

    def _pil(self, i: int, as_tensor: bool | None = None):
        """Item ``i``'s image, cropped to its box if ``crop_to_box``: a PIL image, or (``as_tensor``,
        default: when the transform is the default one) a uint8 (3, H, W) image tensor for JPEGs."""
        img = _load_image(self.root / self.files[i], self._tensor_input if as_tensor is None else as_tensor)
        if self.crop_to_box:
            h, w = _hw(img)
            x0, y0, x1, y1 = self.boxes[i].tolist()
            # Clamp: some annotation boxes run a pixel past the image border.
            x0, y0 = max(0, int(x0)), max(0, int(y0))
            x1, y1 = min(w, int(round(x1))), min(h, int(round(y1)))
            if x1 > x0 and y1 > y0:
                img = img[..., y0:y1, x0:x1] if isinstance(img, torch.Tensor) else img.crop((x0, y0, x1, y1))
        return img

    def get_target(self, i):
        """The target of item ``i`` without loading its image."""
        i = self._check_index(i)
        if isinstance(self.targets, dict):
            return {k: v[i] for k, v in self.targets.items()}
        return self.targets[i]

    def get_image(self, i) -> torch.Tensor:
        """The transformed image of item ``i`` alone (its target is never read)."""
        return self.transform(self._pil(self._check_index(i)))

    def __getitem__(self, i):
        i = self._check_index(i)
        return self.get_image(i), self.get_target(i)

    def image_array(self, i) -> np.ndarray:
        """Item ``i`` for display: uint8 (H, W, 3), cropped to its box if ``crop_to_box``, resized and
        centre-cropped to ``image_size``, not normalised and never augmented."""
        shown = self._display(self._pil(self._check_index(i)))
        if isinstance(shown, torch.Tensor):
            return np.ascontiguousarray(shown.as_subclass(torch.Tensor).permute(1, 2, 0).numpy(), dtype=np.uint8)
        return np.asarray(shown, dtype=np.uint8)

    def subset(self, indices) -> "RealImageDataset":
        """The items at ``indices`` (ints, a 1-D tensor/array, a boolean mask or a slice; order kept,
        repeats allowed), as a dataset of the same class. Its fingerprint covers its own file list, so
        it differs from the parent's unless the subset is the whole dataset in order."""
        idx = _as_indices(indices, len(self))
        new = copy.copy(self)
        for attr in self._per_item:
            setattr(new, attr, _take(getattr(self, attr), idx))
        new._fingerprint = None  # recomputed from the subset's own file list (order included)
        return new

    def with_transform(self, transform: Callable | None) -> "RealImageDataset":
        """The same items with another transform (None: the default evaluation transform)."""
        new = copy.copy(self)
        new.transform = transform if transform is not None else self._default_transform(False)
        new._tensor_input = transform is None
        new._fingerprint = None
        return new

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, image_size={self.image_size}, root={str(self.root)!r})")


class DenseDataset(RealImageDataset):
    """Images with per-pixel targets: items are ``(image, {"mask": int64 (H, W), "depth": float32 (H, W)})``.

    ``mask_files`` / ``depth_files`` run parallel to ``files`` (either may be None when the dataset
    has no such map). ``decode_mask(array, path)`` turns a stored label map into int64 class ids with
    :data:`IGNORE_INDEX` for void; ``decode_depth(array, path)`` into float32 metres. The transform is
    joint (default :class:`JointTransform`): it is called as ``transform(pil_image, {"mask": Mask,
    "depth": Mask})`` and returns ``(image, maps)``, so a torchvision v2 pipeline works too.
    ``targets`` is None: dense labels need the maps to be read.
    """

    _per_item = ("files", "targets", "boxes", "mask_files", "depth_files")

    def __init__(self, *, mask_files: Sequence[str] | None, depth_files: Sequence[str] | None,
                 decode_mask: Callable | None = None, decode_depth: Callable | None = None, **kw):
        self.mask_files = list(mask_files) if mask_files is not None else None
        self.depth_files = list(depth_files) if depth_files is not None else None
        self.decode_mask = decode_mask
        self.decode_depth = decode_depth
        kw.setdefault("targets", None)
        kw.setdefault("task", "dense")
        super().__init__(**kw)

    def _default_transform(self, train: bool):
        return JointTransform(self.image_size, train=train)

    def _file_lists(self) -> list[list[str]]:
        return [self.files, self.mask_files or [], self.depth_files or []]

    def maps(self, i) -> dict[str, torch.Tensor]:
        """The untransformed dense targets of item ``i`` at the stored resolution."""
        i = self._check_index(i)
        out = {}
        if self.mask_files is not None:
            p = self.root / self.mask_files[i]
            out["mask"] = torch.from_numpy(np.ascontiguousarray(self.decode_mask(_read_array(p), p)))
        if self.depth_files is not None:
            p = self.root / self.depth_files[i]
            out["depth"] = torch.from_numpy(np.ascontiguousarray(self.decode_depth(_read_array(p), p)))
        return out

    def get_target(self, i):
        """The untransformed maps (see :meth:`maps`); the transformed ones come with ``self[i]``."""
        return self.maps(i)

    def get_image(self, i) -> torch.Tensor:
        """The transformed image alone, the maps never read (for label-free distillation). Under a
        random transform its geometry is drawn afresh, as in ``self[i]``."""
        return _unwrap(self.transform(self._pil(self._check_index(i)), {})[0])

    def __getitem__(self, i):
        i = self._check_index(i)
        img = self._pil(i)
        maps = self.maps(i)
        for key, m in maps.items():
            if tuple(m.shape) != _hw(img):
                f = (self.mask_files if key == "mask" else self.depth_files)[i]
                raise DatasetLayoutError(
                    f"{self.name}: {key} {f} is {tuple(m.shape)} (H, W) but its image {self.files[i]} is "
                    f"{_hw(img)}; every map must have its image's size.")
        out_img, out_maps = self.transform(img, {k: tv_tensors.Mask(m) for k, m in maps.items()})
        return _unwrap(out_img), {k: _unwrap(v) for k, v in out_maps.items()}


def _read_array(path: Path) -> np.ndarray:
    """A stored map as a NumPy array: ``.npy`` as saved, images with PIL (16-bit PNGs stay 16-bit)."""
    if path.suffix.lower() == ".npy":
        # allow_pickle=False: a .npy from someone else's disk must not be able to run code.
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError) as e:  # truncated, not a .npy, or an object array
            raise DatasetFormatError(f"{path}: cannot read this map ({type(e).__name__}: {e}); the file is "
                                     "truncated, corrupt or holds Python objects. Re-create it with "
                                     "np.save(path, array) from a numeric array.") from e
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetFormatError(f"{path}: cannot read this map ({type(e).__name__}: {e}); the file is "
                                 "truncated or corrupt. Re-extract it from the dataset's archive.") from e


def pair_by_stem(title: str, root: Path, layout: str, folders: Mapping[str, str],
                 exts: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Match files across ``folders`` ({role: relative folder}) by file stem, sorted by stem.

    Raises a layout error when a folder is empty or a stem lacks one of its partners.
    """
    listing: dict[str, dict[str, str]] = {}
    for role, folder in folders.items():
        allowed = tuple(e.lower() for e in exts[role])
        with os.scandir(root / folder) as it:
            names = [e.name for e in it if e.is_file() and e.name.lower().endswith(allowed)]
        if not names:
            raise layout_error(title, root, f"{folder}/ holds no {'/'.join(allowed)} files", layout)
        listing[role] = {os.path.splitext(n)[0]: f"{folder}/{n}" for n in names}
    roles = list(folders)
    stems = set(listing[roles[0]])
    for role in roles[1:]:
        a, b = stems - set(listing[role]), set(listing[role]) - stems
        if a or b:
            lacking = f"{len(a)} {roles[0]} file(s) without a {role} (e.g. {sorted(a)[:3]})" if a else ""
            extra = f"{len(b)} {role} file(s) without a {roles[0]} (e.g. {sorted(b)[:3]})" if b else ""
            raise layout_error(title, root, "; ".join(s for s in (lacking, extra) if s), layout)
    order = sorted(stems, key=natural_key)
    return {role: [listing[role][s] for s in order] for role in roles}
