"""Early stopping in kaviz.train.fit and train_teacher (issue 12, item 2: teachers train until validation
stops improving). Epochs are 1-based, as in fit's history (``epoch`` column, ``best_epoch``,
``stopped_epoch``)."""
import functools

import pytest
import torch
from conftest import TinyImages
from torch import nn

import kaviz
import kaviz.train
from kaviz import models
from kaviz.train import CheckpointMismatchError, Supervised, fit, teacher_key, train_teacher

NAN, INF = float("nan"), float("inf")


def small_net(classes=3):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, classes))


class Scripted(Supervised):
    """Trains for real (cross-entropy) but reports a scripted validation value: ``seq[i]`` at epoch i+1.
    The epoch counter is a buffer, so it is checkpointed and a resumed run reads on where it left off."""

    def __init__(self, model, seq=(), name="accuracy"):
        super().__init__(model)
        self.seq = list(seq)
        self.name = name
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def evaluate(self, data):
        i = int(self.calls)
        self.calls += 1
        return {self.name: self.seq[i]}


VAL = TinyImages(n=30, seed=1)
SEQ = [0.1, 0.5, 0.4, 0.45, 0.3, 0.2, 0.15, 0.1]  # best at epoch 2, then no improvement


def run(seq, *, epochs=None, name="accuracy", seed=0, **kw):
    kaviz.seed_everything(seed)
    model = small_net()
    method = Scripted(model, seq, name)
    h = fit(method, TinyImages(), VAL, epochs=epochs or len(seq), batch_size=16, lr=0.05, **kw)
    return h, model


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ stopping epoch
@pytest.mark.parametrize("patience, stop", [(1, 3), (2, 4), (3, 5), (6, None), (None, None)])
def test_stops_after_patience_epochs_without_improvement(patience, stop):
    h, _ = run(SEQ, patience=patience)
    assert h.attrs["stopped_epoch"] == stop and h.attrs["patience"] == patience
    assert list(h["epoch"]) == list(range(1, (stop or len(SEQ)) + 1)), "epochs is the maximum; no epoch after the stop"
    assert h.attrs["best_epoch"] == 2 and h.attrs["best_value"] == 0.5


def test_stopping_at_the_last_epoch_is_not_an_early_stop():
    """stopped_epoch is None when every epoch ran, even if the count reached patience at the last one."""
    h, _ = run(SEQ[:4], patience=2)  # the count reaches 2 at epoch 4 == epochs
    assert list(h["epoch"]) == [1, 2, 3, 4] and h.attrs["stopped_epoch"] is None
    h, _ = run(SEQ[:5], patience=2)  # control: one epoch more is left unrun
    assert list(h["epoch"]) == [1, 2, 3, 4] and h.attrs["stopped_epoch"] == 4


def test_min_delta_an_improvement_not_larger_than_it_does_not_reset_the_count():
    seq = [0.5, 0.52, 0.54, 0.56, 0.40, 0.40, 0.40, 0.40]
    h, _ = run(seq, patience=2, min_delta=0.05)  # +0.02, +0.04 over 0.5: not improvements
    assert h.attrs["stopped_epoch"] == 3
    assert h.attrs["best_epoch"] == 3, "the best epoch (restore) counts any improvement, not only > min_delta"
    h, _ = run(seq, patience=2)  # control: with min_delta 0 each small gain resets the count
    assert h.attrs["stopped_epoch"] == 6 and h.attrs["best_epoch"] == 4


def test_a_plateau_or_a_gain_of_exactly_min_delta_is_not_an_improvement():
    h, _ = run([0.5, 0.5, 0.5, 0.5, 0.5], patience=2)  # equal is not better
    assert h.attrs["stopped_epoch"] == 3 and h.attrs["best_epoch"] == 1
    h, _ = run([0.5, 0.75, 0.75, 1.0, 1.0, 1.0], patience=2, min_delta=0.25)  # +0.25 exactly: "more than" fails
    assert h.attrs["stopped_epoch"] == 3
    h, _ = run([0.5, 0.75, 0.75, 1.0, 1.0, 1.0], patience=2, min_delta=0.125)  # control: more than 0.125
    assert h.attrs["stopped_epoch"] is None and len(h) == 6


