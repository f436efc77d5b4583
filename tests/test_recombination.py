"""kaviz.methods.recombination: block-diagonal combination, quantiser, pruning, retraining (SPEC §4.3)."""
import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from _dense_helpers import assert_prune_consistent, with_stats
from torch import nn

from kaviz import metrics, models
from kaviz.methods import recombination as R


def _with_stats(model, seed=0, size=16):
    return with_stats(model, seed, size, passes=2)


def teachers(seed=0, ae_widths=(6, 8, 10), seg_widths=(4, 6, 8), classes=5):
    torch.manual_seed(seed)
    ae = _with_stats(models.build("segnet_small", 3, output="sigmoid", widths=ae_widths), seed)
    seg = _with_stats(models.build("segnet_small", classes, widths=seg_widths), seed + 1)
    return {"reconstruction": ae, "segmentation": seg}


# ------------------------------------------------------------------------------------------------
# combination
# ------------------------------------------------------------------------------------------------
def test_weights_sit_at_their_output_and_input_offsets_and_bn_is_concatenated():
    T = teachers()
    net = R.combine(T)
    ae, seg = T["reconstruction"], T["segmentation"]
    w = net.enc2.conv1.weight  # (6+4 ... ) : in = 6 + 4, out = 8 + 6
    assert w.shape == (8 + 6, 6 + 4, 3, 3)
    assert torch.equal(w[:8, :6], ae.enc2.conv1.weight)
    assert torch.equal(w[8:, 6:], seg.enc2.conv1.weight)
    assert torch.count_nonzero(w[:8, 6:]) == 0 and torch.count_nonzero(w[8:, :6]) == 0
    # first conv: the image is repeated per teacher, teacher 2 reads channels 3..5
    w1 = net.enc1.conv1.weight
    assert w1.shape == (6 + 4, 6, 3, 3)
    assert torch.equal(w1[6:, 3:], seg.enc1.conv1.weight) and torch.count_nonzero(w1[6:, :3]) == 0
    bn = net.enc3.bn2
    assert torch.equal(bn.running_var, torch.cat([ae.enc3.bn2.running_var, seg.enc3.bn2.running_var]))
    assert torch.equal(bn.weight, torch.cat([ae.enc3.bn2.weight, seg.enc3.bn2.weight]))
    assert net.offsets["enc3"] == [(0, 10), (10, 18)]
    # the teachers are left untouched (copies, not shared modules)
    assert all(p is not q for p in net.parameters() for q in ae.parameters())


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_combined_network_reproduces_every_teacher_before_pruning(hw):
    T = teachers()
    net = R.combine(T)
    x = torch.rand(3, 3, *hw, generator=torch.Generator().manual_seed(1))
    check = R.reproduction_check(net, T, x)
    assert list(check["layer"]) == ["enc1", "enc2", "enc3", "output"] * 2
    assert (check["max_abs"] > 0.05).all()  # real features, not zeros
    assert (check["max_abs_diff"] <= 1e-6 * check["max_abs"]).all(), check
    # the quantiser is off in the check; with it on, the outputs move (and the check turns it back on)
    assert net.quantiser.enabled
    with torch.no_grad():
        assert not torch.equal(net.eval()(x)["reconstruction"], T["reconstruction"](x))


def test_reference_offset_bug_breaks_the_second_teacher():
    T = teachers()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    bad = R.reproduction_check(R.combine(T, offset_bug=True), T, x).set_index(["teacher", "layer"])
    # teacher 1 sits at offset 0 anyway; teacher 2 reads teacher 1's channels from the second conv on
    assert (bad.loc["reconstruction", "max_abs_diff"] == 0).all()
    seg = bad.loc["segmentation"]
    assert (seg["max_abs_diff"] > 0.1 * seg["max_abs"]).all()


def test_smaller_bottleneck_is_random_and_check_skips_outputs():
    T = teachers()
    net = R.combine(T, bottleneck=7)
    assert net.code_channels() == 7 and not net.identity_bottleneck
    check = R.reproduction_check(net, T, torch.rand(2, 3, 16, 16))
    assert "output" not in set(check["layer"]) and (check["max_abs_diff"] <= 1e-6 * check["max_abs"]).all()
    out = net(torch.rand(2, 3, 16, 16))
    assert out["reconstruction"].shape == (2, 3, 16, 16) and out["segmentation"].shape == (2, 5, 16, 16)


