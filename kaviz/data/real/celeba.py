"""CelebA (Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015): 202,599 aligned face
images, 40 binary attributes, the official 162,770 / 19,867 / 19,962 train/valid/test partition."""
from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import torch

from .base import RealImageDataset, check_files, check_root, check_split, layout_error

TITLE = "CelebA"
LAYOUT = """\
  celeba/
    img_align_celeba/000001.jpg ...
    list_attr_celeba.txt        (or Anno/list_attr_celeba.txt)
    list_eval_partition.txt     (or Eval/list_eval_partition.txt)"""
SPLITS = ("train", "valid", "test")
_PARTITION = {"train": "0", "valid": "1", "test": "2"}


def _locate(root: Path, name: str, subdir: str) -> Path | None:
    for p in (root / name, root / subdir / name):
        if p.exists():
            return p
    return None


def select_attributes(names: list[str], attributes) -> list[int]:
    """Column indices of ``attributes`` in ``names``; unknown names raise with the closest valid ones."""
    if isinstance(attributes, str):
        attributes = [attributes]
    attributes = list(attributes)
    if not attributes:
        raise ValueError("attributes=[] selects nothing; pass None for all 40 or a list of names.")
    dup = sorted({a for a in attributes if attributes.count(a) > 1})
    if dup:
        raise ValueError(f"attributes lists {dup} more than once.")
    index = {n: k for k, n in enumerate(names)}
    lower = {n.lower(): n for n in names}
    cols = []
    for a in attributes:
        if a in index:
            cols.append(index[a])
            continue
        close = ([lower[a.lower()]] if a.lower() in lower else []) + difflib.get_close_matches(a, names, n=3, cutoff=0.5)
        close = list(dict.fromkeys(close))
        hint = f"closest valid names: {close}" if close else f"valid names: {names}"
        raise ValueError(f"CelebA has no attribute {a!r}; {hint}.")
    return cols


def _parse_values(parts: list[str], n_attr: int) -> np.ndarray | None:
    """(N, n_attr) int64 0/1 from the value part of each line ("-1  1 -1 ..."), or None if malformed.

    One pass over one bytes object instead of 8 million ``int()`` calls: -1 becomes 0, whitespace is
    dropped, and each remaining byte is one value (0/1 files are read as they are).
    """
    flat = " ".join(parts).encode("ascii", "replace").replace(b"-1", b"0").translate(None, b" \t\r\n")
    digits = np.frombuffer(flat, dtype=np.uint8)
    if digits.size != len(parts) * n_attr or not np.isin(digits, (ord("0"), ord("1"))).all():
        return None
    return (digits - ord("0")).astype(np.int64).reshape(len(parts), n_attr)


def celeba(root, split: str = "train", attributes=None, image_size=224, transform=None, augment: bool = True,
           check_images: bool = True) -> RealImageDataset:
    """CelebA attributes from ``img_align_celeba/`` and the official annotation files.

    Targets are int64 (N, A) rows of 0/1 (the files' -1 becomes 0). ``attributes`` selects and orders
    a subset of the 40 names (e.g. ``["Smiling", "Male"]``); None keeps all 40 in file order.
    ``classes`` are the selected attribute names and ``num_classes`` their number. ``split`` follows
    ``list_eval_partition.txt`` (0 train, 1 valid, 2 test).
    """
    check_split(TITLE, split, SPLITS)
    root = check_root(TITLE, root, LAYOUT, ["img_align_celeba"])
    attr_file = _locate(root, "list_attr_celeba.txt", "Anno")
    part_file = _locate(root, "list_eval_partition.txt", "Eval")
    missing = [n for n, p in (("list_attr_celeba.txt", attr_file), ("list_eval_partition.txt", part_file)) if p is None]
    if missing:
        raise layout_error(TITLE, root, "missing " + ", ".join(missing), LAYOUT, marker=missing[0])

    with open(part_file, encoding="utf-8") as fh:
        part = dict(line.split()[:2] for line in fh if line.strip())
    with open(attr_file, encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    if len(lines) < 2:
        raise layout_error(TITLE, root, f"{attr_file.name} is truncated (no attribute-name line)", LAYOUT)
    names = lines[1].split()
    cols = select_attributes(names, attributes) if attributes is not None else list(range(len(names)))

    want = _PARTITION[split]
    rows = [line.split(None, 1) for line in lines[2:]]
    rows = [r for r in rows if part.get(r[0]) == want]
    files = ["img_align_celeba/" + r[0] for r in rows]
    arr = _parse_values([r[1] if len(r) > 1 else "" for r in rows], len(names))
    if arr is None:  # find the culprit for the message
        bad = next((r for r in rows if len(r) < 2 or len(r[1].split()) != len(names)
                    or not set(r[1].split()) <= {"-1", "1", "0"}), rows[0])
        raise layout_error(TITLE, root, f"{attr_file.name}: the line for {bad[0]} does not hold {len(names)} "
                           "values of -1/1", LAYOUT)
    arr = arr[:, cols]
    y = torch.from_numpy(np.ascontiguousarray(arr))
    if check_images:
        check_files(TITLE, root, LAYOUT, files)
    return RealImageDataset(name="celeba", root=root, split=split, files=files, targets=y,
                            classes=[names[c] for c in cols], image_size=image_size, transform=transform,
                            train=split == "train", augment=augment, task="attributes", options={"attributes": cols})
