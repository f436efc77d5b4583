"""Student Becoming the Master (kaviz.methods.sbm, SPEC.md §4.2) and the dense helpers it added
(train_teacher(method=...), plots.label_image / scalar_image / dense_predictions)."""
import copy
import functools

import numpy as np
import pandas as pd
import pytest
import torch
from _dense_helpers import W, tiny_scene_splits
from _dense_helpers import identity_adaptors as _identity_adaptors
from _dense_helpers import teachers as _teachers
from torch import nn

from kaviz import metrics, models
from kaviz.features import OUTPUT
from kaviz.methods import sbm
from kaviz.train import fit, train_teacher

KINDS = {"seg": "segmentation", "depth": "depth"}


@pytest.fixture(scope="module")
def tiny_scenes():
    return tiny_scene_splits()


# --------------------------------------------------------------------------------------- adaptor
def test_se_adaptor_pools_over_the_whole_non_square_map():
    torch.manual_seed(0)
    a = sbm.SEAdaptor(8)
    assert a.fc1.out_channels == 16  # max(8 // 4, 16)
    assert sbm.SEAdaptor(128).fc1.out_channels == 32
    f = torch.randn(2, 8, 3, 12)  # width 4x the height: a square window would miss most of it
    g = torch.sigmoid(a.fc2(torch.relu(a.fc1(f.mean(dim=(2, 3), keepdim=True)))))
    assert torch.allclose(a.gate(f), g) and a.gate(f).shape == (2, 8, 1, 1)
    assert torch.allclose(a(f), f * g)
    f2 = f.clone()
    f2[:, :, :, -1] += 5.0  # the last column only
    assert not torch.allclose(a.gate(f2), a.gate(f))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        a(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="positive int"):
        sbm.SEAdaptor(0)


# -------------------------------------------------------------------------- branches and tails
@pytest.mark.parametrize("skips", [False, True])
def test_branches_use_the_teachers_decoder_weights(skips):
    teachers = _teachers(skips)
    student = sbm.SBMStudent(teachers)
    assert student.points == {t: list(sbm.BRANCH_POINTS) for t in teachers}
    tails = sbm.check_tails(student, teachers)
    assert len(tails) == 8 and tails["equal"].all()
    assert tails.set_index(["task", "point"]).loc[("depth", "dec3"), "blocks"] == "dec2+dec1+head"

    x = torch.rand(2, 3, 8, 16)  # non-square
    student = _identity_adaptors(student).eval()
    outs = student.forward_all(x)
    seg, depth = teachers["seg"], teachers["depth"]
    with torch.no_grad():
        # the trunk is the segmentation teacher, so every seg branch reproduces it exactly
        for p in sbm.BRANCH_POINTS:
            assert torch.allclose(outs["seg"][p], seg(x), atol=1e-6), p
        # a depth branch is the seg teacher's blocks up to p, then the depth teacher's blocks
        e1 = seg.enc1(x)
        e2 = seg.enc2(e1)
        z = seg.enc3(e2)
        d3 = seg.dec3(z, e2 if skips else None)
        expect = depth.head(depth.dec1(depth.dec2(d3, e1 if skips else None)))
    assert torch.allclose(outs["depth"]["dec3"], expect, atol=1e-6)

    # the reference-code bug: branches built on fresh decoders are detectably different
    torch.manual_seed(1)
    buggy = sbm.SBMStudent(teachers, tails="fresh")
    bad = sbm.check_tails(buggy, teachers)
    assert not bad["equal"].any() and (bad["max_abs_diff"] > 0.05).all()
    buggy = _identity_adaptors(buggy).eval()
    with torch.no_grad():
        diff = (buggy.forward_all(x)["seg"]["dec2"] - seg(x)).abs().max()
    assert diff > 1e-2
    assert all(p.requires_grad for p in buggy.branches.parameters())  # fresh tails always learn