def test_combine_errors():
    T = teachers()
    with pytest.raises(ValueError, match="skip connections"):
        R.combine({**T, "segmentation": models.build("segnet_small", 5, skips=True)})
    with pytest.raises(TypeError, match="not a SegNet-like"):
        R.combine({**T, "segmentation": models.build("cifar_resnet8", 5)})
    with pytest.raises(TypeError, match="non-empty dict"):
        R.combine({})
    with pytest.raises(ValueError, match="different channel counts"):
        R.combine({**T, "segmentation": models.build("segnet_small", 5, in_channels=1)})
    with pytest.raises(ValueError, match="not among the teachers"):
        R.combine(T, kinds={"depth": "segmentation"})
    with pytest.raises(ValueError, match="kind must be one of"):
        R.combine(T, kinds={"segmentation": "depth"})
    with pytest.raises(ValueError, match="not a segmentation teacher"):
        R.combine({"depth": models.build("segnet_small", 1)})
    with pytest.raises(ValueError, match="quantiser step"):
        R.combine(T, quant_step=-1.0)
    with pytest.raises(ValueError, match="positive number of channels"):
        R.combine(T, bottleneck=0)
    net = R.combine(T)
    with pytest.raises(ValueError, match="pass the plain image"):
        net(torch.rand(1, 6, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.rand(1, 3, 12, 16))
    with pytest.raises(ValueError, match="in order"):
        R.reproduction_check(net, dict(reversed(list(T.items()))), torch.rand(1, 3, 16, 16))


def test_frozen_teachers_are_accepted():
    from kaviz.train import freeze

    T = teachers()
    net = R.combine({k: freeze(v) for k, v in T.items()})
    check = R.reproduction_check(net, {k: freeze(v) for k, v in T.items()}, torch.rand(2, 3, 16, 16))
    assert (check["max_abs_diff"] <= 1e-6 * check["max_abs"]).all()


# ------------------------------------------------------------------------------------------------
# quantiser
# ------------------------------------------------------------------------------------------------
def test_quantiser_rounds_forward_and_passes_gradients_straight_through():
    q = R.Quantiser(0.25)
    z = torch.tensor([0.1, 0.2, -0.37, 1.13], requires_grad=True)
    y = q(z)
    assert torch.allclose(y, torch.tensor([0.0, 0.25, -0.25, 1.25]))
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.equal(z.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # identity STE
    assert q.symbols(z).tolist() == [0, 1, -1, 5]
    with q.disabled():
        assert torch.equal(q(z), z)
    assert q.active
    assert torch.equal(R.Quantiser(None)(z), z)
    with pytest.raises(ValueError, match="step"):
        R.Quantiser("0.1")


# ------------------------------------------------------------------------------------------------
# pruning
# ------------------------------------------------------------------------------------------------
def _consistent(net):
    assert_prune_consistent(net)


def _kept(weight, fraction):
    norms = weight.abs().sum(dim=(1, 2, 3))
    n_remove = int(np.floor(fraction * len(norms) + 0.5))
    return torch.sort(torch.argsort(norms, stable=True)[n_remove:]).values, norms, n_remove


def test_prune_removes_the_smallest_l1_filters_with_their_bn_and_next_layer_inputs():
    T = teachers()
    net = R.combine(T)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert torch.equal(R.filter_l1(net.enc2.conv1), before["enc2.conv1.weight"].abs().sum(dim=(1, 2, 3)))
    log = R.prune(net, 0.3, groups=("encoder",)).set_index("layer")
    keep0, _, _ = _kept(before["enc1.conv2.weight"], 0.3)
    keep, norms, n_remove = _kept(before["enc2.conv1.weight"], 0.3)
    keep2, _, _ = _kept(before["enc2.conv2.weight"], 0.3)
    assert net.enc2.conv1.out_channels == len(norms) - n_remove == log.loc["enc2.conv1", "after"]
    # its own smallest filters are gone, and so are the input channels of enc1.conv2's removed filters
    assert torch.equal(net.enc2.conv1.weight, before["enc2.conv1.weight"][keep][:, keep0])
    assert torch.equal(net.enc2.bn1.running_mean, before["enc2.bn1.running_mean"][keep])
    assert torch.equal(net.enc2.bn1.bias, before["enc2.bn1.bias"][keep])
    assert torch.equal(net.enc2.conv2.weight, before["enc2.conv2.weight"][keep2][:, keep])
    assert norms[keep].min() >= torch.sort(norms).values[n_remove - 1]
    assert (log["max_removed_l1"] <= log["min_kept_l1"]).all()
    # the bottleneck (not pruned here) reads only the kept channels of enc3.conv2
    keep3, _, _ = _kept(before["enc3.conv2.weight"], 0.3)
    assert torch.equal(net.bottleneck.weight, before["bottleneck.weight"][:, keep3])
    _consistent(net)


def test_prune_largest_and_random_criteria_differ():
    T = teachers()
    a, b, c = R.combine(T), R.combine(T), R.combine(T)
    log_a = R.prune(a, 0.5, groups=("encoder",))
    log = R.prune(b, 0.5, groups=("encoder",), criterion="largest").set_index("layer")
    R.prune(c, 0.5, groups=("encoder",), criterion="random", seed=3)
    assert R.filter_l1(a.enc3.conv2).sum() > R.filter_l1(b.enc3.conv2).sum()
    assert (log["max_removed_l1"] >= log["min_kept_l1"]).all()
    assert (log_a["max_removed_l1"] <= log_a["min_kept_l1"]).all()
    assert (log_a["after"].to_numpy() == log["after"].to_numpy()).all()
    _consistent(b)
    _consistent(c)


def test_pruning_channels_that_carry_nothing_leaves_the_outputs_unchanged():
    """Channels whose BN output is always ≤ 0 vanish after the ReLU: removing them (and the next
    layer's inputs that read them) must not change the network's outputs — only possible when the
    dependent channels are the right ones."""
    net = R.combine(teachers(ae_widths=(6, 9, 12), seg_widths=(3, 6, 9))).eval()  # widths divisible by 3
    with torch.no_grad():
        for blk in (net.enc1, net.enc2, net.enc3):
            for conv, bn in ((blk.conv1, blk.bn1), (blk.conv2, blk.bn2)):
                dead = torch.arange(conv.out_channels)[::3]  # every third filter
                conv.weight[dead] *= 1e-3                   # the smallest L1 norms
                bn.weight[dead] = 0.0
                bn.bias[dead] = -1.0                        # relu(-1) = 0 whatever the input
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
    fraction = 1 / 3 - 1e-6  # round(fraction * C) = C / 3 = the number of dead filters
    log = R.prune(net, fraction, groups=("encoder",), min_channels=1)
    assert ((log["before"] - log["after"]).to_numpy() == log["before"].to_numpy() // 3).all()
    with torch.no_grad():
        out = net(x)
    for task in ref:
        assert torch.allclose(out[task], ref[task], atol=1e-5), task


def test_network_runs_with_consistent_shapes_after_every_round():
    T = teachers()
    net = R.combine(T)
    sizes = [sum(p.numel() for p in net.parameters())]
    for _ in range(4):
        R.prune(net, 0.3, groups=R.PRUNE_GROUPS)  # decoders and adaptors too
        _consistent(net)
        net.train()
        out = net(torch.rand(2, 3, 16, 24))
        assert out["reconstruction"].shape == (2, 3, 16, 24) and out["segmentation"].shape == (2, 5, 16, 24)
        loss = sum(o.mean() for o in out.values())
        loss.backward()  # the rebuilt modules are trainable
        assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
        net.zero_grad()
        sizes.append(sum(p.numel() for p in net.parameters()))
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert min(net.widths().values()) >= 2  # min_channels
    assert net.pruned_rounds == 4
    with pytest.raises(ValueError, match="pruned"):
        R.reproduction_check(net, T, torch.rand(1, 3, 16, 16))


def test_origins_follow_the_teachers_filters_through_rounds():
    T = teachers()
    net = R.combine(T)
    assert net.origins["enc2.conv1"].tolist() == [0] * 8 + [1] * 6
    with torch.no_grad():  # make teacher 2's filters of enc2.conv1 the smallest
        net.enc2.conv1.weight[8:] *= 1e-3
    log = R.prune(net, 0.4).set_index("layer")
    assert log.loc["enc2.conv1", "kept/segmentation"] == 6 - round(0.4 * 14) == 0
    assert log.loc["enc2.conv1", "kept/reconstruction"] == 8
    assert net.origins["enc2.conv1"].tolist() == [0] * 8
    before = net.origins["enc3.conv2"].clone()
    log2 = R.prune(net, 0.3).set_index("layer")
    assert len(net.origins["enc3.conv2"]) == net.enc3.conv2.out_channels
    assert (log2.loc["enc3.conv2", ["kept/reconstruction", "kept/segmentation"]].sum()
            == net.enc3.conv2.out_channels)
    assert set(net.origins["enc3.conv2"].tolist()) <= set(before.tolist())


def test_bn_scaled_criterion_folds_the_batch_norm():
    T = teachers()
    a, b = R.combine(T), R.combine(T)
    for net in (a, b):
        with torch.no_grad():  # filter 0 has the largest raw norm but a zero batch-norm gain
            net.enc1.conv1.weight[0] *= 100
            net.enc1.bn1.weight[0] = 0.0
    R.prune(a, 0.2, groups=("encoder",))
    R.prune(b, 0.2, groups=("encoder",), criterion="bn-scaled")
    assert a.origins["enc1.conv1"].numel() == b.origins["enc1.conv1"].numel()
    assert torch.isclose(a.enc1.conv1.weight.abs().sum(dim=(1, 2, 3)).max(), R.filter_l1(a.enc1.conv1).max())
    assert a.enc1.bn1.weight.min() == 0.0   # raw L1 kept the dead filter
    assert b.enc1.bn1.weight.min() > 0.0    # the folded norm removed it


def test_prune_errors():
    net = R.combine(teachers())
    with pytest.raises(ValueError, match="fraction"):
        R.prune(net, 1.0)
    with pytest.raises(ValueError, match="criterion"):
        R.prune(net, 0.2, criterion="biggest")
    with pytest.raises(ValueError, match="unknown prune groups"):
        R.prune(net, 0.2, groups=("head",))
    with pytest.raises(ValueError, match="min_channels"):
        R.prune(net, 0.2, min_channels=0)


# ------------------------------------------------------------------------------------------------
# losses and metrics
# ------------------------------------------------------------------------------------------------
def test_ssim_loss_matches_the_metric_and_is_differentiable():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 16, 16, generator=g)
    b = (a + 0.1 * torch.randn(2, 3, 16, 16, generator=g)).clamp(0, 1)
    assert 1 - R.ssim_loss(a, b).item() == pytest.approx(metrics.ssim(a, b, window=7), abs=1e-5)  # its 7×7 window
    assert R.ssim_loss(a, b).item() == metrics.ssim_loss(a, b, window=R.SSIM_WINDOW).item()  # one arithmetic
    assert R.ssim_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    b.requires_grad_(True)
    R.ssim_loss(a, b).backward()
    assert b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="smaller than"):
        R.ssim_loss(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="one shape"):
        R.ssim_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8))


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n=10, size=16, classes=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, size, size, generator=g)
        self.mask = torch.randint(0, classes, (n, size, size), generator=g)
        self.mask[:, 0] = 255  # void row

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"mask": self.mask[i]}


