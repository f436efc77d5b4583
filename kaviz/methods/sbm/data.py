"""SBM notebook data (embedded scenes or NYUv2 / CamVid) and teacher training."""
from __future__ import annotations

import functools
from typing import Mapping

import numpy as np

from ..dense import DenseSupervised
from .tasks import check_kind, kind_channels


def scene_splits(data: str = "embedded", *, root=None, image_size=32, n: int = 1500, max_objects: int = 4,
                 seed: int = 0, val: float = 0.15, test: float = 0.15, augment: bool = False,
                 max_per_split: int | None = None, normals: bool = False):
    """Train / validation / test data and what the notebook needs to know about it.

    ``data="embedded"``: :func:`kaviz.data.scenes` (``n`` square images of side ``image_size``,
    classes = background + the shapes, depth 1..10) split at random into ``val``/``test`` fractions.
    ``data="nyuv2"``: :func:`kaviz.data.real.nyuv2` from ``root`` (13 classes, depth in metres) at
    ``image_size`` (an int or ``(height, width)``, e.g. ``(288, 384)``): validation = a ``val``
    fraction of the train split (never augmented), test = the test split; ``augment=True`` keeps
    the random crops and flips on the training part (the teachers' predictions are then computed
    on the fly). ``max_per_split`` (real data): at most that many images of each split, a seeded
    choice (:func:`kaviz.data.limit`); ``None`` keeps everything. Returns ``(Splits(train, val,
    test), info)`` with ``info = {"num_classes", "class_names", "size", "source"}``.
    ``normals=True`` (embedded only): the scenes also carry a surface-normal map, target ``"normals"``
    (:func:`kaviz.data.synthetic.depth_normals`), for a third task of kind ``"normals"``; the images,
    masks and depth are the same as without it (and ``info`` says ``"normals": True``).
    """
    from ...data import Splits, limit, split

    if not isinstance(normals, bool):
        raise ValueError(f"normals must be True or False, got {normals!r}")
    if normals and data != "embedded":
        raise ValueError("normals=True needs the embedded scenes (data='embedded'): the real-data loaders give no "
                         "surface normals")
    if data == "embedded":
        from ...data import scenes

        if isinstance(image_size, bool) or not isinstance(image_size, int):
            raise ValueError(f"the embedded scenes are square: image_size must be an int, got {image_size!r}")
        ds = scenes(n=n, seed=seed, size=image_size, max_objects=max_objects, normals=normals)
        parts = split(ds, val=val, test=test, seed=seed)
        names = list(ds.info["mask_classes"])
        info = {"num_classes": len(names), "class_names": names, "size": (image_size, image_size), "source": "scenes"}
        if normals:
            info["normals"] = True
        return parts, info
    if data == "nyuv2":
        from ...data.real import nyuv2

        fixed = nyuv2(root, "train", image_size=image_size, augment=False)
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(fixed))
        n_val = max(1, int(round(val * len(fixed))))
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        train_src = nyuv2(root, "train", image_size=image_size, augment=augment)
        parts = Splits(*(limit(part, max_per_split, seed=seed) for part in (
            train_src.subset(train_idx), fixed.subset(val_idx), nyuv2(root, "test", image_size=image_size,
                                                                      augment=False))))
        names = list(fixed.classes)
        return parts, {"num_classes": len(names), "class_names": names, "size": tuple(fixed.image_size),
                       "source": "nyuv2"}
    raise ValueError(f"data must be 'embedded' (synthetic scenes) or 'nyuv2' (with root=...), got {data!r}")


def train_teachers(train_data, val_data, *, num_classes: int, epochs: int = 8, widths=(16, 32, 64),
                   lr: float = 2e-3, batch_size: int = 32, seed: int = 0, tasks: Mapping[str, str] | None = None,
                   cache=True, device=None, progress: bool | None = None):
    """A segmentation and a depth ``segnet_small`` trained with :class:`DenseSupervised` through
    :func:`kaviz.train.train_teacher` (cached by everything that determines them; the epoch with
    the lowest validation loss is kept). ``tasks`` maps task names to kinds (default
    ``{"seg": "segmentation", "depth": "depth"}``; add e.g. ``"normals": "normals"`` for a normals
    teacher with 3 output channels and the ``1 − cos`` loss, on data with a ``"normals"`` target,
    see :func:`scene_splits` (normals=True)). Returns ``({task: model}, {task: history})``."""
    from ...train import train_teacher

    tasks = dict(tasks or {"seg": "segmentation", "depth": "depth"})
    models, histories = {}, {}
    for t, kind in tasks.items():
        check_kind(kind)
        model, hist = train_teacher(
            "segnet_small", train_data, val_data, num_classes=kind_channels(kind, num_classes),
            epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, arch_kwargs={"widths": tuple(widths)},
            method=functools.partial(DenseSupervised, task=kind), cache=cache, device=device, progress=progress)
        models[t], histories[t] = model.eval(), hist
    return models, histories