def test_min_delta_gains_add_up_against_the_reference():
    """The reference is the last value that improved by more than min_delta, not the best so far: a slow
    steady improvement resets the count once it adds up (0.5 -> 0.56 is +0.06 > 0.05)."""
    seq = [0.5, 0.53, 0.56, 0.59, 0.2, 0.2, 0.2, 0.2]
    h, _ = run(seq, patience=2, min_delta=0.05)
    assert h.attrs["stopped_epoch"] == 5 and h.attrs["best_epoch"] == 4
    # control: the same step in isolation (+0.03 twice without the first gain adding up) does stop early
    h, _ = run([0.5, 0.53, 0.53, 0.2, 0.2], patience=2, min_delta=0.05)
    assert h.attrs["stopped_epoch"] == 3


def test_loss_monitor_stops_when_the_loss_stops_going_down():
    seq = [1.0, 0.5, 0.6, 0.55, 0.7, 0.8, 0.9]
    h, _ = run(seq, name="xloss", monitor="val/xloss", patience=2)
    assert h.attrs["stopped_epoch"] == 4 and h.attrs["best_epoch"] == 2 and h.attrs["best_value"] == 0.5
    # control: read as a value to maximise, the same sequence stops one epoch earlier (1.0 is never beaten)
    h, _ = run(seq, name="xloss", monitor=("val/xloss", "max"), patience=2)
    assert h.attrs["stopped_epoch"] == 3 and h.attrs["best_epoch"] == 1


def test_nan_and_inf_are_never_improvements():
    with pytest.warns(RuntimeWarning, match="not finite"):
        h, _ = run([0.3, NAN, NAN, 0.9, 0.9, 0.9], patience=2)
    assert h.attrs["stopped_epoch"] == 3 and h.attrs["best_epoch"] == 1
    with pytest.warns(RuntimeWarning, match="not finite"):
        h, _ = run([0.3, NAN, 0.9, 0.1, 0.1, 0.1], patience=2)  # control: a finite gain after one NaN resets it
    assert h.attrs["stopped_epoch"] == 5 and h.attrs["best_epoch"] == 3
    # a leading NaN is not a reference: 0.3 at epoch 2 is the first improvement
    with pytest.warns(RuntimeWarning, match="not finite"):
        h, _ = run([NAN, 0.3, 0.2, 0.1, 0.1, 0.1], patience=2)
    assert h.attrs["stopped_epoch"] == 4 and h.attrs["best_epoch"] == 2
    # +inf on an accuracy-like value is not an improvement (inf - 0.3 > 0 would be)
    with pytest.warns(RuntimeWarning, match="not finite"):
        h, _ = run([0.3, INF, INF, 0.9, 0.9, 0.9], patience=2)
    assert h.attrs["stopped_epoch"] == 3
    with pytest.warns(RuntimeWarning, match="not finite"):
        h, _ = run([NAN, NAN, NAN, NAN], patience=2)  # nothing ever finite: stops after patience epochs
    assert h.attrs["stopped_epoch"] == 2 and h.attrs["best_epoch"] is None


def test_helper_counts_epochs_without_improvement():
    count = kaviz.train._epochs_without_improvement
    assert count([0.1, 0.5, 0.4, 0.45], "max", 0.0) == 2
    assert count([0.1, 0.5, 0.4, 0.55], "max", 0.0) == 0
    assert count([0.1, 0.5, 0.4, 0.55], "max", 0.1) == 2
    assert count([1.0, 0.5, 0.6], "min", 0.0) == 1
    assert count([NAN, NAN], "max", 0.0) == 2
    assert count([], "max", 0.0) == 0