class _Echo(nn.Module):
    """'Segments' by the image's red channel, 'reconstructs' by the identity."""

    def __init__(self, kind, classes=4):
        super().__init__()
        self.kind, self.classes = kind, classes
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        if self.kind == "reconstruction":
            return x
        ids = (x[:, 0] * self.classes).long().clamp(max=self.classes - 1)
        return nn.functional.one_hot(ids, self.classes).permute(0, 3, 1, 2).float()


def test_evaluate_dense_accumulates_over_batches_like_the_whole_set_metrics():
    data = _Pairs()
    s = R.evaluate_dense(_Echo("segmentation"), data, kinds={"out": "segmentation"}, num_classes=4, batch_size=3)
    pred = (data.x[:, 0] * 4).long().clamp(max=3)
    ref = metrics.segmentation_scores(pred, data.mask, num_classes=4)
    assert s["mIoU"] == pytest.approx(ref["mIoU"]) and s["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"])
    r = R.evaluate_dense(_Echo("reconstruction"), data, kinds={"out": "reconstruction"}, batch_size=4)
    assert r["ssim"] == pytest.approx(1.0) and r["psnr"] >= 100
    with pytest.raises(ValueError, match="kinds="):
        R.evaluate_dense(_Echo("reconstruction"), data)


def test_bpp_is_the_code_entropy():
    T = teachers()
    net = R.combine(T, quant_step=1e6)  # every symbol rounds to 0: zero entropy
    assert R.evaluate_dense(net, _Pairs(classes=5), batch_size=4)["bpp"] == 0.0
    net = R.combine(T, quant_step=0.01)
    bpp = R.evaluate_dense(net, _Pairs(classes=5), batch_size=4)["bpp"]
    # at most log2(#symbols) bits per symbol; 18 channels at 2x2 positions per 16x16 image
    assert 0 < bpp <= np.log2(10 * 4) * 18 * 4 / 256
    assert "bpp" not in R.evaluate_dense(R.combine(T, quant_step=None), _Pairs(classes=5))


