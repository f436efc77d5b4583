"""SBM options: the blockwise training schedule of the branches (``sbm.run(..., schedule="blockwise")``)
and SegNet max-unpooling with pooling indices (``segnet_small(..., unpool="indices")``), SPEC.md §4.2."""
import copy

import pandas as pd
import pytest
import torch
from _dense_helpers import W, tiny_scene_splits
from _dense_helpers import identity_adaptors as _identity_adaptors
from _dense_helpers import teachers as _teachers
from torch import nn

from kaviz import models
from kaviz.methods import sbm
from kaviz.models.dense import DecoderBlock, SegNetSmall
from kaviz.train import fit


@pytest.fixture(scope="module")
def tiny_scenes():
    return tiny_scene_splits()


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    now = module.state_dict()
    return {k for k in before if not torch.equal(before[k], now[k])}


# ------------------------------------------------------------------------------------ blockwise
def test_stages_partition_the_trunk():
    student = sbm.SBMStudent(_teachers(), {"seg": ["dec3", "dec1"], "depth": ["enc3", "dec3"]})
    assert student.stage_points == ["enc3", "dec3", "dec1"]
    assert student.stage_blocks("enc3") == ["enc1", "enc2", "enc3"]
    assert student.stage_blocks("dec3") == ["dec3"]
    assert student.stage_blocks("dec1") == ["dec2", "dec1"]
    with pytest.raises(ValueError, match="no task has a candidate branch at 'dec2'"):
        student.stage_blocks("dec2")
    with pytest.raises(ValueError, match="no task has a candidate branch at 'dec2'"):
        student.set_stage("dec2")
    with pytest.raises(ValueError, match="candidate branch at 'dec4'"):
        student.forward_all(torch.rand(1, 3, 8, 8), points=["dec4"])
    # only the stage's branches are computed; a task without one there maps to {}
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        out = student.eval().forward_all(x, points=["enc3"])
        assert out["seg"] == {} and list(out["depth"]) == ["enc3"]
        assert torch.equal(out["depth"]["enc3"], student.forward_all(x)["depth"]["enc3"])
    student.set_stage("dec3")
    with pytest.raises(ValueError, match="set_stage\\(None\\)"):
        student.branch_out({"seg": "dec3", "depth": "dec3"})
    student.set_stage(None)
    assert student.branch_out({"seg": "dec3", "depth": "dec3"}).points == {"seg": ["dec3"], "depth": ["dec3"]}


@pytest.mark.parametrize("stage", [None, "dec3"])
def test_a_blockwise_stage_trains_only_its_blocks(tiny_scenes, stage):
    """In the stage of dec3 only trunk dec3 and the dec3 adaptors move (parameters and batch-norm
    statistics); the joint schedule (stage None) is the control: it moves the other blocks too."""
    train, val = tiny_scenes
    teachers = {"seg": models.build("segnet_small", 11, widths=W).eval(),
                "depth": models.build("segnet_small", 1, widths=W).eval()}
    student = sbm.SBMStudent(teachers, {"seg": ["enc3", "dec3", "dec1"], "depth": ["enc3", "dec3"]})
    method = sbm.SBM(student, teachers, metrics=False)
    student.set_stage(stage)
    trunk0 = {b: _state(m) for b, m in student.trunk.items()}
    branches0 = {(t, p): _state(br) for t, per in student.branches.items() for p, br in per.items()}
    hist = fit(method, train, val, epochs=1, batch_size=8, lr=1e-2, progress=False)
    student.set_stage(None)

    moved_trunk = {b for b, s in trunk0.items() if _changed(s, student.trunk[b])}
    def moved(part):
        return {k for k, s in branches0.items()
                if _changed({n: v for n, v in s.items() if n.startswith(part)}, student.branches[k[0]][k[1]])}

    moved_adaptors, moved_tails = moved("adaptor."), moved("tail.")
    assert moved_tails == set()  # teacher tails are frozen in both schedules
    if stage == "dec3":
        assert moved_trunk == {"dec3"}
        assert moved_adaptors == {("seg", "dec3"), ("depth", "dec3")}
        # the running statistics of the frozen blocks did not move either
        assert not _changed(trunk0["enc1"], student.trunk["enc1"])
        assert {c for c in hist.columns if c.startswith("train/") and "@" in c} == {"train/seg@dec3",
                                                                                   "train/depth@dec3"}
    else:  # control
        assert moved_trunk == {"enc1", "enc2", "enc3", "dec3", "dec2", "dec1"}
        assert moved_adaptors == set(branches0)
    # set_stage(None) restores the joint setting: trunk and adaptors trainable, teacher tails frozen
    assert all(p.requires_grad for p in student.trunk.parameters())
    assert all(p.requires_grad for per in student.branches.values() for br in per.values()
               for p in br.adaptor.parameters())
    assert not any(p.requires_grad for per in student.branches.values() for br in per.values()
                   for p in br.tail.parameters())
    student.train()
    assert all(m.training for m in student.trunk.modules())