# ---------------------------------------------------------------------------------- restore and defaults
def test_restore_best_loads_the_best_epoch_of_a_stopped_run():
    seen = {}
    h, model = run(SEQ, patience=2, callbacks=[lambda e, row, core: seen.__setitem__(e, state(core.model))])
    assert h.attrs["stopped_epoch"] == 4 and sorted(seen) == [1, 2, 3, 4]
    assert same(state(model), seen[2])
    assert not same(seen[2], seen[4]), "control: the last epoch's weights differ from the best's"
    h, model = run(SEQ, patience=2, restore="last")
    assert same(state(model), seen[4]) and h.attrs["restored"] == "last"


def test_default_is_unchanged_and_a_patience_that_never_triggers_changes_nothing():
    """patience=None: the same history columns, no attrs but two new ones, and weights equal to a run whose
    patience is larger than epochs (the check draws no random numbers and trains nothing)."""
    seq = [0.1, 0.2, 0.15, 0.3]
    h0, m0 = run(seq, restore="last")
    rng0 = torch.get_rng_state()
    h1, m1 = run(seq, restore="last", patience=10)
    rng1 = torch.get_rng_state()
    assert list(h0.columns) == ["epoch", "train/loss", "train/ce", "lr", "val/ce", "val/loss", "val/accuracy",
                                "seconds"]
    assert list(h1.columns) == list(h0.columns)
    assert h0.drop(columns="seconds").equals(h1.drop(columns="seconds"))
    assert same(state(m0), state(m1)) and torch.equal(rng0, rng1)
    assert h0.attrs == {"best_epoch": 4, "monitor": "val/accuracy", "best_value": 0.3, "restored": "last",
                        "patience": None, "stopped_epoch": None}
    assert h1.attrs["patience"] == 10 and h1.attrs["stopped_epoch"] is None
    # control: a patience that does trigger changes the weights (the comparison above can fail)
    h2, m2 = run(seq, restore="last", patience=1)
    assert h2.attrs["stopped_epoch"] == 3 and not same(state(m0), state(m2))


def test_schedule_keeps_epochs_as_its_horizon():
    """A stopped cosine run is the first k epochs of the full run: the same learning rates and weights."""
    seen = {}
    full, _ = run(SEQ, schedule="cosine", restore="last",
                  callbacks=[lambda e, row, core: seen.__setitem__(e, state(core.model))])
    stopped, model = run(SEQ, schedule="cosine", restore="last", patience=2)
    k = stopped.attrs["stopped_epoch"]
    assert k == 4
    assert list(stopped["lr"]) == list(full["lr"])[:k]
    assert full["lr"].iloc[k - 1] > 0.01, "the lr at the stop is that of a horizon of 8 epochs, not of 4 (0)"
    assert same(state(model), seen[k])
    assert not same(seen[k], seen[len(SEQ)]), "control: the full run moved on after epoch k"


# ---------------------------------------------------------------------------------------- checkpoints
class Interrupt(Exception):
    pass


def interrupt_after(k):
    def cb(epoch, row, core):
        if epoch == k:
            raise Interrupt(epoch)
    return cb


@pytest.mark.parametrize("k, restore", [(1, "last"), (3, "last"), (4, "last"), (3, "best")])
def test_resume_stops_at_the_same_epoch_as_an_uninterrupted_run(tmp_path, k, restore):
    """Interrupted after epoch k (a callback raises, after last.pt of that epoch is written), then resumed:
    the same history, stopped_epoch and weights, bit for bit. k=4 is the epoch where it stops: the resumed
    run must not train further. restore="best": the best weights come from best.pt written before."""
    kw = dict(schedule="cosine", patience=2, restore=restore)
    ref_h, ref_m = run(SEQ, checkpoint_dir=tmp_path / "ref", **kw)
    assert ref_h.attrs["stopped_epoch"] == 4 and ref_h.attrs["best_epoch"] == 2
    ck = tmp_path / "ck"
    with pytest.raises(Interrupt):
        run(SEQ, checkpoint_dir=ck, callbacks=[interrupt_after(k)], **kw)
    assert kaviz.train.load_checkpoint(ck / "last.pt")["epoch"] == k
    seen = []
    h, m = run(SEQ, checkpoint_dir=ck, resume=True, callbacks=[lambda e, row, core: seen.append(e)], **kw)
    assert seen == list(range(k + 1, 5)), "the resumed run trains only the epochs left before the stop"
    assert h.attrs["stopped_epoch"] == 4 and list(h["epoch"]) == [1, 2, 3, 4]
    assert h.drop(columns="seconds").equals(ref_h.drop(columns="seconds"))
    assert {a: h.attrs[a] for a in ("best_epoch", "best_value", "restored", "patience")} == \
        {a: ref_h.attrs[a] for a in ("best_epoch", "best_value", "restored", "patience")}
    assert same(state(m), state(ref_m))
    # control: the last weights of the run without early stopping differ, so the comparison above can fail
    _, full = run(SEQ, schedule="cosine", restore="last")
    assert not same(state(full), state(ref_m))


