"""Tiny fixture trees in each real dataset's standard layout (for tests/test_real_data.py).

Every builder writes into a given folder and returns a dict describing what it wrote (ids, labels,
splits), so tests compare the loaders against the fixture's own bookkeeping, not hard-coded numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLACK = (220, 20, 20), (0, 0, 0)


def save_rgb(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    kw = {"quality": 95, "subsampling": 0} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(np.asarray(array, dtype=np.uint8), "RGB").save(path, **kw)


def boxed_image(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Black image with a red rectangle ``box`` = (x0, y0, x1, y1): crops to the box are all red."""
    a = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = RED
    return a


def block_image(h: int, w: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """Random black/white blocks of ``block`` pixels (grey levels 0 and 255, same on the 3 channels)."""
    cells = rng.integers(0, 2, size=(-(-h // block), -(-w // block))) * 255
    g = np.kron(cells, np.ones((block, block)))[:h, :w]
    return np.repeat(g[..., None], 3, axis=2).astype(np.uint8)


# --------------------------------------------------------------------------------------------------

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def make_cub(root: Path, per_class: int = 4, h: int = 24, w: int = 32) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    images, labels, split, boxes = [], [], [], []
    img_id = 0
    for c, folder in enumerate(CUB_CLASSES):
        for j in range(per_class):
            img_id += 1
            rel = f"{folder}/{folder.split('.')[1]}_{j:04d}_{100 + img_id}.jpg"
            box = (2 + j, 3, 14 + j, 15)  # x0, y0, x1, y1
            save_rgb(root / "images" / rel, boxed_image(h, w, box))
            images.append((img_id, rel))
            labels.append((img_id, c + 1))
            split.append((img_id, int(img_id % 3 != 0)))
            boxes.append((img_id, box[0], box[1], box[2] - box[0], box[3] - box[1]))
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p in images))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c in labels))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, t in split))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} {x}.0 {y}.0 {bw}.0 {bh}.0\n" for i, x, y, bw, bh in boxes))
    (root / "classes.txt").write_text("".join(f"{k + 1} {n}\n" for k, n in enumerate(CUB_CLASSES)))
    return {
        "train": [(p, c - 1) for (i, p), (_, c), (_, t) in zip(images, labels, split) if t == 1],
        "test": [(p, c - 1) for (i, p), (_, c), (_, t) in zip(images, labels, split) if t == 0],
        "boxes": {p: b[1:] for (_, p), b in zip(images, boxes)},
    }


# --------------------------------------------------------------------------------------------------

DOG_FOLDERS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]


