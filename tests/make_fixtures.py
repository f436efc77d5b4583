"""Build tiny, deterministic copies of every real dataset in its official format, sized for running the
paper notebooks end to end on a CPU (tests/test_realdata_notebooks.py).

    python tests/make_fixtures.py OUT [--only cub200,voc2007]

writes ``OUT/CUB_200_2011`` (and ``OUT/CUB_200_2011_15``, 15 images per class), ``OUT/StanfordDogs``,
``OUT/VOC2007``, ``OUT/coco``, ``OUT/celeba``,
``OUT/nyuv2``, ``OUT/nyuv2_mtan``, ``OUT/CamVid`` (about 2 MB in all, a few seconds). The formats are
the real ones: CUB's text files with float ``x y w h`` boxes and CRLF endings, Stanford Dogs' MATLAB
``train_list.mat``/``test_list.mat`` and XML boxes, VOC XML with ``difficult``, COCO 2014 json with
non-contiguous category ids 1..90 and images without objects, CelebA's distribution tree
(``Img/ Anno/ Eval/``, two header lines, -1/1 values), NYUv2 in VainF's toolkit layout
(``image/ seg13/ seg40/ depth/`` per split) and in MTAN's ``.npy`` folders, CamVid in the SegNet
layout. Among the JPEGs are grayscale, CMYK and EXIF-rotated ones. The image content depends on the
class (a coloured blob on noise), so a few epochs learn something, but nothing here is meant to be
accurate: the notebooks' real-data path is what is tested.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures_real import CELEBA_ATTRIBUTES, save_jpeg_variant, to_crlf

KINDS = ("rgb", "rgb", "rgb", "gray", "cmyk", "exif")  # one image in six is awkward
VOC_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
             "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def _picture(rng, h: int, w: int, k: int, n: int) -> np.ndarray:
    """Noise with a blob whose colour and place say the class ``k`` of ``n``."""
    img = rng.integers(0, 90, (h, w, 3)).astype(np.uint8)
    hue = np.array([np.cos(2 * np.pi * k / n), np.cos(2 * np.pi * (k / n + 1 / 3)),
                    np.cos(2 * np.pi * (k / n + 2 / 3))])
    colour = (127 + 120 * hue).astype(np.uint8)
    cy, cx = int(h * (0.3 + 0.4 * ((k * 7) % n) / max(n - 1, 1))), int(w * (0.3 + 0.4 * k / max(n - 1, 1)))
    y, x = np.ogrid[:h, :w]
    img[(y - cy) ** 2 + (x - cx) ** 2 < (min(h, w) // 4) ** 2] = colour
    return img


def make_cub(root: Path, n_classes: int = 4, per_class: int = 6, h: int = 60, w: int = 80, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images, labels, split, boxes, classes = [], [], [], [], []
    i = 0
    for c in range(n_classes):
        folder = f"{c + 1:03d}.Bird_{c + 1}"
        classes.append(folder)
        for j in range(per_class):
            i += 1
            rel = f"{folder}/Bird_{c + 1}_{j:04d}_{1000 + i}.jpg"
            save_jpeg_variant(root / "images" / rel, _picture(rng, h, w, c, n_classes), KINDS[i % len(KINDS)])
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c + 1}")
            split.append(f"{i} {int(j % 3 != 2)}")      # 2/3 train, 1/3 test in every class
            boxes.append(f"{i} {w * 0.2:.1f} {h * 0.15:.1f} {w * 0.6:.1f} {h * 0.7:.1f}")
    for name, rows in (("images", images), ("image_class_labels", labels), ("train_test_split", split),
                       ("bounding_boxes", boxes), ("classes", [f"{k + 1} {c}" for k, c in enumerate(classes)])):
        (root / f"{name}.txt").write_text("\n".join(rows) + "\n")
    to_crlf(root)
    return root


def make_dogs(root: Path, n_classes: int = 4, per_class: int = 6, h: int = 64, w: int = 72, seed: int = 1) -> Path:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    lists = {"train": [], "test": []}
    for c in range(n_classes):
        wnid = f"n0208{5620 + 100 * c}"
        folder = f"{wnid}-Breed_{c + 1}"
        for j in range(per_class):
            stem = f"{wnid}_{100 + j}"
            save_jpeg_variant(root / "Images" / folder / f"{stem}.jpg", _picture(rng, h, w, c, n_classes),
                              KINDS[(c + j) % len(KINDS)])
            ann = root / "Annotation" / folder / stem
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text(f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
                           f"<object><name>Breed_{c + 1}</name><difficult>0</difficult><bndbox><xmin>8</xmin>"
                           f"<ymin>6</ymin><xmax>{w - 8}</xmax><ymax>{h - 6}</ymax></bndbox></object></annotation>")
            lists["train" if j % 3 != 2 else "test"].append((f"{folder}/{stem}.jpg", c))
    for name, items in lists.items():
        files = np.empty((len(items), 1), dtype=object)
        anns = np.empty((len(items), 1), dtype=object)
        for k, (rel, _) in enumerate(items):
            files[k, 0], anns[k, 0] = np.array([rel]), np.array([rel[:-4]])
        savemat(root / f"{name}_list.mat", {"file_list": files, "annotation_list": anns,
                                            "labels": np.array([[c + 1] for _, c in items], dtype=np.uint8)})
    return root


def _objects_for(k: int, n: int = 20):
    """Image k holds classes k mod 20 and (3k + 5) mod 20; every third image's second object is difficult."""
    a, b = k % n, (3 * k + 5) % n
    return [(a, 0)] + ([(b, int(k % 3 == 0))] if b != a else [])


