r"""Compression as a use of knowledge consistency (SPEC §3, "compression: magnitude pruning of a net
vs the original"): prune a trained network by weight magnitude, then ask how much of each net's
intermediate feature the other one explains.

- :func:`magnitude_prune` returns a pruned *copy* (the original is untouched): unstructured pruning
  that zeroes the ``round(s·N)`` conv / linear weights of smallest ``|w|`` over all of them at once
  (``scope="global"``, the default) or the ``round(s·n_l)`` smallest in every layer
  (``scope="layer"``). Biases and batch-norm parameters are kept. Optionally the survivors are
  fine-tuned for a few epochs with :func:`kaviz.train.fit` (the pruned weights are held at zero);
- :func:`compression_consistency` prunes at several sparsities and, at the named layers, fits a
  Trans-Net in both directions (original → pruned: what of the pruned net's feature the original
  explains; pruned → original: what the pruned net still explains of the original) with
  :func:`fit_transnet`, reporting the variance shares of :func:`compare` and each net's accuracy in
  one tidy table. Independent networks passed as ``references`` (another seed, random init) get the
  same rows: the reference point for "how consistent is consistent".

Why global by default: measured on the knowledge_consistency notebook's nets
(scripts/measure_kc_compression.py, 3 seeds), one threshold keeps far more accuracy than the same
sparsity in every layer — 50 %: test accuracy 0.862 vs 0.488 without fine-tuning; 80 % + 2 epochs of
fine-tuning: 0.886 vs 0.607 — because it spares the thin first conv and the classifier and prunes
the wide late convs more. Its pitfall: with batch-norm a conv's output does not depend on its
weights' scale, and init schemes differ by layer, so magnitudes of different layers need not be
comparable and a global threshold can empty a whole layer (an untrained ``cifar_resnet8`` at 60 %
loses its entire N(0, 0.01)-initialised classifier). A warning names such layers;
``scope="layer"`` (every layer at the same sparsity) is the option that cannot do it.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .analysis import compare, fit_transnet

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
SCOPES = ("global", "layer")
DIRECTIONS = {"both": ("original→net", "net→original"), "forward": ("original→net",),
              "backward": ("net→original",)}


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) \
            or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity is the share of conv/linear weights set to zero and must lie in [0, 1) "
                         f"(e.g. 0.5, 0.8, 0.95), got {sparsity!r}")
    return float(sparsity)


def prunable_modules(model: nn.Module, modules: Iterable[str] | None = None) -> list[str]:
    """Names of the modules whose ``weight`` :func:`magnitude_prune` prunes: every conv and linear
    layer (``modules=None``) or the named ones (each must be a conv or linear layer of ``model``)."""
    from ...features import unknown_layer_error

    named = dict(model.named_modules())
    if modules is None:
        names = [n for n, m in named.items() if isinstance(m, PRUNABLE) and getattr(m, "weight", None) is not None]
        if not names:
            raise ValueError(f"{type(model).__name__} has no conv or linear layer to prune")
        return names
    names = [modules] if isinstance(modules, str) else list(dict.fromkeys(modules))
    if not names:
        raise ValueError("modules is empty: name at least one conv or linear layer, or pass None for all of them")
    for n in names:
        if n not in named:
            raise unknown_layer_error(model, n)
        if not isinstance(named[n], PRUNABLE):
            raise ValueError(f"module {n!r} is a {type(named[n]).__name__}; only conv and linear weights are "
                             f"pruned (prunable: {', '.join(prunable_modules(model)[:8])} ...)")
    return names


def prune_masks(model: nn.Module, sparsity: float, *, scope: str = "global",
                modules: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks (bool, the weight's shape) of unstructured magnitude pruning, by module name.

    ``scope="global"`` (default): the ``round(s·N)`` weights of smallest ``|w|`` over all N prunable
    weights (a ``UserWarning`` names any layer it empties); ``scope="layer"``: the ``round(s·n_l)``
    smallest in every layer. Ties are broken by position (a stable sort), so the number pruned is
    exact and the masks are deterministic."""
    s = _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} ('global': one threshold over all pruned weights; "
                         f"'layer': every layer at the same sparsity), got {scope!r}")
    named = dict(model.named_modules())
    names = prunable_modules(model, modules)
    weights = [named[n].weight.detach() for n in names]

    def keep(flat: torch.Tensor) -> torch.Tensor:
        k = int(round(s * flat.numel()))
        mask = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        if k:
            mask[torch.argsort(flat.abs(), stable=True)[:k]] = False
        return mask

    if scope == "layer":
        return {n: keep(w.reshape(-1)).reshape(w.shape) for n, w in zip(names, weights)}
    flat = keep(torch.cat([w.reshape(-1) for w in weights]))
    out, start = {}, 0
    for n, w in zip(names, weights):
        out[n] = flat[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    emptied = [n for n, k in out.items() if k.numel() and not bool(k.any())]
    if emptied:
        import warnings

        warnings.warn(f"global magnitude pruning at sparsity {s} removes every weight of {', '.join(emptied)} "
                      "(its weights are all smaller than the global threshold; with batch-norm or a different "
                      "init, weight scales of different layers need not be comparable): the net's output no "
                      "longer depends on what comes before. Use scope='layer' to prune every layer alike.",
                      UserWarning, stacklevel=3)
    return out


def weight_sparsity(model: nn.Module, modules: Iterable[str] | None = None) -> float:
    """Share of exact zeros among the prunable (conv and linear) weights of ``model``."""
    named = dict(model.named_modules())
    ws = [named[n].weight.detach() for n in prunable_modules(model, modules)]
    return float(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))


