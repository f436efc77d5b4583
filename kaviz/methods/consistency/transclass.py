"""Trans-classification: classify from the consistent components through the rest of the target network."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...train import freeze
from .analysis import Consistency
from .features import FeatureLabels
from .transnet import TransNet
from .variances import float_rows

_FLATTEN = "<flatten>"


def _chain(parent: nn.Module) -> list | None:
    """The children of ``parent`` in the order its forward applies them (``_FLATTEN`` for a
    functional ``torch.flatten``), or None when its forward is not a plain chain."""
    from ...models.small import (
        BasicBlock,
        CifarResNet,
        InvertedResidual,
        SmallMobileNet,
        SmallVGG,
    )

    names = [n for n, _ in parent.named_children()]
    if isinstance(parent, (CifarResNet, SmallVGG, SmallMobileNet)):
        return names
    if isinstance(parent, BasicBlock):
        return None
    if isinstance(parent, InvertedResidual):
        return None if parent.residual else names
    cls = type(parent)
    if cls.__module__.startswith("torchvision.models"):
        if cls.__name__ == "ResNet":
            return ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool",
                    _FLATTEN, "fc"]
        if cls.__name__ == "VGG":
            return ["features", "avgpool", _FLATTEN, "classifier"]
    if type(parent) is nn.Sequential or (isinstance(parent, nn.Sequential)
                                         and type(parent).forward is nn.Sequential.forward):
        return names
    return None


def tail_after(model: nn.Module, layer: str) -> nn.Sequential:
    """B's layers after the cut: an ``nn.Sequential`` that maps the feature of ``layer`` (a dotted
    module name; ``"<name>:in"`` cuts before that module) to the model's output.

    Works for kaviz's small families (``cifar_resnet*`` also at ``layerK.i.merge``, the residual sum
    before the block's last ReLU), torchvision ResNets (at block boundaries) and VGGs, and any
    plain ``nn.Sequential``; other places raise an error that says where a cut is possible.
    The modules are shared with ``model`` (deep-copy the result before fine-tuning it).
    """
    from ...features import parse_layer, unknown_layer_error
    from ...models.small import BasicBlock

    name, where = parse_layer(layer)
    modules = dict(model.named_modules())
    if name not in modules:
        raise unknown_layer_error(model, name)
    if name == "":
        return nn.Sequential()
    parts = name.split(".")
    after: list[nn.Module] = [modules[name]] if where == "in" else []
    for depth in range(len(parts), 0, -1):
        parent_name = ".".join(parts[:depth - 1])
        parent = modules[parent_name]
        child = parts[depth - 1]
        if isinstance(parent, BasicBlock) and child in ("merge", "relu2"):
            after += [parent.relu2] if child == "merge" else []
            continue
        order = _chain(parent)
        if order is None or child not in order:
            where_ok = parent_name or type(model).__name__
            raise ValueError(
                f"cannot run {type(model).__name__} from the feature of {layer!r}: {where_ok!r} "
                f"({type(parent).__name__}) does not apply its children as a plain chain (e.g. a residual block), "
                "so the layers after the cut are not known. Cut at a block boundary (e.g. 'layer3' or 'layer3.1'), "
                "at 'layerK.i.merge' in kaviz's cifar_resnet, at 'features.N' of a VGG; or pass your own tail module.")
        own = dict(parent.named_children())
        for n in order[order.index(child) + 1:]:
            after.append(nn.Flatten() if n == _FLATTEN else own[n])
    return nn.Sequential(*after)


def check_tail(model, layer, tail, example):
    from ...features import FeatureTap, eval_mode

    with eval_mode(model), eval_mode(tail), torch.no_grad():
        with FeatureTap(model, [layer], clone=True) as tap:  # the tail shares modules: run it outside the tap
            out = model(example)
            feature = tap[layer]
        try:
            again = tail(feature)
        except RuntimeError:  # e.g. a shape mismatch inside the tail
            again = None
    if again is None or again.shape != out.shape or not torch.allclose(again, out, rtol=1e-4, atol=1e-5):
        raise ValueError(f"the layers after {layer!r} do not reproduce {type(model).__name__}'s output from the "
                         "tapped feature (its forward is not the chain kaviz assumed); cut at another layer")


class TransClassifier(nn.Module):
    """B's layers after the cut (``tail``, trainable), fed ``Σ_k mask_k · x⁽ᵏ⁾(x_A)`` from a frozen
    Trans-Net — or B's own feature when ``transnet`` is None. ``{"ce": cross-entropy}``;
    ``evaluate`` reports ``accuracy``. Batches are ``(feature, label)``."""

    def __init__(self, tail: nn.Module, transnet: TransNet | None = None, mask=None):
        super().__init__()
        self.tail = tail
        self.transnet = freeze(transnet) if transnet is not None else None
        if transnet is None:
            if mask is not None:
                raise ValueError("a mask selects Trans-Net components: pass transnet= too")
            self.mask = None
        else:
            m = torch.ones(transnet.orders) if mask is None else torch.as_tensor(mask, dtype=torch.float32).reshape(-1)
            if m.numel() != transnet.orders:
                raise ValueError(f"mask has {m.numel()} entries for a Trans-Net with {transnet.orders} orders "
                                 f"(one 0/1 per order, e.g. {[1] * transnet.orders})")
            self.mask = m.tolist()

    def inputs(self, f: torch.Tensor) -> torch.Tensor:
        if self.transnet is None:
            return f
        with torch.no_grad():
            comps = self.transnet.module.decompose(f)
            m = torch.tensor(self.mask, dtype=comps.dtype, device=comps.device)
            return (comps * m.view(-1, *([1] * (comps.dim() - 1)))).sum(0)

    def forward(self, batch):
        f, y = batch[0], batch[1]
        return {"ce": F.cross_entropy(self.tail(self.inputs(f)), y)}

    def evaluate(self, data, batch_size: int = 256) -> dict:
        from ... import metrics
        from ...features import eval_mode

        dev = next(self.tail.parameters()).device
        logits, ys = [], []
        with eval_mode(self), torch.no_grad():
            for f, y in torch.utils.data.DataLoader(data, batch_size=batch_size):
                logits.append(self.tail(self.inputs(f.to(dev))).cpu())
                ys.append(y)
        return {"accuracy": metrics.accuracy(torch.cat(logits), torch.cat(ys))}


def trans_classification(cons: Consistency, test_data=None, *, masks=((1, 1, 1), (1, 0, 0)), epochs: int = 10,
                         lr: float = 1e-5, batch_size: int = 64, schedule="loglinear", weight_decay: float = 0.0,
                         control: bool = True, max_train: int | None = None, precompute: bool = True,
                         tail: nn.Module | None = None, seed: int = 0, device=None, progress: bool | None = None):
    """Feature refinement (SPEC §3): feed A's consistent components chosen by each order mask into B's
    layers after the cut and fine-tune those layers (Adam, lr decaying log-linearly by 100×: the
    paper's 1e-5 → 1e-7); compare with B alone.

    Rows: B alone (its own feature, not fine-tuned); B's tail fine-tuned on its own feature with the
    same schedule (``control``: any gain that is only due to the extra fine-tuning shows here); for
    each mask, the masked components before and after fine-tuning. Accuracies on the validation
    split (best epoch, which also selects the test number) and, when ``test_data`` is given, on the
    test split. ``max_train`` fine-tunes on a seeded subset of the training split; ``precompute``
    computes each split's masked inputs once (in memory: N·C·H·W floats per split) instead of every
    epoch; ``tail`` replaces :func:`tail_after` for architectures it does not know.
    Returns ``(table, histories)``.
    """
    import pandas as pd

    from ...train import fit

    for mask in masks:
        if len(mask) != cons.transnet.orders:
            raise ValueError(f"mask {list(mask)} has {len(mask)} entries for a Trans-Net with "
                             f"{cons.transnet.orders} orders")
    splits = {"train": cons.features("train"), "val": cons.features("val")}
    if test_data is not None:
        splits["test"] = cons.features("test", test_data)
    la, lb = cons.layer_a, cons.layer_b
    base_tail = tail if tail is not None else tail_after(cons.model_b, lb)
    if cons.example is not None:
        check_tail(cons.model_b, lb, base_tail, cons.example)
    n_train = len(splits["train"][1])
    keep = {"train": None if max_train is None or max_train >= n_train else
            np.sort(np.random.default_rng(seed).choice(n_train, size=int(max_train), replace=False))}

    def datasets(mask):
        out = {}
        for name, (sa, sb) in splits.items():
            idx = keep.get(name)
            if mask is None:
                out[name] = FeatureLabels(sb[lb], sb.targets, idx)
            elif precompute:
                feats = sa[la] if idx is None else sa[la][idx]
                out[name] = FeatureLabels(_masked(cons.transnet, feats, mask, device=device), np.asarray(sb.targets)[
                    slice(None) if idx is None else idx])
            else:
                out[name] = FeatureLabels(sa[la], sb.targets, idx)
        return out

    rows, histories = [], {}

    def record(label, method, data, mask, tuned, best_epoch):
        row = {"input": label, "mask": "—" if mask is None else str(list(mask)), "fine_tuned": tuned,
               "val_accuracy": method.evaluate(data["val"])["accuracy"]}
        if "test" in data:
            row["test_accuracy"] = method.evaluate(data["test"])["accuracy"]
        row["epoch"] = best_epoch
        rows.append(row)

    def classifier(mask):
        if mask is None or precompute:
            return TransClassifier(copy.deepcopy(base_tail))
        return TransClassifier(copy.deepcopy(base_tail), cons.transnet, mask)

    plain = datasets(None)
    record("B alone: x_B", classifier(None), plain, None, False, 0)
    runs = ([("x_B, B's layers fine-tuned (control)", None)] if control else []) + \
        [("Σ mask·x⁽ᵏ⁾(x_A)", tuple(m)) for m in masks]
    for label, mask in runs:
        data = plain if mask is None else datasets(mask)
        if mask is not None:
            record(label, classifier(mask), data, mask, False, 0)
        method = classifier(mask)
        hist = fit(method, data["train"], data["val"], epochs=epochs, lr=lr, batch_size=batch_size,
                   optimizer="adam", weight_decay=weight_decay, schedule=schedule, monitor="val/accuracy",
                   restore="best", seed=seed, device=device, progress=progress, val_losses=False)
        method.cpu()
        record(label, method, data, mask, True, int(hist.attrs["best_epoch"]))
        histories["control" if mask is None else f"mask {list(mask)}"] = hist
    table = pd.DataFrame(rows)
    table.attrs["note"] = ("accuracy = top-1 on the split; epoch = best on validation (0: no fine-tuning); "
                           "the test number is at that epoch")
    return table, histories


def _masked(transnet: TransNet, feats, mask, batch_size: int = 256, device=None) -> torch.Tensor:
    """``Σ_k mask_k · x⁽ᵏ⁾`` for every row of ``feats``, computed once (on ``device``; kept on the CPU)."""
    from ... import default_device

    dev = default_device(device) if device is not None else torch.device("cpu")
    home = next(transnet.parameters()).device
    transnet.to(dev)
    m = torch.tensor(list(mask), dtype=torch.float32, device=dev)
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(feats), batch_size):
                comps = transnet.decompose(float_rows(feats, i, batch_size).to(dev))
                out.append((comps * m.view(-1, *([1] * (comps.dim() - 1)))).sum(0).cpu())
    finally:
        transnet.to(home)
    return torch.cat(out)
