"""Stanford Dogs (Khosla et al., FGVC workshop at CVPR 2011): 120 breeds from ImageNet, 20,580
images, the official 12,000 / 8,580 train/test lists and VOC-style XML boxes."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
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

TITLE = "Stanford Dogs"
LAYOUT = """\
  StanfordDogs/
    Images/n02085620-Chihuahua/n02085620_10074.jpg ...
    Annotation/n02085620-Chihuahua/n02085620_10074 ...   (XML boxes; needed for crop_to_box=True)
    train_list.mat  test_list.mat      (from lists.tar; or train_list.txt  test_list.txt, one
                                        'n02085620-Chihuahua/n02085620_5927.jpg' per line)"""
SPLITS = ("train", "test")


def _read_mat_list(path: Path) -> tuple[list[str], list[int]]:
    from scipy.io import loadmat

    try:
        m = loadmat(path)
    except Exception as e:  # noqa: BLE001 - scipy raises IndexError, ValueError, TypeError, MatReadError ...
        raise ValueError(f"it could not be read as a MATLAB file ({type(e).__name__}: {e}); the file is truncated "
                         f"or corrupt. Re-extract lists.tar, or put {path.stem}.txt (one "
                         "'n02085620-Chihuahua/n02085620_5927.jpg' per line) beside it and delete the .mat") from None
    if "file_list" not in m or "labels" not in m:
        raise KeyError(f"{path.name} has no 'file_list'/'labels' variables (found {sorted(k for k in m if not k.startswith('__'))})")
    try:
        files = [str(np.asarray(x).ravel()[0]) for x in np.asarray(m["file_list"], dtype=object).ravel()]
        labels = [int(v) for v in np.asarray(m["labels"]).ravel()]
    except (IndexError, TypeError, ValueError) as e:
        raise ValueError(f"its file_list/labels variables are not a list of names and integer labels ({e})") from None
    if len(files) != len(labels):
        raise ValueError(f"file_list has {len(files)} entries but labels has {len(labels)}")
    return files, labels


def _read_txt_list(path: Path) -> tuple[list[str], list[int]]:
    lines = read_numbered_lines(path)
    return [fields[0] for _, fields in lines], [n for n, _ in lines]


def _union_box(xml_path: Path) -> list[float]:
    """Union of every object's box in one VOC-style annotation (several dogs share one breed)."""
    tree = ET.parse(xml_path)
    boxes = []
    for bb in tree.getroot().iter("bndbox"):
        boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    if not boxes:
        raise ValueError(f"{xml_path} holds no <bndbox>")
    b = np.asarray(boxes)
    return [b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()]


def stanford_dogs(root, split: str = "train", image_size=224, transform=None, augment: bool = True,
                  crop_to_box: bool = False, check_images: bool = True) -> RealImageDataset:
    """Stanford Dogs from the official archives (``images.tar``, ``annotation.tar``, ``lists.tar``).

    ``classes`` are the sorted ``Images/`` folders without their WordNet id (``Chihuahua``); targets
    are 0-based indices into them. The split comes from ``<split>_list.mat`` (``file_list`` and 1-based
    ``labels``, checked against the folders) or, when absent, from ``<split>_list.txt`` (one relative
    image path per line; the label is the folder). ``crop_to_box=True`` crops every image to the union
    of its annotated boxes (``Annotation/``), exposed as ``boxes`` (``x0, y0, x1, y1``).
    """
    check_split(TITLE, split, SPLITS)
    root = check_root(TITLE, root, LAYOUT, ["Images"] + (["Annotation"] if crop_to_box else []))
    mat, txt = root / f"{split}_list.mat", root / f"{split}_list.txt"
    if not mat.exists() and not txt.exists():
        raise layout_error(TITLE, root, f"missing {mat.name} (or {txt.name})", LAYOUT, marker=mat.name)

    with os.scandir(root / "Images") as it:
        folders = sorted(e.name for e in it if e.is_dir())
    if not folders:
        raise layout_error(TITLE, root, "Images/ holds no breed folders", LAYOUT)
    index = {f: k for k, f in enumerate(folders)}
    classes = [f.partition("-")[2] or f for f in folders]

    if mat.exists():
        try:
            rel, mat_labels = _read_mat_list(mat)
        except (KeyError, ValueError) as exc:
            raise malformed_error(TITLE, root, mat.name, f"not a Stanford Dogs list: {str(exc).strip(chr(39))}",
                                  LAYOUT) from None
        source, lines = mat.name, [None] * len(rel)
    else:
        (rel, lines), mat_labels, source = _read_txt_list(txt), None, txt.name
    rel = [r[len("Images/"):] if r.startswith("Images/") else r for r in rel]
    rel = [safe_relpath(TITLE, root, r, source, n if n is not None else None) for r, n in zip(rel, lines)]
    for r, n in zip(rel, lines):
        if "/" not in r:
            where = f"line {n}" if n is not None else "an entry"
            raise malformed_error(TITLE, root, source, f"{r!r} ({where}) is not '<breed folder>/<image>.jpg'",
                                  LAYOUT, line=n)

    unknown = sorted({r.split("/")[0] for r in rel} - index.keys())
    if unknown:
        raise layout_error(TITLE, root, f"{source} lists breeds with no folder in Images/ "
                           f"(e.g. {unknown[:3]})", LAYOUT)
    y = torch.tensor([index[r.split("/")[0]] for r in rel], dtype=torch.int64)
    if mat_labels is not None:
        wrong = [(r, lab) for r, lab, k in zip(rel, mat_labels, y.tolist()) if lab != k + 1]
        if wrong:
            raise layout_error(
                TITLE, root, f"{source} gives labels that disagree with the sorted Images/ folders "
                f"(e.g. {wrong[0][0]} has label {wrong[0][1]}); Images/ must hold all 120 breed folders",
                LAYOUT)

    files = ["Images/" + r for r in rel]
    if check_images:
        check_files(TITLE, root, LAYOUT, files)
    boxes = None
    if crop_to_box:
        ann = ["Annotation/" + os.path.splitext(r)[0] for r in rel]
        check_files(TITLE, root, LAYOUT, ann, what="annotations")
        try:
            boxes = torch.tensor([_union_box(root / a) for a in ann], dtype=torch.float32).reshape(-1, 4)
        except (ET.ParseError, ValueError, TypeError) as exc:
            raise malformed_error(TITLE, root, "Annotation/", f"an annotation could not be read ({exc})",
                                  LAYOUT) from None
    return RealImageDataset(name="stanford_dogs", root=root, split=split, files=files, targets=y,
                            classes=classes, image_size=image_size, transform=transform,
                            train=split == "train", augment=augment, boxes=boxes, crop_to_box=crop_to_box,
                            options={"list": source})
