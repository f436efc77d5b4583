"""CUB-200-2011 (Wah et al., Caltech-UCSD Birds 200-2011, CNS-TR-2011-001): 200 bird species,
11,788 images, the official 5,994 / 5,794 train/test split and one bounding box per image."""
from __future__ import annotations

import torch

from .base import (
    RealImageDataset,
    check_files,
    check_root,
    check_split,
    malformed_error,
    read_numbered_lines,
    safe_relpath,
)

TITLE = "CUB-200-2011"
LAYOUT = """\
  CUB_200_2011/
    images.txt  image_class_labels.txt  train_test_split.txt  bounding_boxes.txt  classes.txt
    images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg ..."""
SPLITS = ("train", "test")


def _class_name(folder: str) -> str:
    # "001.Black_footed_Albatross" -> "Black_footed_Albatross"
    head, dot, tail = folder.partition(".")
    return tail if dot and head.isdigit() else folder


def cub200(root, split: str = "train", image_size=224, transform=None, augment: bool = True,
           crop_to_box: bool = False, check_images: bool = True) -> RealImageDataset:
    """CUB-200-2011 from a folder laid out as the official archive (``CUB_200_2011/``).

    Targets are 0-based class ids (``image_class_labels.txt`` is 1-based), in ``images.txt`` id
    order; ``classes`` are the folder names without their number (``Black_footed_Albatross``).
    ``split`` follows ``train_test_split.txt`` (1 = train, 0 = test). ``boxes`` holds every image's
    box as ``x0, y0, x1, y1`` when ``bounding_boxes.txt`` is present; ``crop_to_box=True`` crops each
    image to its box before the transform (and then requires that file). ``check_images`` lists the
    image folders once to report an incomplete extraction up front.
    """
    check_split(TITLE, split, SPLITS)
    required = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images"]
    if crop_to_box:
        required.insert(3, "bounding_boxes.txt")
    root = check_root(TITLE, root, LAYOUT, required)

    line_of: dict[tuple[str, str], int] = {}

    def table(fname: str, ncols: int, ints: tuple[int, ...] = (0,), floats: tuple[int, ...] = ()) -> dict[str, list[str]]:
        """id -> the other fields; every line checked (field count, integer/number fields, unique id)."""
        out: dict[str, list[str]] = {}
        for n, r in read_numbered_lines(root / fname):
            if len(r) != ncols:
                raise malformed_error(TITLE, root, fname, f"{' '.join(r)!r} has {len(r)} fields, expected "
                                      f"{ncols}", LAYOUT, line=n)
            for k in ints:
                if not r[k].lstrip("-").isdigit():
                    raise malformed_error(TITLE, root, fname, f"field {k + 1} of {' '.join(r)!r} is not an "
                                          "integer", LAYOUT, line=n)
            for k in floats:
                try:
                    float(r[k])
                except ValueError:
                    raise malformed_error(TITLE, root, fname, f"field {k + 1} of {' '.join(r)!r} is not a "
                                          "number", LAYOUT, line=n) from None
            if r[0] in out:
                raise malformed_error(TITLE, root, fname, f"image id {r[0]} appears a second time "
                                      f"(first at line {line_of[fname, r[0]]})", LAYOUT, line=n)
            out[r[0]] = r[1:]
            line_of[fname, r[0]] = n
        return out

    images = table("images.txt", 2)
    labels = table("image_class_labels.txt", 2, ints=(0, 1))
    is_train = table("train_test_split.txt", 2, ints=(0, 1))
    class_rows = table("classes.txt", 2)
    for fname, tab in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
        if tab.keys() != images.keys():
            diff = sorted(images.keys() ^ tab.keys(), key=int)
            raise malformed_error(TITLE, root, fname, f"{fname} and images.txt list different image ids "
                                  f"(e.g. {diff[:3]})", LAYOUT)
    for i, (flag,) in is_train.items():
        if flag not in ("0", "1"):
            raise malformed_error(TITLE, root, "train_test_split.txt", f"image {i} has split flag {flag!r}; "
                                  "expected 1 (train) or 0 (test)", LAYOUT, line=line_of["train_test_split.txt", i])
    classes = [_class_name(class_rows[k][0]) for k in sorted(class_rows, key=int)]

    ids = sorted(images, key=int)
    want = "1" if split == "train" else "0"
    ids = [i for i in ids if is_train[i][0] == want]
    files = [safe_relpath(TITLE, root, images[i][0], "images.txt", line_of["images.txt", i], prefix="images/")
             for i in ids]
    y = torch.tensor([int(labels[i][0]) - 1 for i in ids], dtype=torch.int64)
    outside = [i for i, v in zip(ids, y.tolist()) if not 0 <= v < len(classes)]
    if outside:
        i = outside[0]
        raise malformed_error(TITLE, root, "image_class_labels.txt", f"image {i} has class id {labels[i][0]}, "
                              f"outside 1..{len(classes)} (the number of lines of classes.txt)", LAYOUT,
                              line=line_of["image_class_labels.txt", i])

    boxes = None
    if (root / "bounding_boxes.txt").exists():
        bb = table("bounding_boxes.txt", 5, floats=(1, 2, 3, 4))
        missing = [i for i in ids if i not in bb]
        if missing:
            raise malformed_error(TITLE, root, "bounding_boxes.txt", f"no box for image ids {missing[:3]}", LAYOUT)
        xywh = torch.tensor([[float(v) for v in bb[i]] for i in ids], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)

    if check_images:
        check_files(TITLE, root, LAYOUT, files)
    return RealImageDataset(name="cub200", root=root, split=split, files=files, targets=y, classes=classes,
                            image_size=image_size, transform=transform, train=split == "train",
                            augment=augment, boxes=boxes, crop_to_box=crop_to_box)
