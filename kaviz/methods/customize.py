"""Customised amalgamation from heterogeneous teachers (SPEC.md §5).

Shen, Wang, Song, Wang & Song, "Customizing Student Networks From Heterogeneous Teachers via
Adaptive Knowledge Amalgamation", ICCV 2019 (the attribute experiment).

Sources are multi-head classifiers (:class:`MultiHead`, one 2-way head per attribute) covering
overlapping attribute sets. A user wants a network for a *group* of attributes that no single
source covers. Three steps, each trained with :func:`kaviz.train.fit`:

1. **Selective learning** (:func:`select_sources`): for every unlabeled image and every source
   covering attribute a, the entropy of that head, ``H = -Σ_k p_k log p_k`` with
   ``log p = log_softmax(z)`` (finite for any logits); the image is assigned to the source with the
   lowest entropy (ties: the first source).
2. **Component net** per attribute (:class:`ComponentAmalgamation`, a single 2-way head), learned
   from its sources, each on its own assigned images, at the hooked blocks l (ResNet's ``conv1``,
   ``layer1``..``layer4``): 1×1 projections into common widths from the component (``P^s_l``, shared)
   and from each source (``P^t_l``); per source t::

       Σ_l MSE(P^s_l(F^comp_l), P^t_l(F^src_l)) + MSE(m_t · z^comp, z^src_a) + R(P^t)

   with a learnable scalar ``m_t`` (init 1) on the component's logits and the unit-norm regulariser
   ``R(P) = Σ_l mean_o (‖w_o‖² − 1)²`` over the rows ``w_o`` of the source-side projections (without
   it, both projections collapse to zero and the feature term vanishes).
3. **Target net** (:class:`TargetAmalgamation`): one network, wider than a component, one head per
   attribute of the group; for each component a (frozen)::

       Σ_l MSE(P_{a,l}(F^target_l), F^comp_a_l) + MSE(m_a · z^target_a, z^comp_a)

Labels are never read while amalgamating (only to pick the best epoch on the validation split and
to report accuracy). The reference implementation's faults are avoided: a data iterator that dies
after two passes (``fit`` makes a fresh one every epoch), a step schedule stepped per iteration
(``schedule="step"`` steps per epoch), a loop that trains only the last component (each component
is its own ``fit`` run; :func:`amalgamate_components` returns all of them with their histories),
misspelt attribute names (names are checked against the data's ``classes``).
"""
from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..features import FeatureTap, eval_mode
from ..train import Frozen, freeze

__all__ = [
    "BLOCKS",
    "default_blocks",
    "MultiHead",
    "MultiHeadSupervised",
    "train_source",
    "head_entropy",
    "predict",
    "select_from_logits",
    "Assignment",
    "select_sources",
    "AssignedImages",
    "unit_norm_penalty",
    "block_shapes",
    "ComponentAmalgamation",
    "TargetAmalgamation",
    "amalgamate_component",
    "amalgamate_components",
    "amalgamate_target",
    "attribute_accuracy",
    "accuracy_table",
    "AttributeTask",
    "attribute_task",
    "EMBEDDED_GROUP",
    "EMBEDDED_SOURCES",
    "CELEBA_GROUP",
    "CELEBA_SOURCES",
    "run",
    "CustomizeResult",
    "summarise",
    "comparison",
    "assignment_table",
    "assigned_examples",
    "example_images",
    "selection_table",
    "coverage_table",
    "majority_baseline",
]

#: Hooked blocks and the common projection widths per architecture family. ResNet-18 in the paper:
#: ``conv1, layer1..layer4`` (64, 64, 128, 256, 512 channels) projected to (32, 32, 64, 128, 256),
#: half the channels. kaviz's CIFAR ResNets have three stages, ``conv1, layer1..layer3`` (w, w, 2w,
#: 4w channels); the same ratio for the default width w = 16 gives (8, 8, 16, 32).
BLOCKS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "resnet": (("conv1", "layer1", "layer2", "layer3", "layer4"), (32, 32, 64, 128, 256)),
    "cifar_resnet": (("conv1", "layer1", "layer2", "layer3"), (8, 8, 16, 32)),
}

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


def _family(arch: str) -> str:
    from ..models import family

    fam = family(arch)
    if fam.startswith("torchvision:"):
        fam = fam.split(":", 1)[1]
    return fam