def test_a_finished_early_stopped_run_resumes_without_training(tmp_path):
    """With no schedule more epochs may be appended; a run that already stopped stays stopped."""
    h, m = run(SEQ, checkpoint_dir=tmp_path, patience=2, restore="last")
    before = state(m)
    seen = []
    h2, m2 = run(SEQ + [0.9] * 4, checkpoint_dir=tmp_path, resume=True, patience=2, restore="last",
                 callbacks=[lambda e, row, core: seen.append(e)])
    assert seen == [] and h2.attrs["stopped_epoch"] == 4 and same(state(m2), before)
    # control: without patience the same checkpoint would be refused (not silently trained on)
    with pytest.raises(CheckpointMismatchError, match=r"patience: checkpoint 2, this call '<not used>'"):
        run(SEQ + [0.9] * 4, checkpoint_dir=tmp_path, resume=True, restore="last")


@pytest.mark.parametrize("first, then, field", [
    (dict(patience=2), dict(patience=3), "patience"),
    (dict(patience=2), dict(patience=2, min_delta=0.1), "min_delta"),
    (dict(), dict(patience=2), "patience"),
    (dict(patience=2), dict(), "patience"),
])
def test_resume_refuses_other_early_stopping_settings(tmp_path, first, then, field):
    run(SEQ[:2], epochs=1, checkpoint_dir=tmp_path, schedule="cosine", **first)
    with pytest.raises(CheckpointMismatchError, match=rf"other settings \(.*{field}: checkpoint .*, this call "):
        run(SEQ[:2], epochs=1, checkpoint_dir=tmp_path, schedule="cosine", resume=True, **then)
    h, _ = run(SEQ[:2], epochs=1, checkpoint_dir=tmp_path, schedule="cosine", resume=True, **first)  # control
    assert list(h["epoch"]) == [1]


def test_checkpoint_config_without_patience_is_unchanged(tmp_path):
    import json

    run(SEQ[:1], checkpoint_dir=tmp_path / "a")
    run(SEQ[:1], checkpoint_dir=tmp_path / "b", patience=3, min_delta=0.01)
    a = json.loads(kaviz.train.load_checkpoint(tmp_path / "a" / "last.pt")["config"])
    b = json.loads(kaviz.train.load_checkpoint(tmp_path / "b" / "last.pt")["config"])
    assert "patience" not in a and "min_delta" not in a
    assert b.pop("patience") == 3 and b.pop("min_delta") == 0.01 and a == b


