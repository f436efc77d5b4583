"""The reference bottleneck of recombination (``combine(bottleneck="reference")``): 16 channels with BN,
LeakyReLU and the quantiser, per-task adaptors with BN and LeakyReLU — built, quantised, pruned,
trained and scored (SPEC.md §4.3; docs/decisions.md, "Recombination · bottleneck")."""
import copy

import numpy as np
import pytest
import torch
from _dense_helpers import assert_prune_consistent, with_stats
from torch import nn

from kaviz import models
from kaviz.methods import recombination as R


def _warm(model, seed=0, size=16):
    return with_stats(model, seed, size, passes=3)


def _teachers(seed=0, classes=5):
    torch.manual_seed(seed)
    ae = _warm(models.build("segnet_small", 3, output="sigmoid", widths=(6, 8, 10)), seed)
    seg = _warm(models.build("segnet_small", classes, widths=(4, 6, 8)), seed + 1)
    return {"reconstruction": ae, "segmentation": seg}


def _ref(seed=0, **kw):
    """A reference-bottleneck network whose new batch norms hold statistics too."""
    return _warm(R.combine(_teachers(), bottleneck="reference", seed=seed, **kw), seed + 2)


def _consistent(net):
    assert_prune_consistent(net)


def _entropy_bpp(sym, pixels):
    """Zeroth-order entropy per channel of integer symbols (B, C, h, w), summed, in bits per pixel."""
    bits = 0.0
    for c in range(sym.shape[1]):
        _, cnt = np.unique(sym[:, c].numpy(), return_counts=True)
        p = cnt / cnt.sum()
        bits += float(-(p * np.log2(p)).sum()) * sym[:, c].numel()
    return bits / pixels


def test_reference_bottleneck_structure_and_code_shape():
    torch.set_num_threads(1)
    T = _teachers()
    net = R.combine(T, bottleneck="reference", seed=0)
    same = R.combine(T, bottleneck=16, bottleneck_norm=True, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), same.state_dict().values()))
    assert net.bottleneck_norm and not net.identity_bottleneck
    assert net.code_channels() == R.REFERENCE_BOTTLENECK == 16
    neck = net.bottleneck
    assert isinstance(neck, R.Conv1x1Block) and isinstance(neck.bn, nn.BatchNorm2d)
    assert isinstance(neck.act, nn.LeakyReLU) and neck.act.negative_slope == R.LEAKY_SLOPE
    assert (neck.conv1.in_channels, neck.conv1.out_channels, neck.conv2.out_channels) == (18, 16, 16)
    assert neck.conv1.bias is None and neck.conv2.bias is None
    # adaptors: 16 → C_t → C_t, C_t = the teacher's last encoder width (10 and 8)
    assert [(a.in_channels, a.conv1.out_channels, a.out_channels) for a in net.adaptors.values()] == [(16, 10, 10),
                                                                                                      (16, 8, 8)]
    x = torch.rand(3, 3, 16, 24)
    z = net.code(x)
    assert z.shape == (3, 16, 2, 3)
    out = net(x)
    assert out["reconstruction"].shape == (3, 3, 16, 24) and out["segmentation"].shape == (3, 5, 16, 24)
    # control: the default keeps the full width (18) in one identity 1×1 conv, and reproduces the teachers
    plain = R.combine(T)
    assert not plain.bottleneck_norm and isinstance(plain.bottleneck, nn.Conv2d) and plain.code_channels() == 18
    assert "output" in set(R.reproduction_check(plain, T, x)["layer"])
    assert "output" not in set(R.reproduction_check(net, T, x)["layer"])  # random: nothing to reproduce


def test_seeded_initialisation_leaves_the_global_rng_alone():
    T = _teachers()
    a, b, c = (R.combine(T, bottleneck="reference", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.bottleneck.conv1.weight, b.bottleneck.conv1.weight)
    assert not torch.equal(a.bottleneck.conv1.weight, c.bottleneck.conv1.weight)
    torch.manual_seed(5)
    r0 = torch.rand(3)
    torch.manual_seed(5)
    R.combine(T, bottleneck="reference", seed=3)
    assert torch.equal(torch.rand(3), r0)
    torch.manual_seed(5)
    R.combine(T, bottleneck="reference")  # control: unseeded, it draws from the global RNG
    assert not torch.equal(torch.rand(3), r0)


def test_the_code_is_quantised():
    torch.set_num_threads(1)
    net = _ref(quant_step=0.05).eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        z = net.code(x)
        k = z / 0.05
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert len(torch.unique(z)) > 3
        with net.quantiser.disabled():  # control: without the quantiser the values are off the grid
            z_raw = net.code(x)
        k_raw = z_raw / 0.05
        assert (k_raw - k_raw.round()).abs().max() > 0.1
        assert torch.allclose(z, net.quantiser(z_raw))


def test_bpp_is_the_entropy_of_the_16_channel_quantised_code():
    torch.set_num_threads(1)
    net = _ref(quant_step=0.05).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(3, 16, 16, generator=g), {"mask": torch.randint(0, 5, (16, 16), generator=g)})
            for _ in range(6)]
    x = torch.stack([d[0] for d in data])
    s = R.evaluate_dense(net, data, batch_size=4)
    with torch.no_grad():
        sym = net.quantiser.symbols(net.bottleneck(net.encode(x)))
        wide = net.quantiser.symbols(net.encode(x))
    assert sym.shape[1] == 16
    assert s["bpp"] == pytest.approx(_entropy_bpp(sym, 6 * 16 * 16), rel=1e-9)
    # control: the 18-channel encoder output (what the default would code) gives another rate
    assert abs(s["bpp"] - _entropy_bpp(wide, 6 * 16 * 16)) > 1e-3


