"""Notebook-level helpers of ``notebooks/compare_networks.ipynb``: which two networks, which layers,
and the figures and tables that compare them. The computation lives in :mod:`kaviz.analysis`;
this module obtains networks and assembles results.

**Networks by name.** :data:`RECIPES` names the students and teachers of three papers on the
embedded default, each trained by its paper module's own runner with the paper notebook's
default settings — CFL (:func:`kaviz.methods.cfl.train_teachers`, :func:`~kaviz.methods.cfl.run_students`),
LSHFM (:func:`kaviz.train.train_teacher`, :func:`kaviz.methods.lshfm.run`) and Born-Again networks from the
Knowledge Consistency notebook (:func:`kaviz.methods.consistency.born_again_chain`). :func:`obtain`
returns one through :func:`kaviz.runs.ensure`: loaded from the run registry when a notebook
already made it on this floating-point path, trained (through the cached teacher trainers) otherwise.
:func:`network` also takes a torchvision name or a local checkpoint.

**Controls.** :func:`random_like` rebuilds a network's architecture with fresh random weights; the
shuffled-sample control is in :func:`kaviz.analysis.cka_controls`.

**Figures.** :func:`cka_heatmap`, :func:`probe_curves`, :func:`consistency_bars` (plotly);
:class:`NetworkPicker` (ipywidgets: two networks and their layers → a CKA heatmap) with a static
figure for readers without a kernel.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "PAPERS",
    "RECIPES",
    "Recipe",
    "recipe",
    "paper_data",
    "obtain",
    "register_paper",
    "STABLE_COLUMNS",
    "network",
    "random_like",
    "TEACHERS",
    "probe_subset",
    "first",
    "control_table",
    "probe_tables",
    "JointMaps",
    "cka_heatmap",
    "probe_curves",
    "consistency_bars",
    "NetworkPicker",
]

# ------------------------------------------------------------------------------- default settings
#: The embedded default of each paper, as its notebook trains it (the same settings reach the same
#: cache entries of the teacher trainers, so a paper notebook run first makes this one fast).
PAPERS = {
    "cfl": dict(
        data=dict(image_size=32, n_shapes=1500),
        teachers={
            "shapes": dict(arch="mobilenet_small", arch_kwargs={"width": 8, "head_width": 32}, layer="head",
                           epochs=6, lr=1e-2, batch_size=32),
            "digits": dict(arch="cifar_resnet8", arch_kwargs={"width": 8}, layer="layer3",
                           epochs=8, lr=3e-3, batch_size=32),
        },
        student=dict(arch="vgg8_small", arch_kwargs={"width": 4}, layer="features"),
        settings=dict(epochs=6, batch_size=64, lr=2e-3, hidden=16, head_lr_mult=10.0, block_lr_mult=5.0,
                      weights={"kd": 1.0, "mmd": 10.0, "recon": 10.0}, cache_teachers=True, val_losses=False),
    ),
    "lshfm": dict(
        data=dict(n=2500, image_size=32, max_objects=2, seed=0),
        teacher=dict(arch="vgg8_small", arch_kwargs={"width": 16}, epochs=8, lr=2e-3, batch_size=32,
                     optimizer="adam", schedule="cosine", weight_decay=5e-4, loss="bce", target_key="labels"),
        student=dict(arch="vgg8_small", arch_kwargs={"width": 8}),
        settings=dict(epochs=5, stage1_epochs=1, beta=0.5, beta1=1.0, bias="median", n_hashes=None, lr=3e-3,
                      batch_size=32, optimizer="adam", schedule="cosine", weight_decay=5e-4),
    ),
    "born_again": dict(
        data=dict(n=3000, seed=0),
        teacher=dict(arch="vgg8_small", arch_kwargs={"width": 8}, epochs=5, lr=3e-3, batch_size=64, seed=0),
        settings=dict(lam=0.5, tau=1.0, epochs=5, lr=3e-3, batch_size=64, weight_decay=5e-4, schedule="cosine"),
        # student seed s is generation 1 of the chain seeded first_seed + chain_step * s (its own seed is that + 1):
        # the Knowledge Consistency notebook's chains BA_SEED, BA_SEED + 100, ... are seeds 0, 1, ...
        first_seed=100, chain_step=100,
    ),
}


@dataclass(frozen=True)
class Recipe:
    """How a named network is made: its paper, its role (``teacher``/``student``), the method, the
    seed, and ``train()`` -> ``(model, metrics)``; ``key`` is what determines it; ``evaluate(model)``
    -> the same metrics for a network of this recipe trained elsewhere (a paper notebook)."""

    name: str
    paper: str
    role: str
    method: str
    seed: int | None
    train: Callable = field(repr=False)
    key: object = None
    arch: str | None = None
    evaluate: Callable | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=None)
def _cfl_data():
    from .methods import cfl

    return cfl.load_data("embedded", **PAPERS["cfl"]["data"])


@functools.lru_cache(maxsize=None)
def _lshfm_data():
    from .methods import lshfm

    return lshfm.load_data("embedded", **PAPERS["lshfm"]["data"])


@functools.lru_cache(maxsize=None)
def _ba_data():
    from .methods import consistency

    return consistency.load_data("embedded", **PAPERS["born_again"]["data"])


@dataclass(frozen=True)
class PaperData:
    """A paper's default splits: ``train``, ``val``, ``test``; ``classes`` and ``labels(split)``
    (one class id per image; LSHFM's multi-label scenes: the largest object)."""

    paper: str
    train: object
    val: object
    test: object
    classes: list

    def labels(self, split=None) -> np.ndarray:
        """Class ids of ``split`` (default: the test split; a :func:`probe_subset` of a split too);
        -1 for a scene without any object."""
        ds = self.test if split is None else split
        if isinstance(ds, _Subset):
            return self.labels(ds.dataset)[np.asarray(ds.indices)]
        if self.paper == "lshfm":
            from .methods import lshfm

            return np.asarray(lshfm.primary_labels(ds))
        return np.asarray([int(t) for t in ds.targets])

    def names(self, labels) -> list:
        """Class names of class ids (``"none"`` for -1)."""
        return [self.classes[int(c)] if int(c) >= 0 else "none" for c in labels]


def paper_data(paper: str) -> PaperData:
    """The embedded default data a paper's networks were trained on (its notebook's splits)."""
    if paper == "cfl":
        d = _cfl_data()
        return PaperData(paper, d.train, d.val, d.test, list(d.test.classes))
    if paper == "lshfm":
        tr, va, te = _lshfm_data()
        return PaperData(paper, tr, va, te, list(tr.classes))
    if paper == "born_again":
        d = _ba_data()
        return PaperData(paper, d.train, d.val, d.test, list(d.train.classes))
    raise ValueError(f"unknown paper {paper!r}; kaviz.compare.PAPERS has {list(PAPERS)}")


# --------------------------------------------------------------------------------------- recipes
def _cfl_teachers():
    from .methods import cfl

    p = PAPERS["cfl"]
    teachers, _, _ = cfl.train_teachers(p["teachers"], _cfl_data(), progress=False)
    return dict(zip(p["teachers"], teachers))


def _cfl_teacher(source):
    t = _cfl_teachers()[source]
    return t, _cfl_teacher_metrics(source, t)


def _cfl_teacher_metrics(source, model):
    from .train import Supervised

    return {"test accuracy": Supervised(model).evaluate(_cfl_data().sources[source].test)["accuracy"]}


def _cfl_student_metrics(model):
    from .methods.kd import union_accuracy

    return {f"test {k}": v for k, v in union_accuracy(model, _cfl_data().test).items()}


def _cfl_student(seed):
    from .methods import cfl

    p, d = PAPERS["cfl"], _cfl_data()
    teachers = [_teacher(f"cfl-teacher-{s}") for s in p["teachers"]]
    layers = [t["layer"] for t in p["teachers"].values()]
    s = p["student"]
    run = cfl.run_students(s["arch"], teachers, s["layer"], layers, d.train, d.val, d.test, seeds=[seed],
                           methods=["CFL"], arch_kwargs=s["arch_kwargs"], **p["settings"])[0]
    return run.student, {f"test {k}": v for k, v in run.scores.items()}


def _lshfm_teacher():
    from .train import train_teacher

    tr, va, _ = _lshfm_data()
    t = dict(PAPERS["lshfm"]["teacher"])
    teacher, _ = train_teacher(t.pop("arch"), tr, va, num_classes=len(tr.classes), progress=False, **t)
    return teacher, _lshfm_metrics(teacher)


def _lshfm_metrics(model):
    return {"test mAP": _map(model, _lshfm_data()[2])}


def _map(model, data):
    from .methods import lshfm

    return float(lshfm.evaluate_model(model, data)["mAP"])


_OUTPUTS: dict = {}


def _lshfm_teacher_outputs(teacher):
    """The teacher's outputs on the training and validation splits, computed once per teacher weights
    (every student seed trained in this process reuses them)."""
    from .methods import lshfm
    from .models import weights_hash

    key = weights_hash(teacher)
    if key not in _OUTPUTS:
        tr, va, _ = _lshfm_data()
        _OUTPUTS.clear()
        _OUTPUTS[key] = (lshfm.teacher_outputs(tr, teacher), lshfm.teacher_outputs(va, teacher))
    return _OUTPUTS[key]


def _lshfm_student(seed, variant="lshl2"):
    from .methods import lshfm

    tr, va, _ = _lshfm_data()
    p = PAPERS["lshfm"]
    teacher = _teacher("lshfm-teacher")
    train_c, val_c = _lshfm_teacher_outputs(teacher)
    r = lshfm.run(variant, p["student"]["arch"], teacher, train_c, val_c, seed=seed, num_classes=len(tr.classes),
                  arch_kwargs=p["student"]["arch_kwargs"], progress=False, **p["settings"])
    return r.student, _lshfm_metrics(r.student)


def _ba_teacher():
    from .train import train_teacher

    d = _ba_data()
    t = dict(PAPERS["born_again"]["teacher"])
    model, _ = train_teacher(t.pop("arch"), d.train, d.val, progress=False, **t)
    return model, _ba_metrics(model)


def _ba_metrics(model):
    from .train import Supervised

    return {"test accuracy": Supervised(model).evaluate(_ba_data().test)["accuracy"]}


def _ba_student(seed):
    from .methods import consistency

    d, p = _ba_data(), PAPERS["born_again"]
    gen0 = _teacher("ba-gen0")
    t = p["teacher"]
    chain, _ = consistency.born_again_chain(gen0, d.train, d.val, arch=t["arch"], arch_kwargs=t["arch_kwargs"],
                                            generations=2, seed=p["first_seed"] + p["chain_step"] * seed,
                                            progress=False, **p["settings"])
    return chain[1], _ba_metrics(chain[1])


_NAME = re.compile(r"^(?P<base>.+)-seed(?P<seed>\d+)$")


def recipe(name: str) -> Recipe:
    """The :class:`Recipe` of a default network: ``cfl-teacher-shapes``, ``cfl-teacher-digits``,
    ``cfl-student-seed<S>``, ``lshfm-teacher``, ``lshfm-student-seed<S>``, ``ba-gen0`` (Born-Again
    generation 0, trained with labels) and ``ba-gen1-seed<S>`` (generation 1, distilled from it)."""
    p = PAPERS
    fixed = {
        "cfl-teacher-shapes": ("cfl", "teacher", "supervised (shapes)", None, lambda: _cfl_teacher("shapes"),
                               [p["cfl"]["data"], p["cfl"]["teachers"]], "mobilenet_small",
                               functools.partial(_cfl_teacher_metrics, "shapes")),
        "cfl-teacher-digits": ("cfl", "teacher", "supervised (digits)", None, lambda: _cfl_teacher("digits"),
                               [p["cfl"]["data"], p["cfl"]["teachers"]], "cifar_resnet8",
                               functools.partial(_cfl_teacher_metrics, "digits")),
        "lshfm-teacher": ("lshfm", "teacher", "supervised (BCE)", 0, _lshfm_teacher,
                          [p["lshfm"]["data"], p["lshfm"]["teacher"]], p["lshfm"]["teacher"]["arch"], _lshfm_metrics),
        "ba-gen0": ("born_again", "teacher", "supervised (generation 0)", p["born_again"]["teacher"]["seed"],
                    _ba_teacher, [p["born_again"]["data"], p["born_again"]["teacher"]],
                    p["born_again"]["teacher"]["arch"], _ba_metrics),
    }
    if name in fixed:
        return Recipe(name, *fixed[name])
    m = _NAME.match(name)
    if m:
        base, seed = m["base"], int(m["seed"])
        if base == "cfl-student":
            return Recipe(name, "cfl", "student", "CFL", seed, lambda: _cfl_student(seed),
                          [p["cfl"], seed], p["cfl"]["student"]["arch"], _cfl_student_metrics)
        if base == "lshfm-student":
            return Recipe(name, "lshfm", "student", "LSH+L2 (lshl2)", seed, lambda: _lshfm_student(seed),
                          [p["lshfm"], seed], p["lshfm"]["student"]["arch"], _lshfm_metrics)
        if base == "ba-gen1":
            return Recipe(name, "born_again", "student", "Born-Again (generation 1)", seed,
                          lambda: _ba_student(seed), [p["born_again"], seed], p["born_again"]["teacher"]["arch"],
                          _ba_metrics)
    raise KeyError(f"no recipe for {name!r}: kaviz.compare.RECIPES lists the default networks "
                   f"({', '.join(RECIPES)}; students take any -seed<S>); kaviz.runs.list() shows the registry")


#: The default networks (students at seed 0; any ``-seed<S>`` works).
RECIPES = ["cfl-teacher-shapes", "cfl-teacher-digits", "cfl-student-seed0", "lshfm-teacher", "lshfm-student-seed0",
           "ba-gen0", "ba-gen1-seed0"]

#: Each default student's teachers (the names of their recipes) and the layers compared by default.
TEACHERS = {
    "cfl-student": {"cfl-teacher-shapes": "head", "cfl-teacher-digits": "layer3"},
    "lshfm-student": {"lshfm-teacher": "fc:in"},
    "ba-gen1": {"ba-gen0": "features.14"},
}


def obtain(name: str, *, device=None) -> nn.Module:
    """The default network ``name`` (:func:`recipe`) from the run registry, trained first when this
    floating-point path has not made it yet (:func:`kaviz.runs.ensure`); eval mode, record in
    ``model.kaviz_run``."""
    from . import runs

    r = recipe(name)
    return runs.ensure(name, r.train, key=r.key, device=device, **_fields(r))


def _fields(r: Recipe) -> dict:
    """The record fields of a recipe's run (the same whoever trained it)."""
    return dict(paper=r.paper, method=r.method, seed=r.seed,
                data=f"{r.paper} embedded default ({len(paper_data(r.paper).train)} training images)",
                notes=f"{r.role}; kaviz.compare.recipe({r.name!r})")


#: The columns of a run record that do not depend on the floating-point path (a notebook shows these).
STABLE_COLUMNS = ["name", "paper", "method", "arch", "seed", "params"]


def _canonical_settings(settings) -> str:
    import json

    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def register_paper(paper: str, networks: Mapping[str, Mapping], *, settings: Mapping | None = None,
                   defaults: str | None = None, device=None):
    """Register the networks a paper notebook trained (the cell at the end of each paper notebook),
    so that any other notebook loads them by name (:func:`kaviz.runs.load`, :func:`obtain`) instead of
    training them again. Returns their records' :data:`STABLE_COLUMNS` as a DataFrame (one row per
    network, in the order given).

    ``networks``: name → ``dict(model=..., method=..., seed=..., metrics={...})`` (any other key is a
    field of :func:`kaviz.runs.register`, e.g. ``notes``). ``settings``: everything the notebook
    trained them with (``source``, data, teachers, students, schedule), JSON-able; it is the key of
    every run registered here.

    ``defaults`` (default: ``paper`` when it is a key of :data:`PAPERS`) names the entry of
    :data:`PAPERS` these settings are compared with, as ``{"source": "embedded", **PAPERS[defaults]}``:

    - equal (the notebook ran its embedded default): names are kept, and a name that is a default
      recipe (:func:`recipe`) is registered exactly as :func:`obtain` would register it — the
      recipe's key on this floating-point path, its record fields, its metrics computed by the
      recipe's own ``evaluate`` (``metrics`` given here are ignored for it) — so :func:`obtain`
      loads it without training;
    - different (other data, ``QUICK``/``SMOKE``, a changed schedule): every name gets the suffix
      ``-<8 hex digits of the settings>``, so a network trained otherwise never passes for a default one.

    A paper without an entry in :data:`PAPERS` (``defaults=None``): names are kept, the key is the settings.
    """
    import hashlib

    from . import runs
    if not isinstance(networks, Mapping) or not networks:
        raise ValueError(f"register_paper({paper!r}): networks must be a non-empty dict name -> "
                         "dict(model=..., method=..., seed=..., metrics=...)")
    defaults = defaults if defaults is not None else (paper if paper in PAPERS else None)
    if defaults is not None and defaults not in PAPERS:
        raise ValueError(f"register_paper({paper!r}): defaults={defaults!r} is not a key of kaviz.compare.PAPERS "
                         f"({list(PAPERS)})")
    text = _canonical_settings(settings)
    is_default = defaults is not None and text == _canonical_settings({"source": "embedded", **PAPERS[defaults]})
    suffix = "" if defaults is None or is_default else "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    names = []
    for name, entry in networks.items():
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ValueError(f"register_paper({paper!r}): networks[{name!r}] must be a dict with 'model' (and "
                             "method=, seed=, metrics=), got " + type(entry).__name__)
        fields = {k: v for k, v in entry.items() if k != "model"}
        model = entry["model"]
        try:
            r = recipe(name) if is_default else None
        except KeyError:
            r = None
        if r is not None:
            fields = _fields(r)
            metrics = r.evaluate(model)
            full = runs.run_key(name, r.key, device=device)
        else:
            fields.setdefault("paper", paper)
            metrics = fields.pop("metrics", None)
            name = name + suffix
            full = runs.run_key(name, settings, device=device)
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        runs.register(name, model, key=full, metrics=metrics, **fields)
        names.append(name)
    table = runs.list(names=names)
    table = table.set_index("name").loc[names].reset_index()[STABLE_COLUMNS]
    return table.astype({"seed": "Int64"}).set_index("name")


def _teacher(name: str) -> nn.Module:
    """A teacher for a student recipe: :func:`obtain` (so it is registered too)."""
    return obtain(name)


def network(source: str, name: str, *, num_classes: int | None = None, arch: str | None = None,
            arch_kwargs: Mapping | None = None, seed: int = 0) -> nn.Module:
    """A network to compare: ``source="registry"`` (a registered run, or a default recipe trained on
    demand), ``"torchvision"`` / ``"kaviz"`` (an architecture name built with random weights by
    ``seed`` — nothing is downloaded; pass ``arch_kwargs={"weights_path": ...}`` for your weights),
    or ``"checkpoint"`` (a local state dict at ``name`` for the architecture ``arch``)."""
    from . import runs, seed_everything
    from .models import build, load_weights

    if source == "registry":
        if runs.exists(name):
            return runs.load(name)
        try:
            recipe(name)
        except KeyError:
            raise runs.RunNotFoundError(f"no run named {name!r} is registered and it is not a default recipe "
                                        f"({', '.join(RECIPES)}); kaviz.runs.list() shows the registry") from None
        return obtain(name)
    if num_classes is None and source in ("torchvision", "kaviz", "checkpoint"):
        raise ValueError(f"network({source!r}, {name!r}): pass num_classes= (the size of the model's output)")
    if source in ("torchvision", "kaviz"):
        seed_everything(seed)
        return build(name, num_classes, **dict(arch_kwargs or {})).eval()
    if source == "checkpoint":
        if not arch:
            raise ValueError(f"network('checkpoint', {name!r}): say which architecture the weights are for, "
                             "e.g. arch='resnet18' (kaviz.models.available() lists the names)")
        return load_weights(build(arch, num_classes, **dict(arch_kwargs or {})), name).eval()
    raise ValueError(f"source must be 'registry', 'torchvision', 'kaviz' or 'checkpoint', got {source!r}")


def random_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """The control network: ``model``'s architecture (:func:`kaviz.models.spec`, including an LSHFM
    adaptation layer) with fresh random weights drawn with ``seed``, in eval mode."""
    from . import runs, seed_everything

    record = getattr(model, "kaviz_run", None)
    from .models import PROVENANCE_KEYS, spec

    own = spec(model)
    if record is None and "num_classes" not in own:
        raise ValueError(f"random_like: {type(model).__name__} was not built by kaviz; build the control yourself "
                         "with kaviz.models.build(arch, num_classes)")
    seed_everything(seed)
    if record is not None:
        out = runs.build_from_record(record)
    else:
        extra = {k: v for k, v in own.items() if k not in PROVENANCE_KEYS}
        adaptations = {k: extra.pop(k) for k in list(extra) if k in runs.ADAPTERS}
        out = runs.build_from_record({"arch": own["name"], "num_classes": own["num_classes"], "arch_kwargs": extra,
                                      "adaptations": adaptations})
    return out.eval()


# ----------------------------------------------------------------------------------- assembling
class _Subset(torch.utils.data.Subset):
    """The first ``n`` images of a split, with a fingerprint of their own (for feature caches)."""

    def __init__(self, dataset, n: int):
        from .data import fingerprint

        super().__init__(dataset, range(min(int(n), len(dataset))))
        self.fingerprint = f"{fingerprint(dataset)}-first{len(self.indices)}"
        self.classes = getattr(dataset, "classes", None)

    def image_array(self, i):
        return self.dataset.image_array(self.indices[i])


def probe_subset(data: PaperData, n: int):
    """The first ``n`` test images of a paper's split (its order is already shuffled by the split),
    the images every comparison of that paper's networks is made on; ``.image_array(i)`` for the explorer."""
    if not isinstance(n, int) or n < 8:
        raise ValueError(f"n (the number of probe images) must be an int >= 8, got {n!r}")
    return _Subset(data.test, n)


def first(dataset, n: int):
    """The first ``n`` items of a (fingerprinted) dataset, fingerprinted itself: e.g. the training
    images a Trans-Net of the consistency report is fitted on, when the whole split is not needed."""
    if not isinstance(n, int) or n < 8:
        raise ValueError(f"n must be an int >= 8, got {n!r}")
    return _Subset(dataset, n)


def control_table(students: Mapping[int, nn.Module], teacher: nn.Module, data, student_layer: str,
                  teacher_layer: str, *, pool: str = "none", debiased: bool = True):
    """One row per student seed: the debiased CKA of the student's ``student_layer`` with its
    teacher's ``teacher_layer`` on ``data`` (``network``), and the controls of
    :func:`kaviz.analysis.cka_controls` — the same teacher with shuffled samples (permutation by the
    seed) and a random-init network of the teacher's architecture (weights drawn with the seed)."""
    import pandas as pd

    from .analysis import cka_controls, layer_features

    ft = layer_features(teacher, data, teacher_layer, pool=pool)[teacher_layer]
    rows = []
    for seed, student in students.items():
        fs = layer_features(student, data, student_layer, pool=pool)[student_layer]
        fr = layer_features(random_like(teacher, seed=1000 + int(seed)), data, teacher_layer, pool=pool)[teacher_layer]
        rows.append({"seed": int(seed), **cka_controls(fs, ft, random=fr, seed=int(seed), debiased=debiased)})
    df = pd.DataFrame(rows).set_index("seed")
    df.attrs.update(student_layer=student_layer, teacher_layer=teacher_layer, n=len(ft))
    return df[["network", "random-init", "shuffled"]]


def probe_tables(models: Mapping[str, nn.Module], data, labels, layers: Mapping[str, Sequence[str]], *, cv: int = 3,
                 pool: str = "avg", control: bool = False, seed: int = 0) -> dict:
    """:func:`kaviz.analysis.linear_probe` of every network's ``layers[name]`` (pooled features of
    ``data``, labels ``labels``): a dict name → table, layers in the order given."""
    from .analysis import layer_features, linear_probe

    return {name: linear_probe(layer_features(m, data, layers[name], pool=pool), labels, cv=cv, control=control,
                               seed=seed)
            for name, m in models.items()}


class JointMaps:
    """The ``compute`` of a :class:`kaviz.widgets.EmbeddingExplorer` over pairs of networks: for the
    pair ``pair`` and its layer pair ``layer`` (``"<student layer> | <teacher layer>"``), a t-SNE /
    UMAP / PCA map of each network's features of the same images (:func:`kaviz.embed.embed`) — one
    common map of both when the two layers have the same width (``mode="joint"``), else one map per
    network — returned as two panels (student, teacher) linked by image: a selection in one panel
    shows where the same images lie in the other."""

    def __init__(self, pairs: Mapping[str, tuple], data: Mapping[str, object], labels: Mapping[str, np.ndarray],
                 pool: str = "avg"):
        self.pairs, self.data, self.labels, self.pool = dict(pairs), dict(data), dict(labels), pool
        self._features: dict = {}
        self.current = next(iter(self.pairs))

    def image(self, index: int):
        """The image ``index`` of the pair shown last (the explorer's ``images``)."""
        return self.data[self.current].image_array(int(index))

    def layers(self) -> dict:
        """pair → the layer choices (for the explorer's layer dropdown)."""
        return {p: [f"{ls} | {lt}" for ls, lt in v[2]] for p, v in self.pairs.items()}

    def _feat(self, pair, side, model, layer):
        key = (pair, side, layer)
        if key not in self._features:
            from .analysis import layer_features

            self._features[key] = layer_features(model, self.data[pair], layer, pool=self.pool)[layer]
        return self._features[key]

    def __call__(self, pair, layer, method, params):
        from .embed import embed

        student, teacher, _ = self.pairs[pair]
        self.current = pair
        ls, _, lt = layer.partition(" | ")
        feats = {"student": self._feat(pair, "s", student, ls), "teacher": self._feat(pair, "t", teacher, lt)}
        params = dict(params or {})
        if feats["student"].shape[1] == feats["teacher"].shape[1]:
            df = embed(feats, labels=self.labels[pair], method=method, mode="joint", **params)
            return df[df.source == "student"], df[df.source == "teacher"]
        return tuple(embed({k: v}, labels=self.labels[pair], method=method, **params) for k, v in feats.items())


# --------------------------------------------------------------------------------------- figures
def cka_heatmap(df, title: str = "CKA", zmin: float = 0.0, zmax: float = 1.0):
    """A layer × layer CKA matrix (:func:`kaviz.analysis.cka_matrix`) as a plotly heatmap, values
    written in the cells; rows: network A's layers (top to bottom), columns: network B's."""
    import plotly.graph_objects as go

    from .plots import wrap_title

    z = df.to_numpy(dtype=float)
    text = [[("—" if not np.isfinite(v) else f"{v:.2f}") for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in df.columns], y=[str(i) for i in df.index], text=text,
                               texttemplate="%{text}", colorscale="Viridis", zmin=zmin, zmax=zmax,
                               colorbar=dict(title="CKA")))
    fig.update_yaxes(autorange="reversed", title=df.index.name or "A")
    fig.update_xaxes(title=df.columns.name or "B")
    width = 220 + 90 * len(df.columns)
    title = wrap_title(title, width)
    extra = _extra_title_px(title)
    return fig.update_layout(title=title, height=120 + 45 * len(df.index) + extra, width=width, margin_t=80 + extra)


