import copy
import functools
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import kaviz
from kaviz import data, models
from kaviz.methods import kd
from kaviz.methods import layerwise as lw
from kaviz.train import fit


# ------------------------------------------------------------------------------------------ fixtures
def images(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)


def labelled(n=40, k=4, size=16, seed=0, name="toy"):
    return data.ImageDataset(images(n, size, seed), torch.arange(n) % k, classes=[f"c{i}" for i in range(k)], name=name)


def toy_union(n=40, k=4, size=16, seed=0):
    return data.union(lw.class_parts(labelled(n, k, size, seed), 2))


def vgg(num_classes, width=2):
    return models.build("vgg8_small", num_classes, width=width)


def plain(num_classes, width=4, in_channels=3):
    """A second plain-chain family: convs with bias, no batch-norm, other module names."""
    return nn.Sequential(OrderedDict([
        ("c1", nn.Conv2d(in_channels, width, 3, padding=1)), ("act1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("c2", nn.Conv2d(width, 2 * width, 3, padding=1)), ("act2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("c3", nn.Conv2d(2 * width, 2 * width, 1)), ("act3", nn.ReLU()),
        ("gap", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("head", nn.Linear(2 * width, num_classes)),
    ]))


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def randomize_aux(method, seed=0):
    g = torch.Generator().manual_seed(seed)
    for a in method.aux:
        c = a.weight.shape[0]
        a.weight.data.copy_(torch.eye(c) + 0.4 * torch.randn(c, c, generator=g))
        a.bias.data.copy_(0.3 * torch.randn(c, generator=g))
    return method


def example(u, n=4):
    return torch.stack([u.get_image(i) for i in range(n)])


# ----------------------------------------------------------------------------------------- class parts
def test_class_parts_relabel_to_local_ids_and_union_rebuilds_the_label_set():
    ds = labelled(n=50, k=5)
    a, b = lw.class_parts(ds, 2)
    assert a.classes == ["c0", "c1", "c2"] and b.classes == ["c3", "c4"]
    assert a.num_classes == 3 and b.num_classes == 2
    assert set(a.targets.tolist()) == {0, 1, 2} and set(b.targets.tolist()) == {0, 1}
    assert len(a) + len(b) == len(ds)
    u = data.union([a, b])
    original = torch.cat([ds.targets[ds.targets < 3], ds.targets[ds.targets >= 3]])
    assert torch.equal(u.targets, original)  # offsets 0 and 3 give back the original class ids
    assert torch.equal(u.get_image(0), ds.get_image(int(torch.nonzero(ds.targets < 3)[0])))
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == lw.class_parts(labelled(n=50, k=5), 2)[0].fingerprint  # stable
    sub = a.subset([0, 2])
    assert sub.classes == a.classes and torch.equal(sub.targets, a.targets[[0, 2]])
    assert sub.fingerprint != a.fingerprint
    parts = data.split(a, val=0.2, test=0.2)
    assert sum(len(p) for p in parts) == len(a)
    custom = lw.class_parts(ds, [[4, 0], [2]], names=["x", "y"])
    assert custom[0].name == "x" and custom[0].classes == ["c4", "c0"]
    assert torch.equal(custom[0].targets, (ds.targets[(ds.targets == 4) | (ds.targets == 0)] == 0).long())


def test_class_parts_bad_inputs():
    ds = labelled(n=20, k=4)
    with pytest.raises(ValueError, match="share classes"):
        lw.class_parts(ds, [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"distinct class ids in \[0, 4\)"):
        lw.class_parts(ds, [[0, 7]])
    with pytest.raises(ValueError, match="2 <= parts"):
        lw.class_parts(ds, 1)
    with pytest.raises(ValueError, match="names"):
        lw.class_parts(ds, 2, names=["only one"])
    multilabel = data.ImageDataset(images(6), torch.ones(6, 3), name="m")
    with pytest.raises(ValueError, match="class ids"):
        lw.class_parts(multilabel, [[0]])


# ------------------------------------------------------------------------------------------- segments
def test_infer_segments_of_vgg8_small():
    segs = lw.infer_segments(vgg(4), torch.rand(2, 3, 16, 16))
    assert [s.name for s in segs] == ["features.1", "features.5", "features.9", "features.12", "features.16",
                                      "features.19", "fc"]
    assert segs[0].ops == [] and segs[0].linear == "features.0"
    assert segs[1].ops == ["features.2", "features.3"]  # ReLU, max-pool
    assert segs[-1].ops == ["features.20", "avgpool", "flatten"] and segs[-1].norm is None


def test_infer_segments_of_a_plain_net_with_biases():
    segs = lw.infer_segments(plain(3), torch.rand(2, 3, 16, 16))
    assert [(s.linear, s.norm) for s in segs] == [("c1", None), ("c2", None), ("c3", None), ("head", None)]
    assert segs[1].ops == ["act1", "pool1"] and segs[-1].ops == ["act3", "gap", "flat"]


class FunctionalFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.act(self.conv(self.act(x))))))


