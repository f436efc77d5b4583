"""LSH notebook data: embedded multi-label scenes, VOC2007 or COCO2014."""
from __future__ import annotations

from typing import Mapping

import numpy as np

DATA_SOURCES = ("embedded", "voc2007", "coco2014")


def load_data(source: str = "embedded", *, root=None, n: int = 2500, image_size: int = 32, max_objects: int = 2,
              val: float = 0.2, test: float = 0.2, seed: int = 0, max_per_split: int | None = None):
    """Train / validation / test splits for the LSHFM notebook (``kaviz.data.Splits``).

    - ``"embedded"``: ``kaviz.data.scenes(n, seed, image_size, max_objects)`` (multi-hot labels,
      VOC-style difficult flags), split ``val``/``test`` of it;
    - ``"voc2007"``: ``trainval`` (a seeded ``val`` share held out for model selection, shown with
      the evaluation transform) and ``test`` from :func:`kaviz.data.real.voc2007`;
    - ``"coco2014"``: ``train`` (``val`` share held out) and COCO's ``val`` as the test split.

    ``root=None`` for a real source raises the loader's error that shows the expected folder
    layout (no silent fallback to the embedded data). ``max_per_split`` (real data): at most that
    many images of each split, a seeded choice (:func:`kaviz.data.limit`); ``None`` keeps everything.
    """
    from ...data import Splits, limit, scenes, split

    if source not in DATA_SOURCES:
        raise ValueError(f"source must be one of {DATA_SOURCES}, got {source!r}")
    if source == "embedded":
        return split(scenes(n, seed=seed, size=image_size, max_objects=max_objects), val=val, test=test, seed=seed)
    from ...data import real

    if source == "voc2007":
        full = real.voc2007(root, split="trainval", image_size=image_size)
        test_ds = real.voc2007(root, split="test", image_size=image_size)
    else:
        full = real.coco2014_multilabel(root, split="train", image_size=image_size)
        test_ds = real.coco2014_multilabel(root, split="val", image_size=image_size)
    tr, va, _ = split(full, val=val, test=0.0, seed=seed)
    return Splits(*(limit(part, max_per_split, seed=seed) for part in (tr, va.with_transform(None), test_ds)))


def label_summary(splits: Mapping[str, object], *, target_key: str = "labels"):
    """Images per class in each split (``{"train": ds, ...}``), and how many of them are
    difficult (ignored by the mAP), from the datasets' ``targets`` (no image is loaded)."""
    import pandas as pd

    cols = {}
    classes = None
    for name, ds in splits.items():
        t = getattr(ds, "targets", None)
        if not isinstance(t, Mapping) or target_key not in t:
            raise ValueError(f"split {name!r} has no multi-hot {target_key!r} targets")
        classes = classes or list(getattr(ds, "classes", None) or range(t[target_key].shape[1]))
        cols[name] = np.asarray(t[target_key]).sum(0).astype(np.int64)
        if "difficult" in t:
            cols[f"{name} difficult"] = np.asarray(t["difficult"]).sum(0).astype(np.int64)
    return pd.DataFrame(cols, index=pd.Index(classes, name="class"))
