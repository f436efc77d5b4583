"""NYU Depth v2 (Silberman et al., ECCV 2012) for joint scene parsing and depth: 795 train / 654 test
labelled indoor images, 13 semantic classes (Couprie et al., 2013) or 40 (Gupta et al., 2013), depth in
metres.

The official release is one ``.mat`` file; users have it in one of the preprocessed layouts of the
common multi-task toolkits, all accepted here (found by looking at the folders):

- ``split_first``: ``train/image/ train/seg13/ train/seg40/ train/depth/`` (and ``test/...``);
- ``kind_first`` (VainF's nyuv2-python-toolkit, used by KAmalEngine): ``image/train/ seg13/train/
  seg40/train/ depth/train/`` (and ``.../test/``);
- ``mtan`` (Liu et al.'s MTAN preprocessing, 288x384): ``train/image/0.npy train/label/0.npy
  train/depth/0.npy`` and ``val/...`` for the 654 test images; ``image`` holds floats in [0, 1]
  (H, W, 3), ``label`` the 13 classes as 0..12 with -1 for unlabelled, ``depth`` metres (H, W, 1).

The class mapping: ``seg13`` (and MTAN's ``label``) are Couprie et al.'s 13 classes, read as ids
0..12 in the order of :data:`NYU13_CLASSES` (alphabetical, as every toolkit stores them);
``seg40`` are Gupta et al.'s 40 classes as ids 0..39 in the order of :data:`NYU40_CLASSES`. Maps
that store 0 = unlabelled and the classes from 1 (13 or 40) need ``zero_is_void=True``; a map in the
wrong convention raises an error that says so. kaviz never converts 40 classes into 13: each task
reads the maps stored for it.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from .base import DenseDataset, check_root, check_split, layout_error, pair_by_stem
from .dense import decode_depth, decode_labels

TITLE = "NYUv2"
LAYOUT = """\
  nyuv2/
    train/image/0.png ...    (RGB, .png or .jpg)
    train/seg13/0.png ...    (13 classes as ids 0..12; 255 or -1 = ignore; .png or .npy)
    train/seg40/0.png ...    (only for classes=40: ids 0..39)
    train/depth/0.npy ...    (metres; or 16-bit .png in millimetres)
    test/image/  test/seg13/  test/depth/     (795 train / 654 test images)
  or VainF's toolkit layout:  image/train/  seg13/train/  seg40/train/  depth/train/  (and .../test/)
  or MTAN's .npy folders:     train/image/ train/label/ train/depth/  and  val/... for the test split"""
SPLITS = ("train", "test")
NYU13_CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
                 "table", "tv", "wall", "window")
NYU40_CLASSES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
                 "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
                 "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
                 "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
                 "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")
LAYOUTS = ("split_first", "kind_first", "mtan")


def _folders(layout: str, split: str, seg: str) -> dict[str, str]:
    if layout == "split_first":
        return {"image": f"{split}/image", "mask": f"{split}/{seg}", "depth": f"{split}/depth"}
    if layout == "kind_first":
        return {"image": f"image/{split}", "mask": f"{seg}/{split}", "depth": f"depth/{split}"}
    mtan_split = "val" if split == "test" else split
    return {"image": f"{mtan_split}/image", "mask": f"{mtan_split}/label", "depth": f"{mtan_split}/depth"}


def detect_layout(root: Path, split: str, classes: int = 13) -> str:
    """Which of :data:`LAYOUTS` the folder ``root`` holds for ``split`` (raises with the expected trees)."""
    seg = f"seg{classes}"
    candidates = [layout for layout in LAYOUTS if layout != "mtan" or classes == 13]
    present = {layout: [f for f in _folders(layout, split, seg).values() if (root / f).is_dir()]
               for layout in candidates}
    for layout in candidates:
        if len(present[layout]) == 3:
            return layout
    if classes == 40 and (root / "train" / "label").is_dir():
        _raise(root, "MTAN's folders hold the 13-class labels only (label/); classes=40 needs seg40/ maps")
    best = max(candidates, key=lambda k: len(present[k]))
    if present[best]:  # a layout partly there: name what it lacks
        missing = [f for f in _folders(best, split, seg).values() if f not in present[best]]
        raise layout_error(TITLE, root, "missing " + ", ".join(missing), LAYOUT)
    found = sorted(p.name + "/" for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    problem = (f"no {split} split in any known layout (looked for {split}/image + {split}/{seg} + "
                   f"{split}/depth, image/{split} + {seg}/{split} + depth/{split}"
                   + (", and MTAN's train|val/image + label + depth" if classes == 13 else "") + ")"
                   + (f"; the folder holds {', '.join(found[:8])}" if found else ""))
    return _raise(root, problem)


def _raise(root: Path, problem: str):
    raise layout_error(TITLE, root, problem, LAYOUT, marker="seg13")


def nyuv2(root, split: str = "train", image_size=(288, 384), transform=None, augment: bool = True,
          zero_is_void: bool = False, classes: int = 13, layout: str | None = None) -> DenseDataset:
    """NYUv2 in any of the toolkits' layouts (module docstring); pairs image/label/depth files by stem.

    Items are ``(image, {"mask": int64 (H, W), "depth": float32 (H, W)})``: ``mask`` holds class ids
    0..classes-1 and 255 for ignored pixels (stored as 255 or -1); ``depth`` metres, 0 where unmeasured.
    ``classes``: 13 (``seg13``, MTAN's ``label``) or 40 (``seg40``). ``zero_is_void=True`` reads maps
    that store 0 = unlabelled and 1..classes for the classes. ``layout`` (one of :data:`LAYOUTS`) is
    found from the folders when None. The default transform is a :class:`JointTransform` (random crop +
    flip on ``train``), so image, mask and depth stay aligned. The paper split (795/654) is expected
    but not enforced.
    """
    check_split(TITLE, split, SPLITS)
    if classes not in (13, 40):
        raise ValueError(f"{TITLE}: classes={classes!r}; NYUv2 comes with 13 (seg13) or 40 (seg40) classes.")
    root = check_root(TITLE, root, LAYOUT, [])
    if layout is None:
        layout = detect_layout(root, split, classes)
    elif layout not in LAYOUTS:
        raise ValueError(f"{TITLE}: layout={layout!r}; valid layouts are {list(LAYOUTS)} (or None to detect it).")
    folders = _folders(layout, split, f"seg{classes}")
    root = check_root(TITLE, root, LAYOUT, list(folders.values()))
    paired = pair_by_stem(TITLE, root, LAYOUT, folders,
                          {"image": (".png", ".jpg", ".jpeg", ".npy"), "mask": (".png", ".npy"),
                           "depth": (".npy", ".png")})
    names = NYU13_CLASSES if classes == 13 else NYU40_CLASSES
    return DenseDataset(name="nyuv2", root=root, split=split, files=paired["image"], classes=names,
                        mask_files=paired["mask"], depth_files=paired["depth"],
                        decode_mask=partial(decode_labels, num_classes=classes, void_values=(255, -1),
                                            zero_is_void=zero_is_void),
                        decode_depth=decode_depth, image_size=image_size, transform=transform,
                        train=split == "train", augment=augment,
                        options={"zero_is_void": zero_is_void, "classes": classes, "layout": layout})
