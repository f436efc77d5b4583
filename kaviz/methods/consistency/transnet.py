"""The Trans-Net (SPEC §4): g(x) = Σ_k p_k·Φ_k(x), its order decomposition and training loss."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_SUP = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def order_name(k: int) -> str:
    """``x⁽ᵏ⁾`` with a superscript order (``x⁽⁰⁾``, ``x⁽¹⁾``, ...)."""
    return f"x⁽{str(k).translate(_SUP)}⁾"


def spatial_scale(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``n(z)`` of SPEC §3: per sample and channel, the unbiased standard deviation over spatial
    positions plus ``eps``, computed without gradient and without subtracting anything from ``z``;
    1 for 1×1 maps (an FC feature seen as C×1×1). Shape (B, C, 1, 1)."""
    if z.dim() != 4:
        raise ValueError(f"spatial_scale expects (B, C, H, W), got shape {tuple(z.shape)}")
    if z.shape[-1] * z.shape[-2] == 1:
        return torch.ones(z.shape[0], z.shape[1], 1, 1, dtype=z.dtype, device=z.device)
    with torch.no_grad():
        return z.detach().flatten(2).std(dim=2, correction=1).add(eps)[..., None, None]


class ReluState(NamedTuple):
    """The linearisation point of a :class:`TransNet` pass: the ReLU masks ``M_k = 1[h_k > 0]`` and
    the scales ``n(h_k)`` of its K−1 gated non-linearities (each (B, C, H, W) / (B, C, 1, 1))."""

    masks: tuple
    scales: tuple


