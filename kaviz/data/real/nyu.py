"""NYU Depth v2 (Silberman et al., ECCV 2012) for joint scene parsing and depth: 795 train / 654 test
labelled indoor images, 13 semantic classes (Couprie et al., 2013), depth in metres."""
from __future__ import annotations

from functools import partial

from .base import DenseDataset, check_root, check_split, pair_by_stem
from .dense import decode_depth, decode_labels

TITLE = "NYUv2"
LAYOUT = """\
  nyuv2/
    train/image/0.png ...    (RGB, .png or .jpg)
    train/seg13/0.png ...    (13 classes as ids 0..12; 255 or -1 = ignore; .png or .npy)
    train/depth/0.npy ...    (metres; or 16-bit .png in millimetres)
    test/image/  test/seg13/  test/depth/     (795 train / 654 test images)"""
SPLITS = ("train", "test")
NYU13_CLASSES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
                 "table", "tv", "wall", "window")


def nyuv2(root, split: str = "train", image_size=(288, 384), transform=None, augment: bool = True,
          zero_is_void: bool = False) -> DenseDataset:
    """NYUv2 in the layout of the common multi-task toolkits; pairs image/seg13/depth files by stem.

    Items are ``(image, {"mask": int64 (H, W), "depth": float32 (H, W)})``: ``mask`` holds class ids
    0..12 and 255 for ignored pixels (stored as 255 or -1); ``depth`` metres, 0 where unmeasured.
    ``zero_is_void=True`` reads maps that store 0 = unlabelled and 1..13 for the classes. The default
    transform is a :class:`JointTransform` (random crop + flip on ``train``), so image, mask and depth
    stay aligned. The paper split (795/654) is expected but not enforced.
    """
    check_split(TITLE, split, SPLITS)
    folders = {"image": f"{split}/image", "mask": f"{split}/seg13", "depth": f"{split}/depth"}
    root = check_root(TITLE, root, LAYOUT, list(folders.values()))
    paired = pair_by_stem(TITLE, root, LAYOUT, folders,
                          {"image": (".png", ".jpg", ".jpeg"), "mask": (".png", ".npy"), "depth": (".npy", ".png")})
    return DenseDataset(name="nyuv2", root=root, split=split, files=paired["image"], classes=NYU13_CLASSES,
                        mask_files=paired["mask"], depth_files=paired["depth"],
                        decode_mask=partial(decode_labels, num_classes=13, void_values=(255, -1),
                                            zero_is_void=zero_is_void),
                        decode_depth=decode_depth, image_size=image_size, transform=transform,
                        train=split == "train", augment=augment, options={"zero_is_void": zero_is_void})
