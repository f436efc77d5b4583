"""A registry of architectures: small CPU families, torchvision classifiers by name, your own.

``build(name, num_classes, **kwargs)`` returns a freshly initialised ``nn.Module`` that carries a
``kaviz_spec`` dict (name, num_classes, kwargs) so that caches and checkpoints can say which
architecture they belong to.

- kaviz's small families (CPU-friendly, for 32×32 inputs, every operation a named module so any
  intermediate feature can be tapped by name): ``cifar_resnet{8,14,20,32}``, ``vgg{8,11}_small``,
  ``mobilenet_small``; see :mod:`kaviz.models.small`.
- any classification architecture of torchvision (``resnet18``, ``densenet121``, ...), randomly
  initialised (no downloads); ``weights_path=`` loads a local state-dict file, and
  ``small_input=True`` adapts the stem to 32×32 images.
- ``@register("my_net")`` adds your own builder ``fn(num_classes, **kwargs) -> nn.Module``.
"""
from __future__ import annotations

import difflib
import hashlib
from typing import Callable

import torch
from torch import nn

__all__ = [
    "build",
    "register",
    "builder",
    "available",
    "spec",
    "load_weights",
    "weights_hash",
    "classifier_name",
    "param_count",
    "stages",
    "ArchitectureMismatchError",
    "PROVENANCE_KEYS",
]

#: Keys of ``kaviz_spec`` that record where a network's weights came from, not arguments of its builder:
#: a network is rebuilt from its spec without them (``pretrained``: the zoo entry it started from).
PROVENANCE_KEYS = ("name", "num_classes", "head_reinitialised", "pretrained")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}


class ArchitectureMismatchError(ValueError):
    """A state dict does not fit the model it is loaded into."""


