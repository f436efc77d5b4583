"""Fault tests of the teacher cache and of checkpoints (issue 14, the defects named in each test).

Each test reproduces a fault found when the library was attacked (SIGKILL mid-write, two processes on
one entry, damaged files, stale temporary files, a full disk, a hostile model name) and checks that
kaviz now reports it by path and recomputes, refuses, or cleans up."""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TinyImages
from torch import nn

from kaviz import models
from kaviz.cache import CorruptCacheWarning, DiskFullError
from kaviz.train import CheckpointMismatchError, CorruptCheckpointError, Supervised, fit, load_checkpoint, train_teacher

HERE = Path(__file__).parent
ENV = {**os.environ, "CI": "1", "PYTHONPATH": str(HERE.parent), "OMP_WAIT_POLICY": "PASSIVE"}
TEACHER = dict(epochs=1, batch_size=32, arch_kwargs={"width": 4}, progress=False)


def _teacher(cache, data=None, **kw):
    return train_teacher("vgg8_small", data or TinyImages(), TinyImages(n=30, seed=1), cache=cache, **{**TEACHER, **kw})


def _tmp_files(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------ kill and resume
def test_issue14_3_and_11_kill_during_checkpoint_write_leaves_a_temp_that_resume_cleans_and_refuses_other_data(
    tmp_path):
    """#11: a full-size ``.last.pt.<pid>.tmp`` left by a kill was never cleaned; #3: resume accepted other
    training data of the same length. A worker is SIGKILLed after writing epoch 2's checkpoint into its
    temporary file, before the rename."""
    from _resume_worker import main as run

    ck, ref, res = tmp_path / "ck", tmp_path / "ref.pt", tmp_path / "res.pt"
    killed = subprocess.run([sys.executable, str(HERE / "_resume_worker.py"), str(ck), str(res), "0", "0",
                             "kill-in-write"],
                            env=ENV, timeout=300)
    assert killed.returncode == -9
    left = [p for p in ck.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].stat().st_size > 1000, "a full-size temporary checkpoint is left by the kill"
    assert load_checkpoint(ck / "last.pt")["epoch"] == 1, "the complete checkpoint is the previous epoch's"
    with pytest.raises(CheckpointMismatchError, match=r"train_data: checkpoint .*this call"):
        run(str(ck), str(res), 0, True, train_seed=9)  # other data, same length
    assert _tmp_files(ck) == [], "the dead writer's temporary file is cleaned when the folder is opened again"
    run("", str(ref), 0, False)
    run(str(ck), str(res), 0, True)
    a, b = torch.load(ref, weights_only=True), torch.load(res, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is bit-identical"


def test_issue14_6_a_truncated_checkpoint_is_named_on_resume(tmp_path, tiny):
    """#6: a truncated checkpoint raised ``EOFError``/zip errors without the file's name."""
    fit(Supervised(nn.Sequential(nn.Flatten(), nn.Linear(192, 3))), tiny, epochs=1, batch_size=16,
        checkpoint_dir=tmp_path)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(last)) + r" is corrupt.*Delete it"):
        fit(Supervised(nn.Sequential(nn.Flatten(), nn.Linear(192, 3))), tiny, epochs=2, batch_size=16,
            checkpoint_dir=tmp_path, resume=True)


