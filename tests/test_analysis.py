"""kaviz.analysis: CKA against an independent implementation, its invariances and controls, minibatch
CKA, the layer × layer matrix over two models, linear probes and teacher consistency."""
import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform
from torch import nn

from kaviz import analysis, models
from kaviz.analysis import MinibatchCKA, cka, cka_matrix


# ----------------------------------------------------------- an independent, straightforward reference
def ref_gram(x, kernel, sigma=0.8):
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if kernel == "linear":
        return x @ x.T
    d = pdist(x)  # distances between distinct samples
    bw = sigma * np.median(d)
    return np.exp(-squareform(d) ** 2 / (2 * bw ** 2))


def ref_hsic(K, L, debiased):
    n = len(K)
    if not debiased:
        H = np.eye(n) - np.ones((n, n)) / n
        return np.trace(K @ H @ L @ H) / (n - 1) ** 2
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def ref_cka(x, y, kernel="linear", debiased=False):
    K, L = ref_gram(x, kernel), ref_gram(y, kernel)
    return ref_hsic(K, L, debiased) / np.sqrt(ref_hsic(K, K, debiased) * ref_hsic(L, L, debiased))


def related(n, d1, d2, seed=0, noise=1.0):
    r = np.random.default_rng(seed)
    z = r.normal(size=(n, d1))
    y = np.tanh(z @ r.normal(size=(d1, d2)) / np.sqrt(d1)) + noise * r.normal(size=(n, d2))
    return z + 3.0, y  # an offset, as ReLU features have


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(40, 5, 7), (12, 30, 50)])  # N > D (feature path) and D > N (Gram path)
def test_cka_equals_an_independent_implementation(kernel, debiased, shape):
    x, y = related(*shape)
    want = ref_cka(x, y, kernel, debiased)
    assert cka(x, y, kernel=kernel, debiased=debiased) == pytest.approx(want, rel=1e-9, abs=1e-12)
    # tensors, float32 and conv maps (flattened) are accepted
    xt = torch.from_numpy(x).float().reshape(shape[0], 1, 1, shape[1])
    assert cka(xt, torch.from_numpy(y), kernel=kernel, debiased=debiased) == pytest.approx(want, rel=1e-5)


def test_the_unbiased_hsic_is_the_u_statistic():
    """The closed form equals Song et al.'s U-statistic, averaged over every ordered 4-tuple of distinct samples."""
    x, y = related(8, 3, 4, seed=5)
    K, L = ref_gram(x, "linear"), ref_gram(y, "linear")
    tuples = np.array(list(itertools.permutations(range(8), 4)))
    i, j, q, r = tuples.T
    u = np.mean(K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q])
    assert analysis.hsic(x, y, debiased=True) == pytest.approx(u, rel=1e-10)
    assert analysis.hsic(x, y) == pytest.approx(ref_hsic(K, L, False), rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(debiased):
    x, y = related(30, 6, 8, seed=1, noise=0.3)
    base = cka(x, y, debiased=debiased)
    r = np.random.default_rng(2)
    q1, _ = np.linalg.qr(r.normal(size=(6, 6)))
    q2, _ = np.linalg.qr(r.normal(size=(8, 8)))
    assert cka(x @ q1, y @ q2, debiased=debiased) == pytest.approx(base, rel=1e-10)
    assert cka(7.5 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, rel=1e-10)
    # a control: an anisotropic scaling does change it
    assert abs(cka(x * np.arange(1, 7), y, debiased=debiased) - base) > 1e-3
    # RBF with a median-relative bandwidth is invariant to isotropic scaling too
    assert cka(3 * x, y, "rbf", debiased) == pytest.approx(cka(x, y, "rbf", debiased), rel=1e-10)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_identical_inputs_is_one(kernel, debiased):
    x, _ = related(25, 10, 3, seed=3)
    assert cka(x, x, kernel, debiased) == pytest.approx(1.0, abs=1e-12)
    assert cka(x, x.copy() + 100.0, kernel, debiased) == pytest.approx(1.0, abs=1e-9)


def test_debiased_cka_of_independent_features_is_near_zero_and_the_biased_one_is_not():
    r = np.random.default_rng(4)
    x, y = r.normal(size=(50, 500)), r.normal(size=(50, 500))
    assert abs(cka(x, y, debiased=True)) < 0.05
    assert abs(cka(x, y, "rbf", debiased=True)) < 0.05
    assert cka(x, y) > 0.8  # the control: the biased estimator is fooled at small N, high D
    related_x, related_y = related(50, 20, 30, seed=4, noise=0.3)
    assert cka(related_x, related_y, debiased=True) > 0.5  # and a real relation is seen


def test_cka_errors_teach():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="same samples"):
        cka(x, np.zeros((9, 3)))
    with pytest.raises(ValueError, match="kernel must be one of"):
        cka(x, x, kernel="poly")
    with pytest.raises(ValueError, match="at least 4 samples"):
        cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ValueError, match="NaN"):
        cka(np.full((5, 2), np.nan), x[:5])
    assert np.isnan(cka(x, np.random.default_rng(0).normal(size=(10, 3))))  # a constant feature