def test_student_structure_errors_and_branch_out():
    teachers = _teachers()
    student = sbm.SBMStudent(teachers, {"seg": ["dec2", "dec3"], "depth": "enc3"})
    assert list(student.trunk) == ["enc1", "enc2", "enc3", "dec3", "dec2"]  # up to the deepest point
    assert student.points == {"seg": ["dec3", "dec2"], "depth": ["enc3"]}
    x = torch.rand(3, 3, 16, 8)
    with pytest.raises(RuntimeError, match="branch_out"):
        student(x)
    student.eval()
    all_out = student.forward_all(x)
    final = student.branch_out({"seg": "dec3", "depth": "enc3"})
    assert list(final.trunk) == ["enc1", "enc2", "enc3", "dec3"]
    assert final.points == {"seg": ["dec3"], "depth": ["enc3"]}
    out = final.eval()(x)
    assert set(out) == {"seg", "depth"} and out["seg"].shape == (3, 3, 16, 8) and out["depth"].shape == (3, 1, 16, 8)
    assert torch.equal(out["seg"], all_out["seg"]["dec3"]) and torch.equal(out["depth"], all_out["depth"]["enc3"])
    assert student.points["seg"] == ["dec3", "dec2"]  # the search student is left as it was
    with pytest.raises(ValueError, match="no candidate branch"):
        student.branch_out({"seg": "dec1", "depth": "enc3"})
    with pytest.raises(ValueError, match="one point per task"):
        student.branch_out({"seg": "dec3"})
    with pytest.raises(ValueError, match="divisible by 8"):
        final(torch.rand(1, 3, 12, 16))
    with pytest.raises(ValueError, match="unknown branch point 'dec4'"):
        sbm.SBMStudent(teachers, {"seg": ["dec4"], "depth": ["dec1"]})
    with pytest.raises(ValueError, match="missing \\['depth'\\]"):
        sbm.SBMStudent(teachers, {"seg": ["dec1"]})
    with pytest.raises(ValueError, match="same widths"):
        sbm.SBMStudent({"seg": teachers["seg"], "depth": models.build("segnet_small", 1, widths=(4, 8, 16))})
    with pytest.raises(TypeError, match="segnet_small"):
        sbm.SBMStudent({"seg": teachers["seg"], "depth": nn.Conv2d(3, 1, 1)})
    with pytest.raises(ValueError, match="tails must be"):
        sbm.SBMStudent(teachers, tails="random")
    with pytest.raises(ValueError, match="trunk_from='normals'"):
        sbm.SBMStudent(teachers, trunk_from="normals")
    with pytest.raises(ValueError, match="dict"):
        sbm.SBMStudent({})


# ---------------------------------------------------------------------------------- the losses
def test_losses_are_zero_where_the_student_is_the_teacher():
    teachers = _teachers()
    x = torch.rand(2, 3, 8, 8)
    # trunk from the seg teacher: KL of every seg branch is 0; CE to the argmax is not (soft outputs)
    student = _identity_adaptors(sbm.SBMStudent(teachers))
    method = sbm.SBM(student, teachers, seg_loss="kl", T=2.0).eval()
    with torch.no_grad():
        terms = method((x, {}))
    assert set(terms) == {f"{t}@{p}" for t in teachers for p in sbm.BRANCH_POINTS}
    assert all(abs(float(terms[f"seg@{p}"])) < 1e-6 for p in sbm.BRANCH_POINTS)
    with torch.no_grad():
        assert float(sbm.SBM(student, teachers, seg_loss="ce").eval()((x, {}))["seg@dec1"]) > 0
    # trunk from the depth teacher: the depth L1 is 0 at every point
    student = _identity_adaptors(sbm.SBMStudent(teachers, trunk_from="depth"))
    with torch.no_grad():
        terms = sbm.SBM(student, teachers).eval()((x, {}))
    assert all(float(terms[f"depth@{p}"]) < 1e-6 for p in sbm.BRANCH_POINTS)
    assert all(float(terms[f"seg@{p}"]) > 0 for p in sbm.BRANCH_POINTS)
    with pytest.raises(ValueError, match="seg_loss"):
        sbm.SBM(student, teachers, seg_loss="mse")
    with pytest.raises(ValueError, match="match the student"):
        sbm.SBM(student, {"seg": teachers["seg"]})
    with pytest.raises(ValueError, match="unknown tasks"):
        sbm.SBM(student, teachers, weights={"normals": 1.0})
    with pytest.raises(TypeError, match="SBMStudent"):
        sbm.SBM(teachers["seg"], teachers)


