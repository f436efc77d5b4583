"""MS-COCO 2014 as a multi-label classification set (Lin et al., ECCV 2014): 80 object categories,
82,783 train / 40,504 val images (about 82,081 / 40,137 once images without objects are dropped)."""
from __future__ import annotations

import json

import torch

from .base import (
    RealImageDataset,
    check_files,
    check_root,
    check_split,
    malformed_error,
    safe_relpath,
)

TITLE = "COCO 2014"
LAYOUT = """\
  coco/
    annotations/instances_train2014.json  instances_val2014.json
    train2014/COCO_train2014_000000000009.jpg ...
    val2014/COCO_val2014_000000000042.jpg ..."""
SPLITS = ("train", "val")


def coco2014_multilabel(root, split: str = "train", image_size=224, transform=None, augment: bool = True,
                        check_images: bool = True) -> RealImageDataset:
    """COCO 2014 multi-label classification from the instances annotations.

    The 80 categories are mapped to contiguous ids 0..79 in increasing COCO category id (so
    ``classes[0] == "person"``); an image's target is ``{"labels": float32 (80,) multi-hot,
    "difficult": bool (80,) all False}`` (the same form as VOC; COCO has no difficult flag). Crowd
    annotations count. Images without any annotation are dropped; the rest are ordered by image id.
    Reading ``instances_train2014.json`` takes some seconds and about 1-2 GB of memory.
    """
    check_split(TITLE, split, SPLITS)
    ann_file = f"annotations/instances_{split}2014.json"
    root = check_root(TITLE, root, LAYOUT, [ann_file, f"{split}2014"])
    try:
        with open(root / ann_file, encoding="utf-8") as fh:
            data = json.load(fh)
        cats = sorted(data["categories"], key=lambda c: c["id"])
        images = {im["id"]: im["file_name"] for im in data["images"]}
        pairs = [(a["image_id"], a["category_id"]) for a in data["annotations"]]
    except json.JSONDecodeError as exc:
        raise malformed_error(TITLE, root, ann_file, f"{ann_file} is not a COCO instances file (invalid JSON: "
                              f"{exc.msg})", LAYOUT, line=exc.lineno) from None
    except (KeyError, TypeError, UnicodeDecodeError) as exc:
        raise malformed_error(TITLE, root, ann_file, f"{ann_file} is not a COCO instances file ({exc!r})",
                              LAYOUT) from None
    del data
    cat_index = {c["id"]: k for k, c in enumerate(cats)}
    present: dict[int, set[int]] = {}
    for img_id, cat_id in pairs:
        if cat_id not in cat_index or img_id not in images:
            raise malformed_error(TITLE, root, ann_file, f"an annotation has unknown image id {img_id} "
                                  f"or category id {cat_id}", LAYOUT)
        present.setdefault(img_id, set()).add(cat_index[cat_id])

    ids = sorted(present)
    row_of = {img_id: r for r, img_id in enumerate(ids)}
    rows = torch.tensor([row_of[i] for i, ks in present.items() for _ in ks], dtype=torch.long)
    cols = torch.tensor([k for ks in present.values() for k in ks], dtype=torch.long)
    labels = torch.zeros(len(ids), len(cats), dtype=torch.float32)
    labels[rows, cols] = 1.0
    files = [safe_relpath(TITLE, root, str(images[i]), f"{ann_file} (image id {i})", prefix=f"{split}2014/")
             for i in ids]
    if check_images:
        check_files(TITLE, root, LAYOUT, files)
    return RealImageDataset(name="coco2014_multilabel", root=root, split=split, files=files,
                            targets={"labels": labels, "difficult": torch.zeros_like(labels, dtype=torch.bool)},
                            classes=[c["name"] for c in cats], image_size=image_size, transform=transform,
                            train=split == "train", augment=augment, task="multilabel")