def make_voc(root: Path, n_trainval: int = 40, n_test: int = 24, h: int = 60, w: int = 80, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    ids = {"trainval": [], "test": []}
    for k in range(n_trainval + n_test):
        img_id = f"{k + 1:06d}"
        objs = _objects_for(k)
        img = _picture(rng, h, w, objs[0][0], 20)
        save_jpeg_variant(root / "JPEGImages" / f"{img_id}.jpg", img, KINDS[k % len(KINDS)])
        body = "".join(f"<object><name>{VOC_NAMES[c]}</name><pose>Left</pose><truncated>0</truncated>"
                       f"<difficult>{d}</difficult><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>{w - 2}</xmax>"
                       f"<ymax>{h - 2}</ymax></bndbox></object>" for c, d in objs)
        (root / "Annotations" / f"{img_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{img_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{body}</annotation>")
        ids["trainval" if k < n_trainval else "test"].append(img_id)
    half = len(ids["trainval"]) // 2
    for name, rows in (("trainval", ids["trainval"]), ("train", ids["trainval"][:half]),
                       ("val", ids["trainval"][half:]), ("test", ids["test"])):
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in rows))
    return root


# The 80 COCO categories keep their real, non-contiguous ids (1..90 with gaps).
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def make_coco(root: Path, n_train: int = 40, n_val: int = 24, h: int = 48, w: int = 64, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"category_{c}", "supercategory": "thing"} for c in COCO_IDS]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n, first in (("train", n_train, 9), ("val", n_val, 42)):
        images, anns = [], []
        for k in range(n + 2):                  # the last two images have no objects
            img_id = first + 7 * k
            name = f"COCO_{split}2014_{img_id:012d}.jpg"
            objs = _objects_for(k, 80) if k < n else []
            img = _picture(rng, h, w, objs[0][0] if objs else 0, 80)
            save_jpeg_variant(root / f"{split}2014" / name, img, KINDS[k % len(KINDS)])
            images.append({"id": img_id, "file_name": name, "width": w, "height": h})
            for c, crowd in objs:
                anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": COCO_IDS[c], "iscrowd": crowd,
                             "area": 100.0, "bbox": [2.0, 2.0, 20.0, 20.0], "segmentation": []})
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": cats}))
    return root