def test_block_phase_keeps_teacher_copies_frozen_then_fine_tuning_releases_them(tiny_scenes):
    train, val = tiny_scenes
    teachers = {"seg": models.build("segnet_small", 11, widths=W).eval(),
                "depth": models.build("segnet_small", 1, widths=W).eval()}
    before_teachers = {t: copy.deepcopy(m.state_dict()) for t, m in teachers.items()}
    student = sbm.SBMStudent(teachers, {"seg": ["dec2", "dec1"], "depth": ["enc3", "dec2"]})
    method = sbm.SBM(student, teachers, metrics=False)
    tails0 = {(t, p): copy.deepcopy(br.tail.state_dict()) for t, per in student.branches.items() for p,
              br in per.items()}
    trunk0 = copy.deepcopy(student.trunk.state_dict())
    # one step by hand: gradients reach the trunk and adaptors *through* the frozen tails
    method.train()
    loss = sum(method((train.images[:4].float() / 255, {})).values())
    loss.backward()
    assert all(p.grad is None for per in student.branches.values() for br in per.values() for p in br.tail.parameters())
    assert student.trunk["enc1"].conv1.weight.grad.abs().sum() > 0
    assert student.branches["depth"]["enc3"].adaptor.fc1.weight.grad.abs().sum() > 0
    for per in student.branches.values():  # batch-norm of the tails stays in eval mode while training
        for br in per.values():
            assert not any(m.training for m in br.tail.blocks.modules())
    student.zero_grad(set_to_none=True)

    hist = fit(method, train, val, epochs=2, batch_size=8, lr=1e-2, progress=False)
    assert {"train/seg@dec2", "train/depth@enc3", "val/loss"} <= set(hist.columns)
    for (t, p), state in tails0.items():
        now = student.branches[t][p].tail.state_dict()
        assert all(torch.equal(state[k], now[k]) for k in state), (t, p)
    assert sbm.check_tails(student, teachers)["equal"].all()
    assert any(not torch.equal(trunk0[k], v) for k, v in student.trunk.state_dict().items())
    for t, m in teachers.items():
        assert all(torch.equal(before_teachers[t][k], v) for k, v in m.state_dict().items())

    final = student.branch_out({"seg": "dec1", "depth": "dec2"}).freeze_tails(False)
    fit(sbm.SBM(final, teachers, metrics=False), train, val, epochs=1, batch_size=8, lr=1e-2, progress=False)
    assert not sbm.check_tails(final, teachers)["equal"].any()
    for t, m in teachers.items():
        assert all(torch.equal(before_teachers[t][k], v) for k, v in m.state_dict().items())


