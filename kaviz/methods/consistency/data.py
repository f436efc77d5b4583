"""Knowledge-consistency notebook data: a relabelled coarse task, the embedded shapes or CUB-200, halves."""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class Relabelled(Dataset):
    """``dataset`` with its class ids mapped through ``mapping`` (a fine → coarse task):
    ``(image, mapping[y])``, ``targets``, ``classes``, ``num_classes``, ``fingerprint``,
    ``get_image``, ``image_array`` and ``subset``."""

    def __init__(self, dataset, mapping, classes, name: str = ""):
        self.dataset = dataset
        self.mapping = torch.as_tensor(np.asarray(mapping), dtype=torch.int64)
        self.classes = list(classes)
        if self.mapping.numel() == 0 or not self.classes:
            raise ValueError("Relabelled needs a mapping with one coarse class per fine class and at least one "
                             "coarse class; got an empty mapping or class list")
        if int(self.mapping.min()) < 0 or int(self.mapping.max()) >= len(self.classes):
            raise ValueError(f"mapping values must lie in 0..{len(self.classes) - 1}")
        base = getattr(dataset, "targets", None)
        if base is None:
            raise ValueError("Relabelled needs a dataset with a `targets` tensor of class ids")
        self._fine = torch.as_tensor(base)
        if self._fine.numel() == 0:
            raise ValueError(f"Relabelled got an empty dataset ({getattr(dataset, 'name', type(dataset).__name__)}, "
                             "0 images): the split it comes from holds no image. Carve the split from more data "
                             "(e.g. load_data(..., max_per_split=None)) or keep at least one image per class in it "
                             "(kaviz.data.split(..., min_per_class=1)).")
        if int(self._fine.max()) >= len(self.mapping):
            raise ValueError(f"the dataset has class ids up to {int(self._fine.max())} but the mapping covers "
                             f"{len(self.mapping)} classes")
        self.name = name or f"{getattr(dataset, 'name', 'data')}-coarse"

    @property
    def targets(self):
        return self.mapping[self._fine]

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def fingerprint(self):
        from ...data import digest, fingerprint

        return digest(("relabelled", fingerprint(self.dataset), self.mapping, list(self.classes)))

    def __len__(self):
        return len(self.dataset)

    def get_image(self, i):
        return self.dataset.get_image(i) if hasattr(self.dataset, "get_image") else self.dataset[i][0]

    def image_array(self, i):
        return self.dataset.image_array(i)

    def __getitem__(self, i):
        return self.get_image(i), self.targets[i]

    def subset(self, indices):
        return Relabelled(self.dataset.subset(indices), self.mapping, self.classes, self.name)


def coarse_task(dataset, groups: Mapping[str, Sequence[str]]) -> Relabelled:
    """A narrower task on the same images: each fine class (by name) is mapped to its group
    (``{"round": ["circle", "ring", ...], ...}``); every class must be in exactly one group."""
    classes = list(getattr(dataset, "classes", None) or [])
    if not classes:
        raise ValueError("coarse_task needs a dataset with named classes (dataset.classes)")
    where = {}
    for gi, members in enumerate(groups.values()):
        for c in members:
            if c in where:
                raise ValueError(f"class {c!r} is in two groups")
            where[c] = gi
    unknown = [c for c in where if c not in classes]
    missing = [c for c in classes if c not in where]
    if unknown or missing:
        raise ValueError(f"groups must cover every class exactly once: unknown {unknown[:5]}, "
                         f"missing {missing[:5]} (classes: {classes[:12]}{' ...' if len(classes) > 12 else ''})")
    return Relabelled(dataset, [where[c] for c in classes], list(groups))


def default_coarse_groups(classes: Sequence[str]) -> dict:
    """A narrower task for the diagnosis pair. The synthetic shapes: round / pointy / straight
    outlines. Other class lists (e.g. CUB-200's ``Black_footed_Albatross``): grouped by the last
    word of the class name (the bird family)."""
    from ...data.synthetic import SHAPES

    if sorted(classes) == sorted(SHAPES):
        round_, pointy = ["circle", "ring", "ellipse", "crescent"], ["triangle", "diamond", "star"]
        return {"round": round_, "pointy": pointy,
                "straight": [c for c in classes if c not in round_ + pointy]}
    groups: dict[str, list] = {}
    for c in classes:
        groups.setdefault(str(c).replace("-", "_").split("_")[-1].lower(), []).append(c)
    return groups


class NotebookData(NamedTuple):
    """The splits the notebook uses: ``train`` (to train networks; augmented for real data),
    ``train_features`` (the same images without augmentation, for cached features), ``val``, ``test``."""

    train: Dataset
    train_features: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    name: str


def load_data(source: str = "embedded", *, root=None, n: int = 3000, seed: int = 0, size: int = 32,
              image_size: int = 224, val: float = 0.15, test: float = 0.15,
              max_per_split: int | None = None) -> NotebookData:
    """``"embedded"``: ``kaviz.data.shapes(n, seed, size)`` split train/val/test (stratified).
    ``"cub200"``: CUB-200-2011 from ``root`` (the official train split, 10 % of it held out for
    validation, stratified by class with at least one validation image of every class that has two or
    more training images — a warning says when that rounds a share up; the official test split);
    ``root=None`` raises the loader's layout error.
    ``max_per_split`` (real data): keep at most that many images of each split (train, val, test),
    class-balanced and seeded (:func:`kaviz.data.limit`); ``None`` keeps everything."""
    from ... import data as kdata

    if source == "embedded":
        ds = kdata.shapes(n, seed=seed, size=size)
        sp = kdata.split(ds, val=val, test=test, seed=seed)
        return NotebookData(sp.train, sp.train, sp.val, sp.test, ds.num_classes, "shapes")
    if source == "cub200":
        from ...data import real

        plain = real.cub200(root, split="train", image_size=image_size, augment=False)
        sp = kdata.split(plain, val=0.1, test=0.0, seed=seed, min_per_class=1)
        rounded = sum(int(round(0.1 * int(c))) for c in torch.bincount(plain.targets) if c)
        if len(sp.val) > rounded:
            import warnings

            warnings.warn(f"consistency.load_data('cub200'): 10 % of the training split of {root} rounds to no "
                          f"validation image for some classes; kept one of each such class ({len(sp.val)} "
                          f"validation images instead of {rounded})", stacklevel=2)
        tr_plain = kdata.limit(sp.train, max_per_split, seed=seed)
        va = kdata.limit(sp.val, max_per_split, seed=seed)
        train = tr_plain.with_transform(real.default_transform(image_size, train=True))
        test_ds = kdata.limit(real.cub200(root, split="test", image_size=image_size, augment=False),
                              max_per_split, seed=seed)
        return NotebookData(train, tr_plain, va, test_ds, plain.num_classes, "cub200")
    raise ValueError(f"source must be 'embedded' or 'cub200', got {source!r}")


def halves(dataset, seed: int = 0):
    """Two disjoint halves of ``dataset`` (stratified by class when the targets are class ids), for
    the "same architecture, different data" pair."""
    from ... import data as kdata

    sp = kdata.split(dataset, val=0.5, test=0.0, seed=seed)
    return sp.train, sp.val
