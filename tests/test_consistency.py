"""Knowledge Consistency (SPEC §3): Trans-Net identities, variance formula, trans-classification,
Born-Again chains and the notebook's data helpers."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from kaviz import data, models
from kaviz.methods import consistency as kc


def _net(K, C=4, seed=0, gates=None):
    torch.manual_seed(seed)
    tn = kc.TransNet(C, K)
    if gates is not None:
        tn.set_gates(gates)
    return tn


# ------------------------------------------------------------------------------------ Trans-Net
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_components_sum_to_the_output(K):
    tn = _net(K, gates=np.linspace(0.2, 0.8, K - 1) if K > 1 else None)
    x = torch.randn(6, 4, 5, 7)
    comps = tn.decompose(x)
    assert comps.shape == (K, 6, 4, 5, 7)
    torch.testing.assert_close(comps.sum(0), tn(x), rtol=1e-5, atol=1e-5)
    tn64, x64 = tn.double(), x.double()
    assert (tn64.decompose(x64).sum(0) - tn64(x64)).abs().max().item() < 1e-12


def test_order_zero_is_the_linear_path_and_fc_features_are_c_by_1_by_1():
    tn = _net(3, gates=[0.3, 0.6])
    x = torch.randn(3, 4, 6, 6)
    xbar = x / kc.spatial_scale(x)
    torch.testing.assert_close(tn.decompose(x)[0], tn.convs[2](xbar))
    v = torch.randn(5, 4)  # an FC feature
    comps = tn.decompose(v)
    assert comps.shape == (3, 5, 4) and tn(v).shape == (5, 4)
    torch.testing.assert_close(comps.sum(0), tn(v), rtol=1e-5, atol=1e-6)
    # on 1x1 maps n(.) = 1, so the input is not rescaled
    torch.testing.assert_close(kc.spatial_scale(v[:, :, None, None]), torch.ones(5, 4, 1, 1))


def test_each_component_uses_exactly_its_gates():
    """With the ReLU masks and scales fixed, the order-k component is unchanged when a gate off
    its path changes, and scales linearly with each gate on its path."""
    K = 4
    tn = _net(K, gates=[0.3, 0.5, 0.7])
    x = torch.randn(4, 4, 6, 6)
    state = tn.relu_state(x)
    before = tn.decompose(x, state)
    assert [tn.gates_used(k) for k in range(K)] == [[], [2], [1, 2], [0, 1, 2]]
    for gate in range(K - 1):
        p = tn.gates.clone()
        p[gate] = p[gate] * 0.5
        tn.set_gates(p)
        after = tn.decompose(x, state)
        for k in range(K):
            if gate in tn.gates_used(k):
                torch.testing.assert_close(after[k], 0.5 * before[k], rtol=1e-4, atol=1e-6)
                assert not torch.allclose(after[k], before[k])
            else:
                torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)
        p[gate] = p[gate] * 2
        tn.set_gates(p)


def test_the_last_gate_does_not_move_the_relu_masks():
    """No ReLU follows the last gate, so changing it keeps the full pass's masks: order 0 stays,
    and every higher order scales with it, without fixing the state by hand."""
    tn = _net(3, gates=[0.4, 0.6])
    x = torch.randn(3, 4, 6, 6)
    before = tn.decompose(x)
    tn.set_gates([0.4, 0.3])
    after = tn.decompose(x)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1:], 0.5 * before[1:], rtol=1e-4, atol=1e-6)
    moved = tn.relu_state(x).masks
    tn.set_gates([0.2, 0.3])  # the first gate feeds the second ReLU: its mask moves
    assert torch.equal(tn.relu_state(x).masks[0], moved[0]) and not torch.equal(tn.relu_state(x).masks[1], moved[1])


@pytest.mark.parametrize("c", [0.01, 3.0, 250.0])
def test_g_is_scale_invariant_in_its_input(c):
    """Exactly (to float64 precision) with eps = 0; up to eps / std with the default eps."""
    torch.manual_seed(0)
    exact = kc.TransNet(4, 3, eps=0.0).double()
    exact.set_gates([0.35, 0.65])
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(exact(c * x), exact(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(exact.decompose(c * x), exact.decompose(x), rtol=1e-10, atol=1e-12)
    tn = _net(3, gates=[0.35, 0.65]).double()
    if c >= 1:
        torch.testing.assert_close(tn(c * x), tn(x), rtol=1e-4, atol=1e-4)  # eps = 1e-5 on scales ~ 1
    assert not torch.allclose(tn(-x), tn(x))  # a sign flip is not a rescaling: g is not even


def test_spatial_scale_is_the_unbiased_spatial_std_without_gradient():
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    n = kc.spatial_scale(z)
    assert n.shape == (2, 3, 1, 1) and not n.requires_grad
    torch.testing.assert_close(n[1, 2, 0, 0], z[1, 2].detach().std() + 1e-5)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        kc.spatial_scale(torch.randn(2, 3))


def test_gate_penalty_value_and_gradient():
    tn = _net(3)
    assert torch.allclose(tn.gates, torch.tensor([0.5, 0.5]))  # θ starts at 0
    assert tn.gate_penalty(0.1).item() == pytest.approx(0.1 * (0.25 + 0.25))
    tn.set_gates([0.2, 0.9])
    pen = tn.gate_penalty([1.0, 2.0])
    assert pen.item() == pytest.approx(1.0 * 0.04 + 2.0 * 0.81, rel=1e-5)
    pen.backward()
    p = torch.tensor([0.2, 0.9])
    expected = 2 * torch.tensor([1.0, 2.0]) * p * p * (1 - p)  # d(α p²)/dθ = 2αp · p(1−p)
    torch.testing.assert_close(tn.theta.grad, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="one value per gate"):
        tn.gate_penalty([0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match=">= 0"):
        tn.gate_penalty(-1.0)


def test_transnet_bad_inputs():
    with pytest.raises(ValueError, match="orders must be an int >= 1"):
        kc.TransNet(4, 0)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        kc.TransNet(4, 3, kernel_size=2)
    tn = _net(3)
    with pytest.raises(ValueError, match="got features with 5 channels"):
        tn(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(B, C\)"):
        tn(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="2 gates, got 3"):
        tn.set_gates([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        tn.set_gates([0.0, 0.5])
    with pytest.raises(ValueError, match="same batch"):
        tn.decompose(torch.randn(2, 4, 4, 4), tn.relu_state(torch.randn(3, 4, 4, 4)))
    with pytest.raises(ValueError, match="order must be in"):
        tn.gates_used(3)


def test_transnet_loss_learns_a_consistent_target_and_logs_gates():
    from kaviz.train import fit

    torch.manual_seed(0)
    xa = torch.randn(64, 4, 6, 6)
    mix = torch.randn(4, 4, 3, 3) * 0.3
    xb = nn.functional.conv2d(xa / kc.spatial_scale(xa), mix, padding=1)  # linear in x̄_A: fully consistent
    tn = kc.TransNet(4, 3)
    method = kc.TransNetLoss(tn, alpha=0.1)
    start = method((xa, xb))["mse"].item()
    hist = fit(method, kc.PairedFeatures(xa, xb), kc.PairedFeatures(xa[:16], xb[:16]), epochs=25, lr=3e-2,
               batch_size=16, optimizer="adam", schedule="loglinear", restore="last")
    assert {"train/mse", "train/gate_penalty", "val/p0", "val/p1"} <= set(hist.columns)
    assert hist["train/mse"].iloc[-1] < 0.05 * start
    table = kc.variance_table(tn, xa, xb)
    share = table.set_index("kind")["share"]
    assert share["inconsistent"] < 0.05 and share["target"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        method((xa, xb[:, :, :3]))


# ------------------------------------------------------------------------------------- variance
def test_variance_formula_on_a_hand_computed_tensor():
    # channel 0: 1, 3 | 5, 7 (mean 4; squared deviations 9 1 1 9); channel 1: 0, 0 | 2, 2 (mean 1; all 1)
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]],
                      [[[5.0, 7.0]], [[2.0, 2.0]]]])  # (N=2, C=2, H=1, W=2)
    assert kc.component_variance(x) == pytest.approx((9 + 1 + 1 + 9 + 1 + 1 + 1 + 1) / 8)
    assert kc.component_variance(torch.tensor([[1.0, 0.0], [3.0, 4.0]])) == pytest.approx((1 + 1 + 4 + 4) / 4)
    with pytest.raises(ValueError, match=r"\(N, C, ...\)"):
        kc.component_variance(torch.ones(3))


def test_variance_table_streams_the_same_numbers_as_the_formula():
    tn = _net(3, gates=[0.3, 0.6])
    xa, xb = torch.randn(10, 4, 5, 5), torch.randn(10, 4, 5, 5) * 2 + 1
    table = kc.variance_table(tn, xa.numpy(), xb.numpy(), batch_size=3).set_index("kind")
    comps = tn.decompose(xa).detach()
    g = comps.sum(0)
    for k in range(3):
        assert table.loc[f"consistent, order {k}",
                         "variance"] == pytest.approx(kc.component_variance(comps[k]), rel=1e-6)
    assert table.loc["consistent, all orders", "variance"] == pytest.approx(kc.component_variance(g), rel=1e-6)
    assert table.loc["inconsistent", "variance"] == pytest.approx(kc.component_variance(xb - g), rel=1e-6)
    var_b = kc.component_variance(xb)
    assert table.loc["target", "variance"] == pytest.approx(var_b, rel=1e-6)
    np.testing.assert_allclose(table["share"], table["variance"] / var_b)
    assert list(table["component"])[:3] == ["x⁽⁰⁾", "x⁽¹⁾", "x⁽²⁾"]
    with pytest.raises(ValueError, match="aligned"):
        kc.variance_table(tn, xa, xb[:5])


def test_component_correlation_matches_numpy():
    tn = _net(3, gates=[0.4, 0.7])
    xa = torch.randn(7, 4, 5, 5)
    corr = kc.component_correlation(tn, xa, batch_size=3).to_numpy()
    comps = tn.decompose(xa).detach().double()
    cen = comps - comps.mean(dim=(1, 3, 4), keepdim=True)  # centred per channel
    cov = torch.einsum("kbchw,lbchw->kl", cen, cen) / (7 * 4 * 5 * 5)
    d = cov.diagonal().sqrt()
    np.testing.assert_allclose(corr, (cov / d[:, None] / d[None, :]).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.diag(corr), 1.0)
    assert corr.shape == (3, 3) and np.allclose(corr, corr.T)


# ----------------------------------------------------------------------------------- tail_after
@pytest.mark.parametrize("arch,layers", [
    ("cifar_resnet8", ["layer3.0.merge", "layer2.0.merge", "layer2.0.relu2", "layer1", "layer2.0:in", "fc:in"]),
    ("cifar_resnet14", ["layer2.0.merge", "layer3.1.merge"]),
    ("vgg8_small", ["features.3", "features.10", "avgpool"]),
    ("mobilenet_small", ["stem", "blocks.1", "blocks.4", "head"]),
])
def test_tail_after_reproduces_the_model_output(arch, layers):
    torch.manual_seed(0)
    m = models.build(arch, 5).eval()
    x = torch.rand(2, 3, 16, 16)
    for layer in layers:
        kc.transclass.check_tail(m, layer, kc.tail_after(m, layer), x)  # raises on a mismatch


def test_tail_after_bad_cuts():
    m = models.build("cifar_resnet8", 5)
    with pytest.raises(ValueError, match="plain chain"):
        kc.tail_after(m, "layer3.0.conv1")
    with pytest.raises(KeyError, match="Closest valid names"):
        kc.tail_after(m, "layer9")

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(self.a(x) + x)

    with pytest.raises(ValueError, match="pass your own tail"):
        kc.tail_after(Skip(), "a")
    tail = kc.tail_after(m, "layer3.0.merge")
    m.eval()
    with pytest.raises(ValueError, match="do not reproduce"):
        kc.transclass.check_tail(m, "layer2.0.merge", tail, torch.rand(2, 3, 16, 16))


# ---------------------------------------------------------------------------- the whole pipeline
@pytest.fixture
def tiny_pair(tmp_path, monkeypatch):
    monkeypatch.setenv("KAVIZ_DATA", str(tmp_path))
    ds = data.shapes(96, seed=3, size=16)
    sp = data.split(ds, val=0.25, test=0.25, seed=0)
    torch.manual_seed(0)
    a = models.build("cifar_resnet8", 10, width=4).eval()
    torch.manual_seed(1)
    b = models.build("cifar_resnet8", 10, width=4).eval()
    return a, b, sp


def test_fit_transnet_caches_features_and_reports_variances(tiny_pair, tmp_path):
    a, b, sp = tiny_pair
    res = kc.fit_transnet(a, b, sp.train, sp.val, layer_a="layer3.0.merge", epochs=3, lr=1e-2,
                          batch_size=16, max_train=32)
    assert len(res.history) == 3 and res.gates.shape == (2,)
    sa, sb = res.features("train")
    assert sa["layer3.0.merge"].shape == (len(sp.train), 16, 4, 4) and sa.path.is_relative_to(tmp_path)
    again = kc.fit_transnet(a, b, sp.train, sp.val, layer_a="layer3.0.merge", epochs=1, batch_size=16)
    assert again.features("train")[0].meta["seconds"] == sa.meta["seconds"]  # the same store, not re-extracted
    table = res.variance()
    assert list(table["kind"]) == ["consistent, order 0", "consistent, order 1", "consistent, order 2",
                                   "consistent, all orders", "inconsistent", "target"]
    va, vb = res.pair_arrays("val")
    assert table.iloc[-1]["variance"] == pytest.approx(kc.component_variance(np.asarray(vb)), rel=1e-6)
    both = kc.fit_transnet(a, b, sp.train, sp.val, layer_a="layer2.0.merge", epochs=1, batch_size=16,
                           store_layers=["layer3.0.merge", "layer2.0.merge"])
    shared = both.features("train")[0]
    assert shared.layers == ["layer3.0.merge", "layer2.0.merge"] and shared.path != sa.path
    again2 = kc.fit_transnet(a, b, sp.train, sp.val, layer_a="layer3.0.merge", epochs=1, batch_size=16,
                             store_layers=["layer3.0.merge", "layer2.0.merge"])
    assert again2.features("train")[0].path == shared.path  # one extraction pass serves both layers
    assert both.features("test", sp.test)[1].layers == shared.layers
    wide = kc.compare({"seeds": res, "again": again})
    assert list(wide.index) == ["seeds", "again"] and "share x^Δ" in wide.columns and "p1" in wide.columns

    view = kc.contract_view(res, sp.val, [0, 2])
    grid = view.grid(1, 0)
    assert grid["maps"][0][0].shape == (16, 16, 3) and grid["maps"][1][0].shape == (4, 4)
    assert len(grid["maps"][1]) == 2 + 3 + 1 and view.channel(0) == int(np.argmax(
        view.b.transpose(1, 0, 2, 3).reshape(16, -1).var(1)))
    np.testing.assert_allclose(view.components.sum(0), view.g, rtol=1e-5, atol=1e-5)
    c, ca = view.channel(0), int(np.argmax(view.a.transpose(1, 0, 2, 3).reshape(16, -1).var(1)))
    np.testing.assert_array_equal(grid["maps"][1][0], view.b[1, c])
    np.testing.assert_array_equal(grid["maps"][0][1], view.a[1, ca])  # A's most variable channel
    np.testing.assert_array_equal(grid["maps"][1][-1], view.b[1, c] - view.g[1, c])
    np.testing.assert_array_equal(grid["maps"][0][0], sp.val.image_array(2))
    with pytest.raises(ValueError, match="channel rank"):
        view.grid(0, 16)

    class Plain(torch.utils.data.Dataset):  # no image_array: images are converted from the tensors
        def __len__(self):
            return len(sp.val)

        def __getitem__(self, i):
            return sp.val[i]

    np.testing.assert_array_equal(kc.contract_view(res, Plain(), [0, 2]).images, view.images)
    with pytest.raises(KeyError, match="no features for split 'test'"):
        res.features("test")


def test_fit_transnet_refuses_layers_of_different_shapes(tiny_pair):
    a, b, sp = tiny_pair
    with pytest.raises(ValueError, match=r"B's layers with A's shape \(16, 4, 4\): .*layer3\.0\.merge"):
        kc.fit_transnet(a, b, sp.train, sp.val, layer_a="layer3.0.merge", layer_b="layer2.0.merge", epochs=1)


def test_trans_classification_rows_and_masks(tiny_pair):
    a, b, sp = tiny_pair
    res = kc.fit_transnet(a, b, sp.train, sp.val, layer_a="layer3.0.merge", epochs=2, lr=1e-2, batch_size=16)
    table, hists = kc.trans_classification(res, sp.test, masks=[(1, 1, 1), (1, 0, 0)], epochs=2, lr=1e-3,
                                           batch_size=16)
    assert list(table["fine_tuned"]) == [False, True, False, True, False, True]
    assert set(hists) == {"control", "mask [1, 1, 1]", "mask [1, 0, 0]"}
    from kaviz.train import Supervised

    own = Supervised(b).evaluate(sp.test)["accuracy"]
    assert table.iloc[0]["test_accuracy"] == pytest.approx(own)  # "B alone" is B itself
    assert table["val_accuracy"].between(0, 1).all()
    # mask [1,1,1] feeds g(x_A): the same numbers as running B's tail on g(x_A)
    va = torch.from_numpy(np.array(res.pair_arrays("val")[0]))
    tail = kc.tail_after(b, "layer3.0.merge").eval()
    with torch.no_grad():
        acc = (tail(res.transnet(va)).argmax(1) == torch.as_tensor(np.array(res.features("val")[1].targets))
               ).float().mean().item()
    assert table.iloc[2]["val_accuracy"] == pytest.approx(acc)
    # computing the masked inputs once or every step trains the same (up to float rounding)
    slow, _ = kc.trans_classification(res, sp.test, masks=[(1, 0, 0)], epochs=2, lr=1e-3, batch_size=16,
                                      control=False, precompute=False)
    np.testing.assert_allclose(slow["val_accuracy"], table["val_accuracy"].iloc[[0, 4, 5]], atol=1.5 / len(sp.val))
    sub, _ = kc.trans_classification(res, masks=[(1, 1, 1)], epochs=1, batch_size=8, control=False, max_train=10)
    assert "test_accuracy" not in sub and len(sub) == 3
    with pytest.raises(ValueError, match="3 orders"):
        kc.trans_classification(res, masks=[(1, 0)], epochs=1)
    with pytest.raises(ValueError, match="pass transnet="):
        kc.TransClassifier(nn.Identity(), None, mask=(1, 0, 0))
    with pytest.raises(ValueError, match="needs class labels"):
        kc.FeatureLabels(np.zeros((3, 2)), None)


def test_born_again_chain_trains_and_caches_generations(tiny_pair, tmp_path):
    a, _, sp = tiny_pair
    ms, table = kc.born_again_chain(a, sp.train, sp.val, arch="cifar_resnet8", arch_kwargs={"width": 4},
                                    generations=3, epochs=2, batch_size=16, seed=5, test_data=sp.test)
    assert len(ms) == 3 and table["test_accuracy"].between(0, 1).all()
    assert list(table["generation"]) == [0, 1, 2] and list(table["seed"][1:]) == [6, 7]
    assert len(list((tmp_path / "teachers").glob("cifar_resnet8-ba*.pt"))) == 2
    ms2, table2 = kc.born_again_chain(a, sp.train, sp.val, arch="cifar_resnet8", arch_kwargs={"width": 4},
                                      generations=3, epochs=2, batch_size=16, seed=5)
    for m1, m2 in zip(ms[1:], ms2[1:]):
        assert models.weights_hash(m1) == models.weights_hash(m2)
    assert table2["val_accuracy"].tolist() == pytest.approx(table["val_accuracy"].tolist())
    with pytest.raises(ValueError, match="generations must be"):
        kc.born_again_chain(a, sp.train, sp.val, arch="cifar_resnet8", generations=0)


def test_born_again_loss_terms():
    torch.manual_seed(0)
    s, t = nn.Linear(3, 4), nn.Linear(3, 4)
    method = kc.BornAgain(s, t, lam=0.5, tau=1.0)
    x, y = torch.randn(8, 3), torch.randint(0, 4, (8,))
    terms = method((x, y))
    from kaviz.losses import soft_cross_entropy

    assert terms["ce"].item() == pytest.approx(nn.functional.cross_entropy(s(x), y).item())
    assert terms["kd"].item() == pytest.approx(soft_cross_entropy(s(x), t(x)).item())
    assert method.loss_weights == {"ce": 1.0, "kd": 0.5}
    assert not any(p.requires_grad for p in method.teacher.parameters())
    with pytest.raises(ValueError, match="lam"):
        kc.BornAgain(s, t, lam=-1)
    with pytest.raises(ValueError, match="tau"):
        kc.BornAgain(s, t, tau=0)


# ------------------------------------------------------------------------------------------- data
def test_coarse_task_relabels_the_same_images():
    ds = data.shapes(40, seed=1, size=16)
    groups = kc.default_coarse_groups(ds.classes)
    coarse = kc.coarse_task(ds, groups)
    assert coarse.num_classes == 3 and len(coarse) == len(ds)
    for i in range(len(ds)):
        fine = ds.classes[int(ds.targets[i])]
        assert fine in groups[coarse.classes[int(coarse.targets[i])]]
    x, y = coarse[3]
    assert torch.equal(x, ds[3][0]) and int(y) == int(coarse.targets[3])
    sub = coarse.subset([1, 2])
    assert len(sub) == 2 and int(sub.targets[1]) == int(coarse.targets[2])
    assert coarse.fingerprint != ds.fingerprint != sub.fingerprint
    assert kc.default_coarse_groups(["Black_footed_Albatross", "Laysan_Albatross", "Rusty_Blackbird"]) == {
        "albatross": ["Black_footed_Albatross", "Laysan_Albatross"], "blackbird": ["Rusty_Blackbird"]}
    with pytest.raises(ValueError, match="missing"):
        kc.coarse_task(ds, {"round": ["circle"]})
    with pytest.raises(ValueError, match="two groups"):
        kc.coarse_task(ds, {"a": ["circle"], "b": ["circle"]})


def test_halves_are_disjoint_and_stratified():
    ds = data.shapes(60, seed=2, size=16)
    h1, h2 = kc.halves(ds, seed=0)
    assert len(h1) + len(h2) == 60 and abs(len(h1) - len(h2)) <= 10
    assert not {bytes(x.numpy()) for x in h1.images} & {bytes(x.numpy()) for x in h2.images}
    for c in range(10):
        n1, n2 = int((h1.targets == c).sum()), int((h2.targets == c).sum())
        assert abs(n1 - n2) <= 1


def test_load_data_embedded_and_cub200(tmp_path):
    d = kc.load_data("embedded", n=60, size=16)
    assert d.train is d.train_features and d.num_classes == 10
    assert len(d.train) + len(d.val) + len(d.test) == 60
    from fixtures_real import make_cub

    make_cub(tmp_path / "CUB_200_2011", per_class=6)
    c = kc.load_data("cub200", root=tmp_path / "CUB_200_2011", image_size=16)
    assert c.num_classes == 3 and c.name == "cub200"
    assert len(c.train) == len(c.train_features) and len(c.train) + len(c.val) == 12  # 2 of 3 images per class train
    assert c.train.files == c.train_features.files
    assert "RandomResizedCrop" in repr(
        c.train.transform) and "RandomResizedCrop" not in repr(c.train_features.transform)
    assert c.train_features[0][0].shape == (3, 16, 16)
    with pytest.raises(TypeError, match="root=None"):
        kc.load_data("cub200", root=None)
    with pytest.raises(FileNotFoundError, match="images.txt"):
        kc.load_data("cub200", root=tmp_path)
    with pytest.raises(ValueError, match="'embedded' or 'cub200'"):
        kc.load_data("imagenet")


# ------------------------------------------------------------ reference-recipe options (issue 15)
def test_transnet_kaiming_init_is_fan_out_normal_and_keeps_the_decomposition():
    torch.set_num_threads(1)
    C = 32
    torch.manual_seed(0)
    default = kc.TransNet(C)
    torch.manual_seed(0)
    kaiming = kc.TransNet(C, init="kaiming")
    std = (2.0 / (C * 9)) ** 0.5  # kaiming-normal, fan_out = C·3·3, ReLU gain √2
    for conv in kaiming.convs:
        assert conv.weight.std().item() == pytest.approx(std, rel=0.05)
        assert abs(conv.weight.mean().item()) < 0.1 * std
    # PyTorch's default (kaiming-uniform, a=√5: std 1/√(3·fan_in)) is ~6× smaller in variance
    ratio = kaiming.convs[0].weight.var().item() / default.convs[0].weight.var().item()
    assert 5.0 < ratio < 7.0
    x = torch.randn(2, C, 5, 5)
    torch.testing.assert_close(kaiming.decompose(x).sum(0), kaiming(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="init must be one of"):
        kc.TransNet(C, init="xavier")


def test_fit_transnet_passes_init_and_trans_classification_weight_decay(tiny_pair, monkeypatch):
    a, b, sp = tiny_pair
    res = kc.fit_transnet(a, b, sp.train, sp.val, layer_a="layer3.0.merge", epochs=1, lr=1e-2, batch_size=16,
                          init="kaiming")
    assert res.transnet.init == "kaiming"
    import kaviz.train

    seen = []
    real_fit = kaviz.train.fit

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weight_decay"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(kaviz.train, "fit", spy)
    kc.trans_classification(res, masks=[(1, 0, 0)], epochs=1, batch_size=16, control=False, max_train=8,
                            weight_decay=1e-4)
    assert seen == [1e-4]


def test_derangement_and_reordered_rows():
    order = kc.derangement(50, seed=3)
    assert sorted(order) == list(range(50)) and not np.any(order == np.arange(50))
    np.testing.assert_array_equal(order, kc.derangement(50, seed=3))
    assert not np.array_equal(order, kc.derangement(50, seed=4))
    with pytest.raises(ValueError, match="at least 2"):
        kc.derangement(1)
    rows = np.arange(50 * 3).reshape(50, 3).astype(np.float32)
    view = kc.Reordered(rows, order)
    assert len(view) == 50 and view.shape == (50, 3)
    np.testing.assert_array_equal(view[7], rows[order[7]])
    np.testing.assert_array_equal(view[5:20], rows[order[5:20]])
    np.testing.assert_array_equal(view[np.array([9, 2, 2])], rows[order[[9, 2, 2]]])
    torch.testing.assert_close(kc.Reordered(torch.from_numpy(rows), order)[3:9], torch.from_numpy(rows[order[3:9]]))
    with pytest.raises(ValueError, match="entries"):
        kc.Reordered(rows, order[:10])


def test_fit_transnet_controls_untrained_and_shuffled(tiny_pair):
    """The controls: an untrained Trans-Net (no history, the init of the same seed) and one trained on A's
    features of other images (every split's A rows deranged, B's untouched). B's feature is a fixed
    convolution of A's here, so the fitted Trans-Net explains it and both controls do not."""
    a, _, sp = tiny_pair
    b = copy.deepcopy(a)
    kw = dict(layer_a="layer3.0.merge", epochs=6, lr=3e-2, batch_size=16, seed=0)
    fitted = kc.fit_transnet(a, b, sp.train, sp.val, **kw)
    untrained = kc.fit_transnet(a, b, sp.train, sp.val, control="untrained", **kw)
    shuffled = kc.fit_transnet(a, b, sp.train, sp.val, control="shuffled", **kw)
    assert untrained.history is None and len(shuffled.history) == 6 and untrained.control == "untrained"
    torch.manual_seed(0)
    fresh = kc.TransNet(16, 3)
    torch.testing.assert_close(untrained.transnet.state_dict(), fresh.state_dict())
    (fa, fb), (sa, sb) = fitted.pair_arrays("val"), shuffled.pair_arrays("val")
    np.testing.assert_array_equal(np.asarray(sb), np.asarray(fb))  # B unchanged
    order = shuffled.pairing["val"]
    assert not np.any(order == np.arange(len(order)))
    np.testing.assert_array_equal(sa[0:len(order)], np.asarray(fa)[order])
    share = {name: r.variance().set_index("kind")["share"] for name, r in
             (("fitted", fitted), ("untrained", untrained), ("shuffled", shuffled))}
    lead = {name: s["consistent, all orders"] - s["inconsistent"] for name, s in share.items()}
    assert lead["fitted"] > 0 > max(lead["untrained"], lead["shuffled"]), lead
    test_split = shuffled.pair_arrays("train")  # every split gets its own derangement
    assert len(shuffled.pairing["train"]) == len(test_split[1])
    with pytest.raises(ValueError, match="control must be None or one of"):
        kc.fit_transnet(a, b, sp.train, sp.val, control="random", **kw)
