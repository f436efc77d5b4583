"""PASCAL VOC2007 as a multi-label classification set (Everingham et al., IJCV 2010): 20 classes,
5,011 trainval / 4,952 test images, objects flagged ``difficult``."""
from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET

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

TITLE = "PASCAL VOC2007"
LAYOUT = """\
  VOC2007/                       (VOCdevkit/VOC2007 in the official tars; merge VOCtest into it)
    JPEGImages/000005.jpg ...
    Annotations/000005.xml ...   (<object><name>chair</name><difficult>0</difficult>...)
    ImageSets/Main/trainval.txt  train.txt  val.txt  test.txt"""
SPLITS = ("trainval", "train", "val", "test")
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


def _parse(path, index: dict[str, int]) -> tuple[list[int], list[int]]:
    """Per class: number of objects, number of difficult objects."""
    n, hard = [0] * len(index), [0] * len(index)
    for obj in ET.parse(path).getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            raise ValueError(f"unknown class {name!r}")
        k = index[name]
        n[k] += 1
        hard[k] += (obj.findtext("difficult") or "0").strip() == "1"
    return n, hard


def voc2007(root, split: str = "trainval", image_size=224, transform=None, augment: bool = True,
            check_images: bool = True) -> RealImageDataset:
    """VOC2007 multi-label classification.

    Target of an image: ``{"labels": float32 (20,) multi-hot, "difficult": bool (20,)}``; class k is
    present when the image holds an object of class k, and *difficult* when every such object is
    marked difficult (the VOC protocol's "0" label: such image–class pairs are left out of AP, see
    ``kaviz.metrics.multilabel_map(..., difficult=...)``). ``targets`` holds both for the whole split.
    The default transform augments on ``train`` and ``trainval``.

    An annotation without any ``<object>`` (not in the official files) would give an all-zero label
    row, read as "no class present" and scored as negatives for every class: such images are left
    out with a warning naming them. A list line that names a path outside the folder
    (``../x``) raises :class:`DatasetFormatError` with the line number.
    """
    check_split(TITLE, split, SPLITS)
    list_file = f"ImageSets/Main/{split}.txt"
    root = check_root(TITLE, root, LAYOUT, ["JPEGImages", "Annotations", list_file])
    ids = [safe_relpath(TITLE, root, fields[0], list_file, n) for n, fields in read_numbered_lines(root / list_file)]
    if not ids:
        raise layout_error(TITLE, root, f"{list_file} is empty", LAYOUT)
    ann = [f"Annotations/{i}.xml" for i in ids]
    check_files(TITLE, root, LAYOUT, ann, what="annotations")

    index = {c: k for k, c in enumerate(VOC_CLASSES)}
    counts, hard, keep, empty = [], [], [], []
    for i, a in zip(ids, ann):
        try:
            n, h = _parse(root / a, index)
        except (ET.ParseError, ValueError) as exc:
            raise malformed_error(TITLE, root, a, f"it could not be read ({exc})", LAYOUT) from None
        if not any(n):
            empty.append(a)
            continue
        keep.append(i)
        counts.append(n)
        hard.append(h)
    if empty:
        if not keep:
            raise malformed_error(TITLE, root, list_file, f"every listed annotation holds no <object> "
                                  f"(e.g. {empty[0]})", LAYOUT)
        warnings.warn(f"{TITLE} ({split}): {len(empty)} annotation(s) hold no <object> and are left out "
                      f"(e.g. {', '.join(empty[:3])}); an all-zero label row would count as 'no class "
                      "present'.", stacklevel=2)
        ids = keep
    counts_t, hard_t = torch.tensor(counts), torch.tensor(hard)
    labels = (counts_t > 0).float()
    difficult = (counts_t > 0) & (hard_t == counts_t)

    files = [f"JPEGImages/{i}.jpg" for i in ids]
    if check_images:
        check_files(TITLE, root, LAYOUT, files)
    return RealImageDataset(name="voc2007", root=root, split=split, files=files,
                            targets={"labels": labels, "difficult": difficult}, classes=VOC_CLASSES,
                            image_size=image_size, transform=transform,
                            train=split in ("train", "trainval"), augment=augment, task="multilabel")
