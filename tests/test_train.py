import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyImages
from torch import nn

import kaviz
import kaviz.losses
from kaviz import models
from kaviz.train import (
    CheckpointMismatchError,
    Frozen,
    NonFiniteLossError,
    Supervised,
    fit,
    freeze,
    load_checkpoint,
    train_teacher,
)

HERE = Path(__file__).parent


def small_net(classes=3):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, classes))


def test_fit_learns_logs_terms_and_restores_best(tiny):
    kaviz.seed_everything(0)
    model = small_net()
    hist = fit(Supervised(model), tiny, TinyImages(n=48, seed=1), epochs=4, batch_size=16, lr=0.05)
    assert list(hist["epoch"]) == [1, 2, 3, 4]
    for col in ("train/loss", "train/ce", "val/ce", "val/loss", "val/accuracy", "lr", "seconds"):
        assert col in hist.columns, col
    assert hist["train/ce"].iloc[-1] < hist["train/ce"].iloc[0]
    assert hist["val/accuracy"].max() > 0.9
    best = hist.attrs["best_epoch"]
    assert hist.attrs["monitor"] == "val/accuracy"
    assert hist.loc[hist.epoch == best, "val/accuracy"].item() == hist["val/accuracy"].max()
    # the restored weights are the best epoch's: evaluating again reproduces its accuracy
    assert Supervised(model).evaluate(TinyImages(n=48, seed=1))["accuracy"] == pytest.approx(hist.attrs["best_value"])


def test_same_seed_same_bits(tiny):
    outs = []
    for _ in range(2):
        kaviz.seed_everything(5)
        m = small_net()
        fit(Supervised(m), tiny, epochs=2, batch_size=16, seed=1)
        outs.append(models.weights_hash(m))
    assert outs[0] == outs[1]


class TwoTerms(nn.Module):
    def __init__(self, teacher):
        super().__init__()
        self.teacher = freeze(teacher)
        self.student = small_net()
        self.extra = nn.Linear(3, 3)
        self.loss_weights = {"kd": 1.0, "aux": 0.0}

    def forward(self, batch):
        x = batch[0]
        assert not self.teacher.module.training
        t = self.teacher(x)
        s = self.student(x)
        return {"kd": kaviz.losses.soft_cross_entropy(s, t), "aux": self.extra(s).pow(2).mean()}


def test_frozen_teacher_weights_and_terms(tiny, tmp_path):
    teacher = small_net()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = TwoTerms(teacher)
    method.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    extra_before = method.extra.weight.clone()
    hist = fit(method, tiny, epochs=2, batch_size=16, checkpoint_dir=tmp_path)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights and BN statistics unchanged"
    assert torch.equal(method.extra.weight, extra_before), "a term with weight 0 does not train its parameters"
    assert {"train/kd", "train/aux"} <= set(hist.columns)
    ck = load_checkpoint(tmp_path / "last.pt")
    assert not any(k.startswith("teacher.") for k in ck["model"]), "frozen teachers are not checkpointed"
    assert isinstance(method.teacher, Frozen) and freeze(method.teacher) is method.teacher


class NaNAt(Supervised):
    def __init__(self, model, epoch, step, per_epoch):
        super().__init__(model)
        self.at = (epoch - 1) * per_epoch + step
        self.n = -1

    def forward(self, batch):
        out = super().forward(batch)
        if self.training:
            self.n += 1
            if self.n == self.at:
                out["ce"] = out["ce"] * float("nan")
        return out


