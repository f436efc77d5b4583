"""The two amalgamation steps (SPEC §6): components from their sources, then the target from the components."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...features import FeatureTap, eval_mode
from ...train import freeze, unfrozen
from .multihead import MultiHead, check_head_names, default_blocks
from .selection import AssignedImages, Assignment, select_sources
from .tables import attribute_accuracy


def unit_norm_penalty(weight: torch.Tensor) -> torch.Tensor:
    """``mean_o (‖w_o‖² − 1)²`` over the output rows ``w_o`` of a (1×1 conv or linear) weight: zero
    exactly when every row has unit norm; keeps source-side projections from collapsing to zero."""
    rows = weight.reshape(weight.shape[0], -1)
    return ((rows.pow(2).sum(1) - 1.0) ** 2).mean()


def block_shapes(model: nn.Module, blocks: Sequence[str], image_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """``(C, H, W)`` of each hooked block of ``model`` (a :class:`MultiHead`, possibly frozen) for one
    image of shape ``image_shape``; raises if a block is unknown or does not give a feature map."""
    net = unfrozen(model)
    backbone = net.backbone if isinstance(net, MultiHead) else net
    x = torch.zeros(1, *image_shape, device=next(net.parameters()).device)
    with eval_mode(net), torch.no_grad(), FeatureTap(backbone, list(blocks)) as tap:
        net(x)
        shapes = [tuple(tap[b].shape[1:]) for b in blocks]
    for b, s in zip(blocks, shapes):
        if len(s) != 3:
            raise ValueError(f"block {b!r} gives features of shape {s}, not a (C, H, W) map; hook convolutional blocks")
    return shapes


def _conv1x1(cin, cout, bias=False):
    return nn.Conv2d(cin, cout, 1, bias=bias)


#: How :class:`ComponentAmalgamation` combines the per-source losses: ``"batch_share"`` weighs source t's
#: mean loss by the share of the batch assigned to it (every image counts once; kaviz's default);
#: ``"sum_of_means"`` adds the per-source means unweighted (the reference code).
REDUCTIONS = ("batch_share", "sum_of_means")


def _tap(model, blocks, detach):
    net = unfrozen(model)
    return FeatureTap(net.backbone, list(blocks), detach=detach)


def _check_same_grid(blocks, a, b, what):
    for blk, sa, sb in zip(blocks, a, b):
        if sa[1:] != sb[1:]:
            raise ValueError(
                f"block {blk!r}: the {what[0]} map is {sa[1]}×{sa[2]} but the {what[1]} map is {sb[1]}×{sb[2]}; the "
                "block-wise loss compares maps position by position. Hook blocks at the same resolution "
                "(same family and input size), e.g. blocks=default_blocks(arch)[0]."
            )


class ComponentAmalgamation(nn.Module):
    """Step 2 of SPEC §5: a single-head component for ``attribute`` from the sources covering it.

    ``forward((images, source_index))`` (batches of :class:`AssignedImages`) returns
    ``{"feat", "logit", "reg"}``: per source t on its own images of the batch, the block-wise
    projection loss and the scaled-logit loss, weighted by the share of the batch it was given (so
    every image counts once), and the unit-norm regulariser of all source-side projections.
    Trainable: the component, ``proj_c`` (component side, shared), ``proj_t`` (per source) and
    ``scale`` (m_t, one per source, initialised to 1). Sources are frozen.

    Recipe options (defaults unchanged; docs/decisions.md, "Recipes"):
    ``shared_projection=False`` gives every source its own component-side projections
    (``proj_c[t]``, as the reference code), and all projections then carry biases;
    ``selective=False`` is the ablation without selective learning: every source supervises every
    image of the batch (the assignment is ignored); ``reduction`` (:data:`REDUCTIONS`) combines the
    per-source losses by batch share (default) or as the sum of the per-source means (reference).
    """

    def __init__(self, component: MultiHead, sources: Sequence[MultiHead], attribute: str, *,
                 image_shape: Sequence[int], blocks: Sequence[str] | None = None, widths: Sequence[int] | None = None,
                 shared_projection: bool = True, selective: bool = True, reduction: str = "batch_share"):
        super().__init__()
        if not isinstance(component, MultiHead) or component.attributes != [attribute]:
            got = component.attributes if isinstance(component, MultiHead) else type(component).__name__
            raise ValueError(f"the component must be a MultiHead with the single head [{attribute!r}], got {got}")
        if not sources:
            raise ValueError(f"no source given for attribute {attribute!r}")
        for k, s in enumerate(sources):
            if attribute not in unfrozen(s).attributes:
                raise ValueError(f"source #{k} has no head {attribute!r}; its heads: {unfrozen(s).attributes}")
        if blocks is None:
            blocks, default_widths = default_blocks(component.arch)
            widths = default_widths if widths is None else widths
        blocks, widths = list(blocks), list(widths) if widths is not None else None
        if widths is None or len(widths) != len(blocks):
            raise ValueError(f"give one common width per hooked block: {len(blocks)} blocks {blocks}, widths {widths}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.shared_projection, self.selective, self.reduction = bool(shared_projection), bool(selective), reduction
        bias = not self.shared_projection
        self.attribute = attribute
        self.blocks = blocks
        self.widths = widths
        self.component = component
        self.sources = nn.ModuleList([freeze(s) for s in sources])
        self.heads = [unfrozen(s).head_index(attribute) for s in sources]
        comp_shapes = block_shapes(component, blocks, image_shape)
        if self.shared_projection:
            self.proj_c = nn.ModuleList([_conv1x1(s[0], w) for s, w in zip(comp_shapes, widths)])
        else:  # one component-side projection per source
            self.proj_c = nn.ModuleList([
                nn.ModuleList([_conv1x1(s[0], w, bias=True) for s, w in zip(comp_shapes, widths)]) for _ in sources])
        proj_t = []
        for s in sources:
            shapes = block_shapes(s, blocks, image_shape)
            _check_same_grid(blocks, comp_shapes, shapes, ("component", "source"))
            proj_t.append(nn.ModuleList([_conv1x1(sh[0], w, bias=bias) for sh, w in zip(shapes, widths)]))
        self.proj_t = nn.ModuleList(proj_t)
        self.scale = nn.Parameter(torch.ones(len(sources)))

    def regulariser(self) -> torch.Tensor:
        """``Σ_t Σ_l mean_o (‖w_o‖² − 1)²`` over the source-side projections."""
        return sum(unit_norm_penalty(p.weight) for group in self.proj_t for p in group)

    def forward(self, batch):
        x, index = batch[0], batch[1]
        if not torch.is_tensor(index) or index.dim() != 1 or len(index) != len(x) or index.dtype != torch.int64:
            raise ValueError("a component batch is (images, assigned source index (B,) int64); wrap the images "
                             "with AssignedImages(data, assignment.index)")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self.sources)):
            raise ValueError(f"assigned source indices must lie in [0, {len(self.sources)}), got "
                             f"{int(index.min())}..{int(index.max())}")
        with _tap(self.component, self.blocks, detach=False) as tap:
            z = self.component(x)[:, 0]
            fc = [tap[b] for b in self.blocks]
        B = len(x)
        feat = x.new_zeros(())
        logit = x.new_zeros(())
        for t, src in enumerate(self.sources):
            mask = index == t if self.selective else torch.ones_like(index, dtype=torch.bool)
            n = int(mask.sum())
            if n == 0:
                continue
            with _tap(src, self.blocks, detach=True) as stap:
                zs = src(x[mask])[:, self.heads[t]]
                fs = [stap[b] for b in self.blocks]
            if self.reduction == "sum_of_means":
                w = 1.0
            else:  # without selection every source sees the whole batch: each gets an equal share
                w = n / B if self.selective else 1.0 / len(self.sources)
            proj_c = self.proj_c if self.shared_projection else self.proj_c[t]
            feat = feat + w * sum(F.mse_loss(pc(f[mask]), pt(g))
                                  for pc, pt, f, g in zip(proj_c, self.proj_t[t], fc, fs))
            logit = logit + w * F.mse_loss(self.scale[t] * z[mask], zs)
        return {"feat": feat, "logit": logit, "reg": self.regulariser()}

    def evaluate(self, data) -> dict:
        return {"accuracy": attribute_accuracy(self.component, data)[self.attribute]}


class TargetAmalgamation(nn.Module):
    """Step 3 of SPEC §5: the target net learns every component of the group on all images.

    ``forward(images)`` returns ``{"feat", "logit"}`` summed over components a:
    ``Σ_l MSE(P_{a,l}(F^target_l), F^comp_a_l)`` and ``MSE(m_a · z^target_a, z^comp_a)``.
    ``P_{a,l}`` maps the target's block l to component a's channels (1×1 conv; ``proj[l]`` stacks
    them for all components, :meth:`projection` gives one); ``scale`` holds m_a (init 1).
    Components are frozen.
    """

    def __init__(self, target: MultiHead, components: Mapping[str, MultiHead], *, image_shape: Sequence[int],
                 blocks: Sequence[str] | None = None):
        super().__init__()
        if not components:
            raise ValueError("TargetAmalgamation needs at least one component")
        names = list(components)
        if not isinstance(target, MultiHead) or sorted(target.attributes) != sorted(names):
            got = target.attributes if isinstance(target, MultiHead) else type(target).__name__
            raise ValueError(f"the target must be a MultiHead with one head per component {names}, got {got}")
        for a, c in components.items():
            if unfrozen(c).attributes != [a]:
                raise ValueError(f"component {a!r} must have the single head [{a!r}], got {unfrozen(c).attributes}")
        self.blocks = list(blocks) if blocks is not None else list(default_blocks(target.arch)[0])
        self.attributes = names
        self.target = target
        self.components = nn.ModuleDict({a: freeze(c) for a, c in components.items()})
        self.heads = [target.head_index(a) for a in names]
        t_shapes = block_shapes(target, self.blocks, image_shape)
        self.channels = []  # per block: each component's channel count, in attribute order
        for a, c in components.items():
            shapes = block_shapes(c, self.blocks, image_shape)
            _check_same_grid(self.blocks, t_shapes, shapes, ("target", f"component {a!r}"))
            self.channels.append([sh[0] for sh in shapes])
        self.channels = [list(cs) for cs in zip(*self.channels)]
        # P_{a,l} for every component a stacked along the output channels: one 1×1 conv per block
        # computes all of them at once (the same maps as separate convs, in fewer, larger calls)
        self.proj = nn.ModuleList([_conv1x1(ts[0], sum(cs)) for ts, cs in zip(t_shapes, self.channels)])
        self.scale = nn.Parameter(torch.ones(len(names)))

    def projection(self, attribute: str, block: int) -> torch.Tensor:
        """The weight of ``P_{attribute, block}`` (its rows of the stacked 1×1 conv)."""
        k = self.attributes.index(attribute)
        start = sum(self.channels[block][:k])
        return self.proj[block].weight[start:start + self.channels[block][k]]

    def forward(self, batch):
        from ...data import images_of

        x = images_of(batch)
        with _tap(self.target, self.blocks, detach=False) as tap:
            z = self.target(x)
            projected = [p(tap[b]).split(cs, dim=1) for p, b, cs in zip(self.proj, self.blocks, self.channels)]
        feat = x.new_zeros(())
        logit = x.new_zeros(())
        for k, a in enumerate(self.attributes):
            comp = self.components[a]
            with _tap(comp, self.blocks, detach=True) as ctap:
                zc = comp(x)[:, 0]
                feat = feat + sum(F.mse_loss(pr[k], ctap[b]) for pr, b in zip(projected, self.blocks))
            logit = logit + F.mse_loss(self.scale[k] * z[:, self.heads[k]], zc)
        return {"feat": feat, "logit": logit}

    def evaluate(self, data) -> dict:
        acc = attribute_accuracy(self.target, data)
        return {"accuracy": float(np.mean([acc[a] for a in self.attributes])),
                **{f"accuracy/{a}": acc[a] for a in self.attributes}}


def _image_shape(data) -> tuple[int, ...]:
    get = getattr(data, "get_image", None)
    x = get(0) if get is not None else data[0][0]
    return tuple(x.shape)


def amalgamate_component(attribute: str, sources: Mapping[str, MultiHead], train_data, val_data=None, *,
                         arch: str = "cifar_resnet8", arch_kwargs: Mapping | None = None,
                         blocks: Sequence[str] | None = None, widths: Sequence[int] | None = None,
                         assignment: Assignment | None = None, component: MultiHead | None = None,
                         epochs: int = 4, lr: float = 1e-3, batch_size: int = 64, schedule="step", seed: int = 0,
                         shared_projection: bool = True, selective: bool = True, reduction: str = "batch_share",
                         **fit_kwargs):
    """Select sources by entropy on ``train_data`` (unless ``assignment`` is given), then train a
    component for ``attribute`` with :class:`ComponentAmalgamation` and :func:`kaviz.train.fit`
    (``schedule="step"``: ×0.1 at half the epochs, stepped per epoch). The best epoch on
    ``val_data`` (component accuracy) is restored. ``shared_projection``, ``selective`` and ``reduction``:
    the recipe options of :class:`ComponentAmalgamation`. Returns ``(component, history, assignment)``."""
    from ... import seed_everything
    from ...train import fit

    if assignment is None:
        assignment = select_sources(sources, attribute, train_data)[attribute]
    elif assignment.attribute != attribute or len(assignment) != len(train_data):
        raise ValueError(f"the assignment is for {assignment.attribute!r} on {len(assignment)} images, "
                         f"not for {attribute!r} on the {len(train_data)} training images")
    if component is None:
        seed_everything(seed)
        component = MultiHead(arch, [attribute], **dict(arch_kwargs or {}))
    method = ComponentAmalgamation(component, [sources[s] for s in assignment.sources], attribute,
                                   image_shape=_image_shape(train_data), blocks=blocks, widths=widths,
                                   shared_projection=shared_projection, selective=selective, reduction=reduction)
    fit_kwargs.setdefault("val_losses", False)
    history = fit(method, AssignedImages(train_data, assignment.index), val_data, epochs=epochs, lr=lr,
                  batch_size=batch_size, schedule=schedule, seed=seed, **fit_kwargs)
    history.attrs["scale"] = dict(zip(assignment.sources, method.scale.detach().cpu().tolist()))
    return component.cpu().eval(), history, assignment


def amalgamate_components(sources: Mapping[str, MultiHead], attributes: Sequence[str], train_data, val_data=None, *,
                          assignments: Mapping[str, Assignment] | None = None,
                          components: Mapping[str, MultiHead] | None = None, seed: int = 0, **kwargs):
    """One component per attribute, every one trained (its own :func:`fit` run). Returns
    ``(components {attribute: MultiHead}, histories {attribute: DataFrame}, assignments)``."""
    attributes = check_head_names(attributes)
    if assignments is None:
        assignments = select_sources(sources, attributes, train_data)
    comps, hists = {}, {}
    for k, a in enumerate(attributes):
        given = None if components is None else components[a]
        comps[a], hists[a], _ = amalgamate_component(a, sources, train_data, val_data, assignment=assignments[a],
                                                     component=given, seed=seed * 1000 + k, **kwargs)
    return comps, hists, dict(assignments)


def amalgamate_target(components: Mapping[str, MultiHead], train_data, val_data=None, *,
                      arch: str = "cifar_resnet8", arch_kwargs: Mapping | None = None,
                      blocks: Sequence[str] | None = None, target: MultiHead | None = None, epochs: int = 4,
                      lr: float = 1e-3, batch_size: int = 64, schedule="step", seed: int = 0, **fit_kwargs):
    """Train the target net (one head per component's attribute) on the unlabeled ``train_data``
    with :class:`TargetAmalgamation`; best epoch on ``val_data`` (mean accuracy over the group).
    Returns ``(target, history)``."""
    from ... import seed_everything
    from ...data import Unlabeled
    from ...train import fit

    if target is None:
        seed_everything(seed)
        target = MultiHead(arch, list(components), **dict(arch_kwargs or {}))
    method = TargetAmalgamation(target, components, image_shape=_image_shape(train_data), blocks=blocks)
    fit_kwargs.setdefault("val_losses", False)
    history = fit(method, Unlabeled(train_data), val_data, epochs=epochs, lr=lr, batch_size=batch_size,
                  schedule=schedule, seed=seed, **fit_kwargs)
    return target.cpu().eval(), history