def test_infer_segments_says_where_the_chain_breaks():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"between 'pool' and 'fc'.*functional op.*Segment"):
        lw.infer_segments(FunctionalFlatten(), x)
    with pytest.raises(ValueError, match="residual|functional"):
        lw.infer_segments(models.build("cifar_resnet8", 4, width=4), x)
    with pytest.raises(ValueError, match="grouped/depthwise|functional"):
        lw.infer_segments(models.build("mobilenet_small", 4, width=4), x)
    with pytest.raises(ValueError, match="'act' runs more than once"):
        lw.infer_segments(Twice(), x)
    ln = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    ln(x)
    with pytest.raises(ValueError, match="GroupNorm.*has parameters"):
        lw.infer_segments(ln, x)


def test_explicit_segments_cover_functional_ops():
    torch.manual_seed(0)
    u = toy_union()
    teachers = [FunctionalFlatten().eval() for _ in range(2)]
    for t, k in zip(teachers, u.class_counts):
        t.fc = nn.Linear(4, k)
    student = FunctionalFlatten()
    student.fc = nn.Linear(4, 4)
    segs = [lw.Segment("conv", "bn"),
            lw.Segment("fc", None, ["relu", "pool", functools.partial(torch.flatten, start_dim=1)])]
    plan = lw.plan_layers(teachers, student, example(u), segments=segs, teacher_layers=[["bn"], ["bn"]])
    assert plan.student_channels == [4, 4] and plan.teacher_channels == [[4], [4]]
    method = randomize_aux(lw.LayerwiseLearning(student, lw.FeatureAmalgamation(teachers, plan)))
    x = example(u)
    with torch.no_grad():
        assert torch.allclose(method.eval().chain(x), method.folded().eval()(x), atol=1e-5)
    table = plan.table()
    assert table["ops before"].iloc[-1] == "relu, pool, flatten"


def test_plan_layers_pairs_layers_and_checks_shapes():
    x = torch.rand(2, 3, 16, 16)
    teachers = [vgg(2, width=4).eval(), vgg(3, width=2).eval()]
    plan = lw.plan_layers(teachers, vgg(5, width=2), x)
    assert plan.depth == 7
    assert plan.teacher_layers[0] == ["features.1", "features.5", "features.9", "features.12", "features.16",
                                      "features.19"]
    assert plan.teacher_channels == [[4, 8, 16, 16, 32, 32], [2, 4, 8, 8, 16, 16]]
    assert plan.student_channels == [2, 4, 8, 8, 16, 16, 5] and plan.num_outputs == [2, 3]
    assert plan.sizes[:2] == [(16, 16), (8, 8)] and plan.sizes[-1] == ()
    t = plan.table()
    assert list(t["teacher channels"])[:2] == ["4 + 2", "8 + 4"] and t["target"].iloc[-1] == "concatenated logits"
    # a deeper teacher pairs by name: vgg11_small's first six features have the student's sizes
    deep = models.build("vgg11_small", 2, width=2).eval()
    with pytest.raises(ValueError, match="teacher 1 has 9 layers.*teacher_layers"):
        lw.plan_layers([deep, teachers[1]], vgg(5, width=2), x)
    plan2 = lw.plan_layers([deep, teachers[1]], vgg(5, width=2), x,
                           teacher_layers=[plan.teacher_layers[0], plan.teacher_layers[1]])
    assert plan2.teacher_channels[0] == [2, 4, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="spatial size"):
        lw.plan_layers(teachers, vgg(5, width=2), x,
                       teacher_layers=[plan.teacher_layers[0][::-1], plan.teacher_layers[1]])
    with pytest.raises(ValueError, match="comprehensive label space"):
        lw.plan_layers(teachers, vgg(4, width=2), x)
    with pytest.raises(ValueError, match=r"names 2 layers.*6 feature layers"):
        lw.plan_layers(teachers, vgg(5, width=2), x, teacher_layers=[["features.1", "features.5"]] * 2)
    with pytest.raises(ValueError, match="2 lists for 1 teachers"):
        lw.plan_layers(teachers[:1], vgg(2, width=2), x, teacher_layers=plan.teacher_layers)