def default_blocks(arch: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(blocks, widths)`` hooked for architecture ``arch`` (see :data:`BLOCKS`)."""
    fam = _family(arch)
    if fam not in BLOCKS:
        raise ValueError(
            f"no default hooked blocks for architecture {arch!r} (family {fam!r}); known families: "
            f"{sorted(BLOCKS)}. Pass blocks=[...] (module names of the backbone, e.g. from "
            "kaviz.features.list_layers(model.backbone)) and widths=[...] (one per block)."
        )
    return BLOCKS[fam]


# ------------------------------------------------------------------------------------ multi-head net
def _check_names(heads) -> list[str]:
    if isinstance(heads, str):
        heads = [heads]
    heads = list(heads)
    if not heads:
        raise ValueError("a MultiHead needs at least one head (an attribute name)")
    for h in heads:
        if not isinstance(h, str) or not h or "." in h:
            raise ValueError(f"head names must be non-empty strings without '.', got {h!r}")
    dup = sorted({h for h in heads if heads.count(h) > 1})
    if dup:
        raise ValueError(f"head names must be distinct; {dup} appear more than once")
    return heads


def _strip_classifier(model: nn.Module) -> int:
    """Replace the model's final ``nn.Linear`` by ``nn.Identity``; return its input width."""
    from ..models import classifier_name

    name = classifier_name(model)
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, leaf)
    setattr(parent, leaf, nn.Identity())
    return linear.in_features


class MultiHead(nn.Module):
    """A backbone with one ``n_way`` head per attribute: ``forward(x)`` is ``(B, A, n_way)`` logits.

    ``backbone``: an architecture name for :func:`kaviz.models.build` (with ``**arch_kwargs``) or a
    ready ``nn.Module`` ending in an ``nn.Linear`` classifier, which is replaced by the heads (its
    pooled input feeds them). Heads live in ``heads`` (an ``nn.ModuleDict`` keyed by attribute name);
    hooked blocks are named inside ``backbone`` (``model.backbone.layer1``).
    """

    def __init__(self, backbone: str | nn.Module, heads: Sequence[str], *, n_way: int = 2, **arch_kwargs):
        super().__init__()
        from ..models import build, spec

        heads = _check_names(heads)
        if isinstance(backbone, str):
            arch = backbone
            backbone = build(arch, 1, **arch_kwargs)
        elif isinstance(backbone, nn.Module):
            if arch_kwargs:
                raise ValueError(f"arch_kwargs {sorted(arch_kwargs)} only apply when backbone is an architecture name")
            arch = spec(backbone).get("name", type(backbone).__name__)
        else:
            raise TypeError(f"backbone must be an architecture name or an nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone
        self.in_features = _strip_classifier(backbone)
        self.heads = nn.ModuleDict({h: nn.Linear(self.in_features, n_way) for h in heads})
        self.arch = arch
        self.kaviz_spec = {"name": f"multihead:{arch}", "heads": list(heads), "n_way": n_way, **arch_kwargs}

    @property
    def attributes(self) -> list[str]:
        return list(self.heads.keys())

    def head_index(self, attribute: str) -> int:
        if attribute not in self.heads:
            raise KeyError(f"this network has no head {attribute!r}; its heads: {self.attributes}")
        return self.attributes.index(attribute)

    def forward(self, x):
        f = self.backbone(x).flatten(1)
        return torch.stack([h(f) for h in self.heads.values()], dim=1)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, Frozen) else model


def _columns(classes, attributes, what="data") -> list[int]:
    if classes is None:
        raise ValueError(f"the {what} has no `classes` (attribute names); build it with classes=[...]")
    classes = list(classes)
    cols = []
    for a in attributes:
        if a not in classes:
            close = difflib.get_close_matches(a, classes, n=3, cutoff=0.5)
            hint = f"closest: {close}" if close else f"its attributes: {classes}"
            raise KeyError(f"attribute {a!r} is not in the {what}; {hint}")
        cols.append(classes.index(a))
    return cols


# --------------------------------------------------------------------------------------- sources
class MultiHeadSupervised(nn.Module):
    """Supervised training of a :class:`MultiHead` on attribute targets (N, A_data) of 0/1:
    ``{"ce": mean over heads of the cross-entropy}``. ``classes`` (the data's attribute names) maps
    each head to its target column. ``evaluate`` reports ``accuracy`` (mean over heads) and
    ``accuracy/<attribute>``."""

    def __init__(self, model: MultiHead, classes: Sequence[str]):
        super().__init__()
        self.model = model
        self.columns = _columns(classes, model.attributes)

    def forward(self, batch):
        x, y = batch[0], batch[1]
        if not torch.is_tensor(y) or y.dim() != 2:
            raise TypeError("MultiHeadSupervised needs attribute targets of shape (B, A) (0/1 per attribute), "
                            f"got {type(y).__name__} {tuple(y.shape) if torch.is_tensor(y) else ''}")
        logits = self.model(x)
        target = y[:, self.columns].long()
        return {"ce": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))}

    def evaluate(self, data) -> dict:
        acc = attribute_accuracy(self.model, data)
        return {"accuracy": float(np.mean(list(acc.values()))), **{f"accuracy/{k}": v for k, v in acc.items()}}