def register(name: str, *, family: str | None = None, overwrite: bool = False):
    """Decorator registering ``fn(num_classes, **kwargs) -> nn.Module`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError("register() needs a non-empty model name")

    def deco(fn):
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
            raise ValueError(f"a model named {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = fn
        _FAMILY[name] = family or name
        return fn

    return deco


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def builder(name: str) -> Callable[..., nn.Module]:
    """The registered builder ``fn(num_classes, **kwargs)`` of a kaviz (or your own) architecture."""
    if name not in _REGISTRY:
        raise KeyError(f"{name!r} is not a registered architecture; kaviz.models.available(torchvision=False) "
                       "lists them")
    return _REGISTRY[name]


def available(torchvision: bool = True) -> list[str]:
    """Registered names (kaviz's small nets and yours), then torchvision's classifiers."""
    names = sorted(_REGISTRY)
    if torchvision:
        names += [n for n in _torchvision_names() if n not in _REGISTRY]
    return names


def family(name: str) -> str:
    """Architecture family of a registered name (``"cifar_resnet"``, ``"vgg"``, ...)."""
    if name in _FAMILY:
        return _FAMILY[name]
    return "torchvision:" + "".join(c for c in name if not c.isdigit()).split("_")[0]


def build(name: str, num_classes: int, *, weights_path: str | None = None, pretrained: bool = False,
          zoo_dir=None, **kwargs) -> nn.Module:
    """Build architecture ``name`` with a ``num_classes``-way head.

    ``pretrained=True`` loads the zoo entry of ``(name, kwargs)`` (:mod:`kaviz.models.zoo`: kaviz's
    small architectures pretrained on the synthetic pretraining world, the analogue of ImageNet
    weights; ``zoo_dir`` a folder of your own entries); the head is freshly initialised when
    ``num_classes`` differs from the entry's. ``kaviz.models.zoo.entries()`` lists them.

    ``weights_path`` loads a local state dict (``torch.load(weights_only=True)``); when its head
    has another number of classes the head is left freshly initialised (and said so in
    ``model.kaviz_spec["head_reinitialised"]``).
    """
    if not isinstance(name, str):
        raise TypeError(f"build(name, num_classes): name must be an architecture name (a str), got "
                        f"{name!r} ({type(name).__name__}). kaviz's own: {sorted(_REGISTRY)}; "
                        "kaviz.models.available() also lists torchvision's classifiers.")
    num_classes = _positive_int(num_classes)
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {pretrained!r}")
    if pretrained and weights_path is not None:
        raise ValueError("pass either pretrained=True (a zoo entry) or weights_path= (your own file), not both")
    if zoo_dir is not None and not pretrained:
        raise ValueError("zoo_dir= names where pretrained weights are found; it needs pretrained=True")
    if pretrained and name not in _REGISTRY:
        raise ValueError(f"pretrained=True: the zoo holds kaviz's small architectures ({sorted(_REGISTRY)}); "
                         f"for torchvision's {name!r} pass weights_path= to a local state-dict file "
                         "(nothing is downloaded)")
    if name in _REGISTRY:
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    else:
        tv = _torchvision_names()
        if name not in tv:
            close = difflib.get_close_matches(name, list(_REGISTRY) + tv, n=5, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise KeyError(
                f"unknown architecture {name!r}.{hint} kaviz.models.available() lists all names; "
                "@kaviz.models.register('name') adds your own."
            )
        model = _build_torchvision(name, num_classes, **kwargs)
    model.kaviz_spec = {"name": name, "num_classes": num_classes, **_jsonable(kwargs)}
    if weights_path is not None:
        load_weights(model, weights_path, skip_mismatched_head=True)
    if pretrained:
        from .zoo import load_pretrained

        load_pretrained(model, name, kwargs, zoo_dir=zoo_dir)
    return model


def _positive_int(num_classes) -> int:
    """Any integral number (int, NumPy or 0-dim torch integers) >= 1, as a plain int."""
    import operator

    if isinstance(num_classes, bool):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    try:
        k = operator.index(num_classes)
    except TypeError:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r} "
                         f"({type(num_classes).__name__})") from None
    if k < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(k)


def _jsonable(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _build_torchvision(name: str, num_classes: int, small_input: bool = False, **kwargs) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if small_input:
        _adapt_stem(model, name)
    return model


def _adapt_stem(model: nn.Module, name: str) -> None:
    """Make an ImageNet stem keep resolution on 32×32 inputs (3×3 stride-1 conv, no max-pool)."""
    if hasattr(model, "conv1") and hasattr(model, "maxpool"):  # ResNet family
        old = model.conv1
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif hasattr(model, "features") and hasattr(model.features, "conv0"):  # DenseNet
        old = model.features.conv0
        model.features.conv0 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        model.features.pool0 = nn.Identity()
    else:
        raise ValueError(
            f"small_input=True is implemented for torchvision ResNets and DenseNets, not {name!r}; "
            "build it without small_input (and use larger images) or register your own variant."
        )


def spec(model: nn.Module) -> dict:
    """The ``kaviz_spec`` of a model built by :func:`build` (else its class name)."""
    return dict(getattr(model, "kaviz_spec", {"name": type(model).__name__}))


def param_count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of the state dict's names, shapes and bytes: identifies exactly these weights."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the final Linear layer (the classifier), e.g. ``fc`` or ``classifier.6``."""
    name = getattr(model, "kaviz_classifier", None)
    if name:
        return name
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; name the layer explicitly")
    return last


def stages(model: nn.Module, penultimate: bool = True) -> list[str]:
    """The layers worth looking at first, shallow to deep: the output of each stage, then the
    classifier's input (the pooled penultimate feature) when ``penultimate``.

    kaviz's small nets declare them (``model.kaviz_stages``); torchvision ResNets give
    ``layer1..layer4``, DenseNets their dense blocks, VGGs their pooling layers; other models
    their top-level children except the classifier.
    """
    names = list(getattr(model, "kaviz_stages", []) or [])
    if not names:
        children = dict(model.named_children())
        if all(f"layer{i}" in children for i in (1, 2, 3)):
            names = [n for n in children if n.startswith("layer")]
        elif "features" in children:
            feats = dict(model.features.named_children())
            names = [f"features.{n}" for n, m in feats.items()
                     if n.startswith("denseblock") or isinstance(m, nn.MaxPool2d)]
        if not names:
            try:
                head = classifier_name(model).split(".")[0]
            except ValueError:
                head = None
            names = [n for n in children if n != head]
    if penultimate:
        try:
            names.append(classifier_name(model) + ":in")
        except ValueError:
            pass
    return names


def load_weights(model: nn.Module, path, *, skip_mismatched_head: bool = False, strict: bool = True) -> nn.Module:
    """Load a state-dict file (``weights_only=True``) into ``model`` with a readable error on mismatch."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a kaviz checkpoint
    load_state(model, state, skip_mismatched_head=skip_mismatched_head, strict=strict, source=str(path))
    return model


def load_state(model: nn.Module, state: dict, *, skip_mismatched_head=False, strict=True, source="state dict"):
    own = model.state_dict()
    head = None
    if skip_mismatched_head:
        try:
            head = classifier_name(model)
        except ValueError:
            head = None
    state = dict(state)
    skipped = []
    bad_shapes = []
    for k in list(state):
        if k in own and own[k].shape != state[k].shape:
            if head is not None and k.startswith(head + "."):
                skipped.append(k)
                del state[k]
            else:
                bad_shapes.append(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    if bad_shapes or (strict and (missing or unexpected)):
        name = spec(model).get("name", type(model).__name__)
        lines = [f"{source} does not fit architecture {name!r}:"]
        if bad_shapes:
            lines.append("  shape mismatches: " + "; ".join(bad_shapes[:5]) + (" ..." if len(bad_shapes) > 5 else ""))
        if missing:
            lines.append(
                f"  missing in file ({len(missing)}): " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            lines.append(
                f"  not in model ({len(unexpected)}): " + ", ".join(
                    unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
        lines.append("Build the architecture the file was saved from (kaviz.models.spec shows what a model is).")
        raise ArchitectureMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=False)
    if skipped:
        model.kaviz_spec = {**spec(model), "head_reinitialised": True}
    return model


# register kaviz's own families
from . import dense, small  # noqa: E402,F401
