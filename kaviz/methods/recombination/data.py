"""Recombination notebook data: the embedded scenes or a real dataset split into train, val and test."""
from __future__ import annotations

from .tasks import IGNORE_INDEX


def load_splits(data: str = "embedded", *, root=None, n: int = 1200, size=32, seed: int = 0,
                val: float = 0.15, test: float = 0.15, max_per_split: int | None = None) -> dict:
    """Train/val/test splits for the recombination notebook, and what the metrics need.

    ``data="embedded"``: :func:`kaviz.data.scenes` (``n`` images of ``size``² px, 11 mask classes:
    background + 10 shapes), split at random by ``seed``. ``data="camvid"``: the CamVid folder
    ``root`` (SegNet layout, 11 classes, void → 255) with its own train/val/test splits, images
    resized to ``size`` (an int or (H, W); both divisible by 8) and **not** ImageNet-normalised
    (the autoencoder reconstructs pixels in [0, 1]); random crop + flip on ``train`` only.
    ``max_per_split`` (real data): at most that many images of each split, a seeded choice
    (:func:`kaviz.data.limit`); ``None`` keeps everything.
    Returns ``{"train", "val", "test", "num_classes", "class_names", "ignore_index"}``.
    """
    from ...data import limit, scenes, split

    if data == "embedded":
        if not isinstance(size, int):
            raise ValueError(f"the embedded scenes are square: size must be an int, got {size!r}")
        ds = scenes(n=n, seed=seed, size=size)
        parts = split(ds, val=val, test=test, seed=seed)
        names = list(ds.info["mask_classes"])
        return {"train": parts.train, "val": parts.val, "test": parts.test, "num_classes": len(names),
                "class_names": names, "ignore_index": IGNORE_INDEX}
    if data == "camvid":
        from ...data.real import CAMVID_CLASSES, JointTransform, camvid

        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or any(s % 8 for s in hw):
            raise ValueError(f"size must be divisible by 8 (three ×½ stages), got {size!r}")
        out = {s: limit(camvid(root, s, image_size=hw, transform=JointTransform(hw, train=s == "train",
                                                                                normalize=False)),
                        max_per_split, seed=seed)
               for s in ("train", "val", "test")}
        return {**out, "num_classes": len(CAMVID_CLASSES), "class_names": list(CAMVID_CLASSES),
                "ignore_index": IGNORE_INDEX}
    raise ValueError(f"data must be 'embedded' or 'camvid', got {data!r}")