def test_non_finite_loss_names_epoch_step_term_and_keeps_checkpoint(tiny, tmp_path):
    model = small_net()
    method = NaNAt(model, epoch=2, step=3, per_epoch=6)
    with pytest.raises(NonFiniteLossError, match=r"'ce' became nan at epoch 2, step 3.*epoch 1.*intact"):
        fit(method, tiny, epochs=3, batch_size=16, checkpoint_dir=tmp_path)
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_kill_and_resume_is_bitwise_equal_to_uninterrupted(tmp_path):
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(HERE.parent)}
    worker = str(HERE / "_resume_worker.py")
    ref, res = tmp_path / "ref.pt", tmp_path / "res.pt"
    from _resume_worker import main as run_uninterrupted

    run_uninterrupted("", str(ref), 0, False)  # in-process: same seed and thread count as the workers
    ck = tmp_path / "ck"
    killed = subprocess.run([sys.executable, worker, str(ck), str(res), "19", "0"], env=env, timeout=120)
    assert killed.returncode == -9, "the worker killed itself mid-training (step 19 of 28, in epoch 3)"
    assert load_checkpoint(ck / "last.pt")["epoch"] == 2 and not res.exists()
    subprocess.run([sys.executable, worker, str(ck), str(res), "0", "1"], check=True, env=env, timeout=120)
    a = torch.load(ref, weights_only=True)
    b = torch.load(res, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_settings_and_other_models(tiny, tmp_path):
    fit(Supervised(small_net()), tiny, epochs=1, batch_size=16, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="other settings"):
        fit(Supervised(small_net()), tiny, epochs=2, batch_size=32, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointMismatchError, match="another method or architecture"):
        fit(Supervised(small_net(classes=3).append(nn.Linear(3, 3))), tiny, epochs=2, batch_size=16,
            checkpoint_dir=tmp_path, resume=True)
    # no schedule: more epochs may be appended
    h = fit(Supervised(small_net()), tiny, epochs=2, batch_size=16, checkpoint_dir=tmp_path, resume=True)
    assert list(h["epoch"]) == [1, 2]


class Groups(Supervised):
    def param_groups(self, lr):
        head = list(self.model[-1].parameters())
        ids = {id(p) for p in head}
        return [{"params": [p for p in self.model.parameters() if id(p) not in ids]},
                {"params": head, "lr": lr * 10}]


def test_param_groups_and_schedules(tiny):
    seen = []
    fit(Groups(small_net()), tiny, epochs=1, batch_size=16, lr=0.01,
        callbacks=[lambda e, row, m: seen.append(None)], optimizer="sgd")
    assert seen == [None]
    h = fit(Supervised(small_net()), tiny, epochs=4, batch_size=16, lr=0.01, schedule="step")
    assert list(h["lr"]) == pytest.approx([0.01, 0.01, 0.001, 0.001])
    h = fit(Supervised(small_net()), tiny, epochs=3, batch_size=16, lr=1e-4, schedule="loglinear")
    assert list(h["lr"]) == pytest.approx([1e-4, 1e-5, 1e-6])
    with pytest.raises(ValueError, match="schedule"):
        fit(Supervised(small_net()), tiny, epochs=1, schedule="exp")
    with pytest.raises(ValueError, match="optimizer"):
        fit(Supervised(small_net()), tiny, epochs=1, optimizer="rmsprop")


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="epochs"):
        fit(Supervised(small_net()), tiny, epochs=0)
    with pytest.raises(ValueError, match="resume=True needs"):
        fit(Supervised(small_net()), tiny, epochs=1, resume=True)
    with pytest.raises(KeyError, match="monitor"):
        fit(Supervised(small_net()), tiny, tiny, epochs=1, monitor="val/f1")

    class NoDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(1, 1)

        def forward(self, batch):
            return self.l(torch.ones(1)).sum()

    with pytest.raises(TypeError, match="dict of named loss terms"):
        fit(NoDict(), tiny, epochs=1)
    frozen_only = nn.Module()
    frozen_only.t = freeze(small_net())
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(frozen_only, tiny, epochs=1)


def test_train_teacher_caches_by_everything_that_determines_it(tmp_path, tiny):
    val = TinyImages(n=30, seed=1)
    m1, h1 = train_teacher("vgg8_small", tiny, val, epochs=1, batch_size=32, cache=tmp_path, arch_kwargs={"width": 4})
    assert h1.attrs["cached"] is False and not m1.training
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "lock", "pt"], files
    assert len({f.rsplit(".", 1)[0] for f in files}) == 1, "one entry: weights, metadata and its lock"
    m2, h2 = train_teacher("vgg8_small", tiny, val, epochs=1, batch_size=32, cache=tmp_path, arch_kwargs={"width": 4})
    assert h2.attrs["cached"] is True and models.weights_hash(m1) == models.weights_hash(m2)
    assert h2["val/accuracy"].tolist() == pytest.approx(h1["val/accuracy"].tolist())
    train_teacher("vgg8_small", tiny, val, epochs=1, batch_size=32, cache=tmp_path, arch_kwargs={"width": 4}, seed=1)
    train_teacher("vgg8_small", TinyImages(seed=7), val, epochs=1, batch_size=32, cache=tmp_path,
                  arch_kwargs={"width": 4})
    assert len(list(tmp_path.glob("*.pt"))) == 3, "another seed or other data -> another teacher"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        _, h3 = train_teacher("vgg8_small", tiny, val, epochs=1, batch_size=32, cache=tmp_path,
                              arch_kwargs={"width": 4})
    finally:
        torch.set_num_threads(threads)
    assert h3.attrs["cached"] is False, "another thread count sums in another order -> another teacher"
    info = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert info["settings"]["epochs"] == 1