def _dog_xml(boxes, name: str, h: int, w: int) -> str:
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes)
    return (f"<annotation><folder>x</folder><filename>f</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def make_dogs(root: Path, lists: str = "mat", h: int = 24, w: int = 32) -> dict:
    """Three breeds with three images each; the first two go to train, the third to test.

    The first image of the second breed carries two dog boxes (their union is the crop)."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    split = {"train": [], "test": []}
    unions = {}
    for c, folder in enumerate(DOG_FOLDERS):
        wnid = folder.split("-")[0]
        for j in range(3):
            stem = f"{wnid}_{1000 + j}"
            bxs = [(3, 4, 11, 12), (16, 10, 25, 20)] if (c, j) == (1, 0) else [(2 + j, 2, 12 + j, 14)]
            img = np.zeros((h, w, 3), np.uint8)
            for x0, y0, x1, y1 in bxs:
                img[y0:y1, x0:x1] = (20, 200, 20)
            save_rgb(root / "Images" / folder / f"{stem}.jpg", img)
            ann = root / "Annotation" / folder / stem
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text(_dog_xml(bxs, folder.split("-", 1)[1], h, w))
            rel = f"{folder}/{stem}.jpg"
            b = np.asarray(bxs)
            unions[rel] = (b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
            split["train" if j < 2 else "test"].append((rel, c))
    for name, items in split.items():
        if lists == "mat":
            file_list = np.empty((len(items), 1), dtype=object)
            ann_list = np.empty((len(items), 1), dtype=object)
            for k, (rel, _) in enumerate(items):
                file_list[k, 0] = np.array([rel])
                ann_list[k, 0] = np.array([rel[:-4]])
            labels = np.array([[c + 1] for _, c in items], dtype=np.uint8)
            savemat(root / f"{name}_list.mat", {"file_list": file_list, "annotation_list": ann_list, "labels": labels})
        else:
            (root / f"{name}_list.txt").write_text("".join(f"{rel}\n" for rel, _ in items))
    return {"train": split["train"], "test": split["test"], "unions": unions}


# --------------------------------------------------------------------------------------------------

# (image id, [(class, difficult), ...]); the expected flags are worked out in the test.
VOC_OBJECTS = {
    "000001": [("dog", 0), ("person", 0)],
    "000002": [("dog", 1)],                              # dog only difficult -> difficult
    "000003": [("cat", 1), ("cat", 0), ("sofa", 1)],     # one easy cat -> cat not difficult
    "000004": [("car", 1), ("car", 1), ("person", 0)],
    "000005": [("chair", 0)],
}
VOC_SPLITS = {"trainval": ["000001", "000002", "000003"], "train": ["000001", "000002"],
              "val": ["000003"], "test": ["000004", "000005"]}


def make_voc(root: Path, h: int = 16, w: int = 20) -> dict:
    rng = np.random.default_rng(0)
    for img_id, objs in VOC_OBJECTS.items():
        save_rgb(root / "JPEGImages" / f"{img_id}.jpg", rng.integers(0, 256, (h, w, 3)))
        body = "".join(
            f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
            f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
            for n, d in objs)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{img_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{img_id}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{body}</annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, ids in VOC_SPLITS.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return {"objects": VOC_OBJECTS, "splits": VOC_SPLITS}


# --------------------------------------------------------------------------------------------------

# Category ids are not contiguous and listed out of order, as in the real files.
COCO_CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
                   {"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"},
                   {"id": 2, "name": "bicycle", "supercategory": "vehicle"}]


def make_coco(root: Path, split: str = "val", h: int = 12, w: int = 16) -> dict:
    rng = np.random.default_rng(1)
    images = [{"id": i, "file_name": f"COCO_{split}2014_{i:012d}.jpg", "width": w, "height": h}
              for i in (42, 7, 99, 13)]
    # image 99 has no annotation and must be dropped; image 7 has a crowd annotation.
    anns = [(42, 1, 0), (42, 1, 0), (42, 18, 0), (7, 3, 1), (7, 2, 0), (13, 18, 0)]
    for im in images:
        save_rgb(root / f"{split}2014" / im["file_name"], rng.integers(0, 256, (h, w, 3)))
    data = {"info": {}, "licenses": [], "images": images, "categories": COCO_CATEGORIES,
            "annotations": [{"id": k, "image_id": i, "category_id": c, "iscrowd": crowd, "area": 4.0,
                             "bbox": [0, 0, 2, 2], "segmentation": []} for k, (i, c, crowd) in enumerate(anns)]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))
    present = {}
    for i, c, _ in anns:
        present.setdefault(i, set()).add(c)
    return {"present": present, "files": {im["id"]: im["file_name"] for im in images}}


# --------------------------------------------------------------------------------------------------

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
    "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
    "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
    "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
CELEBA_PARTITION = [0, 0, 0, 1, 2, 2]


def make_celeba(root: Path, nested: bool = False, h: int = 16, w: int = 13, distribution: bool = False,
                partition=None) -> dict:
    """Six faces; ``nested`` puts the annotation files in Anno/ and Eval/ (the Google Drive layout);
    ``distribution`` also puts the images in Img/img_align_celeba/ (the distribution's own tree)."""
    rng = np.random.default_rng(2)
    partition = list(CELEBA_PARTITION if partition is None else partition)
    n = len(partition)
    values = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    names = [f"{k + 1:06d}.jpg" for k in range(n)]
    nested = nested or distribution
    images = root / "Img" / "img_align_celeba" if distribution else root / "img_align_celeba"
    for name in names:
        save_rgb(images / name, rng.integers(0, 256, (h, w, 3)))
    attr = root / "Anno" / "list_attr_celeba.txt" if nested else root / "list_attr_celeba.txt"
    part = root / "Eval" / "list_eval_partition.txt" if nested else root / "list_eval_partition.txt"
    attr.parent.mkdir(parents=True, exist_ok=True)
    part.parent.mkdir(parents=True, exist_ok=True)
    # The real file pads values with two spaces and ends the name line with a space.
    rows = "".join(name + " " + " ".join(f"{v:2d}" for v in row) + "\n" for name, row in zip(names, values))
    attr.write_text(f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n" + rows)
    part.write_text("".join(f"{name} {p}\n" for name, p in zip(names, partition)))
    return {"values": values, "names": names, "partition": partition,
            "image_dir": "Img/img_align_celeba" if distribution else "img_align_celeba"}


# --------------------------------------------------------------------------------------------------


def make_nyu(root: Path, n_train: int = 3, n_test: int = 2, size=32, block: int = 8,
             depth_format: str = "npy", seg_format: str = "png", layout: str = "split_first",
             seg40: bool = False) -> dict:
    """Block images whose seg13 mask is the thresholded image (white -> class 1, black -> class 0)
    and whose depth is 1 m on black and 3 m on white, so a misaligned transform shows at once.
    The first train item also has one ignored (255 / -1) block at the top-left corner.

    ``layout``: "split_first" (``train/image``), "kind_first" (VainF's toolkit: ``image/train``) or
    "mtan" (MTAN's ``train|val/image|label|depth/*.npy``: float images in [0, 1], float labels with
    -1, depth (H, W, 1) metres). ``seg40`` also writes ``seg40`` maps (class 1 -> 30 "person")."""
    rng = np.random.default_rng(3)
    h, w = (size, size) if isinstance(size, int) else size
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        out[split] = []
        for k in range(n):
            img = block_image(h, w, block, rng)
            mask = (img[..., 0] > 127).astype(np.int64)
            depth = np.where(mask == 1, 3.0, 1.0).astype(np.float32)
            if split == "train" and k == 0:
                mask[:block, :block] = -1
            stem = str(k * 5)  # 0, 5, 10: checks numeric ordering
            if layout == "mtan":
                d = root / ("val" if split == "test" else split)
                for sub in ("image", "label", "depth"):
                    (d / sub).mkdir(parents=True, exist_ok=True)
                np.save(d / "image" / f"{stem}.npy", img.astype(np.float32) / 255.0)
                np.save(d / "label" / f"{stem}.npy", mask.astype(np.float32))
                np.save(d / "depth" / f"{stem}.npy", depth[..., None])
                out[split].append((stem, img, mask, depth))
                continue
            def folder(kind, split=split):
                return root / split / kind if layout == "split_first" else root / kind / split
            save_rgb(folder("image") / f"{stem}.png", img)
            folder("seg13").mkdir(parents=True, exist_ok=True)
            folder("depth").mkdir(parents=True, exist_ok=True)
            if seg_format == "png":
                Image.fromarray(np.where(mask < 0, 255, mask).astype(np.uint8),
                                "L").save(folder("seg13") / f"{stem}.png")
            else:
                np.save(folder("seg13") / f"{stem}.npy", mask)
            if seg40:
                folder("seg40").mkdir(parents=True, exist_ok=True)
                m40 = np.where(mask < 0, 255, np.where(mask == 1, 30, 0)).astype(np.uint8)
                Image.fromarray(m40, "L").save(folder("seg40") / f"{stem}.png")
            if depth_format == "npy":
                np.save(folder("depth") / f"{stem}.npy", depth)
            else:
                Image.fromarray((depth * 1000).astype(np.uint16)).save(folder("depth") / f"{stem}.png")
            out[split].append((stem, img, mask, depth))
    return out


def make_camvid(root: Path, h: int = 12, w: int = 16) -> dict:
    """SegNet layout; every annotation uses labels 0..11 (11 = void) in horizontal stripes."""
    rng = np.random.default_rng(4)
    out = {}
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        out[split] = []
        for k in range(n):
            stem = f"0001TP_{k:06d}"
            save_rgb(root / split / f"{stem}.png", rng.integers(0, 256, (h, w, 3)))
            ann = np.repeat((np.arange(h) % 12)[:, None], w, axis=1).astype(np.uint8)
            (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
            Image.fromarray(ann, "L").save(root / f"{split}annot" / f"{stem}.png")
            out[split].append((stem, ann))
    return out


# --------------------------------------------------------------------------------------------------
# Awkward files real datasets contain


def save_jpeg_variant(path: Path, array: np.ndarray, kind: str) -> np.ndarray:
    """Save ``array`` (H, W, 3 uint8) as a JPEG of ``kind`` and return the RGB image a reader should
    see: "gray" (mode L, as some CUB/Dogs/VOC images), "cmyk" (Adobe CMYK, as a few Stanford Dogs and
    ImageNet images), "exif" (stored rotated, with EXIF Orientation = 6: shown rotated 90° clockwise
    back upright), "rgb"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(array, dtype=np.uint8), "RGB")
    if kind == "gray":
        im = im.convert("L")
        im.save(path, quality=95)
        return np.asarray(im.convert("RGB"))
    if kind == "cmyk":
        im.convert("CMYK").save(path, quality=95)
        return np.asarray(array, dtype=np.uint8)
    if kind == "exif":
        # Orientation 6: the stored pixels must be rotated 90° clockwise for display; store the
        # upright image rotated 90° counter-clockwise.
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, subsampling=0, exif=exif)
        return np.asarray(array, dtype=np.uint8)
    im.save(path, quality=95, subsampling=0)
    return np.asarray(array, dtype=np.uint8)


def to_crlf(root: Path, pattern: str = "*.txt") -> list[Path]:
    """Rewrite every text index file under ``root`` with Windows line endings (as after a copy through
    some archive tools); returns the files changed."""
    changed = []
    for p in sorted(Path(root).rglob(pattern)):
        data = p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        p.write_bytes(data)
        changed.append(p)
    return changed