def probe_curves(tables: Mapping, title: str = "linear-probe accuracy per layer"):
    """Probe accuracy (mean ± std over folds) per layer, one line per network: ``tables`` maps a
    network's name to its :func:`kaviz.analysis.linear_probe` table (layers in depth order); the
    shuffled-label control (when probed) dotted, and chance as a grey line."""
    import plotly.graph_objects as go

    from .plots import palette, wrap_title

    fig = go.Figure()
    colors = palette(len(tables))
    chance = None
    for (name, t), c in zip(tables.items(), colors):
        x = list(range(1, len(t) + 1))
        hover = [str(l) for l in t.index]
        fig.add_trace(go.Scatter(x=x, y=t["accuracy"], error_y=dict(array=t["std"]), mode="lines+markers", name=name,
                                 line=dict(color=c), text=hover, hovertemplate="%{text}: %{y:.3f}<extra>" + name +
                                 "</extra>"))
        if "shuffled" in t:
            fig.add_trace(go.Scatter(x=x, y=t["shuffled"], mode="lines", name=f"{name}, shuffled labels",
                                     line=dict(color=c, dash="dot")))
        chance = float(t["chance"].max()) if chance is None else max(chance, float(t["chance"].max()))
    if chance is not None:
        fig.add_hline(y=chance, line=dict(color="grey", dash="dash"), annotation_text="majority class")
    title = wrap_title(title)
    return fig.update_layout(title=title, xaxis_title="layer (depth order; hover for names)",
                             yaxis_title="accuracy (cross-validated)", yaxis_range=[0, 1.02],
                             height=380 + _extra_title_px(title), margin_t=80 + _extra_title_px(title))


