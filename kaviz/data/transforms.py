"""Does a transform change the pixels between two reads of the same item? (DESIGN.md §2)

One answer for every cache decision (teacher outputs, features, precomputed targets): cached
outputs are valid only when every epoch sees the same pixels. Nothing is imported here: the
transform's class is recognised by its name and module, so torchvision is never imported just to
ask.
"""
from __future__ import annotations

from typing import Any

__all__ = ["is_random", "has_random_transform"]

# torchvision (v1 and v2) classes that map an input to one output, always the same.
_DETERMINISTIC = frozenset({
    "Resize", "Normalize", "ToTensor", "ToImage", "ToDtype", "ConvertImageDtype", "CenterCrop", "PILToTensor",
    "ToPILImage", "Pad", "Grayscale", "RGB", "Identity", "ToPureTensor", "FiveCrop", "TenCrop",
    "LinearTransformation", "ConvertBoundingBoxFormat", "ClampBoundingBoxes", "ClampKeyPoints",
    "SanitizeBoundingBoxes", "SanitizeKeyPoints", "SetClampingMode", "UniformTemporalSubsample",
})
# Random* classes whose only randomness is "apply a fixed operation with probability p": p = 0 never
# applies it and p = 1 always does, so either way the output is fixed.
_COIN_FLIP = frozenset({
    "RandomHorizontalFlip", "RandomVerticalFlip", "RandomGrayscale", "RandomInvert", "RandomPosterize",
    "RandomSolarize", "RandomAdjustSharpness", "RandomAutocontrast", "RandomEqualize",
})
_SEQUENCES = frozenset({"Compose", "Sequential"})


def _children(t) -> list:
    kids = getattr(t, "transforms", None)
    if kids is None and hasattr(t, "_modules") and type(t).__name__ == "Sequential":
        kids = list(t._modules.values())
    return list(kids or [])


def _p(t) -> float | None:
    p = getattr(t, "p", None)
    try:
        return float(p)
    except (TypeError, ValueError):
        return None


def _span(v) -> bool:
    """A (lo, hi) range that is not a single value (a sigma, a quality, a jitter factor)."""
    if v is None:
        return False
    try:
        lo, hi = (float(x) for x in v)
    except (TypeError, ValueError):
        return True  # not a pair we understand: assume it draws
    return lo != hi


def is_random(transform: Any) -> bool:
    """True when ``transform`` may give different pixels for the same input on two calls.

    - ``None`` → False.
    - torchvision v1 and v2 compositions: ``Compose`` (and ``nn.Sequential``) are random when a step
      is; ``RandomApply`` when its probability is strictly between 0 and 1 or an applied step is
      random; ``RandomChoice``/``RandomOrder`` of more than one step are random (one step: that step).
    - Deterministic torchvision steps: ``Resize``, ``Normalize``, ``ToTensor``, ``ToImage``,
      ``ToDtype``, ``ConvertImageDtype``, ``CenterCrop``, ``Pad``, ``Grayscale``, ``PILToTensor``, ... .
    - ``ColorJitter`` is random unless all four factors are unset (``ColorJitter()`` is the identity);
      ``GaussianBlur`` unless its sigma is one value; ``JPEG`` unless its quality is one value;
      flips and other "fixed operation with probability p" steps unless ``p`` is 0 or 1; every
      other ``Random*`` step, ``RandAugment``, ``TrivialAugmentWide``, ``AugMix``, ``AutoAugment``,
      ``GaussianNoise``, ``RandomErasing`` (p > 0), ``ElasticTransform``, ``MixUp``, ``CutMix``: random.
    - kaviz's :class:`kaviz.data.real.JointTransform`: its pipeline decides (``train=True`` draws a
      crop and a flip; ``train=False`` resizes and centre-crops); ``ResizeCover`` is deterministic.
    - Any object with a boolean attribute ``is_random`` is taken at its word (declare it on your
      own transform class to let caches use it).
    - ``Lambda`` and every other callable: True (unknown code may draw random numbers).
    """
    if transform is None:
        return False
    declared = getattr(transform, "is_random", None)
    if isinstance(declared, bool):
        return declared
    cls = type(transform)
    name, module = cls.__name__, cls.__module__ or ""
    if module.startswith("kaviz.data.real"):
        if name == "JointTransform":
            return is_random(transform.pipeline)
        if name == "ResizeCover":
            return False
    if name == "Sequential" and module.startswith("torch.nn"):
        return any(is_random(t) for t in _children(transform))
    if not module.startswith("torchvision.transforms"):
        return True
    if name in _SEQUENCES:
        return any(is_random(t) for t in _children(transform))
    if name == "RandomApply":
        kids, p = _children(transform), _p(transform)
        if not kids or p is None:
            return bool(kids) or p is None
        if p <= 0:
            return False
        return p < 1 or any(is_random(t) for t in kids)
    if name in ("RandomChoice", "RandomOrder"):
        kids = _children(transform)
        return len(kids) > 1 or any(is_random(t) for t in kids)
    if name in _DETERMINISTIC:
        return False
    if name == "ColorJitter":
        return any(getattr(transform, k, None) is not None
                   for k in ("brightness", "contrast", "saturation", "hue"))
    if name == "GaussianBlur":
        return _span(getattr(transform, "sigma", None))
    if name == "JPEG":
        return _span(getattr(transform, "quality", None))
    p = _p(transform)
    if name in _COIN_FLIP and p is not None:
        return 0 < p < 1
    if name == "RandomErasing" and p is not None and p <= 0:
        return False
    return True


def has_random_transform(data: Any) -> bool:
    """True when reading an item of ``data`` twice may give different pixels: :func:`is_random` of
    its ``transform``, looking through the wrappers kaviz and torch put around datasets
    (``Unlabeled``, ``Subset``, teacher-output datasets via ``.dataset``/``.data``;
    ``UnionDataset``/``ConcatDataset`` via ``.datasets``: random if any part is)."""
    seen: set[int] = set()

    def walk(d, depth=0) -> bool:
        if d is None or id(d) in seen or depth > 16:
            return False
        seen.add(id(d))
        if is_random(getattr(d, "transform", None)):
            return True
        parts = getattr(d, "datasets", None)
        if isinstance(parts, (list, tuple)) and any(walk(p, depth + 1) for p in parts):
            return True
        for attr in ("dataset", "data"):
            inner = getattr(d, attr, None)
            if inner is not None and hasattr(inner, "__getitem__") and hasattr(inner, "__len__") \
                    and not _is_array(inner) and walk(inner, depth + 1):
                return True
        return False

    return walk(data)


def _is_array(x) -> bool:
    return type(x).__module__.split(".")[0] in ("numpy", "torch") and hasattr(x, "shape")