def test_precomputed_teacher_targets_equal_online_ones(tiny_scenes):
    train, _ = tiny_scenes
    teachers = {"seg": models.build("segnet_small", 11, widths=W).eval(),
                "depth": models.build("segnet_small", 1, widths=W).eval()}
    for seg_loss in ("ce", "kl"):
        method = sbm.SBM(sbm.SBMStudent(teachers, {"seg": "dec2", "depth": "dec3"}), teachers, seg_loss=seg_loss).eval()
        pre = method.precompute(train, batch_size=5)
        x, y = next(iter(torch.utils.data.DataLoader(pre, batch_size=6)))
        assert set(y["teacher_outputs"]) == {"seg", "depth"} and "mask" in y
        assert y["teacher_outputs"]["seg"][OUTPUT].shape == (6, 11, 16, 16)  # raw outputs, shared by every method
        assert method._targets((x, y), x)["seg"].shape == ((6, 16, 16) if seg_loss == "ce" else (6, 11, 16, 16))
        online = method((x, {k: v for k, v in y.items() if k != "teacher_outputs"}))
        cached = method((x, y))
        assert online.keys() == cached.keys() == {"seg", "depth"}
        assert all(torch.allclose(online[k], cached[k], atol=1e-6) for k in online)
    # the same teachers on the same data: one cache entry, whichever loss uses it; other teachers: another
    again = sbm.SBM(method.student, teachers, seg_loss="ce").precompute(train, batch_size=5)
    assert pre.fingerprint == again.fingerprint
    other = {"seg": models.build("segnet_small", 11, widths=W).eval(), "depth": teachers["depth"]}
    assert pre.fingerprint != sbm.SBM(method.student, other).precompute(train, batch_size=5).fingerprint

    class Augmented(torch.utils.data.Dataset):
        transform = type("T", (), {"train": True})()

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.rand(3, 8, 8), {}

    with pytest.raises(ValueError, match="random transform"):
        method.precompute(Augmented())


def test_branch_losses_and_selection():
    losses = pd.DataFrame({"task": ["seg", "seg", "depth", "depth", "depth"],
                           "point": ["enc3", "dec1", "enc3", "dec3", "dec2"],
                           "loss": [0.5, 0.2, 1.0, 0.7, 0.7]})
    assert sbm.select_branches(losses) == {"seg": "dec1", "depth": "dec3"}  # tie: the shallower
    with pytest.raises(ValueError, match="columns task, point, loss"):
        sbm.select_branches(losses.rename(columns={"loss": "value"}))
    teachers = _teachers()
    student = sbm.SBMStudent(teachers, {"seg": ["dec3", "dec1"], "depth": ["enc3", "dec2"]})
    method = sbm.SBM(student, teachers)
    data = torch.utils.data.TensorDataset(torch.rand(6, 3, 8, 8))
    table = sbm.branch_losses(method, data, batch_size=4)
    assert list(zip(table["task"], table["point"])) == [("seg", "dec3"), ("seg", "dec1"), ("depth", "enc3"),
                                                        ("depth", "dec2")]
    assert table.groupby("task")["best"].sum().tolist() == [1, 1]
    # the mean over the data, whatever the batching
    x = data.tensors[0]
    with torch.no_grad():
        whole = method.eval()((x,))
    assert np.allclose(table["loss"], [float(whole[f"{t}@{p}"]) for t, p in zip(table["task"], table["point"])],
                       atol=1e-5)
    chosen = sbm.select_branches(table)
    assert chosen["seg"] in ("dec3", "dec1") and chosen["depth"] in ("enc3", "dec2")


# --------------------------------------------------------------------------- teachers, metrics
def test_dense_supervised_ignores_void_pixels_and_missing_depth():
    torch.manual_seed(0)
    seg = models.build("segnet_small", 3, widths=W)
    x = torch.rand(2, 3, 8, 8)
    mask = torch.full((2, 8, 8), 255)
    mask[:, :2] = 1
    ce = sbm.DenseSupervised(seg)((x, {"mask": mask}))["ce"]
    with torch.no_grad():
        logits = seg(x)
    expect = nn.functional.cross_entropy(logits[:, :, :2], mask[:, :2])
    assert torch.allclose(ce, expect, atol=1e-6)
    depth_model = models.build("segnet_small", 1, widths=W)
    d = torch.zeros(2, 8, 8)
    d[0, 0, 0] = 3.0
    l1 = sbm.DenseSupervised(depth_model, task="depth")((x, {"depth": d}))["l1"]
    with torch.no_grad():
        assert torch.allclose(l1, (depth_model(x)[0, 0, 0, 0] - 3.0).abs(), atol=1e-6)
    empty = sbm.DenseSupervised(depth_model, task="depth")((x, {"depth": torch.zeros(2, 8, 8)}))["l1"]
    assert float(empty.detach()) == 0 and empty.requires_grad
    with pytest.raises(KeyError, match="target_key"):
        sbm.DenseSupervised(seg)((x, {"labels": mask}))
    with pytest.raises(ValueError, match="task kind"):
        sbm.DenseSupervised(seg, task="edges")