def test_recombination_loss_terms_and_frozen_teacher():
    T = teachers()
    net = R.combine(T)
    method = R.RecombinationLoss(net, T)
    data = _Pairs(n=4, classes=5)
    batch = (data.x, {"mask": data.mask})
    terms = method(batch)
    assert set(terms) == {"l1", "ssim_loss", "kd"} and method.loss_weights == {"l1": 1.0, "ssim_loss": 1.0, "kd": 1.0}
    sum(terms.values()).backward()
    assert net.enc1.conv1.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in T["segmentation"].parameters())
    # before any training the combined network is the teachers (up to the quantiser): soft-CE = teacher entropy
    with net.quantiser.disabled():
        kd = method(batch)["kd"]
        p = torch.softmax(T["segmentation"](data.x), 1)
        entropy = -(p * torch.log(p)).sum(1).mean()
        assert kd.item() == pytest.approx(entropy.item(), rel=1e-4)
    with pytest.raises(ValueError, match="unknown loss terms"):
        R.RecombinationLoss(net, T, weights={"ce": 1.0})
    with pytest.raises(ValueError, match="need their teacher"):
        R.RecombinationLoss(net, {"reconstruction": T["reconstruction"]})
    with pytest.raises(KeyError, match="mask"):
        R.Segmentation(T["segmentation"], 5)((data.x, torch.zeros(4)))