# --------------------------------------------------------------------------------------- minibatch
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_cka_of_one_batch_is_the_full_debiased_cka(kernel):
    x, y = related(30, 6, 40, seed=6)
    m = MinibatchCKA(kernel).update(x, y)
    assert m.value() == pytest.approx(cka(x, y, kernel, debiased=True), rel=1e-10)


def test_minibatch_cka_over_every_subset_equals_the_full_debiased_cka():
    """HSIC_u is a U-statistic: its average over all subsets of one size is the full-sample HSIC_u,
    so the minibatch estimate over every 6-subset of 9 samples is exactly the full debiased CKA."""
    x, y = related(9, 4, 5, seed=7)
    m, ratios = MinibatchCKA(), []
    for s in itertools.combinations(range(9), 6):
        m.update(x[list(s)], y[list(s)])
        ratios.append(cka(x[list(s)], y[list(s)], debiased=True))
    assert m.batches == 84
    full = cka(x, y, debiased=True)
    assert m.value() == pytest.approx(full, rel=1e-10)
    # controls, 10^6 times further off: one subset alone, and the mean of per-subset CKAs
    assert abs(ratios[0] - full) > 1e-4 and abs(np.mean(ratios) - full) > 1e-4


def test_minibatch_cka_over_shuffled_epochs_converges_to_the_full_one():
    x, y = related(200, 10, 6, seed=8, noise=2.0)
    full = cka(x, y, debiased=True)
    r = np.random.default_rng(0)
    m, biased = MinibatchCKA(), []
    for epoch in range(200):
        p = r.permutation(200)
        for i in range(0, 200, 20):
            xb, yb = x[p[i:i + 20]], y[p[i:i + 20]]
            m.update(xb, yb)
            if epoch == 0:
                biased.append([analysis.hsic(xb, yb), analysis.hsic(xb, xb), analysis.hsic(yb, yb)])
        if epoch == 0:
            first = abs(m.value() - full)
    assert abs(m.value() - full) < 0.01
    xy, xx, yy = np.mean(biased, 0)
    assert xy / np.sqrt(xx * yy) - full > 0.03  # the control: averaging biased HSICs does not converge to it
    assert first > 0 and m.samples == 200 * 200


def test_minibatch_cka_of_several_layers_at_once():
    xs = [related(16, 3 + i, 4, seed=i)[0] for i in range(3)]
    ys = [related(16, 5, 2 + i, seed=10 + i)[1] for i in range(2)]
    many = MinibatchCKA()
    singles = {(i, j): MinibatchCKA() for i in range(3) for j in range(2)}
    for b in (slice(0, 8), slice(8, 16)):
        many.update([x[b] for x in xs], [y[b] for y in ys])
        for (i, j), s in singles.items():
            s.update(xs[i][b], ys[j][b])
    v = many.value()
    assert v.shape == (3, 2)
    for (i, j), s in singles.items():
        assert v[i, j] == pytest.approx(s.value(), rel=1e-10)
    tiny = MinibatchCKA().update(xs[0][:3], ys[0][:3])
    assert tiny.skipped == 3
    with pytest.raises(ValueError, match="no minibatch"):
        tiny.value()
    with pytest.raises(ValueError, match="same number of features"):
        many.update(xs[0][:8], ys[0][:8])


# -------------------------------------------------------------------------------------- two models
def _net(seed, width=4):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 3)).eval()


def _features(model, x, layers):
    from kaviz.features import extract

    store = extract(model, x, layers, pool="none", batch_size=64)
    return [store[l] for l in layers]