def test_pruning_removes_the_bottleneck_filters_with_their_bn_and_the_adaptor_inputs():
    torch.set_num_threads(1)
    net = _ref().eval()
    with torch.no_grad():  # make filters 1, 4, 7, 10, 13 of each bottleneck conv the smallest
        net.bottleneck.conv1.weight[1::3] *= 1e-3
        net.bottleneck.conv2.weight[1::3] *= 1e-3
        net.bottleneck.bn.running_mean.copy_(torch.randn(16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    log = R.prune(net, 0.3, groups=("bottleneck",)).set_index("layer")  # round(0.3 · 16) = 5 filters
    keep = torch.tensor([i for i in range(16) if i % 3 != 1])
    assert log.loc["bottleneck.conv1", "after"] == log.loc["bottleneck.conv2", "after"] == 11
    assert torch.equal(net.bottleneck.conv1.weight, before["bottleneck.conv1.weight"][keep])
    assert torch.equal(net.bottleneck.bn.weight, before["bottleneck.bn.weight"][keep])
    assert torch.equal(net.bottleneck.bn.running_mean, before["bottleneck.bn.running_mean"][keep])
    assert torch.equal(net.bottleneck.conv2.weight, before["bottleneck.conv2.weight"][keep][:, keep])
    for t in net.tasks:  # the code lost channels: every adaptor reads only the kept ones
        assert torch.equal(net.adaptors[t].conv1.weight, before[f"adaptors.{t}.conv1.weight"][:, keep])
    # control: the kept channels are not simply the first ones
    assert not torch.equal(net.bottleneck.bn.running_mean, before["bottleneck.bn.running_mean"][:11])
    assert net.code_channels() == 11 and net.code(torch.rand(2, 3, 16, 16)).shape == (2, 11, 2, 2)
    _consistent(net)


def test_pruning_channels_that_carry_nothing_leaves_the_outputs_unchanged():
    """Bottleneck channels whose BN output is 0 (LeakyReLU(0) = 0) and code channels no adaptor reads
    carry nothing: removing them — with the right BN channels and next-layer inputs — must leave the
    outputs as they were; removing the live ones instead (control) changes them."""
    torch.set_num_threads(1)
    net = _ref().eval()
    with torch.no_grad():
        dead = torch.arange(16)[::4]                     # 4 of 16: round(0.25 · 16)
        net.bottleneck.conv1.weight[dead] *= 1e-3
        net.bottleneck.bn.weight[dead] = 0.0
        net.bottleneck.bn.bias[dead] = 0.0
        net.bottleneck.conv2.weight[dead] *= 1e-3
        for a in net.adaptors.values():
            a.conv1.weight[:, dead] = 0.0
    control = copy.deepcopy(net)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), net.quantiser.disabled():
        ref = net(x)
    R.prune(net, 0.25, groups=("bottleneck",))
    R.prune(control, 0.25, groups=("bottleneck",), criterion="largest")
    with torch.no_grad(), net.quantiser.disabled(), control.quantiser.disabled():
        out, bad = net(x), control(x)
    for task in ref:
        err, bad_err = (out[task] - ref[task]).abs().max(), (bad[task] - ref[task]).abs().max()
        assert err <= 1e-6 and bad_err > 1e-3 and bad_err > 1000 * err, (task, err, bad_err)


def test_every_group_prunes_consistently_over_rounds_and_stays_trainable():
    torch.set_num_threads(1)
    net = _ref()
    units = {u.conv for u in net.prune_units()}
    assert {"bottleneck.conv1", "bottleneck.conv2", "adaptors.segmentation.conv1",
            "adaptors.segmentation.conv2"} <= units
    enc3 = next(u for u in net.prune_units(("encoder",)) if u.conv == "enc3.conv2")
    assert enc3.consumers == ("bottleneck.conv1",)
    sizes = [models.param_count(net)]
    for _ in range(3):
        R.prune(net, 0.3, groups=R.PRUNE_GROUPS, criterion="bn-scaled")
        _consistent(net)
        net.train()
        out = net(torch.rand(2, 3, 16, 16))
        sum(o.mean() for o in out.values()).backward()
        assert all(p.grad is not None for p in net.parameters())
        net.zero_grad()
        sizes.append(models.param_count(net))
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert net.code_channels() == 16 - 5 - 3 - 2


def test_one_training_step_reduces_the_loss():
    torch.set_num_threads(1)
    T = _teachers()
    net = R.combine(T, bottleneck="reference", seed=0, quant_step=0.25).train()
    loss_fn = R.RecombinationLoss(net, T)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = (x, {"mask": torch.zeros(8, 16, 16, dtype=torch.long)})

    def total():
        return sum(loss_fn(batch).values())

    before = total()
    before.backward()
    # the gradient reaches the first bottleneck conv through the quantiser (straight-through)
    assert net.bottleneck.conv1.weight.grad.abs().sum() > 0
    with torch.no_grad():  # one plain gradient step
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
        after = total()
    assert after < before - 1e-3
    # control: rounding without the straight-through estimator cuts the gradient off
    z = net.bottleneck(net.encode(x))
    g_hard, = torch.autograd.grad((torch.round(z / 0.25) * 0.25).sum(), net.bottleneck.conv1.weight, retain_graph=True)
    g_ste, = torch.autograd.grad(net.quantiser(z).sum(), net.bottleneck.conv1.weight)
    assert g_hard.abs().sum() == 0 and g_ste.abs().sum() > 0


def test_recombine_runs_the_reference_bottleneck_end_to_end():
    torch.set_num_threads(1)
    T = _teachers(classes=4)
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(3, 16, 16, generator=g), {"mask": torch.randint(0, 4, (16, 16), generator=g)})
            for _ in range(8)]
    res = R.recombine(T, data[:6], data[6:], data[6:], rounds=1, epochs=1, batch_size=4, bottleneck="reference",
                      quant_step=0.25, progress=False, seed=0)
    tab = res.table("test").set_index("stage")
    assert tab.loc["combined", "code_channels"] == 16 and tab.loc["retrained", "code_channels"] == 11
    assert tab.loc["retrained", "params"] < tab.loc["fine-tuned", "params"]
    assert np.isfinite(tab.loc[["combined", "retrained"], ["psnr", "mIoU", "bpp"]].to_numpy()).all()
    assert res.nets[1].bottleneck_norm
    again = R.recombine(T, data[:6], data[6:], data[6:], rounds=0, epochs=1, batch_size=4, bottleneck="reference",
                        quant_step=0.25, progress=False, seed=0)
    assert again.table("test").set_index("stage").loc["combined", "psnr"] == tab.loc["combined", "psnr"]