# -------------------------------------------------------------------------------------------- folding
def test_fold_conv_with_bias_is_A_times_W_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    aux = lw.ChannelLinear(4, 4).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = aux(conv(x))
        W, b, A, bA = conv.weight.clone(), conv.bias.clone(), aux.weight.clone(), aux.bias.clone()
    lw.fold_auxiliary(conv, aux)
    with torch.no_grad():
        assert torch.allclose(conv(x), want, atol=1e-12, rtol=0)
        # the composition order: W'[o] = Σ_c A[o, c] W[c], b' = A b + b_A
        assert torch.allclose(conv.weight, torch.einsum("oc,cikl->oikl", A, W), atol=1e-14)
        assert torch.allclose(conv.bias, A @ b + bA, atol=1e-14)
        assert not torch.allclose(conv.weight, torch.einsum("co,cikl->oikl", A, W))  # A transposed is wrong


def test_fold_into_linear_and_into_batchnorm_mean():
    torch.manual_seed(1)
    lin, aux = nn.Linear(5, 3).double(), lw.ChannelLinear(3, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        want = aux(lin(x))
    lw.fold_auxiliary(lin, aux)
    with torch.no_grad():
        assert torch.allclose(lin(x), want, atol=1e-12, rtol=0)
    conv = nn.Conv2d(3, 4, 3, bias=False).double()
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(4)).double())[0]
    aux = lw.ChannelLinear(4, 4).double()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    lw.fold_auxiliary(conv, aux, bn)
    assert conv.bias is None  # same architecture: the offset went into the running mean
    for train in (False, True):
        bn.train(train)
        ref_bn.train(train)
        with torch.no_grad():
            assert torch.allclose(bn(conv(x)), ref_bn(aux(ref_conv(x))), atol=1e-10, rtol=0)


def test_fold_bad_inputs():
    aux = lw.ChannelLinear(4, 4)
    with pytest.raises(ValueError, match="bias=True"):
        lw.fold_auxiliary(nn.Conv2d(3, 4, 3, bias=False), aux)
    with pytest.raises(ValueError, match="grouped"):
        lw.fold_auxiliary(nn.Conv2d(4, 4, 3, groups=4), aux)
    with pytest.raises(ValueError, match="takes 4 channels but the layer has 5"):
        lw.fold_auxiliary(nn.Conv2d(3, 5, 3), aux)
    with pytest.raises(TypeError, match="Conv2d or nn.Linear"):
        lw.fold_auxiliary(nn.ReLU(), aux)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        lw.ChannelLinear(3, 4, identity=True)


