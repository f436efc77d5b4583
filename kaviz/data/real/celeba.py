"""CelebA (Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015): 202,599 aligned face
images, 40 binary attributes, the official 162,770 / 19,867 / 19,962 train/valid/test partition."""
from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import torch

from .base import (
    RealImageDataset,
    check_files,
    check_root,
    check_split,
    layout_error,
    malformed_error,
    read_numbered_lines,
    safe_relpath,
)

TITLE = "CelebA"
LAYOUT = """\
  celeba/
    img_align_celeba/000001.jpg ...   (or Img/img_align_celeba/, as in the distribution)
    list_attr_celeba.txt              (or Anno/list_attr_celeba.txt)
    list_eval_partition.txt           (or Eval/list_eval_partition.txt)"""
#: Where the aligned images may be, relative to root: flat, and the distribution's Img/ folder.
IMAGE_DIRS = ("img_align_celeba", "Img/img_align_celeba")
SPLITS = ("train", "valid", "test")
_PARTITION = {"train": "0", "valid": "1", "test": "2"}


def _locate(root: Path, name: str, subdir: str) -> Path | None:
    for p in (root / name, root / subdir / name):
        if p.exists():
            return p
    return None


def _image_dir(root: Path) -> str:
    """The folder of the aligned images: ``img_align_celeba/`` or the distribution's
    ``Img/img_align_celeba/``; one more ``img_align_celeba/`` level inside (what unzipping
    ``img_align_celeba.zip`` into a folder of that name gives) is followed too."""
    for rel in IMAGE_DIRS:
        if (root / rel).is_dir():
            inner = root / rel / "img_align_celeba"
            if inner.is_dir() and not (root / rel / "000001.jpg").exists():
                return f"{rel}/img_align_celeba"
            return rel
    if (root / "Img").is_dir():
        zips = sorted(p.name for p in (root / "Img").glob("*.zip"))
        problem = ("Img/ holds no img_align_celeba/ folder" + (f" (unzip {zips[0]} there)" if zips else ""))
    else:
        problem = "missing img_align_celeba/ (or Img/img_align_celeba/)"
    raise layout_error(TITLE, root, problem, LAYOUT, marker="img_align_celeba")


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
    root = check_root(TITLE, root, LAYOUT, [])
    image_dir = _image_dir(root)
    attr_file = _locate(root, "list_attr_celeba.txt", "Anno")
    part_file = _locate(root, "list_eval_partition.txt", "Eval")
    missing = [n for n, p in (("list_attr_celeba.txt", attr_file), ("list_eval_partition.txt", part_file)) if p is None]
    if missing:
        raise layout_error(TITLE, root, "missing " + ", ".join(missing), LAYOUT, marker=missing[0])

    part_name = str(part_file.relative_to(root))
    part = {}
    for n, fields in read_numbered_lines(part_file):
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise malformed_error(TITLE, root, part_name, f"{' '.join(fields)!r} is not '<image> <0|1|2>' "
                                  "(a truncated line?)", LAYOUT, line=n)
        part[fields[0]] = fields[1]
    with open(attr_file, encoding="utf-8") as fh:
        numbered = [(n, line) for n, line in enumerate(fh, 1) if line.strip()]
    if len(numbered) < 2:
        raise malformed_error(TITLE, root, str(attr_file.relative_to(root)),
                              "truncated (no attribute-name line)", LAYOUT)
    names = numbered[1][1].split()
    cols = select_attributes(names, attributes) if attributes is not None else list(range(len(names)))

    want = _PARTITION[split]
    rows, line_no = [], []
    for n, line in numbered[2:]:
        r = line.split(None, 1)
        if part.get(r[0]) == want:
            rows.append(r)
            line_no.append(n)
    files = [safe_relpath(TITLE, root, r[0], attr_file.name, n, prefix=image_dir + "/")
             for r, n in zip(rows, line_no)]
    arr = _parse_values([r[1] if len(r) > 1 else "" for r in rows], len(names))
    if arr is None:  # find the culprit for the message
        k = next((k for k, r in enumerate(rows) if len(r) < 2 or len(r[1].split()) != len(names)
                  or not set(r[1].split()) <= {"-1", "1", "0"}), 0)
        raise malformed_error(TITLE, root, attr_file.name, f"the line for {rows[k][0]} does not hold {len(names)} "
                              "values of -1/1", LAYOUT, line=line_no[k])
    arr = arr[:, cols]
    y = torch.from_numpy(np.ascontiguousarray(arr))
    if check_images:
        check_files(TITLE, root, LAYOUT, files)
    return RealImageDataset(name="celeba", root=root, split=split, files=files, targets=y,
                            classes=[names[c] for c in cols], image_size=image_size, transform=transform,
                            train=split == "train", augment=augment, task="attributes", options={"attributes": cols})
