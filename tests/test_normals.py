"""Surface normals: the scenes' normal maps, the angle metrics, the "normals" dense task and an SBM
student with three teachers (segmentation, depth, normals)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kaviz import metrics, models
from kaviz.data import scenes, synthetic
from kaviz.methods import dense, sbm
from kaviz.train import fit

W = (4, 8, 8)
KINDS3 = {"seg": "segmentation", "depth": "depth", "normals": "normals"}


@pytest.fixture(scope="module")
def normal_scenes():
    ds = scenes(n=24, size=16, max_objects=2, seed=3, normals=True)
    return ds.subset(range(16)), ds.subset(range(16, 24))


# ------------------------------------------------------------------------------------- the data
def test_scene_normals_change_nothing_else_and_draw_no_random_numbers(monkeypatch):
    rows = []
    real = synthetic._draw_uniforms

    def counting(indices, *args):
        rows.append(len(indices))
        return real(indices, *args)

    monkeypatch.setattr(synthetic, "_draw_uniforms", counting)
    plain = scenes(n=12, size=16, max_objects=3, seed=5)
    drawn_plain, rows[:] = list(rows), []
    off = scenes(n=12, size=16, max_objects=3, seed=5, normals=False)
    with_normals = scenes(n=12, size=16, max_objects=3, seed=5, normals=True)
    assert rows == drawn_plain * 2  # the same uniforms, nothing more, with the normals on
    other = scenes(n=12, size=16, max_objects=3, seed=6)  # control: the comparison sees a change

    def same(a, b):
        return (torch.equal(a.images, b.images)
                and all(torch.equal(a.targets[k], b.targets[k]) for k in ("labels", "difficult", "mask", "depth"))
                and a.meta.equals(b.meta))

    assert same(plain, off) and plain.fingerprint == off.fingerprint and plain.info.keys() == off.info.keys()
    assert same(plain, with_normals) and set(with_normals.targets) - set(plain.targets) == {"normals"}
    assert with_normals.fingerprint != plain.fingerprint  # caches never mix the two
    assert not same(plain, other)
    with pytest.raises(ValueError, match="normals must be True or False"):
        scenes(n=2, size=16, normals="yes")


def test_scene_normals_geometry():
    ds = scenes(n=6, size=16, max_objects=3, seed=2, normals=True)
    r = synthetic.render_scenes(range(6), 2, 16, (1, 3))
    assert ds.targets["normals"].dtype == torch.float32
    nm = ds.targets["normals"].double()
    assert nm.shape == (6, 3, 16, 16)
    assert torch.allclose(nm.norm(dim=1), torch.ones(6, 16, 16, dtype=torch.float64), atol=1e-6)
    assert (nm[:, 2] > 0).all()
    obj = torch.from_numpy(r["instance"] >= 0)
    assert obj.any() and (nm.permute(0, 2, 3, 1)[obj] == torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).all()
    assert (nm[:, 0] == 0).all()  # the background planes only lean up or down
    # the wall (above the horizon) leans down, the floor up, away from the crease row and the objects
    for i in range(6):
        h = int(r["horizon"][i] * 16)
        col = ~obj[i]
        assert (nm[i, 1, : h - 1][col[: h - 1]] > 0.3).all() and (nm[i, 1, h + 2:][col[h + 2:]] < -0.3).all()
    # control: without the objects as their own surfaces the depth jumps tilt the normals at their edges
    blind = torch.from_numpy(synthetic.depth_normals(r["depth"]))
    assert (blind[:, 0].abs() > 0.5).any()


def test_depth_normals_hand_computed_and_bad_inputs():
    # a plane receding to the right: d = 2 + 0.5 u, pitch = 2 / 4 = 0.5 -> n ∝ (0.5, 0, 0.5)
    d = 2 + 0.5 * np.arange(4.0)[None, :].repeat(3, 0)
    n = synthetic.depth_normals(d, view_width=2.0)
    assert n.shape == (3, 3, 4) and n.dtype == np.float32
    assert np.allclose(n.reshape(3, -1).T, [1 / math.sqrt(2), 0, 1 / math.sqrt(2)], atol=1e-6)
    # a floor (depth falling towards the bottom) points up (y < 0): d = 9 − v, pitch 1 -> (0, −1, 1)/√2
    floor = synthetic.depth_normals(9.0 - np.arange(4.0)[:, None].repeat(4, 1), view_width=4.0)
    assert np.allclose(floor[:, 1, 1], [0, -1 / math.sqrt(2), 1 / math.sqrt(2)], atol=1e-6)
    # a square at depth 1 on a flat wall at 5: with surface ids nothing tilts; a missing depth gets (0, 0, 0)
    d = np.full((1, 6, 6), 5.0)
    d[0, 2:4, 2:4] = 1.0
    ids = (d < 2).astype(np.int64)
    d[0, 0, 5], d[0, 5, 5] = 0.0, np.nan
    n = synthetic.depth_normals(d, ids)
    valid = np.isfinite(d[0]) & (d[0] > 0)
    assert np.array_equal(n[0][:, valid].T, np.tile([0.0, 0.0, 1.0], (valid.sum(), 1)))
    assert np.array_equal(n[0][:, ~valid], np.zeros((3, 2)))
    # control: as one surface, the jumps around the square tilt its neighbours
    assert np.abs(synthetic.depth_normals(d)[0, :2]).max() > 0.5
    # one-sided differences at a surface edge: a ramp d = 1 + u (pitch 1) stays a ramp up to the border
    ramp = synthetic.depth_normals(1.0 + np.arange(5.0)[None, :].repeat(2, 0), view_width=5.0)
    assert np.allclose(ramp[0], 1 / math.sqrt(2), atol=1e-6)
    with pytest.raises(ValueError, match="depth must be a map"):
        synthetic.depth_normals(np.zeros(4))
    with pytest.raises(ValueError, match="surfaces"):
        synthetic.depth_normals(np.ones((2, 4, 4)), np.zeros((2, 4, 3), dtype=int))
    with pytest.raises(ValueError, match="view_width"):
        synthetic.depth_normals(np.ones((4, 4)), view_width=0)


# ---------------------------------------------------------------------------------------- metrics
def _angled(degrees, scale=2.0):
    """Predictions at the given angles to the target (0, 0, 1), of length ``scale``: (1, 3, 1, k)."""
    a = np.radians(np.asarray(degrees, dtype=np.float64))
    p = np.stack([np.sin(a), np.zeros_like(a), np.cos(a)]) * scale
    return torch.from_numpy(p)[None, :, None, :]


def test_normal_scores_hand_computed():
    p = _angled([0, 10, 20, 45, 90, 60, 60])
    t = torch.zeros_like(p)
    t[:, 2] = 1.0
    t[0, :, 0, 5] = 0.0  # no normal there
    t[0, 0, 0, 6] = float("nan")
    s = metrics.normal_scores(p, t)
    assert list(s) == list(metrics.NORMAL_METRICS)
    assert s["mean_angle"] == pytest.approx(33.0) and s["median_angle"] == pytest.approx(20.0)
    assert (s["within_11.25"], s["within_22.5"], s["within_30"]) == pytest.approx((2 / 5, 3 / 5, 3 / 5))
    keep = torch.tensor([[[True, True, False, True, True, True, True]]])
    assert metrics.normal_scores(p, t, valid=keep)["mean_angle"] == pytest.approx(36.25)
    # exactly opposite, zero-length and non-unit targets
    e = metrics.angular_errors(torch.tensor([[0.0, 0, -3], [0, 0, 0], [0, 5, 0]]).T[None, :, None],
                               torch.tensor([[0.0, 0, 1], [0, 0, 1], [0, 0, 7]]).T[None, :, None])
    assert e.flatten().tolist() == pytest.approx([180.0, 90.0, 90.0])
    # atan2 keeps tiny angles; the arc cosine of the cosine (the control) rounds them to 0
    up = torch.tensor([0.0, 0, 1]).view(1, 3, 1, 1)
    tiny = metrics.angular_errors(torch.tensor([1e-9, 0, 1]).view(1, 3, 1, 1), up)
    assert float(tiny) == pytest.approx(math.degrees(1e-9), rel=1e-6)
    assert math.degrees(math.acos(min(1.0, 1 / math.hypot(1e-9, 1)))) == 0.0
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        metrics.normal_scores(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.normal_scores(torch.zeros(1, 3, 1, 2), torch.zeros(1, 3, 1, 1))
    with pytest.raises(ValueError, match="no valid normal"):
        metrics.normal_scores(p, torch.zeros_like(p))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        metrics.normal_valid(torch.zeros(1, 1, 2, 2))


def test_normal_meter_streams_the_same_scores():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(5, 3, 4, 6, generator=g), torch.randn(5, 3, 4, 6, generator=g)
    t[1, :, 2] = 0.0
    m = metrics.dense_meter("normals")
    for a, b in ((0, 2), (2, 3), (3, 5)):
        m.update(p[a:b], t[a:b])
    exact, got = metrics.normal_scores(p, t), m.result()
    for k in ("mean_angle", "within_11.25", "within_22.5", "within_30"):
        assert got[k] == pytest.approx(exact[k], rel=1e-12)
    assert abs(got["median_angle"] - exact["median_angle"]) <= m.resolution
    # an even count whose two middle errors lie far apart: the median is their mean (np.median's),
    # not the point where the histogram reaches half the pixels (the control, 0.01)
    m2 = metrics.NormalMeter()
    p2, t2 = _angled([0, 0, 90, 90]), _angled([0, 0, 0, 0])
    m2.update(p2, t2)
    assert m2.result()["median_angle"] == pytest.approx(45.0, abs=0.01)
    assert metrics.normal_scores(p2, t2)["median_angle"] == pytest.approx(45.0)
    m3 = metrics.NormalMeter()
    m3.update(torch.full((1, 3, 1, 2), float("nan")), torch.ones(1, 3, 1, 2))
    assert math.isnan(m3.result()["mean_angle"]) and math.isnan(m3.result()["median_angle"])
    with pytest.raises(ValueError, match="no valid normal"):
        metrics.NormalMeter().result()
    with pytest.raises(ValueError, match="resolution"):
        metrics.NormalMeter(resolution=0)
    with pytest.raises(ValueError, match="'normals'"):
        metrics.dense_meter("normal")


# ----------------------------------------------------------------------------------- dense task
def test_normals_loss_and_dense_supervised():
    t = _angled([0, 0, 0, 0], scale=1.0).float()
    p = _angled([0, 90, 180, 60], scale=3.0).float().requires_grad_(True)
    loss = dense.normals_loss(p, t)
    assert float(loss.detach()) == pytest.approx((0 + 1 + 2 + 0.5) / 4, abs=1e-6)
    loss.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    t2 = t.clone()
    t2[0, :, 0, 1:3] = 0.0  # missing normals are skipped
    assert float(dense.normals_loss(p, t2).detach()) == pytest.approx(0.25, abs=1e-6)
    none = dense.normals_loss(p, torch.zeros_like(t))
    assert float(none.detach()) == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="three output channels"):
        dense.normals_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="must match"):
        dense.normals_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 1))
    raw = torch.tensor([[0.0, 3, 4], [0, 0, 0]]).T.reshape(1, 3, 1, 2)
    unit = sbm.normals_target(raw)
    assert unit[0, :, 0, 0].tolist() == pytest.approx([0, 0.6, 0.8]) and unit[0, :, 0, 1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        sbm.normals_target(torch.zeros(1, 1, 2, 2))
    assert dense.DENSE_KINDS == ("segmentation", "depth", "normals")
    assert dense.DENSE_TARGET_KEYS["normals"] == "normals"

    torch.manual_seed(0)
    model = models.build("segnet_small", 3, widths=W)
    x = torch.randn(2, 3, 16, 16)
    nm = torch.randn(2, 3, 16, 16)
    method = dense.DenseSupervised(model, task="normals")
    out = method((x, {"normals": nm}))
    with torch.no_grad():
        expect = float(dense.normals_loss(model(x), nm))
    assert list(out) == ["cos"] and float(out["cos"].detach()) == pytest.approx(expect)
    with pytest.raises(ValueError, match="3 channels"):
        dense.DenseSupervised(models.build("segnet_small", 2, widths=W), task="normals")((x, {"normals": nm}))
    with pytest.raises(KeyError, match="'normals'"):
        method((x, {"depth": nm[:, 0]}))
    with pytest.raises(ValueError, match="normals"):
        dense.DenseSupervised(model, task="normal")


def test_dense_scores_of_a_normals_model_match_the_metric(normal_scenes):
    _, val = normal_scenes
    torch.manual_seed(1)
    model = models.build("segnet_small", 3, widths=W).eval()
    res = dense.dense_scores(model, val, "normals", batch_size=3)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.stack([val[i][1]["normals"] for i in range(len(val))])
    with torch.no_grad():
        exact = metrics.normal_scores(model(x), y)
    assert res["mean_angle"] == pytest.approx(exact["mean_angle"], rel=1e-9)
    assert abs(res["median_angle"] - exact["median_angle"]) <= 0.01


def test_normals_teacher_trains_like_the_depth_one_and_the_constant_baseline(tmp_path):
    (train, val, test), info = sbm.scene_splits(n=30, image_size=16, seed=1, normals=True)
    assert info["normals"] is True and train[0][1]["normals"].shape == (3, 16, 16)
    (train0, _, _), info0 = sbm.scene_splits(n=30, image_size=16, seed=1)
    assert "normals" not in info0 and torch.equal(train0[3][0], train[3][0])
    assert torch.equal(train0[3][1]["depth"], train[3][1]["depth"])
    teachers, hists = sbm.train_teachers(train, val, num_classes=info["num_classes"], epochs=1, widths=W,
                                         tasks={"normals": "normals"}, cache=tmp_path, progress=False)
    assert teachers["normals"].out_channels == 3
    assert {"val/mean_angle", "val/median_angle", "val/within_11.25"} <= set(hists["normals"].columns)
    res = sbm.score(teachers, test, kinds={"normals": "normals"})
    assert set(res) == {f"normals/{k}" for k in metrics.NORMAL_METRICS}
    assert sbm.kind_channels("normals") == 3 and sbm.kind_channels("depth") == 1
    assert sbm.kind_channels("segmentation", 7) == 7
    with pytest.raises(ValueError, match="num_classes"):
        sbm.kind_channels("segmentation")
    with pytest.raises(ValueError, match="embedded"):
        sbm.scene_splits("nyuv2", root=tmp_path, normals=True)
    with pytest.raises(ValueError, match="normals must be True or False"):
        sbm.scene_splits(n=20, image_size=16, normals=1)


def test_constant_predictor_fits_the_mean_normal():
    x = torch.zeros(3, 3, 4, 4)
    mask = torch.zeros(3, 4, 4, dtype=torch.int64)
    depth = torch.full((3, 4, 4), 2.0)
    nm = torch.zeros(3, 3, 4, 4)
    nm[:, 2] = 1.0  # 48 pixels facing the camera ...
    nm[0, :, :2] = torch.tensor([0.0, 2.0, 0.0]).view(3, 1, 1)  # ... but 8 pointing down (length 2: normalised)
    nm[1, :, 0] = 0.0  # 4 pixels without a normal
    data = [(x[i], {"mask": mask[i], "depth": depth[i], "normals": nm[i]}) for i in range(3)]
    c = sbm.constant_predictor(data, KINDS3, 3, batch_size=2)
    expect = torch.tensor([0.0, 8.0, 36.0], dtype=torch.float64)
    assert c.mean_normal == pytest.approx((expect / expect.norm()).tolist())
    out = c(torch.zeros(2, 3, 8, 16))
    assert out["normals"].shape == (2, 3, 8, 16) and out["depth"].shape == (2, 1, 8, 16)
    res = sbm.score(c, data, kinds=KINDS3)
    tilt = math.degrees(math.atan2(8, 36))
    assert res["normals/mean_angle"] == pytest.approx((36 * tilt + 8 * (90 - tilt)) / 44)
    assert res["seg/pixel_accuracy"] == 1.0
    # the two-task predictor is what it was: no normals read, no mean_normal
    assert sbm.constant_predictor([(x[i], {"mask": mask[i], "depth": depth[i]}) for i in range(3)],
                                  {"seg": "segmentation", "depth": "depth"}, 3).mean_normal is None
    with pytest.raises(ValueError, match="mean_normal"):
        sbm.ConstantPredictor(KINDS3, 3, 0, 1.0)
    with pytest.raises(ValueError, match="mean_normal"):
        sbm.ConstantPredictor(KINDS3, 3, 0, 1.0, mean_normal=(0, 0, 0))
    with pytest.raises(ValueError, match="no valid normal"):
        sbm.constant_predictor([(x[0], {"mask": mask[0], "depth": depth[0], "normals": torch.zeros(3, 4, 4)})],
                               KINDS3, 3)


# ------------------------------------------------------------------------------- three tasks
def _three_teachers():
    torch.manual_seed(0)
    return {"seg": models.build("segnet_small", 11, widths=W).eval(),
            "depth": models.build("segnet_small", 1, widths=W).eval(),
            "normals": models.build("segnet_small", 3, widths=W).eval()}


def test_three_teachers_one_student_end_to_end(normal_scenes):
    train, val = normal_scenes
    teachers = _three_teachers()
    points = {"seg": ["dec2", "dec1"], "depth": ["enc3", "dec1"], "normals": ["enc3", "dec3"]}
    # a 3-channel teacher reads as a 3-class segmenter unless its kind is named (control)
    assert sbm.SBMStudent(teachers, points).kinds["normals"] == "segmentation"
    student = sbm.SBMStudent(teachers, points, kinds={"normals": "normals"})
    assert student.tasks == ["seg", "depth", "normals"] and student.points == points
    assert student.kinds == {"seg": "segmentation", "depth": "depth", "normals": "normals"}
    x = torch.stack([train[i][0] for i in range(2)])
    outs = student.forward_all(x)
    assert {t: {p: tuple(o.shape) for p, o in per.items()} for t, per in outs.items()} == {
        "seg": {"dec2": (2, 11, 16, 16), "dec1": (2, 11, 16, 16)},
        "depth": {"enc3": (2, 1, 16, 16), "dec1": (2, 1, 16, 16)},
        "normals": {"enc3": (2, 3, 16, 16), "dec3": (2, 3, 16, 16)}}
    assert sbm.check_tails(student, teachers)["equal"].all()
    method = sbm.SBM(student, teachers)
    # the student is the teachers where its trunk is theirs: the normals branch at enc3 of a
    # student whose trunk is the normals teacher's has zero loss (control: the seg trunk does not)
    same = sbm.SBMStudent(teachers, {"seg": "dec1", "depth": "enc3", "normals": "enc3"}, trunk_from="normals",
                          kinds={"normals": "normals"})
    for per in same.branches.values():
        for br in per.values():
            br.adaptor = nn.Identity()
    with torch.no_grad():
        loss_same = sbm.SBM(same, teachers, metrics=False).eval()((x, {}))["normals"]
        loss_seg = method.eval()((x, {}))["normals@enc3"]
    method.train()
    assert float(loss_same) == pytest.approx(0.0, abs=1e-6) and float(loss_seg) > 1e-3
    hist = fit(method, method.precompute(train), method.precompute(val), epochs=1, batch_size=8, progress=False)
    assert {"val/normals@enc3/mean_angle", "val/seg@dec2/mIoU", "val/depth@dec1/rmse"} <= set(hist.columns)
    losses = sbm.branch_losses(method, train)
    assert isinstance(losses, pd.DataFrame) and len(losses) == 6 and losses["best"].sum() == 3
    chosen = sbm.select_branches(losses)
    final = student.branch_out(chosen).freeze_tails(False)
    assert final.points == {t: [p] for t, p in chosen.items()}
    fit(sbm.SBM(final, teachers), train, val, epochs=1, batch_size=8, progress=False)
    res = sbm.score(final, val, kinds=KINDS3)
    assert {"seg/mIoU", "depth/rmse", "normals/mean_angle", "normals/within_30"} <= set(res)
    assert 0 <= res["normals/mean_angle"] <= 180
    pred = sbm.predict({"student": final}, val, [0, 1], kinds=KINDS3)
    assert pred["truth"]["normals"].shape == (2, 16, 16, 3) and pred["student"]["normals"].shape == (2, 16, 16, 3)
    assert np.allclose(np.linalg.norm(pred["student"]["normals"], axis=-1), 1, atol=1e-5)
    assert pred["student"]["seg"].shape == (2, 16, 16) and pred["student"]["depth"].shape == (2, 16, 16)


def test_named_kinds_are_checked_and_run_passes_them(normal_scenes):
    teachers = _three_teachers()
    with pytest.raises(ValueError, match="no teacher"):
        sbm.SBMStudent(teachers, kinds={"edges": "normals"})
    with pytest.raises(ValueError, match="task kind"):
        sbm.SBMStudent(teachers, kinds={"normals": "edges"})
    with pytest.raises(ValueError, match="needs 3 output channel"):
        sbm.SBMStudent(teachers, kinds={"depth": "normals"})  # a 1-channel teacher cannot be normals
    train, val = normal_scenes
    res = sbm.run(teachers, train, val, points={"seg": "dec1", "depth": "dec1", "normals": ["enc3", "dec1"]},
                  kinds={"normals": "normals"}, search_epochs=1, finetune_epochs=1, batch_size=8, progress=False)
    assert res.settings["kinds"]["normals"] == "normals" and res.student.kinds["normals"] == "normals"
    summary = sbm.branch_summary(res)
    assert summary.loc[summary["task"] == "normals", "val mean_angle"].notna().all()
    assert summary.loc[summary["task"] != "normals", "val mean_angle"].isna().all()
    two = sbm.run({t: teachers[t] for t in ("seg", "depth")}, train, val, points={"seg": "dec1", "depth": "dec1"},
                  search_epochs=1, finetune_epochs=0, batch_size=8, progress=False)
    assert "kinds" not in two.settings and "val mean_angle" not in sbm.branch_summary(two)  # two tasks: unchanged