@pytest.mark.parametrize("family", ["vgg", "plain"])
def test_folding_leaves_the_whole_student_unchanged(family):
    torch.manual_seed(0)
    u = toy_union()
    build = vgg if family == "vgg" else plain
    teachers = [build(k).eval() for k in u.class_counts]
    student = randomize_bn(build(u.num_classes))
    plan = lw.plan_layers(teachers, student, example(u))
    method = randomize_aux(lw.LayerwiseLearning(student, lw.FeatureAmalgamation(teachers, plan)))
    x = example(u, 8)
    check = lw.fold_check(method, x)
    assert check["max_rel_diff_eval"] < 1e-5 and check["max_rel_diff_train"] < 1e-5
    # the control fold_check reports: the student with its maps left out is far from the chain
    assert check["dropped_maps_rel_diff_eval"] > 1e-3 and check["dropped_maps_rel_diff_train"] > 1e-3
    with torch.no_grad():
        dropped = (method.eval().chain(x) - copy.deepcopy(student).eval()(x)).abs().max()
    assert check["dropped_maps_rel_diff_eval"] == pytest.approx(float(dropped / method.eval().chain(x).abs().max()))
    folded = method.folded()
    assert set(folded.state_dict()) == set(student.state_dict())  # the same architecture
    fresh = build(u.num_classes)
    fresh.load_state_dict(folded.state_dict())
    # and the auxiliary maps were not the identity, so the check was not trivial
    with torch.no_grad():
        assert (method.eval().chain(x) - copy.deepcopy(student).eval()(x)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------- stages
def test_stage1_autoencoders_reduce_reconstruction_error_and_keep_teachers_frozen():
    kaviz.seed_everything(0)
    u = toy_union(n=48)
    teachers = [randomize_bn(vgg(k, width=4)).eval() for k in u.class_counts]
    before_w = [models.weights_hash(t) for t in teachers]
    plan = lw.plan_layers(teachers, vgg(u.num_classes), example(u))
    amalg = lw.FeatureAmalgamation(teachers, plan)
    before = lw.reconstruction_errors(amalg, u)
    hist = fit(amalg, data.Unlabeled(u), epochs=8, lr=2e-2, batch_size=16)
    after = lw.reconstruction_errors(amalg, u)
    assert list(hist.filter(like="train/recon_l").columns) == [f"train/recon_l{l}" for l in range(1, 7)]
    assert (after["unexplained variance"] < 0.5 * before["unexplained variance"]).all()
    # no linear autoencoder with a code of C_s channels beats PCA
    assert (after["unexplained variance"] >= after["PCA bound"] - 1e-6).all()
    assert [models.weights_hash(t) for t in teachers] == before_w
    assert not any(p.requires_grad for t in amalg.teachers for p in t.parameters())
    targets = amalg.targets(example(u))
    assert [tuple(t.shape[1:]) for t in targets][:2] == [(2, 16, 16), (4, 8, 8)] and targets[-1].shape[1] == 4


def test_stage2_layers_are_trained_independently_and_learn():
    kaviz.seed_everything(0)
    u = toy_union(n=48)
    teachers = [randomize_bn(vgg(k, width=4)).eval() for k in u.class_counts]
    student = vgg(u.num_classes)
    plan = lw.plan_layers(teachers, student, example(u))
    method = lw.LayerwiseLearning(student, lw.FeatureAmalgamation(teachers, plan))
    terms = method(example(u, 8))
    assert list(terms) == [f"mse_l{l}" for l in range(1, 8)]
    layer2 = [p for n in ("features.4", "features.5") for p in dict(student.named_modules())[n].parameters()]
    others = [p for p in student.parameters() if all(p is not q for q in layer2)]
    grads = torch.autograd.grad(terms["mse_l2"], layer2 + others, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:len(layer2)])
    assert all(g is None for g in grads[len(layer2):])  # layer 2's loss reaches only layer 2
    with torch.no_grad():
        first = {k: float(v) for k, v in method(example(u, 48)).items()}
    fit(method, data.Unlabeled(u), epochs=10, lr=1e-2, batch_size=16)
    with torch.no_grad():
        last = {k: float(v) for k, v in method(example(u, 48)).items()}
    assert sum(last[k] < first[k] for k in first) >= 6
    assert any(not torch.equal(a.weight, torch.eye(a.weight.shape[0])) for a in method.aux)
    assert lw.fold_check(method, example(u, 8))["max_rel_diff_eval"] < 1e-5
    with pytest.raises(TypeError, match="stage-1 FeatureAmalgamation"):
        lw.LayerwiseLearning(student, teachers[0])


def test_stage2_rejects_parameters_outside_the_plan():
    u = toy_union()
    teachers = [vgg(k).eval() for k in u.class_counts]
    student = vgg(u.num_classes)
    plan = lw.plan_layers(teachers, student, example(u))
    student.extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"\['extra.weight', 'extra.bias'\] belong to no layer"):
        lw.LayerwiseLearning(student, lw.FeatureAmalgamation(teachers, plan))


