"""Small encoder–decoder networks for dense prediction (segmentation, depth, reconstruction).

SegNet-style (Badrinarayanan et al. 2017), sized for 32–96 px images on a CPU. Every block is a
named module so that the dense papers can branch, copy and combine by name:

``enc1 enc2 enc3`` (each ``conv1 bn1 relu1 conv2 bn2 relu2`` then ``pool``: ×½ resolution),
``dec3 dec2 dec1`` (each ``up`` (×2 bilinear) then ``conv1 bn1 relu1 conv2 bn2 relu2``, with an
optional skip from the encoder block of the same resolution), ``head`` (1×1 conv to the output
channels). ``forward(x)`` returns ``(B, out_channels, H, W)`` — class logits for segmentation,
one channel for depth, three for reconstruction (``output="sigmoid"`` maps to [0, 1]).

``unpool="indices"`` is SegNet's own upsampling: each encoder block's 2×2 max-pooling also returns
the argmax positions (``enc<k>(x)`` → ``(features, indices)``), and the decoder block of the same
resolution (``dec3`` ← ``enc3``, ``dec2`` ← ``enc2``, ``dec1`` ← ``enc1``) puts every value back at
the position it was pooled from with ``nn.MaxUnpool2d`` (zeros elsewhere) instead of interpolating.
The weights (state dict) are the same in both modes; only the forward differs. The default
``unpool="bilinear"`` is the ×2 bilinear upsampling above.

Registered as ``segnet_small`` (``build("segnet_small", num_classes, ...)``: ``num_classes`` is
the number of output channels). ``encoder_names(model)`` / ``decoder_names(model)`` list blocks.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import register

__all__ = ["EncoderBlock", "DecoderBlock", "SegNetSmall", "encoder_names", "decoder_names", "UNPOOL_MODES"]

#: How a SegNetSmall decoder block doubles the resolution: ×2 bilinear interpolation (the default) or
#: max-unpooling with the pooling indices of the encoder block of the same resolution (SegNet).
UNPOOL_MODES = ("bilinear", "indices")


def _check_unpool(unpool) -> str:
    if unpool not in UNPOOL_MODES:
        raise ValueError(f"unpool must be 'bilinear' (×2 interpolation) or 'indices' (SegNet max-unpooling with "
                         f"the encoder's pooling indices), got {unpool!r}")
    return unpool


class EncoderBlock(nn.Module):
    """Two 3×3 conv–BN–ReLU and a 2×2 max-pooling. ``return_indices=True`` (SegNet unpooling):
    ``forward`` returns ``(pooled, indices)``, the indices of ``nn.MaxPool2d(2, return_indices=True)``."""

    def __init__(self, cin: int, cout: int, return_indices: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2, return_indices=True) if return_indices else nn.MaxPool2d(2)
        self.return_indices = bool(return_indices)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.pool(x)


class DecoderBlock(nn.Module):
    """×2 upsampling, an optional skip concatenation, two 3×3 conv–BN–ReLU. ``unpool="indices"``:
    the upsampling is ``nn.MaxUnpool2d(2)`` with the ``indices`` of the matching encoder block's pooling
    (required in ``forward``)."""

    def __init__(self, cin: int, cout: int, skip: int = 0, unpool: str = "bilinear"):
        super().__init__()
        self.unpool = _check_unpool(unpool)
        if unpool == "indices":
            self.up = nn.MaxUnpool2d(2)
        else:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv1 = nn.Conv2d(cin + skip, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()

    def forward(self, x, skip: torch.Tensor | None = None, indices: torch.Tensor | None = None):
        if self.unpool == "indices":
            if indices is None:
                raise ValueError("this decoder block max-unpools (unpool='indices'): pass the pooling indices of the "
                                 "encoder block of the same resolution, block(x, skip, indices=indices)")
            if indices.shape != x.shape:
                raise ValueError(f"pooling indices of shape {tuple(indices.shape)} do not fit the decoder input "
                                 f"{tuple(x.shape)}: use the indices of the encoder block that produced this "
                                 "resolution (dec3 ← enc3, dec2 ← enc2, dec1 ← enc1)")
            x = self.up(x, indices)
        else:
            x = self.up(x)
        if skip is not None:
            if skip.shape[-2:] != x.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, skip], 1)
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(x)))


class SegNetSmall(nn.Module):
    """Encoder–decoder with three ×½ stages and a 1×1 head (see module docstring).

    ``widths`` are the encoder widths (the decoder mirrors them); ``skips=True`` adds U-Net style
    skip connections from ``enc1``/``enc2`` into ``dec2``/``dec1`` (off by default: SegNet-like,
    so a decoder can be reused behind any encoder with the same bottleneck width). ``unpool``:
    ``"bilinear"`` (default) or ``"indices"`` (SegNet max-unpooling, see the module docstring).
    """

    def __init__(self, out_channels: int, in_channels: int = 3, widths=(16, 32, 64), skips: bool = False,
                 output: str = "none", unpool: str = "bilinear"):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"segnet_small has three stages: widths must have 3 entries, got {widths}")
        if output not in ("none", "sigmoid"):
            raise ValueError(f"output must be 'none' or 'sigmoid', got {output!r}")
        _check_unpool(unpool)
        w1, w2, w3 = widths
        ind = unpool == "indices"
        self.enc1 = EncoderBlock(in_channels, w1, return_indices=ind)
        self.enc2 = EncoderBlock(w1, w2, return_indices=ind)
        self.enc3 = EncoderBlock(w2, w3, return_indices=ind)
        self.dec3 = DecoderBlock(w3, w2, skip=w2 if skips else 0, unpool=unpool)
        self.dec2 = DecoderBlock(w2, w1, skip=w1 if skips else 0, unpool=unpool)
        self.dec1 = DecoderBlock(w1, w1, unpool=unpool)
        self.head = nn.Conv2d(w1, out_channels, 1)
        self.skips = skips
        self.output = output
        self.unpool = unpool
        self.widths = tuple(widths)
        self.out_channels = out_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encode(self, x):
        """``(z, (e1, e2))``; with ``unpool="indices"`` ``(z, (e1, e2), (i1, i2, i3))``, the pooling
        indices of ``enc1 enc2 enc3``."""
        if self.unpool == "indices":
            e1, i1 = self.enc1(x)
            e2, i2 = self.enc2(e1)
            z, i3 = self.enc3(e2)
            return z, (e1, e2), (i1, i2, i3)
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        return self.enc3(e2), (e1, e2)

    def decode(self, z, skips=None, size=None, indices=None):
        """``indices``: ``(i1, i2, i3)`` from :meth:`encode` (required with ``unpool="indices"``)."""
        e1, e2 = skips if (self.skips and skips is not None) else (None, None)
        if self.unpool == "indices":
            if indices is None:
                raise ValueError("this segnet_small max-unpools (unpool='indices'): decode(z, skips, size, indices) "
                                 "needs the pooling indices (i1, i2, i3) that encode(x) returns")
            i1, i2, i3 = indices
            d = self.dec3(z, e2, indices=i3)
            d = self.dec2(d, e1, indices=i2)
            d = self.dec1(d, indices=i1)
        else:
            d = self.dec3(z, e2)
            d = self.dec2(d, e1)
            d = self.dec1(d)
        if size is not None and d.shape[-2:] != size:
            d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        out = self.head(d)
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def forward(self, x):
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"segnet_small needs height and width divisible by 8, got {tuple(x.shape[-2:])}")
        if self.unpool == "indices":
            z, skips, indices = self.encode(x)
            return self.decode(z, skips, size=x.shape[-2:], indices=indices)
        z, skips = self.encode(x)
        return self.decode(z, skips, size=x.shape[-2:])


@register("segnet_small", family="segnet")
def segnet_small(num_classes, in_channels=3, widths=(16, 32, 64), skips=False, output="none", unpool="bilinear"):
    return SegNetSmall(num_classes, in_channels, tuple(widths), skips, output, unpool)


def encoder_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_children() if n.startswith("enc")]


def decoder_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_children() if n.startswith("dec")]
