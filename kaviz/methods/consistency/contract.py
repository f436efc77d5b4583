"""The visual contract: images with the components of their features, for the notebook's figure."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .analysis import Consistency
from .transnet import order_name


@dataclass
class ContractView:
    """What the visual contract shows for a few images of one pair and layer (precomputed, so a
    widget callback only indexes arrays): ``images`` (n, H, W, 3) uint8, ``a``, ``b``, ``g``,
    ``delta`` (n, C, h, w), ``components`` (K, n, C, h, w), ``gates``, and ``channel_order`` /
    ``channel_order_a`` (B's / A's channels by decreasing variance over these images: A's channels
    do not correspond to B's, so the input panel shows A's channel of the same variance rank)."""

    images: np.ndarray
    a: np.ndarray
    b: np.ndarray
    g: np.ndarray
    components: np.ndarray
    delta: np.ndarray
    gates: np.ndarray
    channel_order: np.ndarray
    channel_order_a: np.ndarray
    indices: np.ndarray
    title: str = ""

    def channel(self, rank: int) -> int:
        """B's channel of variance rank ``rank`` (0 = the most variable)."""
        if not 0 <= rank < len(self.channel_order):
            raise ValueError(f"channel rank must be in 0..{len(self.channel_order) - 1}, got {rank}")
        return int(self.channel_order[rank])

    def grid(self, image: int, rank: int) -> dict:
        """Keyword arguments for :func:`kaviz.plots.feature_grid` (``symmetric="row"``): row 1 the
        image and A's feature ("in"), its last cell left empty (titled "gates") for a bar chart of the
        gates; row 2, on one colour range symmetric about 0, B's feature ("target"), g(x_A)
        ("output"), each component, and target − output."""
        if not 0 <= image < len(self.images):
            raise ValueError(f"image must be in 0..{len(self.images) - 1}, got {image}")
        c = self.channel(rank)
        ca = int(self.channel_order_a[min(rank, len(self.channel_order_a) - 1)])
        K = self.components.shape[0]
        row2 = [self.b[image, c], self.g[image, c]] + [self.components[k, image, c] for k in range(K)] + \
            [self.delta[image, c]]
        row1 = [self.images[image], self.a[image, ca]] + [None] * (len(row2) - 2)
        t2 = ["x_B (target)", "g(x_A) (output)"] + [order_name(k) for k in range(K)] + ["target − output"]
        t1 = [f"image {int(self.indices[image])}", f"x_A (in), ch {ca}"] + [""] * (len(row2) - 3) + ["gates"]
        return {"maps": [row1, row2], "titles": [t1, t2], "row_titles": ["A", f"B, channel {c}"],
                "symmetric": "row"}


def contract_view(cons: Consistency, data, indices, *, split: str = "val", title: str = "") -> ContractView:
    """Precompute the visual contract (SPEC §3) of ``cons`` for the samples ``indices`` of
    ``split``; ``data`` is that split's dataset (for the images, via ``image_array``)."""
    idx = np.asarray(indices, dtype=np.int64)
    m = cons.maps(idx, split)
    if m["b"].ndim != 4:
        raise ValueError("the visual contract shows feature maps (C, H, W); this layer gives vectors")
    if hasattr(data, "image_array"):
        images = np.stack([data.image_array(int(i)) for i in idx])
    else:  # a dataset of float (C, H, W) images in [0, 1] (methods do not import plots)
        chw = [torch.as_tensor(data[int(i)][0]).float().clamp(0, 1) for i in idx]
        images = np.stack([(x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]).permute(1, 2, 0).mul(255).round()
                           .to(torch.uint8).numpy() for x in chw])
    def by_variance(x):
        return np.argsort(-x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).var(axis=1), kind="stable")

    return ContractView(images, m["a"], m["b"], m["g"], m["components"], m["delta"], cons.gates, by_variance(m["b"]),
                        by_variance(m["a"]), idx, title)