def magnitude_prune(model: nn.Module, sparsity: float, *, scope: str = "global", modules: Iterable[str] | None = None,
                    train_data=None, val_data=None, epochs: int = 0, lr: float = 1e-3, batch_size: int = 64,
                    schedule="cosine", seed: int = 0, device=None, progress: bool | None = None,
                    **fit_kwargs) -> nn.Module:
    """A pruned copy of ``model`` (in eval mode; ``model`` itself is not changed).

    The weights outside :func:`prune_masks` are set to zero. With ``epochs > 0`` the copy is then
    fine-tuned on ``train_data`` with :class:`kaviz.train.Supervised` and :func:`kaviz.train.fit`
    (Adam, ``lr``, ``schedule``, best epoch on ``val_data``, ``fit_kwargs`` passed on) while the
    pruned weights are held at zero (a gradient hook zeroes their gradient, and the mask is applied
    again after training). ``sparsity=0`` without fine-tuning is an exact copy.
    """
    from ... import seed_everything
    from ...train import Supervised, fit

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs (of fine-tuning) must be an int >= 0, got {epochs!r}")
    if epochs and train_data is None:
        raise ValueError("fine-tuning (epochs > 0) needs train_data (and val_data to pick the epoch)")
    masks = prune_masks(model, sparsity, scope=scope, modules=modules)
    pruned = copy.deepcopy(model)
    named = dict(pruned.named_modules())
    with torch.no_grad():
        for n, keep in masks.items():
            named[n].weight.mul_(keep.to(named[n].weight.dtype))
    if epochs:
        # a pruned weight gets no gradient, so Adam / SGD (with or without weight decay) leave it at 0;
        # the masks are applied once more at the end in case an optimiser moves zeros anyway
        hooks = [named[n].weight.register_hook(lambda g, keep=keep: g * keep.to(g.device, g.dtype))
                 for n, keep in masks.items()]
        try:
            seed_everything(seed)
            fit(Supervised(pruned), train_data, val_data, epochs=epochs, lr=lr, batch_size=batch_size,
                schedule=schedule, seed=seed, device=device, progress=progress, **fit_kwargs)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for n, keep in masks.items():
                named[n].weight.mul_(keep.to(named[n].weight.device, named[n].weight.dtype))
    return pruned.eval()


def _accuracies(model, val_data, test_data) -> dict:
    from ...train import Supervised

    out = {"val_accuracy": Supervised(model).evaluate(val_data)["accuracy"]}
    if test_data is not None:
        out["test_accuracy"] = Supervised(model).evaluate(test_data)["accuracy"]
    return out


def _check_layers(model: nn.Module, layers) -> list[str]:
    from ...features import OUTPUT, parse_layer, unknown_layer_error

    layers = [layers] if isinstance(layers, str) else list(layers or [])
    if not layers:
        raise ValueError("layers is empty: name at least one layer (kaviz.features.list_layers(model) lists them)")
    named = dict(model.named_modules())
    for layer in layers:
        if layer == OUTPUT:
            continue
        name, _ = parse_layer(layer)
        if name not in named:
            raise unknown_layer_error(model, name)
    return list(dict.fromkeys(layers))