def test_blockwise_run_selects_the_lowest_loss_end_to_end(tiny_scenes):
    train, val = tiny_scenes
    teachers = {"seg": models.build("segnet_small", 11, widths=W).eval(),
                "depth": models.build("segnet_small", 1, widths=W).eval()}
    points = {"seg": ["enc3", "dec2"], "depth": ["enc3", "dec1"]}
    res = sbm.run(teachers, train, val, points=points, schedule="blockwise", search_epochs=1, finetune_epochs=1,
                  batch_size=8, progress=False)
    h = res.search_history
    assert list(h["stage"]) == ["enc3", "dec2", "dec1"] and list(h["epoch"]) == [1, 2, 3]
    assert h.attrs["stage_best_epochs"] == {"enc3": 1, "dec2": 2, "dec1": 3}
    assert "train/seg@enc3" in h.columns and pd.isna(h.loc[1, "train/seg@enc3"])  # not trained in stage dec2
    # selection: the lowest training loss per task, measured on every candidate
    table = res.branch_losses
    assert list(zip(table["task"], table["point"])) == [(t, p) for t, ps in points.items() for p in ps]
    lowest = {t: part.loc[part["loss"].idxmin(), "point"] for t, part in table.groupby("task", sort=False)}
    assert res.points == lowest == sbm.select_branches(table)
    assert res.student.points == {t: [p] for t, p in res.points.items()}
    assert res.settings["schedule"] == "blockwise" and sbm.check_tails(res.search_student, teachers)["equal"].all()
    assert res.search_student.stage is None and all(p.requires_grad for p in res.student.parameters())
    summary = sbm.branch_summary(res)
    assert summary["chosen"].sum() == 2 and summary["val mIoU"].notna().sum() == 2
    with pytest.raises(ValueError, match="schedule must be 'joint'"):
        sbm.run(teachers, train, val, points=points, schedule="greedy", progress=False)


def test_a_branch_is_final_after_its_own_stage(tiny_scenes):
    """Blockwise: the enc3 branch's loss measured right after its stage equals its loss after the
    later stages (control: under the joint schedule more training moves it)."""
    train, val = tiny_scenes
    teachers = {"seg": models.build("segnet_small", 11, widths=W).eval(),
                "depth": models.build("segnet_small", 1, widths=W).eval()}
    student = sbm.SBMStudent(teachers, {"seg": ["enc3", "dec2"], "depth": ["enc3"]})
    method = sbm.SBM(student, teachers, metrics=False)
    student.set_stage("enc3")
    fit(method, train, None, epochs=1, batch_size=8, lr=1e-2, progress=False)
    student.set_stage(None)
    after_own = sbm.branch_losses(method, train).set_index(["task", "point"])["loss"]
    student.set_stage("dec2")
    fit(method, train, None, epochs=1, batch_size=8, lr=1e-2, progress=False)
    student.set_stage(None)
    after_all = sbm.branch_losses(method, train).set_index(["task", "point"])["loss"]
    assert after_all[("seg", "enc3")] == after_own[("seg", "enc3")]
    assert after_all[("depth", "enc3")] == after_own[("depth", "enc3")]
    assert after_all[("seg", "dec2")] != after_own[("seg", "dec2")]
    fit(method, train, None, epochs=1, batch_size=8, lr=1e-2, progress=False)  # control: joint
    joint = sbm.branch_losses(method, train).set_index(["task", "point"])["loss"]
    assert joint[("seg", "enc3")] != after_all[("seg", "enc3")]


# --------------------------------------------------------------------------------- unpooling
def test_max_unpooling_puts_each_value_at_its_argmax():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6)  # non-square
    pooled, idx = nn.MaxPool2d(2, return_indices=True)(x)
    block = DecoderBlock(3, 3, unpool="indices")
    up = block.up(pooled, idx)
    assert up.shape == x.shape
    # every 2×2 window holds its maximum at the argmax and zeros elsewhere
    win = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 3, 2, 3, 4)
    uwin = up.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 3, 2, 3, 4)
    arg = win.argmax(-1, keepdim=True)
    assert torch.equal(uwin.gather(-1, arg), win.gather(-1, arg))
    assert (uwin != 0).sum(-1).eq(1).all()
    # control: the default bilinear upsampling spreads the values over the window
    bil = DecoderBlock(3, 3).up(pooled)
    bwin = bil.unfold(2, 2, 2).unfold(3, 2, 2).reshape(2, 3, 2, 3, 4)
    assert (bwin != 0).sum(-1).gt(1).any() and not torch.equal(bil, up)