def test_dense_meters_match_the_metrics_on_the_whole_set():
    # the streaming meters SBM scores with (kaviz.metrics; sbm.DenseMeter was a copy of them)
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(5, 4, 6, 7)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, 4, size=(5, 6, 7)))
    t[0, :2] = 255
    m = metrics.dense_meter("segmentation", num_classes=4)
    for a, b in ((0, 2), (2, 5)):
        m.update(logits[a:b], t[a:b])
    expect = metrics.segmentation_scores(logits, t, 4)
    got = m.result()
    assert got[
        "pixel_accuracy"] == pytest.approx(expect["pixel_accuracy"]) and got["mIoU"] == pytest.approx(expect["mIoU"])
    p = torch.from_numpy(rng.uniform(0.5, 5, size=(5, 1, 6, 7)).astype(np.float32))
    d = torch.from_numpy(rng.uniform(0.5, 5, size=(5, 6, 7)).astype(np.float32))
    d[1, 0] = 0  # no measurement
    m = metrics.dense_meter("depth")
    for a, b in ((0, 1), (1, 5)):
        m.update(p[a:b], d[a:b])
    expect = metrics.depth_scores(p[:, 0], d)
    assert m.result() == pytest.approx(expect)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.dense_meter("segmentation")
    with pytest.raises(ValueError, match="no valid depth"):
        metrics.dense_meter("depth").result()
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dense_meter("segmentation", num_classes=4).update(logits, t[:, :3])


def test_teachers_train_through_train_teacher_with_a_dense_method(tiny_scenes, tmp_path):
    train, val = tiny_scenes
    teachers, hists = sbm.train_teachers(train, val, num_classes=11, epochs=1, widths=W, cache=tmp_path, progress=False)
    assert teachers["seg"].out_channels == 11 and teachers["depth"].out_channels == 1
    assert "val/mIoU" in hists["seg"].columns and "val/rmse" in hists["depth"].columns
    assert not hists["seg"].attrs["cached"]
    files = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert len(files) == 2  # the task's method is part of the key
    again, hists2 = sbm.train_teachers(train, val, num_classes=11, epochs=1, widths=W, cache=tmp_path, progress=False)
    assert hists2["depth"].attrs["cached"]
    assert all(torch.equal(a, b) for a,
               b in zip(again["depth"].state_dict().values(), teachers["depth"].state_dict().values()))
    with pytest.raises(ValueError, match="stable name"):
        train_teacher("segnet_small", train, val, num_classes=1, epochs=1, cache=tmp_path,
                      method=lambda m: sbm.DenseSupervised(m, task="depth"))
    # a partial's arguments are part of the key
    from kaviz.train import _callable_key
    assert _callable_key(functools.partial(sbm.DenseSupervised, task="depth")) != \
        _callable_key(functools.partial(sbm.DenseSupervised, task="segmentation"))


