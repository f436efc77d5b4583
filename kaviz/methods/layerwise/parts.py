"""Parts of one label set: the class-subset datasets each teacher is trained on (ClassPart, class_parts)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


# parts of one label set
class ClassPart(torch.utils.data.Dataset):
    """The samples of ``dataset`` whose class is in ``classes``, relabelled to local ids
    ``0..len(classes)-1`` in the order given (the label set of one teacher).

    Works on any kaviz dataset with ``targets`` (class ids), ``classes`` and ``subset`` (embedded
    or real). Images are read through the parent's ``get_image``; ``fingerprint`` covers the parent,
    the samples and the class mapping, so teacher caches keyed on it are never stale.
    """

    def __init__(self, dataset, classes: Sequence[int], name: str | None = None):
        targets = getattr(dataset, "targets", None)
        if not (torch.is_tensor(targets) and targets.dim() == 1 and not targets.dtype.is_floating_point):
            raise ValueError("class_parts needs a classification dataset whose `targets` are class ids "
                             f"(an int tensor of shape (N,)); got {type(targets).__name__}")
        classes = [int(c) for c in classes]
        k = getattr(dataset, "num_classes", None) or (int(targets.max()) + 1 if len(targets) else 0)
        bad = [c for c in classes if not 0 <= c < k]
        if not classes or bad or len(set(classes)) != len(classes):
            raise ValueError(f"a part must be distinct class ids in [0, {k}); got {classes}")
        lookup = torch.full((k,), -1, dtype=torch.int64)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        keep = torch.nonzero(lookup[targets.to(torch.int64)] >= 0).reshape(-1)
        names = getattr(dataset, "classes", None)
        class_names = [str(names[c]) if names else str(c) for c in classes]
        name = name or f"{getattr(dataset, 'name', '') or 'data'}[{_span(classes)}]"
        info = {**dict(getattr(dataset, "info", {}) or {}), "task": "classification", "classes_of_parent": classes}
        self._init(dataset.subset(keep), classes, lookup, class_names, name, info)

    def _init(self, base, classes, lookup, class_names, name, info):
        from ...data import fingerprint

        self.base = base
        self.parent_classes = list(classes)
        self._lookup = lookup
        self.targets = lookup[base.targets.to(torch.int64)]
        self.classes = list(class_names)
        self.name = name
        self.info = dict(info)
        self.fingerprint = fingerprint(("class_part", fingerprint(base), self.parent_classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self):
        return len(self.targets)

    def get_image(self, i):
        return self.base.get_image(i)

    def get_target(self, i):
        return self.targets[i]

    def __getitem__(self, i):
        return self.get_image(i), self.targets[i]

    def image_array(self, i):
        return self.base.image_array(i)

    def subset(self, indices) -> "ClassPart":
        new = ClassPart.__new__(ClassPart)
        new._init(self.base.subset(indices), self.parent_classes, self._lookup, self.classes, self.name, self.info)
        return new

    def __repr__(self):
        return f"ClassPart(name={self.name!r}, n={len(self)}, classes={self.classes})"


def _span(classes):
    c = list(classes)
    if c == list(range(c[0], c[0] + len(c))):
        return f"{c[0]}-{c[-1]}" if len(c) > 1 else str(c[0])
    return ",".join(map(str, c))


def class_parts(dataset, parts: int | Sequence[Sequence[int]] = 2,
                names: Sequence[str] | None = None) -> list[ClassPart]:
    """Split one label set into parts (one per teacher): ``parts=2`` cuts the classes into two
    contiguous halves (0–4 and 5–9 for ten classes); or give the class ids of each part. Each part
    is relabelled to local ids, so ``kaviz.data.union(parts)`` rebuilds the original label space
    with offsets 0, K_1, … (SPEC §0.1)."""
    k = getattr(dataset, "num_classes", None)
    if isinstance(parts, int) and not isinstance(parts, bool):
        if k is None or not 2 <= parts <= k:
            raise ValueError(f"parts={parts}: need 2 <= parts <= number of classes ({k}); or pass the class ids of "
                             f"each part")
        parts = [list(a) for a in np.array_split(np.arange(k), parts)]
    parts = [list(p) for p in parts]
    flat = [c for p in parts for c in p]
    if len(set(flat)) != len(flat):
        raise ValueError(f"parts must not share classes; got {parts}")
    if names is not None and len(names) != len(parts):
        raise ValueError(f"got {len(names)} names for {len(parts)} parts")
    return [ClassPart(dataset, p, None if names is None else names[i]) for i, p in enumerate(parts)]