def test_ms_ssim_reconstruction_loss_option():
    torch.set_num_threads(1)
    T = teachers()
    net = R.combine(T)
    w = metrics.MS_SSIM_WEIGHTS[:2]  # 16-pixel images: two scales of the 7×7 window
    method = R.RecombinationLoss(net, T, reconstruction="ms_ssim", ms_ssim_weights=w)
    data = _Pairs(n=4, classes=5)
    batch = (data.x, {"mask": data.mask})
    terms = method(batch)
    assert set(terms) == {"ms_ssim_loss", "kd"} and method.loss_weights == {"ms_ssim_loss": 1.0, "kd": 1.0}
    with torch.no_grad():
        expected = metrics.ms_ssim_loss(net(data.x)["reconstruction"], data.x, window=7, weights=w)
    assert terms["ms_ssim_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    sum(terms.values()).backward()
    assert net.enc1.conv1.weight.grad is not None
    ev = method.evaluate(_Pairs(n=4, classes=5))
    assert 0 < ev["ms_ssim"] <= 1 and "ssim" in ev and "psnr" in ev
    # the default keeps L1 + (1 − SSIM) and reports no MS-SSIM
    assert "ms_ssim" not in R.RecombinationLoss(net, T).evaluate(_Pairs(n=4, classes=5))
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        R.RecombinationLoss(net, T, reconstruction="ssim")


def test_constant_baseline_is_the_mean_image_and_the_majority_class():
    train, test = _Pairs(n=6, classes=4, seed=0), _Pairs(n=5, classes=4, seed=1)
    train.mask[:, 1:4] = 2  # class 2 is the most frequent training class
    res = R.constant_baseline(train, test, num_classes=4, batch_size=4)
    assert res["majority"] == 2
    mean = train.x.double().mean(0).float()
    assert res["psnr"] == pytest.approx(metrics.psnr(mean.expand_as(test.x), test.x), rel=1e-6)
    assert res["ssim"] == pytest.approx(metrics.ssim(mean.expand_as(test.x), test.x, window=7), rel=1e-6)
    ref = metrics.segmentation_scores(torch.full_like(test.mask, 2), test.mask, num_classes=4)
    assert res["mIoU"] == pytest.approx(ref["mIoU"]) and res["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"])
    # the mean image beats a constant grey of the wrong level (a control for the "mean" part)
    grey = metrics.psnr(torch.zeros_like(test.x), test.x)
    assert res["psnr"] > grey
    only = R.constant_baseline(train, test)  # reconstruction only without num_classes
    assert "mIoU" not in only and only["majority"] is None
    with pytest.raises(ValueError, match="num_classes"):
        R.constant_baseline(train, test, kinds={"seg": "segmentation"})


