"""Variance of each order's component, correlations between components, comparisons of pairs."""
from __future__ import annotations

import numpy as np
import torch

from .transnet import TransNet, order_name


def component_variance(x) -> float:
    """SPEC §3: centre ``x`` per channel (mean over samples and positions), then the mean of the
    squared deviations over samples, channels and positions. ``x``: (N, C, H, W) or (N, C)."""
    t = x.double() if torch.is_tensor(x) else torch.from_numpy(np.array(x, dtype=np.float64))
    if t.dim() < 2:
        raise ValueError(f"component_variance expects (N, C, ...) features, got shape {tuple(t.shape)}")
    dims = [0] + list(range(2, t.dim()))
    return float((t - t.mean(dim=dims, keepdim=True)).pow(2).mean())


class _Moments:
    """Per-channel running sums (float64) for :func:`component_variance` over batches."""

    def __init__(self):
        self.s = self.ss = None
        self.n = 0

    def add(self, t: torch.Tensor):
        t = t.double().transpose(0, 1).reshape(t.shape[1], -1)  # (C, samples·positions)
        s, ss = t.sum(1).cpu(), t.pow(2).sum(1).cpu()
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += t.shape[1]

    def variance(self) -> float:
        mean = self.s / self.n
        return float((self.ss / self.n - mean * mean).clamp_min(0).mean())


def variance_table(transnet: TransNet, xa, xb, *, batch_size: int = 256, device=None):
    """The variance analysis of SPEC §3 over paired features ``(x_A, x_B)`` (use the validation split).

    Rows: each order's component ``x⁽ᵏ⁾``, their sum ``g(x_A)`` (all consistent knowledge), the
    inconsistent part ``x^Δ = x_B − g(x_A)`` and the target ``x_B``. Columns: ``variance`` (as
    :func:`component_variance` defines it — the reference script's number, not normalised) and
    ``share`` = variance / Var(x_B) (kaviz's addition; the paper's exact normaliser is not
    confirmed). Shares need not add up to 1: the components are correlated.
    """
    import pandas as pd

    if len(xa) != len(xb):
        raise ValueError(f"x_A has {len(xa)} samples and x_B {len(xb)}; they must be aligned")
    if len(xa) < 2:
        raise ValueError("the variance analysis needs at least 2 samples")
    from ... import default_device

    K = transnet.orders
    acc = {k: _Moments() for k in range(K)}
    acc_g, acc_d, acc_b = _Moments(), _Moments(), _Moments()
    dev = default_device(device) if device is not None else next(transnet.parameters()).device
    home = next(transnet.parameters()).device
    transnet.to(dev)
    with torch.no_grad():
        for i in range(0, len(xa), batch_size):
            a = float_rows(xa, i, batch_size).to(dev)
            b = float_rows(xb, i, batch_size).to(dev)
            comps = transnet.decompose(a)
            if comps.shape[1:] != b.shape:
                raise ValueError(f"g(x_A) has shape {tuple(comps.shape[1:])} but x_B has {tuple(b.shape)}")
            g = comps.sum(0)
            for k in range(K):
                acc[k].add(comps[k])
            acc_g.add(g)
            acc_d.add(b - g)
            acc_b.add(b)
    transnet.to(home)
    var_b = acc_b.variance()
    rows = [(order_name(k), f"consistent, order {k}", acc[k].variance()) for k in range(K)]
    rows += [("g(x_A) = Σ x⁽ᵏ⁾", "consistent, all orders", acc_g.variance()),
             ("x^Δ = x_B − g(x_A)", "inconsistent", acc_d.variance()),
             ("x_B", "target", var_b)]
    df = pd.DataFrame(rows, columns=["component", "kind", "variance"])
    df["share"] = df["variance"] / var_b if var_b > 0 else np.nan
    df.attrs["definition"] = ("variance: centred per channel, mean of squares over samples, channels and "
                              "positions; share: variance / Var(x_B)")
    return df


def float_rows(x, i, n):
    part = x[i:i + n]
    if torch.is_tensor(part):
        return part.float()
    return torch.from_numpy(np.array(part, dtype=np.float32))


def component_correlation(transnet: TransNet, xa, *, batch_size: int = 256):
    """Correlation between the components ``x⁽ᵏ⁾`` over ``xa`` (each centred per channel, as in the
    variance analysis; then pooled over samples, channels and positions): a K×K DataFrame. Strongly
    negative off-diagonal values mean that one order cancels another, so their variances overlap."""
    import pandas as pd

    K = transnet.orders
    n, s, gram = 0, None, None
    with torch.no_grad():
        for i in range(0, len(xa), batch_size):
            comps = transnet.decompose(float_rows(xa, i, batch_size)).double()
            flat = comps.transpose(1, 2).reshape(K, comps.shape[2], -1)  # (K, C, samples·positions)
            s = flat.sum(2) if s is None else s + flat.sum(2)
            g = torch.einsum("kcn,lcn->klc", flat, flat)
            gram = g if gram is None else gram + g
            n += flat.shape[2]
    mean = s / n
    cov = (gram / n - mean[:, None, :] * mean[None, :, :]).mean(2)  # per-channel centred, averaged over channels
    d = cov.diagonal().clamp_min(1e-300).sqrt()
    names = [order_name(k) for k in range(K)]
    return pd.DataFrame((cov / d[:, None] / d[None, :]).numpy(), index=names, columns=names)
