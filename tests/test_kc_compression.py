"""Knowledge Consistency, compression use (SPEC §3): magnitude pruning of a net vs the original."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from kaviz import data, models
from kaviz.methods import consistency as kc


def _tiny(seed=0, width=4):
    torch.manual_seed(seed)
    return models.build("cifar_resnet8", 10, width=width).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _prunable_weights(model):
    named = dict(model.named_modules())
    return {n: named[n].weight.detach() for n in kc.prunable_modules(model)}


def _gap(w0, w1, groups):
    """Smallest kept |w| minus largest pruned |w| within each group (>= 0 for magnitude pruning)."""
    return min(torch.cat([w0[n][w1[n] != 0].abs() for n in g]).min() -
               torch.cat([w0[n][w1[n] == 0].abs() for n in g]).max() for g in groups)


@pytest.mark.filterwarnings("ignore:global magnitude pruning")  # untrained: global 0.9 empties the classifier
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_pruned_copy_hits_the_sparsity_and_leaves_the_original(scope, sparsity):
    torch.set_num_threads(1)
    net = _tiny()
    before = _state(net)
    pruned = kc.magnitude_prune(net, sparsity, scope=scope)
    assert pruned is not net and not pruned.training
    for k, v in net.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    assert kc.weight_sparsity(net) == 0.0
    w0, w1 = _prunable_weights(net), _prunable_weights(pruned)
    n_all = sum(w.numel() for w in w0.values())
    assert kc.weight_sparsity(pruned) == pytest.approx(sparsity, abs=(len(w0) if scope == "layer" else 1) / n_all)
    if scope == "layer":
        for n, w in w1.items():
            assert int((w == 0).sum()) == round(sparsity * w.numel()), n
    # the survivors are untouched and the pruned ones are the smallest |w| (of the net / of each layer)
    for n in w0:
        keep = w1[n] != 0
        assert torch.equal(w1[n][keep], w0[n][keep])
    groups = [list(w0)] if scope == "global" else [[n] for n in w0]
    assert _gap(w0, w1, groups) >= 0
    # control: a random mask of the same sparsity fails that check
    g = torch.Generator().manual_seed(0)
    rand = {n: w * (torch.rand(w.shape, generator=g) >= sparsity) for n, w in w0.items()}
    assert _gap(w0, rand, groups) < 0
    if scope == "layer":  # and one threshold per layer is not one threshold for the net
        assert _gap(w0, w1, [list(w0)]) < 0
    # other parameters (biases, batch-norm) are kept
    for k, v in pruned.state_dict().items():
        if not any(k == f"{n}.weight" for n in w0):
            assert torch.equal(v, before[k]), k


def test_sparsity_zero_is_an_exact_copy():
    torch.set_num_threads(1)
    net = _tiny()
    x = torch.rand(4, 3, 16, 16)
    copy0 = kc.magnitude_prune(net, 0.0)
    with torch.no_grad():
        assert torch.equal(copy0(x), net(x))
        assert not torch.equal(kc.magnitude_prune(net, 0.5, scope="layer")(x), net(x))  # control: pruning does
    assert copy0 is not net and next(copy0.parameters()).data_ptr() != next(net.parameters()).data_ptr()


def test_global_pruning_warns_when_it_empties_a_layer():
    net = _tiny()  # untrained: the classifier's N(0, 0.01) weights are all below the convs' global threshold
    with pytest.warns(UserWarning, match="removes every weight of fc"):
        masks = kc.prune_masks(net, 0.6)
    assert not masks["fc"].any()
    with warnings.catch_warnings():  # control: the same sparsity per layer keeps 40 % of every layer
        warnings.simplefilter("error")
        masks = kc.prune_masks(net, 0.6, scope="layer")
    assert all(k.float().mean() == pytest.approx(0.4, abs=0.02) for k in masks.values())


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    monkeypatch.setenv("KAVIZ_DATA", str(tmp_path))
    ds = data.shapes(96, seed=3, size=16)
    return data.split(ds, val=0.25, test=0.25, seed=0)


def test_fine_tuning_keeps_the_pruned_weights_at_zero(tiny_data):
    torch.set_num_threads(1)
    sp = tiny_data
    net = _tiny()
    masks = kc.prune_masks(net, 0.6, scope="layer")
    plain = kc.magnitude_prune(net, 0.6, scope="layer")
    tuned = kc.magnitude_prune(net, 0.6, scope="layer", train_data=sp.train, val_data=sp.val, epochs=1, lr=1e-2,
                               batch_size=16)
    assert list(tuned.state_dict()) == list(net.state_dict())  # no pruning re-parametrisation left behind
    wp, wt = _prunable_weights(plain), _prunable_weights(tuned)
    for n, keep in masks.items():
        assert torch.equal(wt[n] == 0, ~keep), n  # exactly the pruned weights are zero
    # control: fine-tuning did change the surviving weights
    assert any(not torch.equal(wt[n], wp[n]) for n in masks)
    assert kc.weight_sparsity(tuned) == pytest.approx(kc.weight_sparsity(plain))


def _normed(seed, C=8):
    """A tiny conv net whose tapped feature ``norm2`` is instance-normalised: every image's channel
    has the same spatial scale, which the Trans-Net cannot see (g is scale-invariant in its input),
    so a few epochs of Trans-Net training suffice to tell a near-copy from an independent net."""
    from collections import OrderedDict

    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, C, 3, padding=1), relu1=nn.ReLU(), pool=nn.MaxPool2d(2), conv2=nn.Conv2d(C, C, 3, padding=1),
        norm2=nn.InstanceNorm2d(C, affine=True), relu2=nn.ReLU(), gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
        fc=nn.Linear(C, 10))).eval()


def test_original_explains_a_lightly_pruned_net_better_than_an_independent_one(tiny_data):
    torch.set_num_threads(1)
    sp = tiny_data
    a, other = _normed(0), _normed(1)
    tn = dict(epochs=8, lr=3e-2, batch_size=16)
    table = kc.compression_consistency(a, sp.train, sp.val, sp.test, layers=["norm2"], sparsities=[0.2],
                                       references={"independent (seed 1)": other}, transnet=tn, progress=False)
    assert list(table["direction"]) == ["original→net", "net→original"] * 2
    assert list(table["kind"]) == ["pruned"] * 2 + ["reference"] * 2
    assert list(table["net"]) == ["pruned 20%"] * 2 + ["independent (seed 1)"] * 2
    for col in ("sparsity", "weight_sparsity", "fine_tune_epochs", "val_accuracy", "test_accuracy", "layer",
                "share x⁽⁰⁾", "share x⁽²⁾", "share g(x_A)", "share x^Δ", "Var(x_B)", "p0", "p1"):
        assert col in table, col
    assert table["weight_sparsity"].iloc[0] == pytest.approx(0.2, abs=1e-3)
    assert math.isnan(table["sparsity"].iloc[2]) and table["weight_sparsity"].iloc[2] == 0
    assert table["test_accuracy"].between(0, 1).all() and "test_accuracy" in table.attrs["original"]
    share = table.set_index(["kind", "direction"])["share x^Δ"]
    for d in ("original→net", "net→original"):
        # the property; the independent net is the control that fails it (measured margin ~0.3)
        assert share["pruned", d] < share["reference", d] - 0.1, (d, share.to_dict())
    # the same numbers as a Trans-Net fitted directly on the pair (same tap, fit and variance table)
    direct = kc.fit_transnet(a, kc.magnitude_prune(a, 0.2), sp.train, sp.val, layer_a="norm2", progress=False, **tn)
    assert share["pruned", "original→net"] == pytest.approx(direct.variance().iloc[-2]["share"], rel=1e-6)


def test_bad_inputs_raise_value_error(tiny_data):
    sp = tiny_data
    net = _tiny()
    for s in (-0.1, 1.0, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"sparsity .* \[0, 1\)"):
            kc.magnitude_prune(net, s)
    with pytest.raises(ValueError, match="scope must be"):
        kc.magnitude_prune(net, 0.5, scope="channel")
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        kc.magnitude_prune(net, 0.5, modules=["layer9"])
    with pytest.raises(ValueError, match="only conv and linear"):
        kc.magnitude_prune(net, 0.5, modules=["bn1"])
    with pytest.raises(ValueError, match="needs train_data"):
        kc.magnitude_prune(net, 0.5, epochs=2)
    with pytest.raises(ValueError, match="no layer 'layer3.9.merge'"):
        kc.compression_consistency(net, sp.train, sp.val, layers=["layer3.9.merge"])
    with pytest.raises(ValueError, match=r"sparsity .* \[0, 1\)"):
        kc.compression_consistency(net, sp.train, sp.val, layers=["layer3.0.merge"], sparsities=[0.5, 1.0])
    with pytest.raises(ValueError, match="directions must be"):
        kc.compression_consistency(net, sp.train, sp.val, layers=["layer3.0.merge"], directions="sideways")
    with pytest.raises(ValueError, match="fine_tune_epochs"):
        kc.compression_consistency(net, sp.train, sp.val, layers=["layer3.0.merge"], fine_tune_epochs=[-1])
    with pytest.raises(ValueError, match="fine_tune_epochs, fine_tune_train"):
        kc.compression_consistency(net, sp.train, sp.val, layers=["layer3.0.merge"], fine_tune={"epochs": 2})
    with pytest.raises(ValueError, match="layers is empty"):
        kc.compression_consistency(net, sp.train, sp.val, layers=[])
    assert np.isfinite(kc.weight_sparsity(net))
