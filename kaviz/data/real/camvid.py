"""CamVid (Brostow et al., PRL 2009) in the SegNet layout: 367 / 101 / 233 train/val/test road scenes
at 360x480, 11 classes plus void."""
from __future__ import annotations

from functools import partial

from .base import IGNORE_INDEX, DenseDataset, check_root, check_split, pair_by_stem
from .dense import decode_labels

TITLE = "CamVid"
LAYOUT = """\
  CamVid/
    train/0001TP_006690.png ...       trainannot/0001TP_006690.png ...
    val/...  valannot/...  test/...  testannot/...
    (annotations: class ids 0..10, 11 = void)"""
SPLITS = ("train", "val", "test")
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                  "Pedestrian", "Bicyclist")
VOID = 11


def camvid(root, split: str = "train", image_size=(360, 480), transform=None, augment: bool = True) -> DenseDataset:
    """CamVid semantic segmentation: items are ``(image, {"mask": int64 (H, W)})`` with class ids 0..10
    and the void label 11 mapped to the ignore index 255. The default transform is a
    :class:`JointTransform` (random crop + flip on ``train``)."""
    check_split(TITLE, split, SPLITS)
    folders = {"image": split, "mask": f"{split}annot"}
    root = check_root(TITLE, root, LAYOUT, list(folders.values()))
    paired = pair_by_stem(TITLE, root, LAYOUT, folders, {"image": (".png", ".jpg"), "mask": (".png",)})
    return DenseDataset(name="camvid", root=root, split=split, files=paired["image"], classes=CAMVID_CLASSES,
                        mask_files=paired["mask"], depth_files=None,
                        decode_mask=partial(decode_labels, num_classes=11, void_values=(VOID, IGNORE_INDEX)),
                        image_size=image_size, transform=transform, train=split == "train", augment=augment)