def test_one_stage_terms_and_gradient_paths():
    torch.manual_seed(0)
    u = toy_union()
    teachers = [vgg(k, width=4).eval() for k in u.class_counts]
    student = vgg(u.num_classes)
    plan = lw.plan_layers(teachers, student, example(u))
    method = lw.OneStageAmalgamation(student, teachers, plan)
    terms = method(example(u, 8))
    assert set(terms) == {"kd", "feat", "recon"}
    enc = list(method.encoders.parameters())
    g_feat_enc = torch.autograd.grad(terms["feat"], enc, retain_graph=True, allow_unused=True)
    assert all(g is None for g in g_feat_enc)  # the code is a detached target for the student
    g_feat_student = torch.autograd.grad(terms["feat"], [student.features[0].weight], retain_graph=True)[0]
    assert g_feat_student.abs().sum() > 0
    g_recon = torch.autograd.grad(terms["recon"], enc + [student.features[0].weight], allow_unused=True)
    assert all(g is not None for g in g_recon[:-1]) and g_recon[-1] is None
    with pytest.raises(ValueError, match="plan is for 2 teachers, 1 were given"):
        lw.OneStageAmalgamation(student, teachers[:1], plan)
    some = lw.OneStageAmalgamation(student, teachers, plan, layers=[2, 6])
    assert [tuple(e.weight.shape) for e in some.encoders] == [(4, 16), (16, 64)]  # 8 + 8 -> 4, 32 + 32 -> 16
    assert set(some(example(u, 8))) == {"kd", "feat", "recon"}
    for bad in ([], [0], [7], [2, 2]):
        with pytest.raises(ValueError, match=r"distinct feature layers of the plan, in 1..6"):
            lw.OneStageAmalgamation(student, teachers, plan, layers=bad)


class Bomb:
    def __getattr__(self, name):
        raise AssertionError("a label was touched")


class BombLabels(torch.utils.data.Dataset):
    def __init__(self, n=24):
        self.x = torch.rand(n, 3, 16, 16)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], Bomb()


@pytest.mark.parametrize("family", ["vgg", "plain"])
def test_run_layerwise_end_to_end_on_two_families(family):
    kaviz.seed_everything(0)
    u = toy_union(n=32)
    build = vgg if family == "vgg" else plain
    teachers = [build(k).eval() for k in u.class_counts]
    res = lw.run_layerwise(teachers, build(u.num_classes), u, u, epochs=(1, 2, 1), batch_size=16)
    assert set(res.students) == {"layer-wise", "fine-tuned"}
    assert list(res.histories) == ["stage 1: autoencoders", "stage 2: layer-wise", "stage 3: fine-tuning"]
    assert res.histories["stage 2: layer-wise"].attrs["monitor"] == "val/task_agnostic"
    x = example(u, 8)
    with torch.no_grad():  # the stored stage-2 student is the folded stage-2 method
        assert torch.allclose(res.students["layer-wise"](x), res.layerwise.eval().chain(x), atol=1e-5)
    errs = lw.layer_errors(res, u)
    assert list(errs.columns) == ["layer", "student layer", "target", "layer-wise", "end-to-end: layer-wise",
                                  "end-to-end: fine-tuned"]
    assert len(errs) == res.plan.depth and errs["target"].iloc[-1] == "logits"
    # layer 1 reads the image in both cases, so its two errors agree
    assert errs["layer-wise"].iloc[0] == pytest.approx(errs["end-to-end: layer-wise"].iloc[0], rel=1e-4)
    method, hist = lw.run_one_stage(teachers, build(u.num_classes), u, u, epochs=1, batch_size=16, plan=res.plan)
    assert {"train/kd", "train/feat", "train/recon", "val/task_agnostic"} <= set(hist.columns)
    # labels are never read while training
    lw.run_layerwise(teachers, build(u.num_classes), BombLabels(), epochs=1, batch_size=8)
    lw.run_one_stage(teachers, build(u.num_classes), BombLabels(), epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="one per stage"):
        lw.run_layerwise(teachers, build(u.num_classes), u, epochs=(1, 2))


# ------------------------------------------------------------------------------------------- analysis
def test_accuracy_table_and_seed_summary():
    torch.manual_seed(0)
    u = toy_union()
    teachers = [vgg(k).eval() for k in u.class_counts]
    student = vgg(u.num_classes).eval()
    tab = lw.accuracy_table({"student": student}, u, teachers=teachers)
    assert list(tab["model"]) == ["teacher 1", "teacher 2", "concatenated teachers", "student"]
    assert list(tab.columns) == ["model", *u.sources, "task-aware (all)", "whole"]
    ref = kd.union_accuracy(student, u)
    row = tab.set_index("model").loc["student"]
    assert row[
        "whole"] == pytest.approx(
            ref["task_agnostic"]) and row[u.sources[1]] == pytest.approx(ref[f"task_aware/{u.sources[1]}"])
    assert np.isnan(tab.set_index("model").loc["teacher 1", u.sources[1]])
    with pytest.raises(TypeError, match="union split"):
        lw.accuracy_table({"s": student}, labelled())
    a = pd.DataFrame({"model": ["x", "y"], "acc": [0.5, np.nan]})
    b = pd.DataFrame({"model": ["x", "y"], "acc": [0.7, np.nan]})
    s = lw.summarize_seeds([a, b])
    # sample std (ddof = 1): 0.5 and 0.7 give 0.1414, not the population 0.100
    assert s.loc["x", "acc"] == "0.600 ± 0.141" and s.loc["y", "acc"] == "-" and s.loc["x", "seeds"] == 2


