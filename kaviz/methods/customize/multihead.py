"""The multi-head attribute network: a shared backbone with one binary head per attribute; hooked blocks per family."""
from __future__ import annotations

import difflib
from typing import Sequence

import torch
from torch import nn

#: Hooked blocks and the common projection widths per architecture family. ResNet-18 in the paper:
#: ``conv1, layer1..layer4`` (64, 64, 128, 256, 512 channels) projected to (32, 32, 64, 128, 256),
#: half the channels. kaviz's CIFAR ResNets have three stages, ``conv1, layer1..layer3`` (w, w, 2w,
#: 4w channels); the same ratio for the default width w = 16 gives (8, 8, 16, 32).
BLOCKS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "resnet": (("conv1", "layer1", "layer2", "layer3", "layer4"), (32, 32, 64, 128, 256)),
    "cifar_resnet": (("conv1", "layer1", "layer2", "layer3"), (8, 8, 16, 32)),
}


def _family(arch: str) -> str:
    from ...models import family

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


def check_head_names(heads) -> list[str]:
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
    from ...models import classifier_name

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
        from ...models import build, spec

        heads = check_head_names(heads)
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



def attribute_columns(classes, attributes, what="data") -> list[int]:
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