def compression_consistency(model: nn.Module, train_data, val_data, test_data=None, *, layers,
                            sparsities: Sequence[float] = (0.5, 0.8, 0.95), fine_tune_epochs: Sequence[int] = (0,),
                            scope: str = "global", modules: Iterable[str] | None = None,
                            fine_tune: Mapping | None = None, fine_tune_train=None,
                            references: Mapping[str, nn.Module] | None = None,
                            directions: str = "both", orders: int = 3, alpha=0.1, transnet: Mapping | None = None,
                            seed: int = 0, device=None, progress: bool | None = None):
    """Knowledge consistency between ``model`` and its magnitude-pruned copies (SPEC §3, compression).

    For every sparsity in ``sparsities`` and every count in ``fine_tune_epochs`` (0: pruned only),
    :func:`magnitude_prune` (``scope``, ``modules``; fine-tuned on ``train_data`` / ``val_data`` with
    ``fine_tune`` = more :func:`magnitude_prune` / :func:`kaviz.train.fit` keywords, e.g. ``lr``;
    ``fine_tune_train``: another training split for fine-tuning, e.g. an augmented one) gives
    a net; every ``references`` net (name → an independent network of the same architecture: another
    seed, a random init) is treated alike. For each net, layer and direction a Trans-Net is fitted by
    :func:`fit_transnet` (``orders``, ``alpha``, ``seed``, ``transnet`` = its other keywords, e.g.
    ``epochs``, ``lr``, ``max_train``; features cached once per net and split for all ``layers``):
    ``"original→net"`` explains the net's feature from the original's, ``"net→original"`` the
    reverse (``directions``: ``"both"``, ``"forward"`` or ``"backward"``).

    Returns a tidy DataFrame, one row per (net, layer, direction): ``net``, ``kind`` (pruned /
    reference), ``sparsity`` (requested), ``weight_sparsity`` (measured share of zero conv/linear
    weights), ``fine_tune_epochs``, ``val_accuracy`` (and ``test_accuracy`` with ``test_data``:
    top-1, the weights as returned — the best-on-validation epoch after fine-tuning), ``layer``,
    ``direction``, then the :func:`compare` columns on the validation split (the shares of Var(x_B)
    of each order, of g(x_A) and of x^Δ; Var(x_B); the gates). ``attrs["original"]`` holds the
    original's accuracies and weight sparsity.
    """
    import pandas as pd

    layers = _check_layers(model, layers)
    sparsities = [_check_sparsity(s) for s in ([sparsities] if isinstance(sparsities, (int, float)) else sparsities)]
    if not sparsities and not references:
        raise ValueError("nothing to compare: give at least one sparsity (or a reference net)")
    epochs_list = [fine_tune_epochs] if isinstance(fine_tune_epochs, int) else list(fine_tune_epochs)
    for e in epochs_list:
        if isinstance(e, bool) or not isinstance(e, int) or e < 0:
            raise ValueError(f"fine_tune_epochs must be ints >= 0 (0: no fine-tuning), got {e!r}")
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {sorted(DIRECTIONS)}, got {directions!r}")
    prunable_modules(model, modules)  # fail before any work on a bad name
    fine_tune = dict(fine_tune or {})
    for k in ("epochs", "train_data", "val_data", "scope", "modules", "seed"):
        if k in fine_tune:
            raise ValueError(f"fine_tune={{'{k}': ...}}: pass it as compression_consistency's own argument "
                             "(fine_tune_epochs, fine_tune_train, val_data, scope, modules, seed)")
    transnet = dict(transnet or {})
    for k in ("layer_a", "layer_b", "store_layers", "orders", "alpha", "seed"):
        if k in transnet:
            raise ValueError(f"transnet={{'{k}': ...}}: set by compression_consistency (layers, orders, alpha, seed)")
    for ref in (references or {}).values():
        _check_layers(ref, layers)

    def nets():  # one pruned copy in memory at a time
        for s in sparsities:
            for e in epochs_list:
                net = magnitude_prune(model, s, scope=scope, modules=modules, train_data=fine_tune_train or train_data,
                                      val_data=val_data, epochs=e, seed=seed, device=device, progress=progress,
                                      **fine_tune)
                yield f"pruned {100 * s:g}%" + (f" + {e} ep fine-tuning" if e else ""), "pruned", s, e, net
        for name, ref in (references or {}).items():
            yield str(name), "reference", float("nan"), 0, ref

    rows = []
    for label, kind, s, e, net in nets():
        info = {"net": label, "kind": kind, "sparsity": s, "weight_sparsity": weight_sparsity(net, modules),
                "fine_tune_epochs": e, **_accuracies(net, val_data, test_data)}
        for layer in layers:
            for direction in DIRECTIONS[directions]:
                a, b = (model, net) if direction == "original→net" else (net, model)
                names = ("original", label) if direction == "original→net" else (label, "original")
                cons = fit_transnet(a, b, train_data, val_data, layer_a=layer, orders=orders, alpha=alpha, seed=seed,
                                    names=names, store_layers=layers, device=device, progress=progress, **transnet)
                shares = compare({label: cons}).iloc[0].to_dict()
                rows.append({**info, "layer": layer, "direction": direction, **shares})
    table = pd.DataFrame(rows)
    table.attrs["original"] = {**_accuracies(model, val_data, test_data),
                               "weight_sparsity": weight_sparsity(model, modules)}
    table.attrs["note"] = (f"magnitude pruning ({scope}) of conv/linear weights; shares of Var(x_B) on the validation "
                           "split; direction original→net explains the net's feature from the original's")
    return table
