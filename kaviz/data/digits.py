"""scikit-learn's 1,797 handwritten digits (8x8, bundled with scikit-learn: no download), rendered
at the size and channel count of the synthetic images so both can be united (SPEC.md §1: the
embedded stand-in for CUB-200 vs Stanford Dogs)."""
from __future__ import annotations

import numpy as np
import torch

from .core import ImageDataset, digest
from .synthetic import (
    COLOURS,
    GENERATOR_VERSION,
    check_seed,
    hsv_to_rgb,
    noise_windows,
)

__all__ = ["digits"]

_TAG = 0xD161  # separates the digits' colour streams from the synthetic generator's


def digits(size: int = 32, seed: int = 0, colour: bool = True) -> ImageDataset:
    """The 1,797 scikit-learn digits as a 10-class ImageDataset of uint8 (1797, 3, size, size).

    The 8x8 images (0..16) are upsampled with bicubic interpolation (smooth strokes, clipped to
    [0, 1]). With ``colour=True`` each digit gets its own ink and background colour (a bright
    ink on a dark, slightly tinted background, drawn from
    ``numpy.random.default_rng([seed, i, ...])``, so independent of the class) and mild pixel
    noise; with ``colour=False`` the images are white on black, repeated to 3 channels, and
    ``seed`` has no effect. ``meta`` holds the label and the ink colour.
    """
    from sklearn.datasets import load_digits  # lazy: scikit-learn is heavy to import

    seed = check_seed(seed)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the digits are 8x8 originals), got {size!r}")
    size = int(size)
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    ink = x.clamp_(0, 1)[:, 0].numpy()  # (n, S, S) ink coverage
    n = len(ink)
    labels = torch.from_numpy(d.target.astype(np.int64))
    import pandas as pd

    meta = pd.DataFrame({"index": np.arange(n), "label": d.target.astype(np.int64)})
    if colour:
        u = np.stack([np.random.default_rng([seed, i, _TAG]).random(10) for i in range(n)])
        names = list(COLOURS)
        hue_id = np.minimum((u[:, 0] * len(names)).astype(np.int64), len(names) - 1)
        hue = np.array(list(COLOURS.values()))[hue_id] + (u[:, 1] - 0.5) * 0.05
        # Bright ink on dark paper, as in the originals. Mid-grey paper too (as for the shapes)
        # halved a small CNN's accuracy after 3 epochs: 1,259 training digits are only 60 steps.
        paper = hsv_to_rgb(u[:, 5], 0.3 * u[:, 6], 0.04 + 0.16 * u[:, 7])
        ink_rgb = hsv_to_rgb(hue, 0.55 + 0.45 * u[:, 3], 0.62 + 0.38 * u[:, 4])
        luma = np.array([0.2126, 0.7152, 0.0722])
        # at least 0.3 lighter (luminance) than the paper: a dark blue ink would hardly show
        lift = np.clip((paper @ luma + 0.3 - ink_rgb @ luma) / np.maximum(1 - ink_rgb @ luma, 1e-6), 0, 1)
        ink_rgb = ink_rgb + (1 - ink_rgb) * lift[:, None]
        a = ink[:, None]  # (n, 1, S, S)
        img = paper[:, :, None, None] * (1 - a) + ink_rgb[:, :, None, None] * a
        windows = noise_windows(size)
        oy = (u[:, 8] * windows.shape[0]).astype(np.int64)
        ox = (u[:, 9] * windows.shape[1]).astype(np.int64)
        img = img + 0.025 * windows[oy, ox]
        meta["ink"] = [names[h] for h in hue_id]
    else:
        img = np.repeat(ink[:, None], 3, axis=1)
    images = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)  # (n, 3, S, S)
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        labels,
        classes=[str(k) for k in range(10)],
        name="digits",
        meta=meta,
        fingerprint=digest(("digits", GENERATOR_VERSION, size, seed if colour else None, bool(colour))),
        info={"task": "classification", "source": "sklearn.datasets.load_digits", "size": size,
              "seed": seed, "colour": bool(colour)},
    )
