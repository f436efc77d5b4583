"""LSH feature mimicking (SPEC §2): the loss, the adaptation layer, the two stages, the analysis."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from kaviz.data import scenes, split
from kaviz.features import OUTPUT
from kaviz.methods import lshfm
from kaviz.train import fit


# ------------------------------------------------------------------------------------ fixtures
class TinyNet(nn.Module):
    """conv-bn-relu, global average pool, classifier ``fc``: the pooled feature is ``fc:in``."""

    def __init__(self, width=4, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, 2, 1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.bn(self.conv(x))))))


@pytest.fixture(scope="module")
def data():
    ds = scenes(60, seed=0, size=16, max_objects=2)
    return split(ds, val=0.25, test=0.25, seed=0)


def _teacher(width=6, seed=1):
    torch.manual_seed(seed)
    return TinyNet(width).eval()


def _params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------- the loss
def test_lsh_loss_against_hand_computed_values():
    lsh = lshfm.LSHLoss(2, 2, std=1.0, bias="zero")
    lsh.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    lsh.bias.copy_(torch.tensor([0.0, -1.0]))
    f_t = torch.tensor([[2.0, 3.0], [-1.0, 0.5]])  # h_t = [[2, 2], [-1, -0.5]] -> bits [[1, 1], [0, 0]]
    f_s = torch.tensor([[1.0, 0.0], [0.5, 2.0]])   # h_s = [[1, -1], [0.5, 1]]
    out = lsh(f_s, f_t)

    def bce(z, y):
        return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))

    expected_lsh = (bce(1, 1) + bce(-1, 1) + bce(0.5, 0) + bce(1, 0)) / 4
    expected_l2 = ((1 - 2) ** 2 + (0 - 3) ** 2 + (0.5 + 1) ** 2 + (2 - 0.5) ** 2) / 4
    assert set(out) == {"l2", "lsh"}
    assert float(out["lsh"]) == pytest.approx(expected_lsh, rel=1e-6)
    assert float(out["l2"]) == pytest.approx(expected_l2, rel=1e-6)
    assert set(lshfm.LSHLoss(2, 2, 1.0, bias="zero", with_l2=False)(f_s, f_t)) == {"lsh"}


def test_teacher_bits_are_the_signs_of_the_hash_and_are_the_targets():
    torch.manual_seed(0)
    lsh = lshfm.LSHLoss(5, 64, std=0.3, bias="mean", seed=3)
    f_t = torch.randn(20, 5)
    lsh.fit_bias(torch.randn(50, 5))
    h_t = f_t @ lsh.weight.T + lsh.bias
    assert torch.equal(lsh.bits(f_t), h_t > 0)
    # the LSH term is BCE against exactly these bits (same value and gradient)
    f_s = torch.randn(20, 5, requires_grad=True)
    lsh(f_s, f_t)["lsh"].backward()
    grad_h = torch.autograd.grad(
        torch.nn.functional.binary_cross_entropy_with_logits(lsh.hash(f_s), (h_t > 0).float()), f_s)[0]
    torch.testing.assert_close(f_s.grad, grad_h)


def test_scaling_w_leaves_the_teachers_bits_unchanged():
    torch.manual_seed(0)
    feats = torch.rand(40, 8)
    f_t, f_s = torch.rand(10, 8), torch.rand(10, 8)
    for bias in ("median", "mean", "zero"):
        a = lshfm.LSHLoss(8, 32, std=0.05, bias=bias, seed=7).fit_bias(feats)
        b = lshfm.LSHLoss(8, 32, std=5.0, bias=bias, seed=7).fit_bias(feats)
        torch.testing.assert_close(b.weight, a.weight * 100)
        assert torch.equal(a.bits(f_t), b.bits(f_t))
        # ...while the student's hash logits scale with W (std is an inverse temperature)
        torch.testing.assert_close(b.hash(f_s), a.hash(f_s) * 100, rtol=1e-4, atol=1e-4)


def test_differing_bits_approach_angle_over_pi_for_zero_bias():
    lsh = lshfm.LSHLoss(16, 20000, std=1.0, bias="zero", seed=0)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(16, generator=g)
    u = u / u.norm()
    v = torch.randn(16, generator=g)
    v = v - (v @ u) * u
    v = v / v.norm()
    for deg in (10, 45, 90, 135, 170):
        th = math.radians(deg)
        w = math.cos(th) * u + math.sin(th) * v
        frac = (lsh.bits(u[None]) != lsh.bits(w[None])).float().mean().item()
        assert abs(frac - th / math.pi) < 0.012, (deg, frac)


def test_fit_bias_lower_median_mean_and_zero():
    lsh = lshfm.LSHLoss(1, 1, std=1.0, bias="median")
    lsh.weight.fill_(1.0)
    lsh.fit_bias(torch.tensor([[4.0], [1.0], [3.0], [2.0]]))  # even count: lower median 2
    assert float(lsh.bias) == -2.0
    # each bit splits the fitting data about evenly (strictly above the median -> 1)
    feats = torch.randn(101, 6)
    lsh = lshfm.LSHLoss(6, 50, std=1.0, bias="median", seed=0).fit_bias(feats)
    assert torch.all(lsh.bits(feats).sum(0) == 50)
    mean = lshfm.LSHLoss(1, 1, std=1.0, bias="mean")
    mean.weight.fill_(2.0)
    mean.fit_bias(torch.tensor([[1.0], [2.0], [6.0]]))
    assert float(mean.bias) == pytest.approx(-6.0)
    zero = lshfm.LSHLoss(3, 4, std=1.0, bias="zero").fit_bias(torch.ones(5, 3))
    assert torch.all(zero.bias == 0)
    # numpy input works too
    lshfm.LSHLoss(6, 5, std=1.0, seed=0).fit_bias(np.random.default_rng(0).normal(size=(9, 6)))


def test_single_label_variant_averages_over_samples_the_teacher_gets_right():
    lsh = lshfm.LSHLoss(3, 8, std=1.0, bias="zero", seed=0)
    f_s, f_t = torch.randn(4, 3), torch.randn(4, 3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 2.0]])
    targets = torch.tensor([0, 0, 0, 1])
    mask = lshfm.teacher_correct(logits, targets)
    assert mask.tolist() == [True, False, True, True]
    out = lsh(f_s, f_t, mask)
    ref = lsh(f_s[mask], f_t[mask])
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    # no sample right: 0, and backward still works
    f = f_s.clone().requires_grad_(True)
    none = lsh(f, f_t, torch.zeros(4, dtype=torch.bool))
    assert none["lsh"].item() == 0.0 and none["l2"].item() == 0.0
    (none["lsh"] + none["l2"]).backward()
    assert torch.all(f.grad == 0)


def test_binary_kd_hand_value():
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, -1.0]])
    q = 1 / (1 + math.exp(1))
    p = 1 / (1 + math.exp(-1))
    expected = (math.log(2) + -(q * math.log(p) + (1 - q) * math.log(1 - p))) / 2
    assert float(lshfm.binary_kd(s, t)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        lshfm.binary_kd(s, torch.zeros(1, 3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=4, n_hashes=8, std=1.0, bias="median2"), "bias must be one of"),
    (dict(dim=4, n_hashes=8, std=0.0), "std must be a positive"),
    (dict(dim=4, n_hashes=8, std=float("nan")), "std must be a positive"),
    (dict(dim=4, n_hashes=0, std=1.0), "n_hashes"),
    (dict(dim=0, n_hashes=4, std=1.0), "dim"),
])
def test_lsh_loss_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lshfm.LSHLoss(**kwargs)


def test_lsh_loss_bad_inputs():
    lsh = lshfm.LSHLoss(4, 8, std=1.0)
    with pytest.raises(RuntimeError, match="fit_bias"):
        lsh(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="4 dimensions|expects 4"):
        lsh.fit_bias(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        lsh.fit_bias(torch.randn(5, 4, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        lsh.fit_bias(torch.full((3, 4), float("nan")))
    lsh.fit_bias(torch.randn(5, 4))
    with pytest.raises(ValueError, match="adaptation layer"):
        lsh(torch.randn(2, 3), torch.randn(2, 4))


# -------------------------------------------------------------------------------- adaptation
def test_adapt_puts_feat_fc_under_the_classifier():
    torch.manual_seed(0)
    student = TinyNet(4)
    lshfm.adapt(student, 6)
    assert isinstance(student.fc, lshfm.AdaptedHead)
    assert student.fc.feat_fc.in_features == 4 and student.fc.feat_fc.out_features == 6
    assert student.fc.fc.in_features == 6 and student.fc.out_features == 10
    assert lshfm.adapted_layer(student) == "fc.feat_fc" and lshfm.pooled_layer(student) == "fc.feat_fc:in"
    from kaviz.features import FeatureTap
    from kaviz.models import classifier_name

    assert classifier_name(student) == "fc.fc"
    x = torch.rand(3, 3, 16, 16)
    with FeatureTap(student, ["fc:in", "fc.feat_fc", "fc.fc:in"]) as tap:
        logits = student(x)
    # the classifier reads the adapted feature
    torch.testing.assert_close(tap["fc.feat_fc"], tap["fc.fc:in"])
    torch.testing.assert_close(logits, student.fc.fc(student.fc.feat_fc(tap["fc:in"])))
    # equal widths get an adaptation layer too (SPEC: ResNet-18 <- ResNet-34 uses 512 -> 512)
    same = lshfm.adapt(TinyNet(4), 4)
    assert isinstance(same.fc, lshfm.AdaptedHead)


def test_adapt_bad_inputs():
    student = lshfm.adapt(TinyNet(4), 6)
    with pytest.raises(ValueError, match="already has an adaptation layer"):
        lshfm.adapt(student, 6)
    with pytest.raises(TypeError, match="nn.Linear"):
        lshfm.adapt(TinyNet(4), 6, classifier="bn")
    with pytest.raises(KeyError, match="Closest valid names"):
        lshfm.adapt(TinyNet(4), 6, classifier="fcc")
    with pytest.raises(ValueError, match="no adaptation layer"):
        lshfm.adapted_layer(TinyNet(4))


def test_adapt_works_on_a_torchvision_resnet():
    from kaviz.models import build

    tv = build("resnet18", 5).eval()
    lshfm.adapt(tv, 64)
    assert tv(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    assert lshfm.adapted_layer(tv) == "fc.feat_fc"


# ---------------------------------------------------------------------------------- the method
def test_variants_log_their_named_terms(data):
    train, _, _ = data
    teacher = _teacher()
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=8)))
    expected = {"bce": {"bce"}, "l2": {"bce", "l2"}, "lsh": {"bce", "lsh"}, "lshl2": {"bce", "l2", "lsh"},
                "kd": {"bce", "kd"}}
    for variant, terms in expected.items():
        torch.manual_seed(0)
        m = lshfm.FeatureMimic(TinyNet(4), teacher, variant, n_hashes=16)
        m.fit_bias(torch.rand(10, 6))
        out = m(batch)
        assert set(out) == terms, variant
        assert all(torch.isfinite(v) for v in out.values())
    m = lshfm.FeatureMimic(TinyNet(4), teacher, "lshl2")
    assert m.lsh.n_hashes == 4 * 6  # 4·D hash functions by default
    assert m.lsh.std == pytest.approx(lshfm.classifier_std(teacher))
    assert m.loss_weights == {"bce": 1.0, "l2": 0.5, "lsh": 0.5, "kd": 1.0}
    m.stage = 1
    assert m.loss_weights == {"l2": 1.0, "lsh": 1.0}


def test_method_bad_inputs():
    teacher = _teacher()
    with pytest.raises(ValueError, match="variant must be one of"):
        lshfm.FeatureMimic(TinyNet(4), teacher, "fitnet")
    with pytest.raises(ValueError, match="stage 1 is for"):
        lshfm.FeatureMimic(TinyNet(4), teacher, "bce", stage=1)
    with pytest.raises(ValueError, match="beta"):
        lshfm.FeatureMimic(TinyNet(4), teacher, "l2", beta=-1)
    with pytest.raises(ValueError, match="outputs 5 features"):
        lshfm.FeatureMimic(lshfm.adapt(TinyNet(4), 5), teacher, "l2")
    m = lshfm.FeatureMimic(TinyNet(4), teacher, "l2", target_key="labelz")
    with pytest.raises(KeyError, match="labelz"):
        m((torch.rand(2, 3, 16, 16), {"labels": torch.zeros(2, 10)}))


def test_stage1_trains_only_feat_fc_and_batch_norm_statistics_update(data):
    train, val, _ = data
    teacher = _teacher()
    t_before = _params(teacher)
    torch.manual_seed(0)
    student = TinyNet(4)
    m = lshfm.FeatureMimic(student, teacher, "lshl2", n_hashes=16, stage=1)
    m.fit_bias(lshfm.TeacherOutputs(train, teacher).features)
    before = _params(student)
    h = fit(m, train, val, epochs=1, batch_size=8, lr=1e-2, monitor="val/loss")
    after = _params(student)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"fc.feat_fc.weight", "fc.feat_fc.bias"} <= changed
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= changed  # train-mode BN
    frozen = {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.fc.weight", "fc.fc.bias"}
    assert not (changed & frozen), changed & frozen
    assert all(torch.equal(v, _params(teacher)[k]) for k, v in t_before.items())
    assert {"train/l2", "train/lsh", "val/cos", "val/mAP"} <= set(h.columns)
    assert "train/bce" not in h.columns


def test_stage2_trains_everything_and_teacher_stays_frozen(data):
    train, _, _ = data
    teacher = _teacher()
    t_before = _params(teacher)
    torch.manual_seed(0)
    student = TinyNet(4)
    m = lshfm.FeatureMimic(student, teacher, "l2")
    before = _params(student)
    fit(m, train, None, epochs=1, batch_size=8, lr=1e-2)
    after = _params(student)
    assert all(not torch.equal(before[k], after[k]) for k in ("conv.weight", "fc.fc.weight", "fc.feat_fc.weight"))
    assert all(torch.equal(v, _params(teacher)[k]) for k, v in t_before.items())


def test_cached_teacher_outputs_equal_live_ones(data):
    train, _, _ = data
    teacher = _teacher()
    cached = lshfm.TeacherOutputs(train, teacher)
    assert set(cached[0][1]) == {"labels", "difficult", "teacher_outputs"}  # the one format of kaviz.cache
    assert set(cached[0][1]["teacher_outputs"]["teacher"]) == {cached.layer, OUTPUT}
    loader = lambda d: next(iter(torch.utils.data.DataLoader(d, batch_size=10)))  # noqa: E731
    torch.manual_seed(0)
    m = lshfm.FeatureMimic(TinyNet(4), teacher, "lshl2", n_hashes=16).eval()
    m.fit_bias(cached.features)
    with torch.no_grad():
        a = m(loader(cached))
        b = m(loader(train))
        with torch.no_grad():
            from kaviz.features import FeatureTap

            with FeatureTap(teacher, "fc:in") as tap:
                teacher(loader(train)[0])
            torch.testing.assert_close(cached.features[:10], tap["fc:in"])
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert cached.fingerprint != lshfm.TeacherOutputs(train, _teacher(seed=5)).fingerprint


def test_run_two_stages_refits_bias_and_selects_on_validation(data):
    train, val, _ = data
    teacher = _teacher()
    res = lshfm.run("lshl2", TinyNet(4), teacher, train, val, epochs=2, stage1_epochs=1, batch_size=8,
                    lr=1e-2, n_hashes=16, seed=0)
    h = res.history
    assert h["stage"].tolist() == [1, 2, 2] and h["epoch"].tolist() == [1, 2, 3]
    assert h.attrs["best_epoch"] in (2, 3) and h.attrs["monitor"] == "val/mAP"
    assert h.attrs["best_value"] == pytest.approx(h.loc[h["epoch"] == h.attrs["best_epoch"], "val/mAP"].item())
    proj = lshfm.TeacherOutputs(train, teacher).features @ res.method.lsh.weight.T
    torch.testing.assert_close(res.method.lsh.bias, -proj.median(0).values)
    assert not res.student.training
    # the baseline has no stage 1 even when asked
    torch.manual_seed(3)
    base = lshfm.run("bce", TinyNet(4), teacher, train, val, epochs=1, stage1_epochs=2, batch_size=8, seed=0)
    assert base.history["stage"].tolist() == [2] and base.history["epoch"].tolist() == [3]  # aligned on stage 2
    assert base.history.attrs["best_epoch"] == 3 and base.history.attrs["stage1_epochs"] == 0
    # same seed (and same initial student), same result
    torch.manual_seed(3)
    again = lshfm.run("bce", TinyNet(4), teacher, train, val, epochs=1, stage1_epochs=2, batch_size=8, seed=0)
    assert again.history["val/mAP"].tolist() == base.history["val/mAP"].tolist()


def test_run_builds_a_student_by_name_and_single_label_works():
    from kaviz.data import shapes

    ds = shapes(48, seed=0, size=16)
    tr, va, _ = split(ds, val=0.25, test=0.25, seed=0)
    teacher = _teacher()
    res = lshfm.run("lsh", TinyNet(4), teacher, tr, va, epochs=1, stage1_epochs=1, loss="ce", target_key=None,
                    batch_size=8, n_hashes=8)
    assert "val/accuracy" in res.history.columns and res.history.attrs["monitor"] == "val/accuracy"
    res2 = lshfm.run("bce", "cifar_resnet8", teacher, *split(scenes(40, size=16), val=0.25, test=0.25)[:2],
                     epochs=1, arch_kwargs={"width": 4}, batch_size=8)
    assert res2.student.fc.feat_fc.out_features == 6
    with pytest.raises(ValueError, match="variant"):
        lshfm.run("lsh2", TinyNet(4), teacher, tr, va, epochs=1)


# ----------------------------------------------------------------------------------- analysis
def test_feature_agreement_is_one_for_a_copy_of_the_teacher(data):
    train, _, test = data
    import copy

    teacher = _teacher()
    student = lshfm.adapt(copy.deepcopy(teacher), 6)
    with torch.no_grad():
        student.fc.feat_fc.weight.copy_(torch.eye(6))
        student.fc.feat_fc.bias.zero_()
    ag = lshfm.feature_agreement(student, teacher, test, train)
    assert ag["cos"] == pytest.approx(1.0, abs=1e-6)
    assert ag["cos_linear"] == pytest.approx(1.0, abs=1e-3)
    other = lshfm.feature_agreement(lshfm.adapt(TinyNet(4), 6), teacher, test)
    assert set(other) == {"cos"} and other["cos"] < 0.999


def test_results_table_and_per_class(data):
    train, val, test = data
    teacher = _teacher()
    runs = {(v, s): lshfm.run(v, TinyNet(4), teacher, train, val, epochs=1, batch_size=8, seed=s, n_hashes=8)
            for v in ("bce", "lsh") for s in (0, 1)}
    table, scores = lshfm.results_table(runs, test, teacher)
    assert list(table.index) == ["teacher", "bce", "lsh"]
    assert table.loc["bce", "seeds"] == 2 and np.isnan(table.loc["teacher", "mAP std"])
    row = scores[(scores.variant == "lsh") & (scores.seed == 1)].iloc[0]
    direct = lshfm.evaluate_model(runs[("lsh", 1)].student, test)
    assert row["mAP"] == pytest.approx(direct["mAP"])
    assert table.loc["lsh", "mAP mean"] == pytest.approx(scores[scores.variant == "lsh"]["mAP"].mean())
    per_class = lshfm.per_class_table(scores)
    assert list(per_class.columns) == ["teacher", "bce", "lsh"] and len(per_class) == 10


def test_angle_hamming_table():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    df = lshfm.angle_hamming({"random": (a, b), "same": (a, a)}, n_hashes=4000, std=1.0, bias="zero")
    assert set(df["pair"]) == {"random", "same"} and len(df) == 100
    assert df.attrs["mean_abs_dev"] < 0.02
    assert (df[df.pair == "same"]["differing bits"] == 0).all()
    med = lshfm.angle_hamming({"random": (a, b)}, n_hashes=64, std=1.0, bias="median", fit_on=b)
    assert med.attrs["bias"] == "median"
    with pytest.raises(ValueError, match="fit_on"):
        lshfm.angle_hamming({"random": (a, b)}, n_hashes=64, std=1.0, bias="median")
    with pytest.raises(ValueError, match="differ in shape"):
        lshfm.angle_hamming({"x": (a, b[:3])}, n_hashes=8, std=1.0)


def test_primary_labels(data):
    train, _, _ = data
    lab = lshfm.primary_labels(train)
    labels = train.targets["labels"].numpy()
    assert lab.shape == (len(train),)
    assert all(labels[i, lab[i]] == 1 for i in range(len(train)))  # the chosen class is present
    assert np.array_equal(lshfm.primary_labels(lshfm.TeacherOutputs(train, _teacher())), lab)
    from kaviz.data import ImageDataset

    plain = ImageDataset(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.tensor([[0, 1.0], [1, 1], [0, 0]]))
    assert lshfm.primary_labels(plain).tolist() == [1, 0, -1]


def test_load_data_embedded_and_real_sources_fail_with_the_layout():
    tr, va, te = lshfm.load_data("embedded", n=40, image_size=16, max_objects=2, seed=0)
    assert len(tr) + len(va) + len(te) == 40 and tr.targets["labels"].shape[1] == 10
    table = lshfm.label_summary({"train": tr, "test": te})
    assert list(table.columns) == ["train", "train difficult", "test", "test difficult"]
    assert table["train"].sum() == int(tr.targets["labels"].sum())
    from kaviz.data.real import DatasetLayoutError

    with pytest.raises(TypeError, match="root=None"):  # the loader's own message, no silent fallback
        lshfm.load_data("voc2007", root=None)
    with pytest.raises(DatasetLayoutError, match="JPEGImages"):
        lshfm.load_data("voc2007", root="/nonexistent/VOC2007")
    with pytest.raises(ValueError, match="source must be one of"):
        lshfm.load_data("voc2012")
    with pytest.raises(ValueError, match="multi-hot"):
        lshfm.label_summary({"x": torch.utils.data.TensorDataset(torch.zeros(2, 1))})


def test_load_data_voc_fixture_holds_out_val_with_the_evaluation_transform(tmp_path):
    from fixtures_real import make_voc  # the foundation's fixture trees

    make_voc(tmp_path)
    tr, va, te = lshfm.load_data("voc2007", root=tmp_path, image_size=32, val=0.34)
    assert len(va) >= 1 and len(tr) >= 1 and te.split == "test"
    assert "Random" in repr(tr.transform) and "Random" not in repr(va.transform)
    teacher = lshfm.adapt(TinyNet(4, num_classes=20), 6)  # any model with a classifier works as a "teacher" here
    assert lshfm.teacher_outputs(tr, teacher) is tr  # augmented: the teacher must run live
    assert isinstance(lshfm.teacher_outputs(va, teacher), lshfm.TeacherOutputs)


def test_mean_feature_cosine_and_feature_sets(data):
    train, _, test = data
    teacher = _teacher()
    ref = lshfm.mean_feature_cosine(teacher, train, test)
    assert 0 < ref <= 1
    students = {"a": lshfm.adapt(TinyNet(4), 6)}
    feats = lshfm.feature_sets(students, teacher, test)
    assert list(feats) == ["teacher", "a"] and feats["a"].shape == (len(test), 6) == feats["teacher"].shape


# ------------------------------------------------------------ reference recipes (issue 15, options)
def test_softmax_kd_is_the_kl_at_temperature_times_t_squared():
    torch.set_num_threads(1)
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    T = 4.0
    p_t, p_s = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    hand = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * T * T
    assert float(lshfm.softmax_kd(s, t, T)) == pytest.approx(float(hand), rel=1e-6)
    assert float(lshfm.softmax_kd(t, t, T)) == pytest.approx(0.0, abs=1e-7)
    # the per-class sigmoid KD is a different loss on the same logits
    assert float(lshfm.binary_kd(s, t, T)) != pytest.approx(float(hand), rel=1e-2)
    with pytest.raises(ValueError, match="temperature"):
        lshfm.softmax_kd(s, t, 0)


def test_kd_variant_softmax_option_and_reference_recipe(data):
    train, _, _ = data
    teacher = _teacher()
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=8)))
    torch.manual_seed(0)
    sig = lshfm.FeatureMimic(TinyNet(4), teacher, "kd")
    torch.manual_seed(0)
    soft = lshfm.FeatureMimic(TinyNet(4), teacher, "kd", **lshfm.REFERENCE_SOFTMAX_KD)
    assert soft.loss_weights["kd"] == 0.001 and soft.T == 4.0
    x = batch[0]
    with torch.no_grad():
        z_s, z_t = soft.student(x), teacher(x)
    assert float(soft(batch)["kd"].detach()) == pytest.approx(float(lshfm.softmax_kd(z_s, z_t, 4.0)), rel=1e-5)
    assert float(sig(batch)["kd"].detach()) == pytest.approx(float(lshfm.binary_kd(z_s, z_t, 1.0)), rel=1e-5)
    # stage1="l2" gives the kd variant the L2 variant's stage 1
    assert soft.stage1_terms == ("l2",) and sig.stage1_terms == ()
    soft.stage = 1
    assert set(soft(batch)) == {"l2"}
    with pytest.raises(ValueError, match="stage 1 is for"):
        sig.stage = 1
    with pytest.raises(ValueError, match="kd must be one of"):
        lshfm.FeatureMimic(TinyNet(4), teacher, "kd", kd="hinge")
    with pytest.raises(ValueError, match="the 'bce' baseline has no stage 1"):
        lshfm.FeatureMimic(TinyNet(4), teacher, "bce", stage1="l2")


def test_run_kd_from_the_l2_stage1_follows_the_l2_runs_stage1(data):
    torch.set_num_threads(1)
    train, val, _ = data
    teacher = _teacher()
    kw = dict(epochs=1, stage1_epochs=1, batch_size=8, lr=1e-2, seed=0)
    torch.manual_seed(5)
    l2 = lshfm.run("l2", TinyNet(4), teacher, train, val, **kw)
    torch.manual_seed(5)
    kd = lshfm.run("kd", TinyNet(4), teacher, train, val, **kw, **lshfm.REFERENCE_SOFTMAX_KD)
    h1, h2 = (r.history[r.history["stage"] == 1] for r in (l2, kd))
    assert len(h1) == 1 and h1["train/l2"].tolist() == h2["train/l2"].tolist()
    assert h1["val/loss"].tolist() == h2["val/loss"].tolist()
    s2 = kd.history[kd.history["stage"] == 2]
    assert "train/kd" in s2.columns and "train/l2" not in s2.dropna(axis=1, how="all").columns
    # control: without stage1 the kd variant has no stage 1
    torch.manual_seed(5)
    plain = lshfm.run("kd", TinyNet(4), teacher, train, val, **kw, kd="softmax")
    assert plain.history["stage"].tolist() == [2]
    # the shared stage 1: an LSH variant with stage1="l2" starts stage 2 from the same L2 stage 1
    torch.manual_seed(5)
    lsh = lshfm.run("lshl2", TinyNet(4), teacher, train, val, **kw, stage1="l2", n_hashes=8)
    h3 = lsh.history[lsh.history["stage"] == 1]
    assert h3["train/l2"].tolist() == h1["train/l2"].tolist() and "train/lsh" not in h3.dropna(axis=1).columns
    assert lsh.history[lsh.history["stage"] == 2]["train/lsh"].notna().all()
    torch.manual_seed(5)
    own = lshfm.run("lshl2", TinyNet(4), teacher, train, val, **kw, n_hashes=8)  # control: its own stage 1
    assert own.history[own.history["stage"] == 1]["train/lsh"].notna().all()


def test_l2_weight_separates_the_l2_term_from_beta(data):
    teacher = _teacher()
    m = lshfm.FeatureMimic(TinyNet(4), teacher, "lshl2", n_hashes=8, l2_weight=1.0)
    assert m.loss_weights["l2"] == 1.0 and m.loss_weights["lsh"] == 0.5
    assert lshfm.FeatureMimic(TinyNet(4), teacher, "l2").loss_weights["l2"] == 0.5  # default: beta
    with pytest.raises(ValueError, match="l2_weight"):
        lshfm.FeatureMimic(TinyNet(4), teacher, "l2", l2_weight=-1)


def test_bce_baseline_without_adaptation_layer(data):
    train, val, _ = data
    teacher = _teacher(width=4)  # the student's width: cos is measured on the classifier input
    student = TinyNet(4)
    m = lshfm.FeatureMimic(student, teacher, "bce", adaptation=False)
    assert lshfm.heads.head_name(student) is None and isinstance(student.fc, nn.Linear)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=8)))
    assert set(m(batch)) == {"bce"}
    ev = m.evaluate(val)
    assert 0 <= ev["mAP"] <= 1 and -1 <= ev["cos"] <= 1
    other = lshfm.FeatureMimic(TinyNet(4), _teacher(width=6), "bce", adaptation=False)
    assert math.isnan(other.evaluate(val)["cos"])  # widths differ: no feature to compare
    # control: the default keeps adapting the baseline
    assert lshfm.heads.head_name(lshfm.FeatureMimic(TinyNet(4), teacher, "bce").student) == "fc"
    with pytest.raises(ValueError, match="'bce' baseline only"):
        lshfm.FeatureMimic(TinyNet(4), teacher, "l2", adaptation=False)


def test_evaluate_adds_the_non_interpolated_map_when_asked(data):
    _, val, _ = data
    teacher = _teacher()
    torch.manual_seed(0)
    m = lshfm.FeatureMimic(TinyNet(4), teacher, "bce", ap="non_interpolated")
    ev = m.evaluate(val)
    assert set(ev) == {"mAP", "mAP_non_interpolated", "cos"}
    assert ev["mAP_non_interpolated"] <= ev["mAP"] + 1e-12  # no envelope: never above all-point
    assert "mAP_non_interpolated" not in lshfm.FeatureMimic(TinyNet(4), teacher, "bce").evaluate(val)
    with pytest.raises(ValueError, match="ap must be one of"):
        lshfm.FeatureMimic(TinyNet(4), teacher, "bce", ap="coco")


def test_hash_std_gives_the_teachers_centred_logits_the_asked_spread():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    f = 3.0 + 0.05 * torch.randn(400, 32, generator=g)  # a small spread around a large mean
    std = lshfm.hash_std(f)
    lsh = lshfm.LSHLoss(32, 512, std, seed=0).fit_bias(f)
    assert lsh.hash(f).std().item() == pytest.approx(1.0, rel=0.1)
    assert lshfm.hash_std(f, logit_std=3.0) == pytest.approx(3 * std)
    # the signal it restores: the gap between a shuffled and a perfect mimic grows with the scale
    perm = torch.randperm(400, generator=g)

    def gap(s):
        m = lshfm.LSHLoss(32, 512, s, seed=0, with_l2=False).fit_bias(f)
        return (m(f[perm], f)["lsh"] - m(f, f)["lsh"]).item()

    assert gap(std) > 5 * gap(0.05 * std)  # control: a scale 20× too small leaves the term near ln 2
    with pytest.raises(ValueError, match="all equal"):
        lshfm.hash_std(torch.ones(5, 3))
    with pytest.raises(ValueError, match="logit_std"):
        lshfm.hash_std(f, logit_std=0)