def train_source(arch: str, attributes: Sequence[str], train_data, val_data=None, *, epochs: int = 5,
                 lr: float = 1e-3, batch_size: int = 64, optimizer: str = "adam", weight_decay: float = 5e-4,
                 schedule: str | None = "cosine", seed: int = 0, arch_kwargs: Mapping | None = None,
                 cache: bool | str | os.PathLike = True, device=None, progress: bool | None = None):
    """Train (or load from the teacher cache) a multi-head source net; returns ``(model, history)``.

    Like :func:`kaviz.train.train_teacher` (same cache folder, same key ingredients: architecture,
    heads, data fingerprints, every setting, the seed), for a :class:`MultiHead` trained with
    :class:`MultiHeadSupervised` on the columns of ``attributes``. The model is returned in eval mode.
    """
    from .. import seed_everything
    from ..train import cache_dir, cached_training, fit, history_frame, history_meta, teacher_key

    attributes = _check_names(attributes)
    _columns(getattr(train_data, "classes", None), attributes, "training data")
    arch_kwargs = dict(arch_kwargs or {})
    settings = dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
                    schedule=schedule, seed=seed, heads=list(attributes), classes=list(train_data.classes),
                    arch_kwargs=arch_kwargs)
    key = teacher_key(f"multihead:{arch}", len(attributes), train_data, val_data, device=device, **settings)
    folder = None
    if cache:
        folder = Path(cache) if isinstance(cache, (str, os.PathLike)) and not isinstance(cache, bool) else cache_dir("teachers")
    fresh = {}

    def train():
        seed_everything(seed)
        model = MultiHead(arch, attributes, **arch_kwargs)
        history = fresh["history"] = fit(
            MultiHeadSupervised(model, train_data.classes), train_data, val_data, epochs=epochs, lr=lr,
            batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay, schedule=schedule, seed=seed,
            device=device, progress=progress)
        return model, {"arch": arch, "heads": attributes, "settings": settings, **history_meta(history)}

    model, meta, cached = cached_training(folder, f"multihead-{arch}", key,
                                          lambda: MultiHead(arch, attributes, **arch_kwargs), train,
                                          what=f"source net {arch!r} {list(attributes)}")
    return model, history_frame(meta, cached, fresh.get("history"))