def test_feature_maps_and_param_table():
    torch.manual_seed(0)
    u = toy_union(n=32)
    teachers = [vgg(k, width=4).eval() for k in u.class_counts]
    res = lw.run_layerwise(teachers, vgg(u.num_classes), u, epochs=1, batch_size=16)
    rows, titles = lw.feature_maps(res, u, index=3, layer=2, channels=[0, 5])
    assert len(rows) == 2 and titles[0][:2] == ["image", titles[0][1]] and titles[0][3] == "amalgamated ch 0"
    assert titles[1][3] == "amalgamated ch 1"  # channel 5 modulo the 4 channels of layer 2
    assert rows[0][0].shape == (16, 16, 3) and all(m.shape == (8, 8) for m in rows[0][1:])
    assert rows[1][0] is None and titles[1][0] is None  # the image is shown once
    # the teacher map shown is the teacher channel with the largest encoder weight
    E = res.amalgamation.encoders[1].weight.detach()
    j = int(E[0, :8].abs().argmax())
    assert titles[0][1] == f"teacher 1 ch {j}"
    with pytest.raises(ValueError, match=r"spatial \(conv\) layer, one of \[1, 2, 3, 4, 5, 6\]"):
        lw.feature_maps(res, u, 0, layer=7)
    p = lw.param_table(teachers, {"student": res.students["fine-tuned"]})
    assert p.loc[2, "parameters"] == p.loc[0, "parameters"] + p.loc[1, "parameters"]
    assert p.loc[3,
                 "share of teachers"] == pytest.approx(
                     models.param_count(res.students["fine-tuned"]) / p.loc[2, "parameters"])


def test_seed_stats_long_form():
    a = pd.DataFrame({"model": ["x", "y"], "acc": [0.5, np.nan], "b": [1.0, 2.0]})
    b = pd.DataFrame({"model": ["x", "y"], "acc": [0.7, np.nan], "b": [3.0, 2.0]})
    s = lw.seed_stats([a, b])
    assert list(s.columns) == ["model", "column", "mean", "std", "seeds"]
    assert s[(s.model == "x") & (s.column == "acc")]["mean"].item() == pytest.approx(0.6)
    assert s[(s.model == "x") & (s.column == "b")]["std"].item() == pytest.approx(2 ** 0.5)  # sample std of 1, 3
    assert ((s.model == "y") & (s.column == "acc")).sum() == 0  # undefined cells are dropped


# ------------------------------------------------- the paper's placement: A on the next layer's input
def bn_free_vgg(num_classes, width=2):
    return models.build("vgg8_small", num_classes, width=width, norm=False)


def fold_forwards(method):
    """A deliberately wrong fold (the control): each A_l folded *forwards* into layer l's own conv,
    on its input side (W' = W·A, b' = b + W·b_A), across the ReLU/pooling that lies in between."""
    student = copy.deepcopy(method.student)
    modules = dict(student.named_modules())
    for seg, aux in zip(method.plan.segments[1:], method.aux):
        lin = modules[seg.linear]
        A, bA = aux.weight.detach(), aux.bias.detach()
        with torch.no_grad():
            W = lin.weight.clone()
            if isinstance(lin, nn.Conv2d):
                lin.weight.copy_(torch.einsum("ockl,cd->odkl", W, A))
                lin.bias.add_(torch.einsum("ockl,c->o", W, bA))
            else:
                lin.weight.copy_(W @ A)
                lin.bias.add_(W @ bA)
    return student