def test_summarize_reports_best_epoch_and_test_metrics(tiny):
    from kaviz.train import summarize

    kaviz.seed_everything(0)
    m = small_net()
    h = fit(Supervised(m), tiny, TinyImages(n=30, seed=1), epochs=2, batch_size=16)
    table = summarize({"net": m}, {"net": h}, TinyImages(n=30, seed=2))
    row = table.loc["net"]
    assert row["best epoch (val)"] == h.attrs["best_epoch"]
    assert row["val/accuracy (best)"] == h.attrs["best_value"]
    assert row["test accuracy"] == Supervised(m).evaluate(TinyImages(n=30, seed=2))["accuracy"]
    assert row["parameters"] == sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------- issue 14 #3 and #14
@pytest.mark.parametrize("change, field", [
    (dict(train_data=TinyImages(seed=9)), "train_data"),  # other data, same length
    (dict(val_data=TinyImages(n=30, seed=8)), "val_data"),
    (dict(grad_clip=1.0), "grad_clip"),
    (dict(momentum=0.5), "momentum"),
    (dict(monitor="val/loss"), "monitor"),
    (dict(drop_last=False), "drop_last"),
    (dict(restore="last"), "restore"),
    (dict(train_data="loader"), "data_type"),
])
def test_resume_refuses_other_data_and_settings_listing_the_difference(tmp_path, change, field):
    """issue 14 #3: resume=True accepted other data of the same length, grad_clip, momentum, monitor,
    drop_last, restore, or a DataLoader instead of the dataset, and the result equalled neither run."""
    base = dict(train_data=TinyImages(), val_data=TinyImages(n=30, seed=1), batch_size=16, checkpoint_dir=tmp_path)
    fit(Supervised(small_net()), epochs=1, **base)
    kw = {**base, **change}
    if kw["train_data"] == "loader":
        kw["train_data"] = torch.utils.data.DataLoader(TinyImages(), batch_size=16, shuffle=True, drop_last=True)
    with pytest.raises(CheckpointMismatchError,
                       match=rf"other settings \(.*{field}: checkpoint .*, this call .*resume=False"):
        fit(Supervised(small_net()), epochs=2, resume=True, **kw)
    h = fit(Supervised(small_net()), epochs=2, resume=True, **base)  # the same settings still resume
    assert list(h["epoch"]) == [1, 2]


class NaNEval(Supervised):
    def evaluate(self, data):
        return {"accuracy": float("nan")}


def test_nan_validation_monitor_warns_naming_the_epochs_and_the_monitor(tiny):
    """issue 14 #14: a NaN validation value meant no epoch was ever best and "last" was restored silently."""
    with pytest.warns(RuntimeWarning, match=r"'val/accuracy' was not finite .* epoch\(s\) 1, 2: no epoch is best, so "
                                            r"the weights of the last epoch are kept"):
        h = fit(NaNEval(small_net()), tiny, TinyImages(n=30, seed=1), epochs=2, batch_size=16)
    assert h.attrs["best_epoch"] is None and h.attrs["restored"] == "last"