# -------------------------------------------------------------------------------- two processes
def test_issue14_2_two_processes_on_one_teacher_entry_one_trains_and_the_other_reuses(tmp_path):
    """#2: two processes on one teacher entry both trained and raced on one ``<key>.json.tmp``
    (FileNotFoundError, entries left as invalid JSON). Now the second waits on the entry's lock and
    reuses the first one's result."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(HERE / "_cache_worker.py"), str(cache), str(go)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()  # both start together
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["cached"] for r in results) == [False, True], results
    assert results[0]["hash"] == results[1]["hash"]
    assert _tmp_files(cache) == []
    (meta,) = list(cache.glob("*.json"))
    assert "history" in json.loads(meta.read_text())


# ---------------------------------------------------------------------------------- damaged files
def _flip(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    path.write_bytes(bytes(blob))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


CORRUPTIONS = {
    "truncate-weights": (".pt", _truncate, "sha256 mismatch"),
    "bitflip-weights": (".pt", _flip, "sha256 mismatch"),
    "swap-in-other-weights": (".pt", None, "sha256 mismatch"),
    "delete-weights": (".pt", lambda p: p.unlink(), "missing"),
    "invalid-json": (".json", lambda p: p.write_text("{not json"), "invalid JSON"),
    "truncated-json": (".json", _truncate, "invalid JSON"),
    "json-missing-keys": (".json", lambda p: p.write_text(json.dumps({"arch": "vgg8_small"})), "missing keys"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_issue14_6_and_9_a_damaged_teacher_entry_is_reported_by_path_and_retrained(tmp_path, kind):
    """#9: tampered or bit-flipped weights loaded silently (``cached=True``); #6: truncated files and bad
    JSON raised ``EOFError``/``JSONDecodeError``/``KeyError`` without the file and never healed."""
    suffix, damage, reason = CORRUPTIONS[kind]
    m1, h1 = _teacher(tmp_path)
    (target,) = list(tmp_path.glob("*" + suffix))
    if damage is None:  # another teacher's weights, same architecture, copied over this one's
        _teacher(tmp_path / "other", seed=1)
        shutil.copy(next((tmp_path / "other").glob("*.pt")), target)
    else:
        damage(target)
    with pytest.warns(CorruptCacheWarning,
                      match=re.escape(str(target)) + r" is corrupt \(" + reason + r".*\); retraining"):
        m2, h2 = _teacher(tmp_path)
    assert h2.attrs["cached"] is False and models.weights_hash(m2) == models.weights_hash(m1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptCacheWarning)
        m3, h3 = _teacher(tmp_path)
    assert h3.attrs["cached"] is True and models.weights_hash(m3) == models.weights_hash(m1), "healed"
    assert h3["val/accuracy"].tolist() == pytest.approx(h1["val/accuracy"].tolist())


def test_issue14_9_train_source_and_born_again_use_the_same_checked_cache(tmp_path, monkeypatch):
    """#9 for the two other copies of the teacher cache (``customize.train_source``,
    ``consistency.born_again_chain``): a bit flip in their weights loaded silently."""
    from test_customize import tiny_attributes

    from kaviz.methods import consistency as kcons
    from kaviz.methods import customize as cz

    ds = tiny_attributes(n=64)
    tr, va = ds.subset(range(48)), ds.subset(range(48, 64))
    kwargs = dict(epochs=1, batch_size=16, arch_kwargs={"width": 4}, cache=tmp_path / "src")
    m1, _ = cz.train_source("cifar_resnet8", ["red"], tr, va, **kwargs)
    (w,) = list((tmp_path / "src").glob("*.pt"))
    _flip(w)
    with pytest.warns(CorruptCacheWarning, match=re.escape(str(w)) + r" is corrupt \(sha256 mismatch\)"):
        m2, h2 = cz.train_source("cifar_resnet8", ["red"], tr, va, **kwargs)
    assert not h2.attrs["cached"] and models.weights_hash(m1) == models.weights_hash(m2)

    monkeypatch.setenv("KAVIZ_DATA", str(tmp_path / "data"))
    gen0 = models.build("vgg8_small", 3, width=4)
    train, val = TinyImages(n=64), TinyImages(n=30, seed=1)
    ba = dict(arch="vgg8_small", arch_kwargs={"width": 4}, generations=2, epochs=1, batch_size=32)
    ms, t1 = kcons.born_again_chain(gen0, train, val, **ba)
    (w,) = list((tmp_path / "data" / "teachers").glob("*ba1*.pt"))
    _flip(w)
    with pytest.warns(CorruptCacheWarning, match=re.escape(str(w)) + r" is corrupt"):
        ms2, t2 = kcons.born_again_chain(gen0, train, val, **ba)
    assert models.weights_hash(ms[1]) == models.weights_hash(ms2[1])
    assert t2["val_accuracy"].tolist() == pytest.approx(t1["val_accuracy"].tolist())


# ----------------------------------------------------------------------------- temporary files, disk
def test_issue14_11_stale_temporary_files_are_cleaned_when_the_cache_is_opened(tmp_path):
    """#11: a 0-byte ``.json.tmp`` and full-size temporaries from killed writers stayed forever."""
    import fcntl

    zero = tmp_path / "vgg8_small-0123.json.tmp"
    zero.write_bytes(b"")
    full = tmp_path / "vgg8_small-0123.pt.999999.0123456789ab.tmp"
    full.write_bytes(os.urandom(50_000))
    live = tmp_path / "vgg8_small-4567.pt.1.abcdefabcdef.tmp"
    live.write_bytes(b"being written")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer that is still alive holds its temporary file's lock
        _teacher(tmp_path)
    finally:
        os.close(fd)
    assert _tmp_files(tmp_path) == [live.name]


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root and mount(8); the ENOSPC path is also covered in test_cache.py")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 5 MB tmpfs here ({done.stderr.strip()}); ENOSPC is also covered in test_cache.py")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_issue14_11_a_full_disk_says_so_names_the_folder_and_the_bytes_and_leaves_no_temp(small_disk):
    """#11: a full disk gave torch's "unexpected pos 91200 vs 91096" and left a 0-byte ``.json.tmp``."""
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # leave less room than one small teacher's weights need
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - 8 * 1024))
    cache = small_disk / "teachers"
    with pytest.raises(DiskFullError,
                       match=rf"disk is full: writing \S+\.pt into {re.escape(str(cache))} needs .* bytes"):
        _teacher(cache)
    assert _tmp_files(cache) == [] and list(cache.glob("*.pt")) == []
    ck = small_disk / "ck"
    with pytest.raises(DiskFullError, match=rf"{re.escape(str(ck))} needs"):
        fit(Supervised(models.build("vgg8_small", 3, width=4)), TinyImages(), epochs=1, batch_size=32,
            checkpoint_dir=ck)
    assert _tmp_files(ck) == []
    filler.unlink()
    _, h = _teacher(cache)
    assert h.attrs["cached"] is False and len(list(cache.glob("*.pt"))) == 1, "works again once there is room"


# ----------------------------------------------------------------------------------- hostile names
def test_issue14_12_a_registered_model_name_with_dotdot_stays_inside_the_cache_folder(tmp_path):
    """#12: a registered model name with ``../`` wrote cache files outside the cache folder."""
    name = "../../escaped"
    models.register(name, overwrite=True)(lambda num_classes, **kw: models.build("vgg8_small", num_classes, width=4))
    try:
        cache = tmp_path / "a" / "b" / "teachers"
        train_teacher(name, TinyImages(), cache=cache, epochs=1, batch_size=32, progress=False)
        _, h = train_teacher(name, TinyImages(), cache=cache, epochs=1, batch_size=32, progress=False)
    finally:
        models._REGISTRY.pop(name, None)
        models._FAMILY.pop(name, None)
    assert h.attrs["cached"] is True
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.parent == cache for p in written), written
