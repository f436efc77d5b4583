"""Pruning filters of a recombined network by a criterion (L1 norm, batch-norm scale, random)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .combine import bn_factory
from .network import CRITERIA, DEFAULT_GROUPS, RecombinedNet


# pruning
def filter_l1(conv: nn.Conv2d) -> torch.Tensor:
    """L1 norm of every filter (output channel) of a conv: ``Σ_{i,h,w} |W[o, i, h, w]|``."""
    return conv.weight.detach().abs().sum(dim=(1, 2, 3))


def _set(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _conv_like(old: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    new = nn.Conv2d(weight.shape[1], weight.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=bias is not None, padding_mode=old.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
    return new


def _bn_like(old: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=old.eps, momentum=old.momentum, affine=old.affine,
                         track_running_stats=old.track_running_stats, **bn_factory(old))
    with torch.no_grad():
        if old.affine:
            new.weight.copy_(old.weight[keep])
            new.bias.copy_(old.bias[keep])
        if old.track_running_stats:
            new.running_mean.copy_(old.running_mean[keep])
            new.running_var.copy_(old.running_var[keep])
            new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.train(old.training)
    return new


def prune(net: RecombinedNet, fraction: float, *, groups: Sequence[str] = DEFAULT_GROUPS, criterion: str = "smallest",
          min_channels: int = 2, seed: int = 0):
    """One pruning round, in place: in every prunable conv of ``groups``, remove
    ``round(fraction · C)`` of its C filters (never going below ``min_channels``), chosen by L1 norm
    — ``criterion="smallest"`` (the method), ``"largest"`` (a reference version's bug),
    ``"random"`` (a baseline) or ``"bn-scaled"`` (the smallest L1 norm of the filter with its batch
    norm folded in, ``‖W_o‖₁·|γ_o|/√(σ²_o+ε)``: a batch norm after the conv undoes any scale of
    ``W_o``, so the raw norm says little about what the channel contributes) — together with the
    dependent batch-norm channels and the input channels of the convs that read them. All norms
    are measured before anything is removed. With the reference bottleneck
    (``combine(bottleneck="reference")``) the ``"bottleneck"`` group is its two convs —
    ``bottleneck.conv1`` with ``bottleneck.bn`` (read by ``bottleneck.conv2``) and
    ``bottleneck.conv2``, the code itself (read by every ``adaptors.<task>.conv1``) — and the
    ``"adaptors"`` group likewise each adaptor's ``conv1`` (with its BN) and ``conv2``.

    Returns a DataFrame, one row per conv: ``layer, group, before, after, max_removed_l1,
    min_kept_l1`` (for ``"smallest"``: ``max_removed_l1 <= min_kept_l1``) and, for the combined
    encoder convs (and an identity-initialised bottleneck), ``kept/<task>``: how many of the kept
    filters descend from each teacher's filters (``net.origins`` follows them through the rounds).
    """
    import pandas as pd

    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1) (the share of filters removed per round), got {fraction!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an int >= 1, got {min_channels!r}")
    units = net.prune_units(groups)
    gen = torch.Generator().manual_seed(seed)
    plan = []
    for u in units:
        conv = net.get_submodule(u.conv)
        norms = filter_l1(conv).cpu()
        if criterion == "bn-scaled" and u.bn is not None:
            bn = net.get_submodule(u.bn)
            norms = norms * (bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).cpu()
        c = len(norms)
        n_remove = min(int(math.floor(fraction * c + 0.5)), max(0, c - min_channels))
        if criterion == "random":
            order = torch.randperm(c, generator=gen)
        else:
            # stable sort: among equal norms the earlier filter goes first
            order = torch.sort(norms, stable=True, descending=criterion == "largest").indices
        removed = order[:n_remove]
        keep = torch.sort(order[n_remove:]).values
        plan.append((u, keep, norms, removed))
    rows = []
    # two passes: consumers are sliced with the plan of their producer (and a conv can be both)
    new_weights = {u.conv: net.get_submodule(u.conv).weight.detach()[keep] for u, keep, _, _ in plan}
    new_bias = {u.conv: (net.get_submodule(u.conv).bias.detach()[keep]
                         if net.get_submodule(u.conv).bias is not None else None) for u, keep, _, _ in plan}
    for u, keep, _, _ in plan:
        for cname in u.consumers:
            w = new_weights.get(cname)
            if w is None:
                w = net.get_submodule(cname).weight.detach()
                new_bias[
                    cname] = net.get_submodule(
                        cname).bias.detach() if net.get_submodule(cname).bias is not None else None
            new_weights[cname] = w[:, keep.to(w.device)]
    for name, w in new_weights.items():
        _set(net, name, _conv_like(net.get_submodule(name), w, new_bias[name]))
    for u, keep, norms, removed in plan:
        if u.bn is not None:
            _set(net, u.bn, _bn_like(net.get_submodule(u.bn), keep.to(net.get_submodule(u.bn).running_mean.device)))
        row = {"layer": u.conv, "group": u.group, "before": len(norms), "after": len(keep),
               "max_removed_l1": float(norms[removed].max()) if len(removed) else float("nan"),
               "min_kept_l1": float(norms[keep].min()) if len(keep) else float("nan")}
        origin = net.origins.get(u.conv)
        if origin is not None:
            for k, task in enumerate(net.tasks):
                row[f"kept/{task}"] = int((origin[keep] == k).sum())
            net.origins[u.conv] = origin[keep]
        rows.append(row)
    net.pruned_rounds += 1
    return pd.DataFrame(rows)
