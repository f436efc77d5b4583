"""The attribute task (embedded shapes or CelebA) and the runner over seeds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .amalgamation import amalgamate_components, amalgamate_target
from .multihead import MultiHead, attribute_columns, check_head_names
from .selection import Assignment, select_sources
from .tables import accuracy_table, attribute_accuracy

#: Embedded default: a group of three attributes, each covered by two of three sources that cover
#: it with different companions (as "Black_Hair" is covered by sources #1 and #2 in the paper).
#: (Shape attributes — round, pointy — stay near chance for nets this small trained on a few hundred
#: images, so the group uses colour, size and texture.)
EMBEDDED_GROUP = ["warm_colour", "large", "textured"]
EMBEDDED_SOURCES = {
    "S1": ["warm_colour", "large", "dark_background"],
    "S2": ["warm_colour", "textured", "on_left"],
    "S3": ["large", "textured", "on_top"],
}
#: Real-data option (CelebA): the hair-colour group, each colour covered by two sources with other
#: companions. An example grouping in the spirit of the paper, not its exact source list.
CELEBA_GROUP = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"]
CELEBA_SOURCES = {
    "S1": ["Black_Hair", "Blond_Hair", "Smiling", "Male"],
    "S2": ["Black_Hair", "Brown_Hair", "Wearing_Hat", "Young"],
    "S3": ["Blond_Hair", "Gray_Hair", "Eyeglasses", "Male"],
    "S4": ["Brown_Hair", "Gray_Hair", "Bangs", "Young"],
}


@dataclass
class AttributeTask:
    """Splits with attribute targets, the attribute group to customise, the sources' attribute sets
    and each source's own labelled training part."""

    train: object
    val: object
    test: object
    group: list[str]
    sources: dict[str, list[str]]
    source_train: dict[str, object]
    info: dict = field(default_factory=dict)


def _check_sources(sources, group, classes):
    if not isinstance(sources, Mapping) or not sources:
        raise ValueError("sources must be a dict {source name: [attributes]} with at least one source")
    for name, attrs in sources.items():
        check_head_names(attrs)
        attribute_columns(classes, attrs, f"data (source {name!r})")
    attribute_columns(classes, check_head_names(group), "data (group)")
    uncovered = [a for a in group if not any(a in attrs for attrs in sources.values())]
    if uncovered:
        raise ValueError(f"no source covers {uncovered}; every attribute of the group needs at least one source")


def _parts(n, k, seed):
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, k)]


def attribute_task(data: str = "embedded", *, root=None, group=None, sources=None, n: int = 3000,
                   image_size: int = 32, val: float = 0.15, test: float = 0.15, source_data: str = "disjoint",
                   max_images: int | None = None, seed: int = 0) -> AttributeTask:
    """The data of the customisation experiment.

    ``data="embedded"``: :func:`kaviz.data.shape_attributes` (``n`` images, ``image_size``), split
    into train/val/test (``val``/``test`` fractions). ``data="celeba"``: CelebA from ``root``
    (``kaviz.data.real.celeba``, official partition, no augmentation, at most ``max_images`` per
    split when given); a missing root raises the loader's layout error. ``group``/``sources``
    default to :data:`EMBEDDED_GROUP`/:data:`EMBEDDED_SOURCES` or :data:`CELEBA_GROUP`/
    :data:`CELEBA_SOURCES`. ``source_data="disjoint"`` gives each source its own disjoint part of the
    training split (teachers trained apart), ``"shared"`` the whole split. The amalgamation steps
    use all training images, unlabeled.
    """
    from ... import data as kdata

    if source_data not in ("disjoint", "shared"):
        raise ValueError(f"source_data must be 'disjoint' or 'shared', got {source_data!r}")
    if data == "embedded":
        group = list(EMBEDDED_GROUP if group is None else group)
        sources = dict(EMBEDDED_SOURCES if sources is None else sources)
        full = kdata.shape_attributes(n=n, seed=seed, size=image_size)
        train, val_ds, test_ds = kdata.split(full, val=val, test=test, seed=seed)
    elif data == "celeba":
        from ...data.real import celeba

        group = list(CELEBA_GROUP if group is None else group)
        sources = dict(CELEBA_SOURCES if sources is None else sources)
        wanted = list(dict.fromkeys([a for attrs in sources.values() for a in attrs] + group))
        splits = []
        for k, sp in enumerate(("train", "valid", "test")):
            ds = celeba(root, sp, attributes=wanted, image_size=image_size, augment=False)
            if max_images is not None and len(ds) > max_images:
                ds = ds.subset(np.sort(np.random.default_rng(seed + k).choice(len(ds), max_images, replace=False)))
            splits.append(ds)
        train, val_ds, test_ds = splits
    else:
        raise ValueError(f"data must be 'embedded' or 'celeba', got {data!r}")
    _check_sources(sources, group, train.classes)
    names = list(sources)
    if source_data == "disjoint":
        parts = _parts(len(train), len(names), seed)
        source_train = {s: train.subset(p) for s, p in zip(names, parts)}
    else:
        source_train = {s: train for s in names}
    return AttributeTask(train, val_ds, test_ds, group, sources, source_train,
                         info={"data": data, "source_data": source_data, "seed": seed})