@pytest.mark.parametrize("kw, match", [
    ({"bottleneck": 0}, "positive number of channels"),
    ({"bottleneck": -3, "bottleneck_norm": True}, "positive number of channels"),
    ({"bottleneck": 2.5}, "positive number of channels"),
    ({"bottleneck": True}, "positive number of channels"),
    ({"bottleneck": "16"}, "'reference'"),
    ({"bottleneck": "reference", "bottleneck_norm": "yes"}, "bottleneck_norm must be True or False"),
    ({"bottleneck_norm": 1}, "bottleneck_norm must be True or False"),
    ({"bottleneck": "reference", "seed": 1.5}, "seed must be an int"),
])
def test_bad_bottleneck_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        R.combine(_teachers(), **kw)


def test_bad_options_raise_in_recombine_and_the_block():
    with pytest.raises(ValueError, match="positive number of channels"):
        R.recombine(_teachers(), [], [], bottleneck=0, bottleneck_norm=True)
    with pytest.raises(ValueError, match="width must be a positive int"):
        R.Conv1x1Block(4, 0, 4)


def test_full_width_with_norm_is_not_the_identity_and_default_is_unchanged():
    T = _teachers()
    net = R.combine(T, bottleneck_norm=True, seed=0)
    assert net.code_channels() == 18 and not net.identity_bottleneck and net.bottleneck_norm
    a, b = R.combine(T), R.combine(T, bottleneck_norm=False, bottleneck=None)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert "bottleneck.weight" in a.state_dict() and "adaptors.segmentation.weight" in a.state_dict()
    # float64 teachers give a float64 reference bottleneck
    d = R.combine({k: v.double() for k, v in T.items()}, bottleneck="reference", seed=0)
    assert d.bottleneck.bn.running_var.dtype == torch.float64
    assert d(torch.rand(1, 3, 16, 16, dtype=torch.float64))["segmentation"].dtype == torch.float64