def test_vgg_small_norm_false_is_bn_free_with_biases():
    torch.manual_seed(0)
    m = bn_free_vgg(4)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 6 and all(c.bias is not None and torch.equal(c.bias, torch.zeros_like(c.bias)) for c in convs)
    assert m.kaviz_spec["norm"] is False and "norm" not in vgg(4).kaviz_spec  # the default spec is unchanged
    segs = lw.infer_segments(m, torch.rand(2, 3, 16, 16))
    assert [s.norm for s in segs] == [None] * 7 and [s.linear for s in segs][:2] == ["features.0", "features.3"]
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    # the default (with BN) is unchanged: the same weights as norm=True under one seed
    torch.manual_seed(1)
    a = vgg(4)
    torch.manual_seed(1)
    b = models.build("vgg8_small", 4, width=2, norm=True)
    assert models.weights_hash(a) == models.weights_hash(b)
    with pytest.raises(ValueError, match="norm must be True .* or False"):
        models.build("vgg8_small", 4, norm="no")


@pytest.mark.parametrize("family", ["vgg", "plain"])
def test_input_placement_folds_backwards_exactly_and_forwards_does_not(family):
    torch.manual_seed(0)
    u = toy_union()
    build = bn_free_vgg if family == "vgg" else plain
    teachers = [(vgg(k, width=4) if family == "vgg" else plain(k)).eval() for k in u.class_counts]  # BN or not
    student = build(u.num_classes)
    plan = lw.plan_layers(teachers, student, example(u))
    method = randomize_aux(lw.LayerwiseLearning(student, lw.FeatureAmalgamation(teachers, plan), placement="input"))
    assert [a.weight.shape[0] for a in method.aux] == plan.student_channels[:-1]  # A_2..A_L, on layers 2..L
    x = example(u, 8)
    check = lw.fold_check(method, x)
    assert check["max_rel_diff_eval"] < 1e-5 and check["max_rel_diff_train"] < 1e-5
    # the control fold_check reports: the student with its maps left out is far from the chain
    assert check["dropped_maps_rel_diff_eval"] > 1e-3 and check["dropped_maps_rel_diff_train"] > 1e-3
    with torch.no_grad():
        dropped = (method.eval().chain(x) - copy.deepcopy(student).eval()(x)).abs().max()
    assert check["dropped_maps_rel_diff_eval"] == pytest.approx(float(dropped / method.eval().chain(x).abs().max()))
    folded = method.folded()
    assert set(folded.state_dict()) == set(student.state_dict())  # the same architecture
    with torch.no_grad():
        chain = method.eval().chain(x)
        scale = chain.abs().max()
        # not trivial: the maps change the function ...
        assert (chain - copy.deepcopy(student).eval()(x)).abs().max() > 0.05 * scale
        # ... and the control, folding forwards into the layer's own conv across its ReLU/pooling, is not exact
        assert (chain - fold_forwards(method).eval()(x)).abs().max() > 0.05 * scale


def test_input_placement_map_sits_before_the_relu_and_trains_with_its_layer():
    torch.manual_seed(0)
    u = toy_union()
    teachers = [vgg(k, width=4).eval() for k in u.class_counts]
    student = bn_free_vgg(u.num_classes)
    plan = lw.plan_layers(teachers, student, example(u))
    method = lw.LayerwiseLearning(student, lw.FeatureAmalgamation(teachers, plan), placement="input")
    # layer 2 = A_2 → ReLU → max-pool → conv: a negative input is cut by the ReLU unless A_2 flips it
    h = -torch.rand(2, plan.student_channels[0], 16, 16)
    with torch.no_grad():
        conv = dict(student.named_modules())[plan.segments[1].linear]
        assert torch.allclose(method.run_layer(1, h), conv.bias[None, :, None, None].expand(2, -1, 8, 8))
        method.aux[0].weight.mul_(-1)
        assert not torch.allclose(method.run_layer(1, h), conv.bias[None, :, None, None].expand(2, -1, 8, 8))
    terms = method(example(u, 8))
    layer1 = list(dict(student.named_modules())[plan.segments[0].linear].parameters())
    layer2 = list(dict(student.named_modules())[plan.segments[1].linear].parameters())
    g = torch.autograd.grad(terms["mse_l2"], [*method.aux[0].parameters(), *layer2, *layer1, method.aux[1].weight],
                            allow_unused=True)
    assert all(t is not None and t.abs().sum() > 0 for t in g[:4])  # A_2 trains with layer 2
    assert all(t is None for t in g[4:])  # and nothing else: not layer 1, not A_3