# ------------------------------------------------------------------------------------------------
# end to end on tiny data
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_scenes():
    return R.load_splits("embedded", n=40, size=16, seed=0, val=0.2, test=0.2)


@pytest.fixture(scope="module")
def tiny_teachers(tiny_scenes, tmp_path_factory):
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("teachers")
    d = tiny_scenes
    ae, h1 = R.train_dense_teacher("reconstruction", d["train"], d["val"], widths=(4, 4, 8), epochs=2,
                                   batch_size=8, cache=cache)
    seg, h2 = R.train_dense_teacher("segmentation", d["train"], d["val"], num_classes=d["num_classes"],
                                    widths=(4, 4, 8), epochs=2, batch_size=8, cache=cache)
    return {"reconstruction": ae, "segmentation": seg}, (h1, h2), cache


def test_teachers_are_trained_and_cached(tiny_scenes, tiny_teachers):
    T, (h1, h2), cache = tiny_teachers
    d = tiny_scenes
    assert {"val/psnr", "val/ssim"} <= set(h1.columns) and {"val/mIoU", "val/pixel_accuracy"} <= set(h2.columns)
    assert h1.attrs["monitor"] == "val/loss" and h2.attrs["monitor"] == "val/mIoU"
    again, h = R.train_dense_teacher("reconstruction", d["train"], d["val"], widths=(4, 4, 8), epochs=2,
                                     batch_size=8, cache=cache)
    assert h.attrs["cached"] and models.weights_hash(again) == models.weights_hash(T["reconstruction"])
    other, h = R.train_dense_teacher("reconstruction", d["train"], d["val"], widths=(4, 4, 8), epochs=1,
                                     batch_size=8, cache=cache)
    assert not h.attrs["cached"]  # another setting, another key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        _, h = R.train_dense_teacher("reconstruction", d["train"], d["val"], widths=(4, 4, 8), epochs=2,
                                     batch_size=8, cache=cache)
    finally:
        torch.set_num_threads(threads)
    assert not h.attrs["cached"]  # another thread count sums in another order: another teacher
    with pytest.raises(ValueError, match="kind must be"):
        R.train_dense_teacher("depth", d["train"])
    with pytest.raises(ValueError, match="num_classes"):
        R.train_dense_teacher("segmentation", torch.utils.data.TensorDataset(torch.rand(4, 3, 16, 16)))