# ---------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kw, match", [
    (dict(patience=0), "patience must be None .* or a positive int"),
    (dict(patience=-1), "patience must be None .* or a positive int"),
    (dict(patience=2.0), "patience must be None .* or a positive int"),
    (dict(patience="3"), "patience must be None .* or a positive int"),
    (dict(patience=True), "patience must be None .* or a positive int"),
    (dict(patience=2, min_delta=-0.1), "min_delta must be a finite number >= 0"),
    (dict(patience=2, min_delta=NAN), "min_delta must be a finite number >= 0"),
    (dict(patience=2, min_delta=INF), "min_delta must be a finite number >= 0"),
    (dict(patience=2, min_delta="0.1"), "min_delta must be a finite number >= 0"),
    (dict(patience=2, min_delta=True), "min_delta must be a finite number >= 0"),
    (dict(min_delta=0.1), r"only applies to early stopping: pass patience=\.\.\. too"),
])
def test_bad_early_stopping_inputs_teach_before_training(kw, match):
    seen = []
    with pytest.raises(ValueError, match=match):
        fit(Supervised(small_net()), TinyImages(), VAL, epochs=2, batch_size=16,
            callbacks=[lambda *a: seen.append(a)], **kw)
    assert seen == []
    with pytest.raises(ValueError, match=match):
        train_teacher("vgg8_small", TinyImages(), VAL, epochs=1, cache=False, arch_kwargs={"width": 4}, **kw)


def test_good_edge_inputs_are_accepted():
    import numpy as np

    for kw in (dict(patience=1), dict(patience=np.int64(2)), dict(patience=2, min_delta=0),
               dict(patience=2, min_delta=np.float32(0.01)), dict(min_delta=0.0)):
        kaviz.train._check_early_stopping(kw.get("patience"), kw.get("min_delta", 0.0))


# --------------------------------------------------------------------------------------- train_teacher
def teacher_keys(monkeypatch, calls):
    keys = []

    class Stop(Exception):
        pass

    def capture(folder, name, key, *a, **k):
        keys.append(key)
        raise Stop

    monkeypatch.setattr(kaviz.train, "cached_training", capture)
    for kw in calls:
        with pytest.raises(Stop):
            train_teacher("vgg8_small", TinyImages(), VAL, arch_kwargs={"width": 4}, **kw)
    return keys


def test_teacher_key_is_unchanged_without_patience(monkeypatch):
    default, none, zero, p3, p3b, p3d = teacher_keys(monkeypatch, [
        {}, dict(patience=None), dict(patience=None, min_delta=0.0), dict(patience=3), dict(patience=3, min_delta=0),
        dict(patience=3, min_delta=0.1)])
    assert default == none == zero
    assert p3 != default and p3 == p3b and p3d != p3
    # the default key is exactly that of the settings known before early stopping existed
    settings = dict(epochs=10, lr=1e-3, batch_size=64, optimizer="adam", weight_decay=5e-4, schedule="cosine",
                    seed=0, loss="ce", target_key=None, arch_kwargs={"width": 4}, device="cpu")
    assert default == teacher_key("vgg8_small", 3, TinyImages(), VAL, **settings)
    assert p3 == teacher_key("vgg8_small", 3, TinyImages(), VAL, **settings, patience=3, min_delta=0.0)


def test_train_teacher_stops_early_and_the_cache_keeps_where(tmp_path):
    method = functools.partial(Scripted, seq=tuple(SEQ))
    kw = dict(num_classes=3, epochs=len(SEQ), batch_size=16, arch_kwargs={"width": 4}, cache=tmp_path,
              method=method, progress=False)
    m1, h1 = train_teacher("vgg8_small", TinyImages(), VAL, patience=2, **kw)
    assert h1.attrs["cached"] is False and h1.attrs["stopped_epoch"] == 4 and list(h1["epoch"]) == [1, 2, 3, 4]
    assert h1.attrs["best_epoch"] == 2 and h1.attrs["patience"] == 2
    m2, h2 = train_teacher("vgg8_small", TinyImages(), VAL, patience=2, **kw)
    assert h2.attrs["cached"] is True and h2.attrs["stopped_epoch"] == 4 and h2.attrs["patience"] == 2
    assert models.weights_hash(m1) == models.weights_hash(m2)
    # control: without patience it is another teacher (another entry, every epoch run)
    _, h3 = train_teacher("vgg8_small", TinyImages(), VAL, **kw)
    assert h3.attrs["cached"] is False and h3.attrs["stopped_epoch"] is None and len(h3) == len(SEQ)
    assert len(list(tmp_path.glob("*.pt"))) == 2