def test_cka_matrix_equals_cka_on_extracted_features():
    a, b = _net(0), _net(1)
    x = torch.randn(40, 3, 8, 8)
    la, lb = ["1", "3", "6"], ["0", "3"]
    fa, fb = _features(a, x, la), _features(b, x, lb)
    one = cka_matrix(a, b, x, la, lb, batch_size=64)
    assert list(one.index) == la and list(one.columns) == lb and one.attrs["n"] == 40
    for i, j in itertools.product(range(3), range(2)):
        assert one.iloc[i, j] == pytest.approx(cka(fa[i], fb[j], debiased=True), rel=1e-6)
    # streaming in batches: the minibatch estimate over the same batches, from one pass per model
    calls = {"a": 0, "b": 0}
    a.register_forward_pre_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1))
    b.register_forward_pre_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1))
    ds = torch.utils.data.TensorDataset(x, torch.zeros(40, dtype=torch.long))
    streamed = cka_matrix(a, b, ds, la, lb, batch_size=16)
    assert calls == {"a": 3, "b": 3}
    m = MinibatchCKA()
    for s in (slice(0, 16), slice(16, 32), slice(32, 40)):
        m.update([f[s] for f in fa], [f[s] for f in fb])
    np.testing.assert_allclose(streamed.to_numpy(), m.value(), rtol=1e-6)
    assert streamed.attrs["batches"] == 3
    rbf = cka_matrix(a, b, x, la, lb, batch_size=64, kernel="rbf")
    assert rbf.iloc[2, 1] == pytest.approx(cka(fa[2], fb[1], "rbf", debiased=True), rel=1e-6)


def test_cka_matrix_of_a_model_with_itself_has_a_unit_diagonal_and_restores_modes():
    a = _net(0).train()
    x = torch.randn(24, 3, 8, 8)
    layers = ["1", "3", "6"]
    calls = []
    a.register_forward_pre_hook(lambda *_: calls.append(1))
    df = cka_matrix(a, a, x, layers, layers, batch_size=12)
    assert len(calls) == 2  # one pass per batch serves both sides
    np.testing.assert_allclose(np.diag(df.to_numpy()), 1.0, rtol=1e-9)
    np.testing.assert_allclose(df.to_numpy(), df.to_numpy().T, rtol=1e-9)
    assert a.training
    with pytest.raises(KeyError, match="Closest valid names"):
        cka_matrix(a, a, x, ["7"], layers)
    with pytest.raises(ValueError, match="batch_size"):
        cka_matrix(a, a, x, layers, layers, batch_size=2)


def test_cka_matrix_sees_a_trained_relation_and_not_a_random_one():
    """A copy of a network with its channels permuted is the same representation (CKA 1); a
    network of the same architecture with other weights is a control."""
    a = _net(0)
    perm = torch.randperm(8)
    b = _net(0)
    with torch.no_grad():  # permute the second conv's output channels, and the classifier's inputs
        b[2].weight.copy_(a[2].weight[perm])
        b[2].bias.copy_(a[2].bias[perm])
        b[6].weight.copy_(a[6].weight[:, perm])
    x = torch.randn(64, 3, 8, 8)
    same = cka_matrix(a, b, x, ["3"], ["3"], batch_size=32).iloc[0, 0]
    other = cka_matrix(a, _net(5), x, ["3"], ["3"], batch_size=32).iloc[0, 0]
    assert same == pytest.approx(1.0, abs=1e-9) and other < same - 0.05


# -------------------------------------------------------------------------------------------- probes
def test_linear_probe_reads_labels_where_they_are_and_not_in_noise():
    r = np.random.default_rng(0)
    y = np.arange(120) % 3
    informative = r.normal(size=(120, 6)) + 2.0 * np.eye(3, 6)[y]
    noise = r.normal(size=(120, 6))
    df = analysis.linear_probe({"informative": informative, "noise": noise}, y, cv=4, control=True)
    assert list(df.index) == ["informative", "noise"]
    assert df.loc["informative", "accuracy"] > 0.8 and df.loc["noise", "accuracy"] < 0.55
    assert df.loc["informative", "shuffled"] < 0.55  # the control: the same features with shuffled labels
    assert df.loc["informative", "chance"] == pytest.approx(1 / 3)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    s = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), informative, y,
                        cv=StratifiedKFold(4, shuffle=True, random_state=0))
    assert df.loc["informative", "accuracy"] == pytest.approx(s.mean())
    assert df.loc["informative", "std"] == pytest.approx(s.std(ddof=1))
    with pytest.raises(ValueError, match="needs class labels"):
        analysis.linear_probe(noise)
    with pytest.raises(ValueError, match="rarest class"):
        analysis.linear_probe(noise, y, cv=50)


def test_linear_probe_on_a_feature_store_uses_its_targets():
    from conftest import TinyImages

    from kaviz.features import extract

    ds = TinyImages(n=60)
    store = extract(_net(0), ds, ["3", "6"], pool="avg")
    df = analysis.linear_probe(store, cv=3)
    assert list(df.index) == ["3", "6"] and df["n"].tolist() == [60, 60] and df["dim"].tolist() == [8, 3]