def test_recombine_end_to_end(tiny_scenes, tiny_teachers):
    T, _, _ = tiny_teachers
    d = tiny_scenes
    res = R.recombine(T, d["train"], d["val"], d["test"], rounds=2, fraction=0.4, epochs=1, batch_size=8)
    tab = res.table("test")
    assert list(tab["stage"]) == ["teachers", "combined", "fine-tuned", "pruned", "retrained", "pruned", "retrained"]
    assert {"psnr", "ssim", "mIoU", "pixel_accuracy", "bpp", "params", "params_ratio", "best_epoch"} <= set(tab.columns)
    after = tab[tab["stage"] == "retrained"]["params"].tolist()
    assert tab.loc[1, "params"] > after[0] > after[1]
    assert tab.loc[0, "params_ratio"] == 1.0
    # untrained combination = the teachers up to the quantiser
    assert tab.loc[1, "mIoU"] == pytest.approx(tab.loc[0, "mIoU"], abs=0.05)
    assert sorted(res.nets) == [0, 1, 2] and sorted(res.histories) == [0, 1, 2]
    assert set(res.pruning["round"]) == {1, 2}
    # the stored networks are snapshots, not the live one
    assert sum(p.numel() for p in res.nets[0].parameters()) > sum(p.numel() for p in res.nets[2].parameters())
    p = res.panels(2, 0, d["test"])
    assert list(p) == ["image", "rows", "kinds"] and p["kinds"] == {"reconstruction": "rgb", "segmentation": "labels"}
    columns = ["ground truth", "teacher", "round 2"]
    assert {t: list(r) for t, r in p["rows"].items()} == {"reconstruction": columns, "segmentation": columns}
    assert np.array_equal(p["rows"]["reconstruction"]["ground truth"], p["image"])  # reconstruction's target
    assert p["rows"]["reconstruction"]["round 2"].shape == (16, 16, 3)
    assert p["rows"]["segmentation"]["round 2"].dtype == np.int64
    from kaviz import plots
    fig = plots.dense_predictions(**p, num_classes=d["num_classes"], background=0)
    assert sum(t.type == "image" for t in fig.data) == 1 + 3 + 3
    with pytest.raises(KeyError, match="rounds"):
        res.panels(5, 0, d["test"])
    with pytest.raises(ValueError, match="split"):
        res.table("train")
    s = R.summarise([res, res])
    assert (s["mIoU_std"] == 0).all() and len(s) == len(tab)
    with pytest.raises(ValueError, match="val_data"):
        R.recombine(T, d["train"], None)
    with pytest.raises(ValueError, match="rounds"):
        R.recombine(T, d["train"], d["val"], rounds=-1)


def test_camvid_path_on_a_fixture_tree(tmp_path):
    from fixtures_real import make_camvid

    from kaviz.data.real import DatasetLayoutError

    make_camvid(tmp_path, h=12, w=16)
    d = R.load_splits("camvid", root=tmp_path, size=16)
    x, target = d["train"][0]
    assert x.shape == (3, 16, 16) and 0 <= x.min() and x.max() <= 1  # not ImageNet-normalised
    assert (target["mask"] == 255).any() and d["num_classes"] == 11
    ae, _ = R.train_dense_teacher("reconstruction", d["train"], d["val"], widths=(4, 4, 4), epochs=1,
                                  batch_size=2, cache=False)
    seg, h = R.train_dense_teacher("segmentation", d["train"], d["val"], num_classes=11, widths=(4, 4, 4),
                                   epochs=1, batch_size=2, cache=False)
    assert np.isfinite(h["train/ce"]).all()  # void pixels are ignored, not an out-of-range class
    res = R.recombine({"reconstruction": ae, "segmentation": seg}, d["train"], d["val"], d["test"], rounds=1,
                      epochs=1, batch_size=2)
    assert np.isfinite(res.table("test")[["psnr", "mIoU"]].to_numpy()).all()
    with pytest.raises(TypeError, match="root=None"):
        R.load_splits("camvid", root=None)
    with pytest.raises(DatasetLayoutError, match="CamVid"):
        R.load_splits("camvid", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="divisible by 8"):
        R.load_splits("camvid", root=tmp_path, size=(12, 16))
    with pytest.raises(ValueError, match="'embedded' or 'camvid'"):
        R.load_splits("voc")