# ------------------------------------------------------------------------------------- selection
def head_entropy(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Entropy of softmax over the last axis, ``H = -Σ_k p_k log p_k`` with ``log p = log_softmax``.

    Computed from ``log_softmax`` so that it stays finite for any finite logits (``softmax`` then
    ``log`` gives ``0 · log 0 = nan`` once a probability underflows)."""
    z = torch.as_tensor(logits).float()
    logp = F.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def predict(model: nn.Module, data, batch_size: int = 256) -> np.ndarray:
    """The model's outputs on every sample of ``data`` in order (``(N, A, 2)`` for a MultiHead)."""
    from ..features import OUTPUT, extract

    return extract(model, data, OUTPUT, pool="none", batch_size=batch_size, progress=False)[OUTPUT]


def select_from_logits(logits) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` (N, S, K): the K-way logits of the same attribute head from S sources. Returns
    ``(index (N,), entropy (N, S))``: per image, the source whose head has the lowest entropy
    (the first one on ties)."""
    z = torch.as_tensor(np.asarray(logits)).float()
    if z.dim() != 3 or z.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, sources, classes), got {tuple(z.shape)}")
    H = head_entropy(z)
    return H.argmin(dim=1).numpy().astype(np.int64), H.numpy()


@dataclass
class Assignment:
    """Which source teaches attribute ``attribute`` on each image (SPEC §5, step 1).

    ``sources``: names of the sources covering the attribute (in the given order); ``index`` (N,):
    position in ``sources`` of the source assigned to each image; ``entropy`` (N, S) and ``logits``
    (N, S, 2): each source's head on each image."""

    attribute: str
    sources: list[str]
    index: np.ndarray
    entropy: np.ndarray
    logits: np.ndarray

    def shares(self):
        """Share of images assigned to each source (a pandas Series)."""
        import pandas as pd

        counts = np.bincount(self.index, minlength=len(self.sources))
        return pd.Series(counts / max(len(self.index), 1), index=self.sources, name=self.attribute)

    def images_of(self, source: str) -> np.ndarray:
        """Indices of the images assigned to ``source``."""
        if source not in self.sources:
            raise KeyError(f"source {source!r} does not cover {self.attribute!r}; the sources that do: {self.sources}")
        return np.flatnonzero(self.index == self.sources.index(source))

    def __len__(self):
        return len(self.index)


def select_sources(sources: Mapping[str, MultiHead], attributes: str | Sequence[str], data, *,
                   batch_size: int = 256, logits: Mapping[str, np.ndarray] | None = None) -> dict[str, Assignment]:
    """Entropy-based selective learning for each attribute: ``{attribute: Assignment}``.

    Every source's outputs on ``data`` are computed once (or taken from ``logits``, ``{source name:
    (N, A_t, 2)}``, e.g. from :func:`predict`) and shared by the attributes. Labels are not read.
    """
    from ..data import Unlabeled

    attributes = _check_names(attributes)
    if not sources:
        raise ValueError("select_sources needs at least one source")
    logits = dict(logits or {})
    out = {}
    for a in attributes:
        names = [s for s, m in sources.items() if a in m.attributes]
        if not names:
            cover = {s: m.attributes for s, m in sources.items()}
            raise ValueError(f"no source covers attribute {a!r}; the sources cover {cover}")
        for s in names:
            if s not in logits:
                logits[s] = predict(sources[s], Unlabeled(data), batch_size)
        z = np.stack([logits[s][:, sources[s].head_index(a)] for s in names], axis=1)
        index, H = select_from_logits(z)
        out[a] = Assignment(a, names, index, H, z)
    return out


class AssignedImages(torch.utils.data.Dataset):
    """``(image, assigned source index)`` for every image of ``data`` (its targets are never read)."""

    def __init__(self, data, index):
        index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        if index.dim() != 1 or len(index) != len(data):
            raise ValueError(f"the assignment has {tuple(index.shape)} entries for {len(data)} images; "
                             "select on the same data you train on")
        from ..data import Unlabeled

        self.images = Unlabeled(data)
        self.index = index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.images[i], self.index[i]

    @property
    def fingerprint(self) -> str:
        from ..data import fingerprint

        h = hashlib.sha1(fingerprint(self.images).encode())
        h.update(self.index.numpy().tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------------------------- amalgamation
def unit_norm_penalty(weight: torch.Tensor) -> torch.Tensor:
    """``mean_o (‖w_o‖² − 1)²`` over the output rows ``w_o`` of a (1×1 conv or linear) weight: zero
    exactly when every row has unit norm; keeps source-side projections from collapsing to zero."""
    rows = weight.reshape(weight.shape[0], -1)
    return ((rows.pow(2).sum(1) - 1.0) ** 2).mean()


def block_shapes(model: nn.Module, blocks: Sequence[str], image_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """``(C, H, W)`` of each hooked block of ``model`` (a :class:`MultiHead`, possibly frozen) for one
    image of shape ``image_shape``; raises if a block is unknown or does not give a feature map."""
    net = _unwrap(model)
    backbone = net.backbone if isinstance(net, MultiHead) else net
    x = torch.zeros(1, *image_shape, device=next(net.parameters()).device)
    with eval_mode(net), torch.no_grad(), FeatureTap(backbone, list(blocks)) as tap:
        net(x)
        shapes = [tuple(tap[b].shape[1:]) for b in blocks]
    for b, s in zip(blocks, shapes):
        if len(s) != 3:
            raise ValueError(f"block {b!r} gives features of shape {s}, not a (C, H, W) map; hook convolutional blocks")
    return shapes


def _conv1x1(cin, cout):
    return nn.Conv2d(cin, cout, 1, bias=False)


def _tap(model, blocks, detach):
    net = _unwrap(model)
    return FeatureTap(net.backbone, list(blocks), detach=detach)


def _check_same_grid(blocks, a, b, what):
    for blk, sa, sb in zip(blocks, a, b):
        if sa[1:] != sb[1:]:
            raise ValueError(
                f"block {blk!r}: the {what[0]} map is {sa[1]}×{sa[2]} but the {what[1]} map is {sb[1]}×{sb[2]}; the "
                "block-wise loss compares maps position by position. Hook blocks at the same resolution "
                "(same family and input size), e.g. blocks=default_blocks(arch)[0]."
            )


class ComponentAmalgamation(nn.Module):
    """Step 2 of SPEC §5: a single-head component for ``attribute`` from the sources covering it.

    ``forward((images, source_index))`` (batches of :class:`AssignedImages`) returns
    ``{"feat", "logit", "reg"}``: per source t on its own images of the batch, the block-wise
    projection loss and the scaled-logit loss, weighted by the share of the batch it was given (so
    every image counts once), and the unit-norm regulariser of all source-side projections.
    Trainable: the component, ``proj_c`` (component side, shared), ``proj_t`` (per source) and
    ``scale`` (m_t, one per source, initialised to 1). Sources are frozen.
    """

    def __init__(self, component: MultiHead, sources: Sequence[MultiHead], attribute: str, *,
                 image_shape: Sequence[int], blocks: Sequence[str] | None = None, widths: Sequence[int] | None = None):
        super().__init__()
        if not isinstance(component, MultiHead) or component.attributes != [attribute]:
            got = component.attributes if isinstance(component, MultiHead) else type(component).__name__
            raise ValueError(f"the component must be a MultiHead with the single head [{attribute!r}], got {got}")
        if not sources:
            raise ValueError(f"no source given for attribute {attribute!r}")
        for k, s in enumerate(sources):
            if attribute not in _unwrap(s).attributes:
                raise ValueError(f"source #{k} has no head {attribute!r}; its heads: {_unwrap(s).attributes}")
        if blocks is None:
            blocks, default_widths = default_blocks(component.arch)
            widths = default_widths if widths is None else widths
        blocks, widths = list(blocks), list(widths) if widths is not None else None
        if widths is None or len(widths) != len(blocks):
            raise ValueError(f"give one common width per hooked block: {len(blocks)} blocks {blocks}, widths {widths}")
        self.attribute = attribute
        self.blocks = blocks
        self.widths = widths
        self.component = component
        self.sources = nn.ModuleList([freeze(s) for s in sources])
        self.heads = [_unwrap(s).head_index(attribute) for s in sources]
        comp_shapes = block_shapes(component, blocks, image_shape)
        self.proj_c = nn.ModuleList([_conv1x1(s[0], w) for s, w in zip(comp_shapes, widths)])
        proj_t = []
        for s in sources:
            shapes = block_shapes(s, blocks, image_shape)
            _check_same_grid(blocks, comp_shapes, shapes, ("component", "source"))
            proj_t.append(nn.ModuleList([_conv1x1(sh[0], w) for sh, w in zip(shapes, widths)]))
        self.proj_t = nn.ModuleList(proj_t)
        self.scale = nn.Parameter(torch.ones(len(sources)))

    def regulariser(self) -> torch.Tensor:
        """``Σ_t Σ_l mean_o (‖w_o‖² − 1)²`` over the source-side projections."""
        return sum(unit_norm_penalty(p.weight) for group in self.proj_t for p in group)

    def forward(self, batch):
        x, index = batch[0], batch[1]
        if not torch.is_tensor(index) or index.dim() != 1 or len(index) != len(x) or index.dtype != torch.int64:
            raise ValueError("a component batch is (images, assigned source index (B,) int64); wrap the images "
                             "with AssignedImages(data, assignment.index)")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self.sources)):
            raise ValueError(f"assigned source indices must lie in [0, {len(self.sources)}), got "
                             f"{int(index.min())}..{int(index.max())}")
        with _tap(self.component, self.blocks, detach=False) as tap:
            z = self.component(x)[:, 0]
            fc = [tap[b] for b in self.blocks]
        B = len(x)
        feat = x.new_zeros(())
        logit = x.new_zeros(())
        for t, src in enumerate(self.sources):
            mask = index == t
            n = int(mask.sum())
            if n == 0:
                continue
            with _tap(src, self.blocks, detach=True) as stap:
                zs = src(x[mask])[:, self.heads[t]]
                fs = [stap[b] for b in self.blocks]
            w = n / B
            feat = feat + w * sum(F.mse_loss(pc(f[mask]), pt(g))
                                  for pc, pt, f, g in zip(self.proj_c, self.proj_t[t], fc, fs))
            logit = logit + w * F.mse_loss(self.scale[t] * z[mask], zs)
        return {"feat": feat, "logit": logit, "reg": self.regulariser()}

    def evaluate(self, data) -> dict:
        return {"accuracy": attribute_accuracy(self.component, data)[self.attribute]}


class TargetAmalgamation(nn.Module):
    """Step 3 of SPEC §5: the target net learns every component of the group on all images.

    ``forward(images)`` returns ``{"feat", "logit"}`` summed over components a:
    ``Σ_l MSE(P_{a,l}(F^target_l), F^comp_a_l)`` and ``MSE(m_a · z^target_a, z^comp_a)``.
    ``P_{a,l}`` maps the target's block l to component a's channels (1×1 conv; ``proj[l]`` stacks
    them for all components, :meth:`projection` gives one); ``scale`` holds m_a (init 1).
    Components are frozen.
    """

    def __init__(self, target: MultiHead, components: Mapping[str, MultiHead], *, image_shape: Sequence[int],
                 blocks: Sequence[str] | None = None):
        super().__init__()
        if not components:
            raise ValueError("TargetAmalgamation needs at least one component")
        names = list(components)
        if not isinstance(target, MultiHead) or sorted(target.attributes) != sorted(names):
            got = target.attributes if isinstance(target, MultiHead) else type(target).__name__
            raise ValueError(f"the target must be a MultiHead with one head per component {names}, got {got}")
        for a, c in components.items():
            if _unwrap(c).attributes != [a]:
                raise ValueError(f"component {a!r} must have the single head [{a!r}], got {_unwrap(c).attributes}")
        self.blocks = list(blocks) if blocks is not None else list(default_blocks(target.arch)[0])
        self.attributes = names
        self.target = target
        self.components = nn.ModuleDict({a: freeze(c) for a, c in components.items()})
        self.heads = [target.head_index(a) for a in names]
        t_shapes = block_shapes(target, self.blocks, image_shape)
        self.channels = []  # per block: each component's channel count, in attribute order
        for a, c in components.items():
            shapes = block_shapes(c, self.blocks, image_shape)
            _check_same_grid(self.blocks, t_shapes, shapes, ("target", f"component {a!r}"))
            self.channels.append([sh[0] for sh in shapes])
        self.channels = [list(cs) for cs in zip(*self.channels)]
        # P_{a,l} for every component a stacked along the output channels: one 1×1 conv per block
        # computes all of them at once (the same maps as separate convs, in fewer, larger calls)
        self.proj = nn.ModuleList([_conv1x1(ts[0], sum(cs)) for ts, cs in zip(t_shapes, self.channels)])
        self.scale = nn.Parameter(torch.ones(len(names)))

    def projection(self, attribute: str, block: int) -> torch.Tensor:
        """The weight of ``P_{attribute, block}`` (its rows of the stacked 1×1 conv)."""
        k = self.attributes.index(attribute)
        start = sum(self.channels[block][:k])
        return self.proj[block].weight[start:start + self.channels[block][k]]

    def forward(self, batch):
        from .kd import images_of

        x = images_of(batch)
        with _tap(self.target, self.blocks, detach=False) as tap:
            z = self.target(x)
            projected = [p(tap[b]).split(cs, dim=1) for p, b, cs in zip(self.proj, self.blocks, self.channels)]
        feat = x.new_zeros(())
        logit = x.new_zeros(())
        for k, a in enumerate(self.attributes):
            comp = self.components[a]
            with _tap(comp, self.blocks, detach=True) as ctap:
                zc = comp(x)[:, 0]
                feat = feat + sum(F.mse_loss(pr[k], ctap[b]) for pr, b in zip(projected, self.blocks))
            logit = logit + F.mse_loss(self.scale[k] * z[:, self.heads[k]], zc)
        return {"feat": feat, "logit": logit}

    def evaluate(self, data) -> dict:
        acc = attribute_accuracy(self.target, data)
        return {"accuracy": float(np.mean([acc[a] for a in self.attributes])),
                **{f"accuracy/{a}": acc[a] for a in self.attributes}}


def _image_shape(data) -> tuple[int, ...]:
    get = getattr(data, "get_image", None)
    x = get(0) if get is not None else data[0][0]
    return tuple(x.shape)


def amalgamate_component(attribute: str, sources: Mapping[str, MultiHead], train_data, val_data=None, *,
                         arch: str = "cifar_resnet8", arch_kwargs: Mapping | None = None,
                         blocks: Sequence[str] | None = None, widths: Sequence[int] | None = None,
                         assignment: Assignment | None = None, component: MultiHead | None = None,
                         epochs: int = 4, lr: float = 1e-3, batch_size: int = 64, schedule="step", seed: int = 0,
                         **fit_kwargs):
    """Select sources by entropy on ``train_data`` (unless ``assignment`` is given), then train a
    component for ``attribute`` with :class:`ComponentAmalgamation` and :func:`kaviz.train.fit`
    (``schedule="step"``: ×0.1 at half the epochs, stepped per epoch). The best epoch on
    ``val_data`` (component accuracy) is restored. Returns ``(component, history, assignment)``."""
    from .. import seed_everything
    from ..train import fit

    if assignment is None:
        assignment = select_sources(sources, attribute, train_data)[attribute]
    elif assignment.attribute != attribute or len(assignment) != len(train_data):
        raise ValueError(f"the assignment is for {assignment.attribute!r} on {len(assignment)} images, "
                         f"not for {attribute!r} on the {len(train_data)} training images")
    if component is None:
        seed_everything(seed)
        component = MultiHead(arch, [attribute], **dict(arch_kwargs or {}))
    method = ComponentAmalgamation(component, [sources[s] for s in assignment.sources], attribute,
                                   image_shape=_image_shape(train_data), blocks=blocks, widths=widths)
    fit_kwargs.setdefault("val_losses", False)
    history = fit(method, AssignedImages(train_data, assignment.index), val_data, epochs=epochs, lr=lr,
                  batch_size=batch_size, schedule=schedule, seed=seed, **fit_kwargs)
    history.attrs["scale"] = dict(zip(assignment.sources, method.scale.detach().cpu().tolist()))
    return component.cpu().eval(), history, assignment


def amalgamate_components(sources: Mapping[str, MultiHead], attributes: Sequence[str], train_data, val_data=None, *,
                          assignments: Mapping[str, Assignment] | None = None,
                          components: Mapping[str, MultiHead] | None = None, seed: int = 0, **kwargs):
    """One component per attribute, every one trained (its own :func:`fit` run). Returns
    ``(components {attribute: MultiHead}, histories {attribute: DataFrame}, assignments)``."""
    attributes = _check_names(attributes)
    if assignments is None:
        assignments = select_sources(sources, attributes, train_data)
    comps, hists = {}, {}
    for k, a in enumerate(attributes):
        given = None if components is None else components[a]
        comps[a], hists[a], _ = amalgamate_component(a, sources, train_data, val_data, assignment=assignments[a],
                                                     component=given, seed=seed * 1000 + k, **kwargs)
    return comps, hists, dict(assignments)


def amalgamate_target(components: Mapping[str, MultiHead], train_data, val_data=None, *,
                      arch: str = "cifar_resnet8", arch_kwargs: Mapping | None = None,
                      blocks: Sequence[str] | None = None, target: MultiHead | None = None, epochs: int = 4,
                      lr: float = 1e-3, batch_size: int = 64, schedule="step", seed: int = 0, **fit_kwargs):
    """Train the target net (one head per component's attribute) on the unlabeled ``train_data``
    with :class:`TargetAmalgamation`; best epoch on ``val_data`` (mean accuracy over the group).
    Returns ``(target, history)``."""
    from .. import seed_everything
    from ..data import Unlabeled
    from ..train import fit

    if target is None:
        seed_everything(seed)
        target = MultiHead(arch, list(components), **dict(arch_kwargs or {}))
    method = TargetAmalgamation(target, components, image_shape=_image_shape(train_data), blocks=blocks)
    fit_kwargs.setdefault("val_losses", False)
    history = fit(method, Unlabeled(train_data), val_data, epochs=epochs, lr=lr, batch_size=batch_size,
                  schedule=schedule, seed=seed, **fit_kwargs)
    return target.cpu().eval(), history


# -------------------------------------------------------------------------------------- metrics
def attribute_accuracy(model: nn.Module, data, attributes: Sequence[str] | None = None,
                       logits: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy of each head of a :class:`MultiHead` on the matching column of ``data``'s attribute
    targets (matched by name through ``data.classes``): ``{attribute: accuracy}``."""
    net = _unwrap(model)
    attributes = net.attributes if attributes is None else _check_names(attributes)
    cols = _columns(getattr(data, "classes", None), attributes)
    targets = getattr(data, "targets", None)
    if not torch.is_tensor(targets) or targets.dim() != 2:
        raise ValueError("attribute accuracy needs data whose targets are (N, A) attribute bits")
    if logits is None:
        logits = predict(net, data)
    pred = np.asarray(logits).argmax(-1)
    y = targets.numpy()
    return {a: float(np.mean(pred[:, net.head_index(a)] == y[:, c])) for a, c in zip(attributes, cols)}


def accuracy_table(models: Mapping[str, nn.Module], data, attributes: Sequence[str] | None = None):
    """Per-attribute accuracy of several multi-head models on ``data``: one row per model, one column
    per attribute (NaN where a model has no head for it)."""
    import pandas as pd

    rows = {}
    for name, m in models.items():
        have = [a for a in _unwrap(m).attributes if attributes is None or a in attributes]
        rows[name] = attribute_accuracy(m, data, have) if have else {}
    df = pd.DataFrame.from_dict(rows, orient="index")
    if attributes is not None:
        df = df.reindex(columns=list(attributes))
    df.index.name = "model"
    return df


# ----------------------------------------------------------------------------------- task & runner
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
        _check_names(attrs)
        _columns(classes, attrs, f"data (source {name!r})")
    _columns(classes, _check_names(group), "data (group)")
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
    from .. import data as kdata

    if source_data not in ("disjoint", "shared"):
        raise ValueError(f"source_data must be 'disjoint' or 'shared', got {source_data!r}")
    if data == "embedded":
        group = list(EMBEDDED_GROUP if group is None else group)
        sources = dict(EMBEDDED_SOURCES if sources is None else sources)
        full = kdata.shape_attributes(n=n, seed=seed, size=image_size)
        train, val_ds, test_ds = kdata.split(full, val=val, test=test, seed=seed)
    elif data == "celeba":
        from ..data.real import celeba

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
        device=None, progress: bool | None = None) -> CustomizeResult:
    """Selective learning once (the sources are fixed), then components and the target for every
    seed; per-attribute test accuracy of sources, components and target in ``result.table``."""
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
                                                batch_size=batch_size, seed=seed, device=device, progress=progress)
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


def summarise(table, decimals: int = 3):
    """Mean ± std over seeds of the per-attribute accuracy: rows = model, columns = (attribute, mean |
    std), plus ``group mean`` (the mean over the attributes, per seed, then over seeds) for the models
    that have every attribute of the table (a source covering part of the group gets NaN there)."""
    import pandas as pd

    t = table.copy()
    attrs = list(dict.fromkeys(t["attribute"]))
    stats = t.groupby(["model", "attribute"], sort=False)["accuracy"].agg(["mean", "std"]).unstack("attribute")
    full = t.groupby("model")["attribute"].nunique() == len(attrs)
    per_seed = t[t["model"].isin(full[full].index)].groupby(["model", "seed"])["accuracy"].mean()
    grp = per_seed.groupby("model").agg(["mean", "std"])
    for stat in ("mean", "std"):
        stats[(stat, "group mean")] = grp[stat].reindex(stats.index)
    out = stats.swaplevel(axis=1)
    out = out.reindex(columns=[(a, s) for a in attrs + ["group mean"] for s in ("mean", "std")])
    out = out.reindex(list(dict.fromkeys(t["model"])))
    return out.round(decimals)


def comparison(table, group: Sequence[str], majority: Mapping[str, float] | None = None):
    """Per attribute of ``group``: the best covering source (name and accuracy), components and target
    (mean and std over seeds), the majority answer when given, and the differences
    ``component − best source`` and ``target − component``. ``table`` is :attr:`CustomizeResult.table`."""
    import pandas as pd

    rows = []
    for a in group:
        t = table[table["attribute"] == a]
        src = t[t["seed"] < 0].set_index("model")["accuracy"]
        row = {"attribute": a}
        if majority is not None:
            row["majority"] = majority[a]
        if len(src):
            row["best source name"] = src.idxmax()
            row["best source"] = float(src.max())
        for m in ("component", "target"):
            acc = t[t["model"] == m]["accuracy"]
            row[m] = float(acc.mean())
            row[f"{m} std"] = float(acc.std()) if len(acc) > 1 else float("nan")
        row["component − best source"] = row["component"] - row.get("best source", float("nan"))
        row["target − component"] = row["target"] - row["component"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("attribute")


def assignment_table(assignments: Mapping[str, Assignment]):
    """Share of training images assigned to each source, per attribute (rows = attribute)."""
    import pandas as pd

    return pd.DataFrame({a: asg.shares() for a, asg in assignments.items()}).T.rename_axis("attribute")


def assigned_examples(assignment: Assignment, source: str, k: int = 16, order: str = "first") -> np.ndarray:
    """Up to ``k`` indices of images assigned to ``source``: the first ones (``order="first"``), or the
    ones its head is most / least sure about (``"confident"`` / ``"unsure"``)."""
    idx = assignment.images_of(source)
    if order == "first":
        return idx[:k]
    if order not in ("confident", "unsure"):
        raise ValueError(f"order must be 'first', 'confident' or 'unsure', got {order!r}")
    H = assignment.entropy[idx, assignment.sources.index(source)]
    rank = np.argsort(H, kind="stable")
    return idx[rank[:k] if order == "confident" else rank[::-1][:k]]


def example_images(assignment: Assignment, data, source: str, k: int = 16, order: str = "first"):
    """``(images, titles)`` of up to ``k`` images assigned to ``source`` (see :func:`assigned_examples`),
    for :func:`kaviz.plots.image_grid`; a title gives the source head's entropy and the attribute's
    true value (read for display only)."""
    idx = assigned_examples(assignment, source, k, order)
    if len(idx) == 0:
        raise ValueError(f"no image of this split was assigned to {source!r} for {assignment.attribute!r}")
    t = assignment.sources.index(source)
    col = _columns(getattr(data, "classes", None), [assignment.attribute])[0]
    titles = [f"H={assignment.entropy[i, t]:.2f} y={int(data.targets[i, col])}" for i in idx]
    return [data.image_array(int(i)) for i in idx], titles


def selection_table(assignments: Mapping[str, Assignment], data):
    """How good the entropy-based choice is, per attribute (labels of ``data`` read for analysis only):
    each covering source's accuracy on all images, the accuracy of the prediction of the source
    each image was assigned to (``selected``), of the best single source, and of an oracle that is
    right whenever any covering source is (``any source right``)."""
    import pandas as pd

    rows = []
    for a, asg in assignments.items():
        y = data.targets[:, _columns(data.classes, [a])[0]].numpy()
        correct = asg.logits.argmax(-1) == y[:, None]  # (N, S)
        row = {"attribute": a}
        row.update({s: float(correct[:, k].mean()) for k, s in enumerate(asg.sources)})
        row["best single"] = float(correct.mean(0).max())
        row["selected"] = float(correct[np.arange(len(y)), asg.index].mean())
        row["any source right"] = float(correct.any(1).mean())
        rows.append(row)
    df = pd.DataFrame(rows).set_index("attribute")
    fixed = ["best single", "selected", "any source right"]
    return df[[c for c in df.columns if c not in fixed] + fixed]


def coverage_table(sources: Mapping[str, Sequence[str]], group: Sequence[str] | None = None):
    """Which source covers which attribute (✓), the group's attributes first."""
    import pandas as pd

    attrs = list(dict.fromkeys(list(group or []) + [a for v in sources.values() for a in v]))
    df = pd.DataFrame({a: ["✓" if a in sources[s] else "" for s in sources] for a in attrs}, index=list(sources))
    df.index.name = "source"
    return df


def majority_baseline(data, attributes: Sequence[str]) -> dict[str, float]:
    """Accuracy of always predicting each attribute's more frequent value on ``data`` (chance level)."""
    cols = _columns(getattr(data, "classes", None), attributes)
    p = data.targets[:, cols].float().mean(0).numpy()
    return {a: float(max(v, 1 - v)) for a, v in zip(attributes, p)}