class TransNet(nn.Module):
    """The normalised, gated Trans-Net ``g`` of Knowledge Consistency (ICLR 2020; SPEC §3).

    With K = ``orders`` convolutions ``W_0 … W_{K−1}`` (C→C, 3×3, padding 1, no bias) and K−1 gates
    ``p_k = sigmoid(θ_k)`` (θ initialised to 0, so p = 0.5)::

        x̄ = x / n(x);   z_0 = x̄
        h_{k+1} = W_k ∗ z_k,   a_{k+1} = p_k · ReLU(h_{k+1} / n(h_{k+1})),   z_{k+1} = x̄ + a_{k+1}
        g(x) = W_{K−1} ∗ z_{K−1}

    (K = 3: ``h1 = W0∗x̄; a1 = p0·ReLU(h1/n(h1)); h2 = W1∗(x̄+a1); a2 = p1·ReLU(h2/n(h2));
    g = W2∗(x̄+a2)``.) With the masks ``M_k`` and the scales of the full pass held fixed, each path
    through the net is linear in x̄, and :meth:`decompose` returns the component of every order
    k = 0 … K−1 (the number of gated non-linearities on the path); they sum to ``g(x)``. The
    component of order k ≥ 1 uses the last k gates ``p_{K−1−k} … p_{K−2}`` (:meth:`gates_used`) and
    is proportional to each of them.

    ``n`` makes ``g`` (almost exactly: up to ``eps``) invariant to a positive rescaling of its input.
    Inputs are feature maps (B, C, H, W) or FC features (B, C), treated as C×1×1.

    ``init``: ``"default"`` (PyTorch's conv initialisation, kaviz's default) or ``"kaiming"``
    (kaiming-normal with ``mode="fan_out"`` and the ReLU gain, as the reference code; std
    √(2 / (C·k²)), so with the same gates the components start larger).
    """

    INITS = ("default", "kaiming")

    def __init__(self, channels: int, orders: int = 3, *, kernel_size: int = 3, eps: float = 1e-5,
                 init: str = "default"):
        super().__init__()
        for name, v, lo in (("channels", channels, 1), ("orders", orders, 1), ("kernel_size", kernel_size, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"TransNet: {name} must be an int >= {lo}, got {v!r}")
        if kernel_size % 2 == 0:
            raise ValueError(f"TransNet: kernel_size must be odd (so that 'same' padding keeps H×W), got {kernel_size}")
        self.channels = int(channels)
        self.orders = int(orders)
        self.eps = float(eps)
        self.convs = nn.ModuleList(
            nn.Conv2d(self.channels, self.channels, kernel_size, padding=kernel_size // 2, bias=False)
            for _ in range(self.orders))
        self.theta = nn.Parameter(torch.zeros(self.orders - 1))
        if init not in self.INITS:
            raise ValueError(f"TransNet: init must be one of {self.INITS} ('kaiming': kaiming-normal, fan_out, as "
                             f"the reference code), got {init!r}")
        self.init = init
        if init == "kaiming":
            for conv in self.convs:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    # --- gates -----------------------------------------------------------------------------------
    @property
    def gates(self) -> torch.Tensor:
        """p = sigmoid(θ), a detached copy (K−1 values)."""
        return torch.sigmoid(self.theta.detach()).clone()

    def set_gates(self, p) -> None:
        """Set the gates to given values in (0, 1) (θ = logit p), e.g. to ablate a path."""
        p = torch.as_tensor(p, dtype=self.theta.dtype).reshape(-1)
        if p.numel() != self.orders - 1:
            raise ValueError(f"this TransNet has {self.orders - 1} gates, got {p.numel()} values")
        if not bool(((p > 0) & (p < 1)).all()):
            raise ValueError(f"gate values must lie strictly between 0 and 1, got {p.tolist()}")
        with torch.no_grad():
            self.theta.copy_(torch.logit(p))

    def gates_used(self, order: int) -> list[int]:
        """Indices of the gates on the path of component ``order``: the last ``order`` gates."""
        if not 0 <= order < self.orders:
            raise ValueError(f"order must be in 0..{self.orders - 1}, got {order}")
        return list(range(self.orders - 1 - order, self.orders - 1))

    def gate_penalty(self, alpha=0.1) -> torch.Tensor:
        """``Σ_k α_k p_k²`` (with gradient); ``alpha`` a number or one value per gate."""
        p = torch.sigmoid(self.theta)
        a = _alpha(alpha, self.orders - 1).to(p)
        return (a * p * p).sum()

    # --- passes ----------------------------------------------------------------------------------
    def _as_maps(self, x: torch.Tensor):
        if not torch.is_tensor(x) or x.dim() not in (2, 4):
            raise ValueError(f"TransNet expects features (B, C, H, W) or (B, C), got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        if x.shape[1] != self.channels:
            raise ValueError(f"TransNet(channels={self.channels}) got features with {x.shape[1]} channels; "
                             "build it with TransNet(channels=<the feature's channel count>)")
        return (x[:, :, None, None], True) if x.dim() == 2 else (x, False)

    def _run(self, x4: torch.Tensor, record: bool):
        xbar = x4 / spatial_scale(x4, self.eps)
        p = torch.sigmoid(self.theta)
        z = xbar
        masks, scales = [], []
        for k in range(self.orders - 1):
            h = self.convs[k](z)
            s = spatial_scale(h, self.eps)
            if record:
                masks.append((h > 0).detach())
                scales.append(s)
            z = xbar + p[k] * F.relu(h / s)
        return self.convs[-1](z), xbar, ReluState(tuple(masks), tuple(scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """g(x), same shape as x."""
        x4, flat = self._as_maps(x)
        out = self._run(x4, record=False)[0]
        return out.flatten(1) if flat else out

    def relu_state(self, x: torch.Tensor) -> ReluState:
        """The masks and scales of the full pass on ``x`` (pass to :meth:`decompose` to hold them
        fixed while, e.g., the gates change)."""
        with torch.no_grad():
            return self._run(self._as_maps(x)[0], record=True)[2]

    def decompose(self, x: torch.Tensor, state: ReluState | None = None) -> torch.Tensor:
        """The components ``x⁽⁰⁾ … x⁽ᴷ⁻¹⁾``, stacked: shape (K, *x.shape); they sum to ``g(x)``.

        With the masks and scales of the full pass fixed (or those of ``state``),
        ``x⁽ᵏ⁾ = W_{K−1} ∗ L_{K−1}(… L_{K−k}(x̄))`` with ``L_j(z) = p_{j−1}·M_j ⊙ (W_{j−1} ∗ z) / n(h_j)``;
        for K = 3: ``x⁽⁰⁾ = W2∗x̄``, ``x⁽¹⁾ = W2∗(p1·M2⊙(W1∗x̄)/n(h2))``,
        ``x⁽²⁾ = W2∗(p1·M2⊙(W1∗(p0·M1⊙(W0∗x̄)/n(h1)))/n(h2))``.
        """
        x4, flat = self._as_maps(x)
        if state is None:
            with torch.no_grad():
                state = self._run(x4, record=True)[2]
        elif len(state.masks) != self.orders - 1 or len(state.scales) != self.orders - 1:
            raise ValueError(f"state has {len(state.masks)} masks for a TransNet with {self.orders - 1} gates")
        elif state.masks and tuple(state.masks[0].shape) != tuple(x4.shape):
            raise ValueError(f"state was computed for features of shape {tuple(state.masks[0].shape)}, "
                             f"not {tuple(x4.shape)}; call relu_state on the same batch")
        xbar = x4 / spatial_scale(x4, self.eps)
        p = torch.sigmoid(self.theta)
        b = x4.shape[0]
        comps = xbar[None]  # components of z_k by order: (k + 1, B, C, H, W)
        for k in range(self.orders - 1):
            h = self.convs[k](comps.flatten(0, 1)).unflatten(0, (comps.shape[0], b))
            lin = h * (p[k] * state.masks[k].to(h.dtype) / state.scales[k])
            comps = torch.cat([xbar[None], lin], 0)
        out = self.convs[-1](comps.flatten(0, 1)).unflatten(0, (self.orders, b))
        return out.flatten(2) if flat else out


def _alpha(alpha, n: int) -> torch.Tensor:
    a = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
    if a.numel() == 1:
        a = a.expand(n)
    if a.numel() != n:
        raise ValueError(f"alpha must be one number or one value per gate ({n}), got {a.numel()} values")
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError(f"alpha must be finite and >= 0, got {a.tolist()}")
    return a.clone()


class TransNetLoss(nn.Module):
    """Trains a :class:`TransNet` on paired features ``(x_A, x_B)`` (SPEC §3):
    ``{"mse": MSE(g(x_A), x_B), "gate_penalty": Σ_k α_k p_k²}`` (α = 0.1 per gate by default; the
    paper uses 8.0 for AlexNet). ``evaluate`` logs the gates ``p0, p1, …`` every epoch."""

    def __init__(self, transnet: TransNet, alpha=0.1):
        super().__init__()
        self.transnet = transnet
        self.register_buffer("alpha", _alpha(alpha, transnet.orders - 1), persistent=False)

    def forward(self, batch):
        xa, xb = batch[0], batch[1]
        out = self.transnet(xa)
        if out.shape != xb.shape:
            raise ValueError(f"g(x_A) has shape {tuple(out.shape)} but x_B has {tuple(xb.shape)}: the Trans-Net "
                             "maps a feature to one of the same shape; pick layers of equal shape")
        return {"mse": F.mse_loss(out, xb), "gate_penalty": self.transnet.gate_penalty(self.alpha)}

    def evaluate(self, data) -> dict:
        return {f"p{k}": float(v) for k, v in enumerate(self.transnet.gates)}