# ------------------------------------------------------------------------------------------------
# the figure builders added to kaviz.plots for this notebook
# ------------------------------------------------------------------------------------------------
def test_dense_predictions_draws_rgb_rows_as_is_and_colours_labels_consistently():
    from kaviz import plots

    m = np.array([[0, 1], [2, 255]]).repeat(4, 0).repeat(4, 1)
    rgb = np.random.default_rng(0).random((8, 8, 3))
    fig = plots.dense_predictions(None, {"reconstruction": {"truth": rgb},
                                         "segmentation": {"truth": m, "prediction": np.full((8, 8), 2)}},
                                  kinds={"reconstruction": "rgb", "segmentation": "labels"}, num_classes=3,
                                  background=0)
    images = [t for t in fig.data if t.type == "image"]
    assert [a.text for a in fig.layout.annotations if a.text in ("truth", "prediction")] == \
        ["truth", "truth", "prediction"]

    def decoded(k):
        from PIL import Image
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(images[k].source.split(",", 1)[1]))).convert("RGB"))

    assert len(images) == 3 and np.array_equal(decoded(0), plots.to_rgb_uint8(rgb))  # RGB drawn as it is
    truth, pred = decoded(1), decoded(2)
    # class 2 has one colour in both label panels; background near-black; ignored pixels white
    assert tuple(truth[4, 0]) == tuple(pred[0, 0]) and tuple(truth[0, 0]) == (17, 17, 17)
    assert tuple(truth[4, 4]) == (255, 255, 255) and tuple(truth[0, 4]) != tuple(truth[4, 0])
    # the legend lists the classes that appear (not the ignored pixels), in their panel colours
    legend = {t.name: t.marker.color for t in fig.data if t.type == "scatter" and t.showlegend}
    assert list(legend) == ["0", "1", "2"] and legend["0"] == "#111111"
    with pytest.raises(ValueError, match=r"rows\['s'\]\['bad'\].*class ids"):
        plots.dense_predictions(None, {"s": {"bad": np.array([[5]])}}, kinds={"s": "labels"}, num_classes=3)
    with pytest.raises(ValueError, match=r"rows\['r'\]\['bad'\].*'rgb'"):
        plots.dense_predictions(None, {"r": {"bad": np.zeros((1, 2, 3, 4))}}, kinds={"r": "rgb"})
    with pytest.raises(ValueError, match="'labels' row"):
        plots.dense_predictions(None, {"s": {"bad": rgb}}, kinds={"s": "labels"})
    with pytest.raises(ValueError, match="kinds must say"):
        plots.dense_predictions(None, {"s": {"a": m}}, kinds={"s": "label"})
    with pytest.raises(ValueError, match="empty"):
        plots.dense_predictions(None, {}, kinds={})


def test_metric_curves():
    from kaviz import plots

    df = pd.DataFrame({"params": [10, 8, 6, 8, 6], "psnr": [20, 18, 17, 19, 18.5],
                       "stage": ["fine-tuned", "pruned", "pruned", "retrained", "retrained"]})
    ref = pd.DataFrame({"params": [9], "psnr": [21.0], "name": ["teachers"]})
    fig = plots.metric_curves(df, "params", ["psnr"], group="stage", reference=ref)
    assert [t.name for t in fig.data] == ["fine-tuned", "pruned", "retrained", "teachers"]
    assert list(fig.data[1].x) == [6, 8]  # sorted by x
    assert [t.mode for t in fig.data] == ["lines+markers"] * 3 + ["markers"]
    fig = plots.metric_curves(df, "params", ["psnr"], group="stage", markers_only=["pruned"])
    assert [t.mode for t in fig.data] == ["lines+markers", "markers", "lines+markers"]
    with pytest.raises(ValueError, match="markers_only"):
        plots.metric_curves(df, "params", ["psnr"], group="stage", markers_only=["teachers"])
    with pytest.raises(ValueError, match="no column"):
        plots.metric_curves(df, "params", ["mIoU"])
    with pytest.raises(ValueError, match="group"):
        plots.metric_curves(df, "params", ["psnr"], group="round")


def test_compare_criteria_leaves_the_network_alone():
    net = R.combine(teachers())
    before = models.weights_hash(net)
    tab = R.compare_criteria(net, _Pairs(n=4, classes=5), 0.5, batch_size=4)
    assert list(tab["criterion"]) == ["smallest", "largest", "random", "bn-scaled"]
    assert np.allclose(tab["share/reconstruction"] + tab["share/segmentation"], 1.0)
    assert (tab["params"] < sum(p.numel() for p in net.parameters())).all() and tab["params"].nunique() == 1
    assert models.weights_hash(net) == before and net.pruned_rounds == 0