def test_input_placement_refuses_batchnorm_and_bad_inputs():
    u = toy_union()
    teachers = [vgg(k).eval() for k in u.class_counts]
    student = vgg(u.num_classes)  # with BN: A after BN cannot be folded into the conv before it
    plan = lw.plan_layers(teachers, student, example(u))
    amalg = lw.FeatureAmalgamation(teachers, plan)
    with pytest.raises(ValueError, match=r"batch-norm 'features.1'.*norm=False\).*placement='output'"):
        lw.LayerwiseLearning(student, amalg, placement="input")
    with pytest.raises(ValueError, match="placement must be 'output' .* or 'input'"):
        lw.LayerwiseLearning(student, amalg, placement="before")
    with pytest.raises(ValueError, match=r"batch-norm 'features.1'"):  # refused before stage 1 trains
        lw.run_layerwise(teachers, vgg(u.num_classes), BombLabels(), epochs=1, placement="input")
    nobias = nn.Sequential(OrderedDict([
        ("c1", nn.Conv2d(3, 4, 3, padding=1, bias=False)), ("act1", nn.ReLU()), ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flat", nn.Flatten()), ("head", nn.Linear(4, u.num_classes))]))
    t2 = [plain(k).eval() for k in u.class_counts]
    plan2 = lw.plan_layers(t2, nobias, example(u), teacher_layers=[["c1"], ["c1"]])
    with pytest.raises(ValueError, match=r"'c1'\) has no bias.*bias=True"):
        lw.LayerwiseLearning(nobias, lw.FeatureAmalgamation(t2, plan2), placement="input")
    # the default placement takes the same BN student, as before
    assert lw.LayerwiseLearning(student, amalg).placement == "output"


def test_batchnorm_control_a_map_after_bn_does_not_fold_into_the_conv():
    """Why the paper's placement refuses BN: A applied after conv+BN, folded into the conv, is not the
    same function (in training mode BN re-standardises the mixed channels; in eval mode its per-channel
    scale does not commute with A)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(4)).double())[0]
    aux = lw.ChannelLinear(4, 4).double()
    with torch.no_grad():
        aux.weight.copy_(torch.eye(4) + 0.4 * torch.randn(4, 4))
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    folded = copy.deepcopy(conv)
    lw.fold_auxiliary(folded, aux)
    for train in (False, True):
        bn.train(train)
        with torch.no_grad():
            assert (aux(bn(conv(x))) - bn(folded(x))).abs().max() > 1e-2
    bn_free = nn.Identity()  # without the norm the same fold is exact
    with torch.no_grad():
        assert torch.allclose(aux(bn_free(conv(x))), folded(x), atol=1e-12)


def test_run_layerwise_with_the_papers_placement():
    kaviz.seed_everything(0)
    u = toy_union(n=32)
    teachers = [vgg(k).eval() for k in u.class_counts]
    res = lw.run_layerwise(teachers, bn_free_vgg(u.num_classes), u, u, epochs=(1, 2, 1), batch_size=16,
                           placement="input")
    assert res.layerwise.placement == "input" and len(res.layerwise.aux) == res.plan.depth - 1
    assert any(not torch.equal(a.weight, torch.eye(a.weight.shape[0])) for a in res.layerwise.aux)
    x = example(u, 8)
    with torch.no_grad():  # the stored stage-2 student is the backwards-folded stage-2 method
        assert torch.allclose(res.students["layer-wise"](x), res.layerwise.eval().chain(x), atol=1e-5)
    # end to end, the folded layer l stands for A_{l+1}(F_a^l): layer 1 reads the image, so its error
    # against that equals the unfolded layer 1 + A_2 against A_2(F_a^1)
    errs = lw.layer_errors(res, u)
    m = res.layerwise.eval()
    with torch.no_grad():
        t = res.amalgamation.targets(torch.stack([u.get_image(i) for i in range(len(u))]))
        own = m.aux[0](m.run_layer(0, torch.stack([u.get_image(i) for i in range(len(u))])))
        want = ((own - m.aux[0](t[0])) ** 2).sum() / ((m.aux[0](t[0]) - m.aux[0](t[0]).mean((0, 2, 3), keepdim=True))
                                                      ** 2).sum()
    assert errs["end-to-end: layer-wise"].iloc[0] == pytest.approx(float(want), rel=1e-3)
    assert errs["end-to-end: layer-wise"].iloc[0] != pytest.approx(errs["layer-wise"].iloc[0], rel=1e-3)