@dataclass
class CustomizeResult:
    """Everything a run produced: ``components[seed][attribute]``, ``targets[seed]``,
    ``histories[(stage, seed)]``, the shared ``assignments``, and ``table`` (tidy: ``seed``, ``model``,
    ``attribute``, ``accuracy`` on the test split; sources are seed-independent, seed = -1)."""

    sources: dict
    assignments: dict
    components: dict
    targets: dict
    histories: dict
    table: object


def run(task: AttributeTask, sources: Mapping[str, MultiHead], *, seeds: Sequence[int] = (0, 1),
        assignments: Mapping[str, Assignment] | None = None,
        component_arch: str = "cifar_resnet8", component_kwargs: Mapping | None = None,
        target_arch: str = "cifar_resnet8", target_kwargs: Mapping | None = None,
        blocks: Sequence[str] | None = None, widths: Sequence[int] | None = None,
        component_epochs: int = 4, target_epochs: int = 4, lr: float = 1e-3, batch_size: int = 64,
        device=None, progress: bool | None = None, component_options: Mapping | None = None) -> CustomizeResult:
    """Selective learning once (the sources are fixed), then components and the target for every
    seed; per-attribute test accuracy of sources, components and target in ``result.table``.
    ``component_options``: recipe options of the components (``shared_projection``, ``selective``,
    ``reduction``: :class:`ComponentAmalgamation`)."""
    import pandas as pd

    if assignments is None:
        assignments = select_sources(sources, task.group, task.train)
    rows = []
    src_acc = accuracy_table(sources, task.test, task.group)
    for name, accs in src_acc.iterrows():
        rows += [{"seed": -1, "model": name, "attribute": a, "accuracy": v} for a, v in accs.items() if pd.notna(v)]
    components, targets, histories = {}, {}, {}
    for seed in seeds:
        comps, hists, _ = amalgamate_components(sources, task.group, task.train, task.val, assignments=assignments,
                                                arch=component_arch, arch_kwargs=component_kwargs, blocks=blocks,
                                                widths=widths, epochs=component_epochs, lr=lr,
                                                batch_size=batch_size, seed=seed, device=device, progress=progress,
                                                **dict(component_options or {}))
        target, th = amalgamate_target(comps, task.train, task.val, arch=target_arch, arch_kwargs=target_kwargs,
                                       blocks=blocks, epochs=target_epochs, lr=lr, batch_size=batch_size, seed=seed,
                                       device=device, progress=progress)
        components[seed], targets[seed] = comps, target
        for a, h in hists.items():
            histories[("component " + a, seed)] = h
        histories[("target", seed)] = th
        for a, c in comps.items():
            rows.append({"seed": seed, "model": "component", "attribute": a,
                         "accuracy": attribute_accuracy(c, task.test)[a]})
        for a, v in attribute_accuracy(target, task.test).items():
            rows.append({"seed": seed, "model": "target", "attribute": a, "accuracy": v})
    return CustomizeResult(dict(sources), assignments, components, targets, histories, pd.DataFrame(rows))