def test_score_table_and_predict(tiny_scenes):
    _, val = tiny_scenes
    teachers = {"seg": models.build("segnet_small", 11, widths=W).eval(),
                "depth": models.build("segnet_small", 1, widths=W).eval()}
    student = sbm.SBMStudent(teachers, {"seg": "dec1", "depth": "dec2"})
    table = sbm.score_table({"teachers": teachers, "student": student}, val, kinds=KINDS, batch_size=3)
    assert list(table.columns) == ["seg/pixel_accuracy", "seg/mIoU", "depth/rmse", "depth/abs_rel", "depth/delta1"]
    assert list(table.index) == ["teachers", "student"]
    assert ((table.filter(like="pixel") >= 0) & (table.filter(like="pixel") <= 1)).all().all()
    search = sbm.SBMStudent(teachers, {"seg": ["dec3", "dec1"], "depth": "dec2"})
    res = sbm.score(search, val, kinds=KINDS, all_branches=True)
    assert {"seg@dec3/mIoU", "seg@dec1/mIoU", "depth/rmse"} <= set(res)
    with pytest.raises(ValueError, match="task="):
        sbm.score(teachers["seg"], val, kinds=KINDS)
    pred = sbm.predict({"teacher": teachers, "student": student}, val, [0, 2], kinds=KINDS)
    assert pred["image"].shape == (2, 16, 16, 3) and pred["image"].dtype == np.uint8
    assert pred["truth"]["seg"].shape == (2, 16, 16) and pred["student"]["depth"].shape == (2, 16, 16)
    assert pred["teacher"]["seg"].max() < 11


def test_run_end_to_end_on_tiny_scenes(tiny_scenes):
    train, val = tiny_scenes
    teachers = {"seg": models.build("segnet_small", 11, widths=W).eval(),
                "depth": models.build("segnet_small", 1, widths=W).eval()}
    res = sbm.run(teachers, train, val, points={"seg": ["dec2", "dec1"], "depth": ["enc3", "dec1"]},
                  search_epochs=1, finetune_epochs=1, batch_size=8, progress=False)
    assert set(res.points) == {"seg", "depth"} and res.points == sbm.select_branches(res.branch_losses)
    assert res.student.points == {t: [p] for t, p in res.points.items()}
    assert "val/seg@dec2/mIoU" in res.search_history.columns and "val/seg/mIoU" in res.finetune_history.columns
    assert all(p.requires_grad for p in res.student.parameters())
    assert sbm.check_tails(res.search_student, teachers)["equal"].all()
    summary = sbm.branch_summary(res)
    assert list(summary.columns) == ["task", "point", "train loss", "chosen", "val mIoU", "val rmse"]
    assert summary[
        "chosen"].sum() == 2 and summary["val mIoU"].notna().sum() == 2 and summary["val rmse"].notna().sum() == 2
    best = res.search_history.attrs["best_epoch"]
    assert summary["val mIoU"].iloc[0] == pytest.approx(res.search_history.loc[best - 1, "val/seg@dec2/mIoU"])


def test_constant_predictor_is_the_majority_class_and_mean_depth():
    x = torch.zeros(3, 3, 8, 8)
    mask = torch.zeros(3, 8, 8, dtype=torch.int64)
    mask[0] = 2
    mask[1, :6] = 2  # class 2 covers 64 + 48 pixels, class 0 the other 80
    mask[2, 0] = 255
    depth = torch.full((3, 8, 8), 2.0)
    depth[2] = 0.0  # not measured
    depth[1, 0] = 8.0
    data = [(x[i], {"mask": mask[i], "depth": depth[i]}) for i in range(3)]
    c = sbm.constant_predictor(data, KINDS, 4, batch_size=2)
    assert c.majority == 2 and c.mean_depth == pytest.approx((2.0 * 120 + 8.0 * 8) / 128)
    out = c(torch.zeros(2, 3, 8, 16))
    assert out["seg"].argmax(1).eq(2).all() and out["seg"].shape == (2, 4, 8, 16)
    assert out["depth"].shape == (2, 1, 8, 16)
    res = sbm.score(c, data, kinds=KINDS)
    assert res["seg/pixel_accuracy"] == pytest.approx(112 / (192 - 8))