def consistency_bars(table, title: str = "which teacher explains the student's feature?"):
    """The consistency report (:func:`kaviz.analysis.teacher_consistency`) as stacked bars: per
    teacher, the share of the student's feature variance in each order's consistent component and
    in the inconsistent rest x^Δ."""
    import plotly.graph_objects as go

    from .plots import palette, wrap_title

    orders = [c for c in table.columns if c.startswith("share ") and c not in ("share g(x_A)", "share x^Δ")]
    cols = orders + ["share x^Δ"]
    colors = palette(len(cols))
    fig = go.Figure()
    for c, col in zip(cols, colors):
        fig.add_trace(go.Bar(x=[str(i) for i in table.index], y=table[c], name=c.replace("share ", ""),
                             marker_color="lightgrey" if c == "share x^Δ" else col))
    title = wrap_title(title)
    return fig.update_layout(barmode="group", title=title, yaxis_title="share of Var(x_S)",
                             height=380 + _extra_title_px(title), margin_t=80 + _extra_title_px(title))


def _extra_title_px(title: str) -> int:
    """The height (px) a title wrapped by :func:`kaviz.plots.wrap_title` adds: 22 px a line beyond the first."""
    return 22 * title.count("<br>")


# ---------------------------------------------------------------------------------------- widget
class NetworkPicker:
    """Pick two networks (registry, torchvision/kaviz architecture, or local checkpoint) and their
    layers, then compute their layer × layer CKA on ``data`` into a heatmap.

    ``networks``: the initial choices ``{"a": name, "b": name}`` (registry names). ``num_classes``:
    for architectures and checkpoints. ``compute(model_a, model_b, layers_a, layers_b) -> DataFrame``
    defaults to :func:`kaviz.analysis.cka_matrix` on ``data``. ``load`` (defaults to :func:`network`)
    turns a side's (source, name, arch) into a model. In a kernel it shows widgets; the stored
    notebook shows :meth:`figure` (the last heatmap). Errors go to ``status``, never lost.
    """

    SOURCES = ("registry", "torchvision", "kaviz", "checkpoint")

    def __init__(self, data, *, networks: Mapping[str, str], num_classes: int | None = None,
                 registry: Sequence[str] | None = None, compute: Callable | None = None,
                 load: Callable | None = None, max_layers: int = 6, batch_size: int = 128, max_batches=None):
        import ipywidgets as W
        import plotly.graph_objects as go

        self.data, self.num_classes, self.max_layers = data, num_classes, int(max_layers)
        self._load = load or (lambda source, name, arch: network(source, name, num_classes=num_classes, arch=arch))
        if compute is None:
            from .analysis import cka_matrix

            def compute(a, b, la, lb):
                return cka_matrix(a, b, data, la, lb, batch_size=batch_size, max_batches=max_batches,
                                  progress=False)
        self._compute = compute
        from . import runs

        names = list(dict.fromkeys(list(registry if registry is not None else RECIPES) +
                                   (runs.list()["name"].tolist() if registry is None else [])))
        self.models: dict = {}
        self.result = None
        self.sides = {}
        for side in ("a", "b"):
            if side not in networks:
                raise ValueError(f"networks must name side {side!r}: e.g. networks={{'a': 'cfl-student-seed0', "
                                 "'b': 'cfl-teacher-shapes'}}")
            src = W.Dropdown(options=self.SOURCES, value="registry", description=f"{side.upper()} from")
            name = W.Combobox(options=names, value=str(networks[side]), description="name", ensure_option=False,
                              placeholder="run name / arch name / path")
            arch = W.Text(value="", description="arch", placeholder="for a checkpoint: e.g. resnet18")
            layers = W.SelectMultiple(options=[], rows=6, description="layers")
            self.sides[side] = dict(source=src, name=name, arch=arch, layers=layers)
            name.observe(lambda change, s=side: self._on_network(s), names="value")
            src.observe(lambda change, s=side: self._on_network(s), names="value")
        self.button = W.Button(description="compare", button_style="primary")
        self.button.on_click(lambda _: self.run())
        self.status = W.HTML("")
        self.figure_widget = go.FigureWidget()
        cols = [W.VBox([s["source"], s["name"], s["arch"], s["layers"]]) for s in self.sides.values()]
        self.widget = W.VBox([W.HBox(cols), W.HBox([self.button, self.status]), self.figure_widget])
        for side in self.sides:
            self._on_network(side)
        self.run()

    def _on_network(self, side: str) -> bool:
        from .models import stages

        s = self.sides[side]
        try:
            model = self._load(s["source"].value, s["name"].value, s["arch"].value or None)
        except Exception as e:  # noqa: BLE001 (shown to the user; the previous choice stays)
            self.status.value = f"<span style='color:#b00'>{side.upper()}: {type(e).__name__}: {_esc(e)}</span>"
            return False
        self.models[side] = model
        options = stages(model)
        s["layers"].options = options
        s["layers"].value = tuple(options[-self.max_layers:])
        self.status.value = ""
        return True

    def layers(self, side: str) -> list:
        return list(self.sides[side]["layers"].value)

    def run(self) -> bool:
        """Compute the CKA heatmap of the current choice (the button does this)."""
        if set(self.models) != {"a", "b"}:
            return False
        la, lb = self.layers("a"), self.layers("b")
        if not la or not lb:
            self.status.value = "<span style='color:#b00'>choose at least one layer of each network</span>"
            return False
        try:
            df = self._compute(self.models["a"], self.models["b"], la, lb)
        except Exception as e:  # noqa: BLE001
            self.status.value = f"<span style='color:#b00'>{type(e).__name__}: {_esc(e)}</span>"
            return False
        self.result = df
        na, nb = self.sides["a"]["name"].value, self.sides["b"]["name"].value
        fig = cka_heatmap(df.rename_axis(index=f"A: {na}", columns=f"B: {nb}"), title=f"CKA: {na} vs {nb}")
        fw = self.figure_widget
        with fw.batch_update():
            fw.data = []
            fw.add_traces(fig.data)
            fw.update_layout(fig.to_dict()["layout"], overwrite=True)
        self.status.value = f"N = {df.attrs.get('n', '?')} images"
        return True

    def figure(self):
        """The current heatmap as a plain figure (the static fallback)."""
        import plotly.graph_objects as go

        return go.Figure(self.figure_widget)

    def _ipython_display_(self):
        from IPython.display import display

        from .widgets import in_kernel, sync_views

        display(sync_views(self.widget) if in_kernel() else self.figure())


def _esc(e) -> str:
    import html

    return html.escape(str(e))