# ---------------------------------------------------------------------------------- consistency
class NoiseImages(torch.utils.data.Dataset):
    """Gaussian-noise images (no structure shared by unrelated networks), with a fingerprint for the cache."""

    def __init__(self, n=96, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.targets = torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 4
        self.fingerprint = f"noise-{n}-{size}-{seed}"

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def test_teacher_consistency_credits_the_teacher_the_student_copied(tmp_path, monkeypatch):
    """A teacher whose feature *is* the student's explains most of it; a random-init control does not."""
    import copy

    monkeypatch.setenv("KAVIZ_DATA", str(tmp_path))
    ds = NoiseImages()
    torch.manual_seed(0)
    student = models.build("cifar_resnet8", 10, width=4).eval()
    torch.manual_seed(1)
    control = models.build("cifar_resnet8", 10, width=4).eval()
    teachers = {"copy": copy.deepcopy(student), "random-init": control}
    layer = "layer1.0.merge"
    table, fits = analysis.teacher_consistency(student, teachers, ds, layer, layer, epochs=15, lr=3e-2,
                                               batch_size=16, return_fits=True)
    assert list(table.index) == ["copy", "random-init"] and set(fits) == {"copy", "random-init"}
    assert table["teacher layer"].tolist() == [layer] * 2 and len(fits["copy"].features("val")[0]) == 24
    assert table.loc["copy", "share x^Δ"] < 0.5
    assert table.loc["copy", "share x^Δ"] < table.loc["random-init", "share x^Δ"] - 0.3
    v = fits["copy"].variance().set_index("component")
    assert table.loc["copy", "share x^Δ"] == pytest.approx(v.loc["x^Δ = x_B − g(x_A)", "share"])
    with pytest.raises(KeyError, match="no layer for teacher"):
        analysis.teacher_consistency(student, teachers, ds, layer, {"copy": layer})


def test_cka_controls_separate_a_related_pair_from_its_controls():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    y = 3.0 * x @ q + 0.1 * torch.randn(200, 12, generator=g, dtype=torch.float64)  # a related network
    unrelated = torch.randn(200, 12, generator=g, dtype=torch.float64)
    c = analysis.cka_controls(x, y, random=unrelated, seed=1)
    assert set(c) == {"network", "shuffled", "random-init"}
    assert c["network"] > 0.95 and abs(c["shuffled"]) < 0.1 and abs(c["random-init"]) < 0.1
    # the claim "network > both controls" fails when B is itself unrelated to A (the control case)
    u = analysis.cka_controls(x, unrelated, random=y, seed=1)
    assert not (u["network"] > u["random-init"])
    assert abs(u["network"] - u["shuffled"]) < 0.1
    with pytest.raises(ValueError, match="same samples"):
        analysis.cka_controls(x, y[:10])


class _Two(nn.Module):
    """A conv at stride 1 (``a``: 4×16×16 for 16 px) and one at stride 2 (``b``: 4×8×8)."""

    def __init__(self, stride):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=stride, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.a(x).mean((2, 3)))


def test_layer_view_pools_a_layer_and_lets_consistency_compare_grids(tmp_path, monkeypatch):
    monkeypatch.setenv("KAVIZ_DATA", str(tmp_path))
    torch.manual_seed(0)
    teacher, student = _Two(1).eval(), _Two(2).eval()
    x = torch.rand(5, 3, 16, 16)
    view = analysis.LayerView(teacher, "a", (8, 8))
    with torch.no_grad():
        torch.testing.assert_close(view(x), torch.nn.functional.adaptive_avg_pool2d(teacher.a(x), (8, 8)))
    assert not any(h for m in teacher.modules() for h in m._forward_hooks.values())  # the tap was removed
    ds = NoiseImages(n=48, size=16)
    with pytest.raises(ValueError, match="same shape"):
        analysis.teacher_consistency(student, {"t": teacher}, ds, "a", "a", epochs=1, batch_size=16)
    table = analysis.teacher_consistency(student, {"t": teacher}, ds, "a", "a", epochs=1, batch_size=16, resize=True)
    assert table.loc["t", "teacher layer"] == "a" and table.loc["t", "pooled to"] == "(8, 8)"
    assert np.isfinite(table.loc["t", "share x^Δ"])


def test_linear_probe_fits_a_layer_with_the_same_features_as_another_once(monkeypatch):
    import sklearn.model_selection

    calls = []
    real = sklearn.model_selection.cross_val_score
    monkeypatch.setattr(sklearn.model_selection, "cross_val_score",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    r = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = r.normal(size=(60, 4)) + np.eye(3, 4)[y]
    t = analysis.linear_probe({"last stage": x, "fc:in": x.copy(), "other": x + 1e-3 * r.normal(size=x.shape)}, y,
                              cv=3, control=True)
    assert len(calls) == 4  # "fc:in" reuses "last stage" (probe and control); "other" differs by 1e-3: fitted
    assert list(t.index) == ["last stage", "fc:in", "other"]
    assert t.loc["fc:in"].equals(t.loc["last stage"]) and t.loc["other", "dim"] == 4