def test_score_full_depth_metric_set_matches_the_hand_checked_metric():
    from kaviz import metrics

    x = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(2, 4, 4, dtype=torch.int64)
    depth = torch.linspace(0.5, 4.0, 32).reshape(2, 4, 4)
    depth[1, 0, 0] = 0.0  # not measured
    data = [(x[i], {"mask": mask[i], "depth": depth[i]}) for i in range(2)]
    c = sbm.ConstantPredictor(KINDS, 4, 0, 1.7)
    full = sbm.score(c, data, kinds=KINDS, batch_size=1, full_depth=True)
    expected = metrics.depth_scores(torch.full_like(depth, 1.7), depth, full=True)
    assert [k for k in full if k.startswith("depth/")] == [f"depth/{k}" for k in metrics.DEPTH_METRICS_FULL]
    for k, v in expected.items():
        assert full[f"depth/{k}"] == pytest.approx(v), k
    assert expected["delta1"] < expected["delta2"] < expected["delta3"] < 1  # three distinct thresholds
    # the default keeps its three depth metrics
    assert [k for k in sbm.score(c, data, kinds=KINDS) if k.startswith("depth/")] == [
        "depth/rmse", "depth/abs_rel", "depth/delta1"]


def test_embedded_scene_splits():
    parts, info = sbm.scene_splits(n=20, image_size=16, seed=1)
    assert sum(map(len, parts)) == 20 and info["num_classes"] == 11 and info["class_names"][0] == "background"
    x, y = parts.train[0]
    assert x.shape == (3, 16, 16) and y["mask"].shape == (16, 16) and y["depth"].dtype == torch.float32
    with pytest.raises(ValueError, match="square"):
        sbm.scene_splits(n=20, image_size=(16, 24))


# ----------------------------------------------------------------------------------- real data
def test_nyuv2_code_path_on_a_tiny_tree(tmp_path):
    from fixtures_real import make_nyu

    from kaviz.data.real import DatasetLayoutError

    make_nyu(tmp_path, n_train=4, n_test=2, size=32)
    parts, info = sbm.scene_splits("nyuv2", root=tmp_path, image_size=16, val=0.25)
    assert info["num_classes"] == 13 and info["class_names"][0] == "bed"
    assert (len(parts.train), len(parts.val), len(parts.test)) == (3, 1, 2)
    teachers, _ = sbm.train_teachers(parts.train, parts.val, num_classes=13, epochs=1, widths=W, batch_size=2,
                                     cache=False, progress=False)
    res = sbm.run(teachers, parts.train, parts.val, points={"seg": ["dec1"], "depth": ["dec2", "dec1"]},
                  search_epochs=1, finetune_epochs=1, batch_size=2, progress=False)
    table = sbm.score_table({"teachers": teachers, "student": res.student}, parts.test, kinds=KINDS)
    assert table.notna().all().all()
    augmented, _ = sbm.scene_splits("nyuv2", root=tmp_path, image_size=16, val=0.25, augment=True)
    with pytest.raises(ValueError, match="random transform"):
        sbm.run(teachers, augmented.train, augmented.val, points={"seg": "dec1", "depth": "dec1"},
                search_epochs=1, finetune_epochs=0, batch_size=2, progress=False)
    res = sbm.run(teachers, augmented.train, augmented.val, points={"seg": "dec1", "depth": "dec1"},
                  search_epochs=1, finetune_epochs=0, batch_size=2, precompute=False, progress=False)
    assert res.finetune_history is None
    with pytest.raises(TypeError, match="root=None"):
        sbm.scene_splits("nyuv2", root=None)  # the loader's own error: no silent fallback
    with pytest.raises(DatasetLayoutError, match="seg13"):
        sbm.scene_splits("nyuv2", root=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="embedded"):
        sbm.scene_splits("cityscapes")