@pytest.mark.parametrize("skips", [False, True])
def test_segnet_with_indices_shapes_and_errors(skips):
    torch.manual_seed(0)
    m = models.build("segnet_small", 5, widths=W, skips=skips, unpool="indices").eval()
    ref = models.build("segnet_small", 5, widths=W, skips=skips)
    ref.load_state_dict(m.state_dict())  # the same weights: only the upsampling differs
    x = torch.rand(2, 3, 16, 32)  # non-square
    with torch.no_grad():
        y = m(x)
        z, sk, ind = m.encode(x)
        assert y.shape == (2, 5, 16, 32) and z.shape == (2, 8, 2, 4)
        assert [i.shape[-2:] for i in ind] == [(8, 16), (4, 8), (2, 4)]
        assert torch.equal(m.decode(z, sk, size=x.shape[-2:], indices=ind), y)
        assert not torch.allclose(y, ref.eval()(x))
    assert isinstance(m.enc1(x), tuple) and torch.is_tensor(ref.enc1(x))
    with pytest.raises(ValueError, match="unpool must be 'bilinear'"):
        models.build("segnet_small", 5, widths=W, unpool="nearest")
    with pytest.raises(ValueError, match="pooling indices"):
        m.decode(z, sk)
    with pytest.raises(ValueError, match="pass the pooling indices"):
        m.dec3(z)
    with pytest.raises(ValueError, match="do not fit"):
        m.dec3(z, indices=ind[1])  # enc2's indices are for dec2
    with pytest.raises(ValueError, match="divisible by 8"):
        m(torch.rand(1, 3, 12, 16))


@pytest.mark.parametrize("skips", [False, True])
def test_sbm_student_from_indices_teachers_reproduces_the_teacher(skips):
    teachers = _teachers(skips, unpool="indices")
    student = sbm.SBMStudent(teachers)
    assert student.unpool == "indices" and sbm.check_tails(student, teachers)["equal"].all()
    x = torch.rand(2, 3, 8, 16)  # non-square
    student = _identity_adaptors(student).eval()
    seg, depth = teachers["seg"], teachers["depth"]
    with torch.no_grad():
        outs = student.forward_all(x)
        final = student.branch_out({"seg": "dec1", "depth": "dec1"}).eval()(x)
        # trunk = seg teacher: every seg branch, the last one included, is the seg teacher exactly
        assert torch.equal(final["seg"], seg(x))
        for p in sbm.BRANCH_POINTS:
            assert torch.allclose(outs["seg"][p], seg(x), atol=1e-6), p
        # a depth tail max-unpools with the *student trunk's* indices, not the depth teacher's own
        z, (e1, e2), (i1, i2, i3) = seg.encode(x)
        d3 = seg.dec3(z, e2 if skips else None, indices=i3)
        expect = depth.head(depth.dec1(depth.dec2(d3, e1 if skips else None, indices=i2), indices=i1))
        assert torch.allclose(outs["depth"]["dec3"], expect, atol=1e-6)
        _, _, (j1, j2, _) = depth.encode(x)
        wrong = depth.head(depth.dec1(depth.dec2(d3, e1 if skips else None, indices=j2), indices=j1))
        assert not torch.allclose(outs["depth"]["dec3"], wrong, atol=1e-3)  # control
    # the student built with trunk_from="depth" reproduces the depth teacher at its last point
    other = _identity_adaptors(sbm.SBMStudent(teachers, {"seg": "dec1", "depth": "dec1"}, trunk_from="depth")).eval()
    with torch.no_grad():
        assert torch.equal(other(x)["depth"], depth(x))
    # check_tails: the same weights with the other upsampling is not the teacher's decoder
    bilinear = {t: models.build("segnet_small", m.out_channels, widths=W, skips=skips) for t, m in teachers.items()}
    for t in bilinear:
        bilinear[t].load_state_dict(teachers[t].state_dict())
    assert not sbm.check_tails(student, bilinear)["equal"].any()
    with pytest.raises(ValueError, match="unpool"):
        sbm.SBMStudent({"seg": teachers["seg"], "depth": bilinear["depth"]})
    tail = student.branches["depth"]["dec3"].tail
    with pytest.raises(ValueError, match="trunk's pooling indices"):
        tail(torch.rand(1, 8, 2, 4))
    fresh = sbm.SBMStudent(teachers, {"seg": "dec2", "depth": "dec2"}, tails="fresh")
    assert fresh.branches["depth"]["dec2"].tail.unpool == "indices"


def test_sbm_run_with_indices_teachers_blockwise(tiny_scenes):
    train, val = tiny_scenes
    torch.manual_seed(0)
    teachers = {"seg": models.build("segnet_small", 11, widths=W, unpool="indices").eval(),
                "depth": models.build("segnet_small", 1, widths=W, unpool="indices").eval()}
    res = sbm.run(teachers, train, val, points={"seg": ["dec3", "dec1"], "depth": ["dec1"]}, schedule="blockwise",
                  search_epochs=1, finetune_epochs=1, batch_size=8, progress=False)
    assert res.student.unpool == "indices"
    out = res.student.eval()(val.images[:2].float() / 255)
    assert out["seg"].shape == (2, 11, 16, 16) and out["depth"].shape == (2, 1, 16, 16)
    assert isinstance(copy.deepcopy(res.student.trunk["enc1"]).pool, nn.MaxPool2d)
    assert isinstance(SegNetSmall(3, widths=W, unpool="indices").dec1.up, nn.MaxUnpool2d)