def test_after_a_non_finite_loss_the_model_in_memory_is_the_last_good_epochs(tiny, tmp_path):
    """issue 14 #14: after NonFiniteLossError the in-memory model was left at the failing step."""
    model = small_net()
    with pytest.raises(NonFiniteLossError, match="restored to its weights at the end of epoch 1"):
        fit(NaNAt(model, epoch=2, step=3, per_epoch=6), tiny, epochs=3, batch_size=16, checkpoint_dir=tmp_path)
    good = load_checkpoint(tmp_path / "last.pt")["model"]
    state = Supervised(model).state_dict()
    assert good.keys() == state.keys() and all(torch.equal(good[k], state[k]) for k in good)
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="restored to its weights before training"):
        fit(NaNAt(model, epoch=1, step=2, per_epoch=6), tiny, epochs=1, batch_size=16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empty_validation_data_is_refused_before_the_first_epoch(tiny):
    """issue 14 #14: empty val_data failed only after a whole epoch of training."""
    seen = []
    with pytest.raises(ValueError, match="val_data is empty.*val_data=None"):
        fit(Supervised(small_net()), tiny, TinyImages(n=0), epochs=1, batch_size=16,
            callbacks=[lambda *a: seen.append(a)])
    assert seen == []


# ---------------------------------------------------------------------- GPU-ready options (tested on CPU)
class Recording(Supervised):
    """Supervised training that records every training batch it sees and the dtype/layout of the first
    conv's input and output (what autocast and channels_last really did)."""

    def __init__(self, model):
        super().__init__(model)
        self.seen, self.dtypes, self.layouts = [], set(), set()
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.training:
            self.dtypes.add(output.dtype)
            self.layouts.add(inputs[0].is_contiguous(memory_format=torch.channels_last)
                             and not inputs[0].is_contiguous())

    def forward(self, batch):
        if self.training:
            self.seen.append((batch[0].clone(), batch[1].clone()))
        return super().forward(batch)


def test_amp_bf16_on_cpu_trains_with_float32_weights(tiny):
    torch.set_num_threads(1)
    kaviz.seed_everything(0)
    method = Recording(small_net())
    hist = fit(method, tiny, TinyImages(n=24, seed=1), epochs=4, batch_size=16, lr=0.05, amp=True, device="cpu")
    assert method.dtypes == {torch.bfloat16}  # the forward really ran under bf16 autocast
    assert hist["train/ce"].iloc[-1] < hist["train/ce"].iloc[0] and hist["train/loss"].notna().all()
    assert all(p.dtype == torch.float32 for p in method.parameters())
    assert hist["val/accuracy"].max() > 0.9
    # the default is untouched: no autocast, float32 activations
    plain = Recording(small_net())
    fit(plain, tiny, epochs=1, batch_size=16, device="cpu")
    assert plain.dtypes == {torch.float32}


def test_amp_fp16_uses_a_grad_scaler_and_checkpoints_it(tiny, tmp_path):
    torch.set_num_threads(1)
    kaviz.seed_everything(0)
    method = Recording(small_net())
    hist = fit(method, tiny, epochs=2, batch_size=16, lr=0.05, amp="fp16", device="cpu", grad_clip=1.0,
               checkpoint_dir=tmp_path)
    assert method.dtypes == {torch.float16} and hist["train/loss"].notna().all()
    ck = load_checkpoint(tmp_path / "last.pt")
    assert "scale" in ck["scaler"] and json.loads(ck["config"])["amp"] == "float16"
    with pytest.raises(CheckpointMismatchError, match="amp"):  # another precision is another run
        fit(Supervised(small_net()), tiny, epochs=3, batch_size=16, lr=0.05, device="cpu", grad_clip=1.0,
            checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize("bad", ["int8", "fp32", 16, "yes"])
def test_amp_bad_value_teaches(tiny, bad):
    with pytest.raises(ValueError, match=r"amp=.*amp=True \(bf16 on CPU, fp16 with a gradient scaler on CUDA\)"):
        fit(Supervised(small_net()), tiny, epochs=1, amp=bad)


def test_bad_loader_options_teach(tiny):
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        fit(Supervised(small_net()), tiny, epochs=1, num_workers=-1)
    with pytest.raises(ValueError, match="persistent_workers=True needs num_workers > 0"):
        fit(Supervised(small_net()), tiny, epochs=1, persistent_workers=True)


def test_channels_last_matches_contiguous(tiny):
    torch.set_num_threads(1)
    runs = {}
    for cl in (False, True):
        kaviz.seed_everything(3)
        method = Recording(small_net())
        # SGD: Adam would turn the rounding noise of the conv bias's ~0 gradient (BatchNorm follows) into full steps
        hist = fit(method, tiny, TinyImages(n=24, seed=1), epochs=2, batch_size=16, lr=0.05, optimizer="sgd",
                   channels_last=cl)
        runs[cl] = (method, hist)
    assert runs[True][0].layouts == {True} and runs[False][0].layouts == {False}
    assert runs[True][0].model[0].weight.is_contiguous(memory_format=torch.channels_last)
    a, b = (dict(runs[cl][0].model.state_dict()) for cl in (False, True))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert runs[True][1]["train/loss"].to_numpy() == pytest.approx(runs[False][1]["train/loss"].to_numpy(), rel=1e-5)


def test_workers_give_the_same_batches_and_weights(tiny):
    torch.set_num_threads(1)
    runs = {}
    for workers in (0, 2):
        kaviz.seed_everything(7)
        method = Recording(small_net())
        fit(method, tiny, TinyImages(n=24, seed=1), epochs=2, batch_size=16, lr=0.05, seed=4, num_workers=workers)
        runs[workers] = method
    assert len(runs[0].seen) == len(runs[2].seen) == 12
    for (x0, y0), (x2, y2) in zip(runs[0].seen, runs[2].seen):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert models.weights_hash(runs[0].model) == models.weights_hash(runs[2].model)


def test_train_teacher_passes_gpu_options_and_keys_them(tmp_path, tiny):
    torch.set_num_threads(1)
    kw = dict(num_classes=3, epochs=1, batch_size=16, arch_kwargs={"width": 4}, cache=tmp_path, progress=False)
    plain, _ = train_teacher("cifar_resnet8", tiny, **kw)
    amp, hist = train_teacher("cifar_resnet8", tiny, amp=True, **kw)
    assert hist.attrs["cached"] is False  # trained under bf16 autocast, not the float32 teacher reused
    assert models.weights_hash(plain) != models.weights_hash(amp)
    assert len(list(tmp_path.glob("cifar_resnet8-*.pt"))) == 2
    again, hist2 = train_teacher("cifar_resnet8", tiny, amp=True, **kw)  # the amp entry is reused
    assert hist2.attrs["cached"] is True and models.weights_hash(again) == models.weights_hash(amp)