# ----------------------------------------------------------------------------------- figures
def test_label_and_scalar_images_and_dense_figure():
    from kaviz import plots

    lab = np.array([[0, 1], [2, 255]])
    img = plots.label_image(lab, 3, colors=["#000000", "#FF0000", "rgb(0, 0, 255)"])
    assert img.dtype == np.uint8 and img.shape == (2, 2, 3)
    assert img[0, 1].tolist() == [255, 0, 0] and img[1, 0].tolist() == [0, 0, 255] and img[1, 1].tolist() == [255] * 3
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        plots.label_image(np.array([[0, 7]]), 3)
    with pytest.raises(ValueError, match="colours for"):
        plots.label_image(lab, 3, colors=["#000000"])
    s = plots.scalar_image(np.array([[0.0, 1.0], [2.0, np.nan]]), vmin=0, vmax=2)
    assert s[0, 0].tolist() != s[1, 0].tolist() and s[1, 1].tolist() == [255] * 3
    assert plots.scalar_image(np.array([[5.0, 9.0]]), vmin=0, vmax=1)[0, 0].tolist() == \
        plots.scalar_image(np.array([[1.0]]), vmin=0, vmax=1)[0, 0].tolist()  # clipped to the range
    rng = np.random.default_rng(0)
    fig = plots.dense_predictions(
        rng.uniform(size=(8, 8, 3)),
        {"segmentation": {"ground truth": rng.integers(0, 3, (8, 8)), "student": rng.integers(0, 3, (8, 8))},
         "depth": {"ground truth": rng.uniform(1, 9, (8, 8)), "student": rng.uniform(1, 9, (8, 8))}},
        kinds={"segmentation": "labels", "depth": "scalar"}, class_names=["bg", "a", "b"])
    legend = [t.name for t in fig.data if t.type == "scatter" and t.showlegend]
    assert legend == ["bg", "a", "b"]
    assert sum(t.type == "image" for t in fig.data) == 5  # input + 2 masks + 2 depth maps
    with pytest.raises(ValueError, match="kinds"):
        plots.dense_predictions(np.zeros((4, 4, 3)), {"x": {"a": np.zeros((4, 4))}}, kinds={})


def test_choice_shares_put_the_chosen_point_against_a_random_pick_and_the_worst():
    summary = pd.DataFrame({"task": ["seg", "seg", "depth", "depth", "depth"], "point": ["a", "b", "a", "b", "c"],
                            "chosen": [False, True, True, False, False],
                            "val mIoU": [0.5, 0.4, np.nan, np.nan, np.nan],
                            "val rmse": [np.nan, np.nan, 2.0, 1.0, 4.0]})
    out = sbm.choice_shares(summary, KINDS)
    assert list(out.index) == ["seg", "depth"]
    seg, depth = out.loc["seg"], out.loc["depth"]
    assert (seg["chosen"], seg["best candidate"], seg["chosen ÷ best"]) == ("b", "a", pytest.approx(0.8))
    assert seg["random pick ÷ best (control)"] == pytest.approx(0.9)
    assert seg["worst ÷ best (control)"] == pytest.approx(0.8)
    # lower is better for depth: best ÷ chosen
    assert depth["best candidate"] == "b" and depth["chosen ÷ best"] == pytest.approx(0.5)
    assert depth["random pick ÷ best (control)"] == pytest.approx((0.5 + 1 + 0.25) / 3)
    assert depth["worst ÷ best (control)"] == pytest.approx(0.25) and depth["candidates"] == 3


@pytest.mark.parametrize("bad, match", [
    ({"chosen": [True, True, True, False, False]}, "exactly one is chosen"),
    ({"val rmse": [np.nan, np.nan, 2.0, np.nan, 4.0]}, "needs a 'val rmse' value"),
])
def test_choice_shares_say_what_is_wrong_with_a_table(bad, match):
    summary = pd.DataFrame({"task": ["seg", "seg", "depth", "depth", "depth"], "point": ["a", "b", "a", "b", "c"],
                            "chosen": [False, True, True, False, False],
                            "val mIoU": [0.5, 0.4, np.nan, np.nan, np.nan],
                            "val rmse": [np.nan, np.nan, 2.0, 1.0, 4.0]})
    with pytest.raises(ValueError, match=match):
        sbm.choice_shares(summary.assign(**bad), KINDS)
    with pytest.raises(ValueError, match="lacks"):
        sbm.choice_shares(summary.drop(columns=["chosen"]), KINDS)
    with pytest.raises(ValueError, match="kinds must give"):
        sbm.choice_shares(summary, {"seg": "segmentation"})