def make_celeba(root: Path, n: int = 90, h: int = 109, w: int = 89, seed: int = 4) -> Path:
    """CelebA's distribution tree; aligned images are 178x218 (w x h) there, half that here."""
    rng = np.random.default_rng(seed)
    names = [f"{k + 1:06d}.jpg" for k in range(n)]
    values = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    for k, name in enumerate(names):
        img = _picture(rng, h, w, int(values[k, 31] > 0) + 2 * int(values[k, 20] > 0), 4)  # Smiling, Male
        save_jpeg_variant(root / "Img" / "img_align_celeba" / name, img, KINDS[k % len(KINDS)])
    (root / "Anno").mkdir(parents=True, exist_ok=True)
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    rows = "".join(name + " " + " ".join(f"{v:2d}" for v in row) + "\n" for name, row in zip(names, values))
    (root / "Anno" / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n" + rows)
    parts = [0 if k < int(n * 0.6) else 1 if k < int(n * 0.8) else 2 for k in range(n)]
    (root / "Eval" / "list_eval_partition.txt").write_text("".join(f"{a} {p}\n" for a, p in zip(names, parts)))
    to_crlf(root)
    return root


def _dense_scene(rng, h: int, w: int, n_classes: int):
    """Horizontal bands of classes with a per-class grey level, depth growing with the row."""
    bands = rng.integers(0, n_classes, size=4)
    rows = np.repeat(bands, -(-h // 4))[:h]
    mask = np.repeat(rows[:, None], w, axis=1)
    img = np.stack([(mask * 37) % 256, (mask * 91) % 256, (mask * 53) % 256], -1).astype(np.uint8)
    img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    depth = (1.0 + 4.0 * np.arange(h)[:, None] / h * np.ones((1, w))).astype(np.float32)
    return img, mask, depth


def make_nyu(root: Path, n_train: int = 8, n_test: int = 4, h: int = 120, w: int = 160, seed: int = 5) -> Path:
    """VainF's toolkit layout: image/ seg13/ seg40/ depth/ per split; 0 = unlabelled in the stored maps
    is not used (ids 0..12 with 255 for void), depth as 16-bit millimetre PNGs."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for kind in ("image", "seg13", "seg40", "depth"):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            img, mask, depth = _dense_scene(rng, h, w, 13)
            mask[:4, :4] = 255
            Image.fromarray(img, "RGB").save(root / "image" / split / f"{k}.png")
            Image.fromarray(mask.astype(np.uint8), "L").save(root / "seg13" / split / f"{k}.png")
            Image.fromarray(np.where(mask == 255, 255, mask * 3).astype(np.uint8),
                            "L").save(root / "seg40" / split / f"{k}.png")
            Image.fromarray((depth * 1000).astype(np.uint16)).save(root / "depth" / split / f"{k}.png")
    return root


def make_nyu_mtan(root: Path, n_train: int = 8, n_test: int = 4, h: int = 72, w: int = 96, seed: int = 6) -> Path:
    """MTAN's .npy folders (288x384 there, a quarter here): train/ and val/ with image/ label/ depth/."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_test)):
        for kind in ("image", "label", "depth"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            img, mask, depth = _dense_scene(rng, h, w, 13)
            label = mask.astype(np.float32)
            label[:4, :4] = -1
            np.save(root / split / "image" / f"{k}.npy", img.astype(np.float32) / 255.0)
            np.save(root / split / "label" / f"{k}.npy", label)
            np.save(root / split / "depth" / f"{k}.npy", depth[..., None])
    return root


def make_camvid(root: Path, sizes=(("train", 8), ("val", 3), ("test", 3)), h: int = 90, w: int = 120,
                seed: int = 7) -> Path:
    """SegNet layout (360x480 there, a quarter here); annotations 0..10 and 11 = void."""
    rng = np.random.default_rng(seed)
    for split, n in sizes:
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            img, mask, _ = _dense_scene(rng, h, w, 12)  # class 11 is void
            stem = f"0001TP_{6690 + 30 * k:06d}"
            Image.fromarray(img, "RGB").save(root / split / f"{stem}.png")
            Image.fromarray(mask.astype(np.uint8), "L").save(root / f"{split}annot" / f"{stem}.png")
    return root


BUILDERS = {
    "cub200": ("CUB_200_2011", make_cub),
    # 10 training images per class: the smallest CUB-like split on which a 10 % validation share
    # stratified by class still holds one image of every class
    "cub200_15": ("CUB_200_2011_15", lambda root: make_cub(root, per_class=15)),
    "stanford_dogs": ("StanfordDogs", make_dogs),
    "voc2007": ("VOC2007", make_voc),
    "coco2014": ("coco", make_coco),
    "celeba": ("celeba", make_celeba),
    "nyuv2": ("nyuv2", make_nyu),
    "nyuv2_mtan": ("nyuv2_mtan", make_nyu_mtan),
    "camvid": ("CamVid", make_camvid),
}


def build(out, only=None) -> dict[str, Path]:
    """Build the fixture trees (all, or the names in ``only``) under ``out``; returns {name: folder}.
    A tree that exists already (its folder is there) is kept: building is deterministic."""
    out = Path(out)
    roots = {}
    for name, (folder, fn) in BUILDERS.items():
        if only and name not in only:
            continue
        root = out / folder
        if not root.exists():
            tmp = out / (folder + ".partial")
            fn(tmp)
            tmp.rename(root)
        roots[name] = root
    return roots


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--only", default="", help=f"comma-separated subset of {list(BUILDERS)}")
    args = p.parse_args(argv)
    roots = build(args.out, [s for s in args.only.split(",") if s] or None)
    for name, root in roots.items():
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print(f"{name:14s} {root}  ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
