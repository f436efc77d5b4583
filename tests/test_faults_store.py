"""Fault tests of on-disk feature stores (issue 14): re-extraction over an open store, a kill during
extraction, two processes on one store, shuffled loaders, truncated / altered / escaping files.

Each test names the defect of issue 14 it guards against; each fails on the code before the fix.
Subprocess tests are bounded: a child that does not reach its checkpoint in time fails the test.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kaviz.features import CorruptStoreError, FeatureStore, extract

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
N = 40
LAYER = "1:in"  # the flattened input of the linear layer


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 2))


class Data(torch.utils.data.Dataset):
    """Fixed images; optionally slow per item, touching ``marker`` when item ``mark_at`` is read."""

    fingerprint = "faults-store-data-v1"

    def __init__(self, delay=0.0, marker=None, mark_at=None):
        self.x = torch.rand(N, 3, 4, 4, generator=torch.Generator().manual_seed(7))
        self.y = torch.arange(N) % 2
        self.delay, self.marker, self.mark_at = delay, marker, mark_at

    def __len__(self):
        return N

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        if self.marker and i == self.mark_at:
            Path(self.marker).touch()
        return self.x[i], self.y[i]


def counted(model):
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def child(code: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}", CI="1", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE")
    prelude = "import torch; torch.set_num_threads(1)\nfrom test_faults_store import *\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(pred, proc, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"child did not reach {what} within {timeout} s")
        time.sleep(0.01)


# ---------------------------------------------------------------------------- defect 1: re-extraction
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_defect1_reextracting_into_an_open_store_leaves_the_earlier_store_unchanged(tmp_path, monkeypatch, exchange):
    import kaviz.features as kf
    from kaviz.models import weights_hash

    if not exchange:  # the fallback where renameat2(RENAME_EXCHANGE) is not available
        monkeypatch.setattr(kf, "_exchange", lambda a, b: False)

    a, b, data, s = make_model(0), make_model(1), Data(), tmp_path / "s"
    expected_a = extract(a, data, LAYER)[LAYER].copy()
    sa = extract(a, data, [LAYER, "3"], store=s, batch_size=16)
    sb = extract(b, data, [LAYER, "3"], store=s, batch_size=16)
    assert np.array_equal(sa[LAYER], expected_a), "the earlier store must keep A's features"
    assert sa.meta["weights"] == weights_hash(a) and sb.meta["weights"] == weights_hash(b)
    assert not np.array_equal(sb["3"], sa["3"])
    assert np.array_equal(FeatureStore.open(s)["3"], sb["3"])
    assert sorted(os.listdir(tmp_path)) == [".s.lock", "s"], "no temporary folder is left behind"


def test_defect1_kill_during_a_second_extraction_keeps_the_complete_store(tmp_path):
    s, marker = tmp_path / "s", tmp_path / "busy"
    a = make_model(0)
    sa = extract(a, Data(), LAYER, store=s, batch_size=8)
    expected = np.array(sa[LAYER])
    proc = child(f"""
        extract(make_model(1), Data(delay=0.03, marker={str(marker)!r}, mark_at=20), {LAYER!r},
                store={str(s)!r}, batch_size=8)
        print("finished")
    """)
    try:
        wait_for(marker.exists, proc, "the middle of the extraction")
        assert list(tmp_path.glob(".s.tmp-*/*.npy")), "the second extraction writes into a sibling folder"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert "finished" not in proc.stdout.read()
    again = FeatureStore.open(s)  # complete, and every file matches its hash
    assert np.array_equal(again[LAYER], expected) and np.array_equal(sa[LAYER], expected)
    calls = counted(a)
    reused = extract(a, Data(), LAYER, store=s, batch_size=8)
    assert not calls and np.array_equal(reused[LAYER], expected)
    assert not list(tmp_path.glob(".s.tmp-*")), "the killed extraction's temporary folder is cleaned"


def test_defect1_a_kill_between_the_two_renames_is_repaired(tmp_path):
    """Where the atomic exchange is unavailable, the old store is renamed away before the new one moves
    in; a kill between the two renames leaves ``.s.old-*`` and no ``s``: the next extraction restores it."""
    s = tmp_path / "s"
    a = make_model(0)
    expected = np.array(extract(a, Data(), LAYER, store=s)[LAYER])
    os.rename(s, tmp_path / ".s.old-123-abcd")
    calls = counted(a)
    back = extract(a, Data(), LAYER, store=s)
    assert not calls and np.array_equal(back[LAYER], expected)
    assert sorted(os.listdir(tmp_path)) == [".s.lock", "s"]


def test_defect1_open_during_a_concurrent_swap_reads_one_consistent_store(tmp_path, monkeypatch):
    """A reader that has read meta.json when another process swaps a new store in (and deletes the old
    one) must not mix generations nor fail: it reads the new store whole."""
    s, t = tmp_path / "s", tmp_path / "t"
    extract(make_model(0), Data(), LAYER, store=s)
    new = extract(make_model(1), Data(), ["3"], store=t)
    real = FeatureStore._read_meta.__func__
    swapped = []

    def read_then_swap(cls, path, dfd):
        meta = real(cls, path, dfd)
        if not swapped:  # what a concurrent extract() does between our reads
            os.rename(s, tmp_path / "gone")
            os.rename(t, s)
            for f in (tmp_path / "gone").iterdir():
                f.unlink()
            swapped.append(1)
        return meta

    monkeypatch.setattr(FeatureStore, "_read_meta", classmethod(read_then_swap))
    got = FeatureStore.open(s)
    assert swapped and got.layers == ["3"] and got.meta["meta_sha256"] == new.meta["meta_sha256"]
    assert np.array_equal(got["3"], new["3"])


def test_defect1_a_folder_holding_other_files_is_never_replaced(tmp_path):
    s = tmp_path / "mine"
    s.mkdir()
    (s / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt.*new or empty folder"):
        extract(make_model(0), Data(), LAYER, store=s)
    assert (s / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX) to simulate a full disk")
def test_defect11_full_disk_names_the_store_and_keeps_the_earlier_one(tmp_path):
    """A full disk, simulated portably (no root, no tmpfs mount) by a 4 KB file-size limit in a child:
    writes fail with EFBIG exactly where ENOSPC would."""
    s = tmp_path / "s"
    expected = np.array(extract(make_model(0), Data(), LAYER, store=s)[LAYER])  # 7.8 KB of features
    proc = child(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            extract(make_model(1), Data(), {LAYER!r}, store={str(s)!r}, batch_size=8)
        except OSError as e:
            print("ERROR", e)
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "ERROR" in out and "no room to write the feature store" in out and str(s) in out, out
    assert np.array_equal(FeatureStore.open(s)[LAYER], expected)
    assert sorted(os.listdir(tmp_path)) == [".s.lock", "s"], "the partial store is removed"


# --------------------------------------------------------------------- defect 8: two processes, one store
def test_defect8_two_processes_extracting_one_store_compute_it_once(tmp_path):
    s, go = tmp_path / "s", tmp_path / "go"
    code = f"""
        import json, sys, time
        from pathlib import Path
        model = make_model(0)
        calls = counted(model)
        print("ready", flush=True)
        while not Path({str(go)!r}).exists():
            time.sleep(0.002)
        st = extract(model, Data(delay=0.02), [{LAYER!r}, "3"], store={str(s)!r}, batch_size=8)
        print(json.dumps({{"calls": len(calls), "sum": float(np.asarray(st["3"], dtype=np.float64).sum()),
                          "meta": st.meta["meta_sha256"]}}))
    """
    procs = [child(code), child(code)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        go.touch()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err[-2000:]
            outs.append((json.loads(out.strip().splitlines()[-1]), err))
    finally:
        for p in procs:
            p.kill()
    results = [o for o, _ in outs]
    assert sorted(r["calls"] for r in results) == [0, N // 8], "one process computes, the other reuses its store"
    assert results[0]["sum"] == results[1]["sum"] and results[0]["meta"] == results[1]["meta"]
    assert any("waiting" in err for _, err in outs), "the second process waited for the lock"
    expected = extract(make_model(0), Data(), "3")["3"]
    assert np.allclose(FeatureStore.open(s)["3"], expected, atol=1e-6)


# -------------------------------------------------------------------------- defect 4: shuffled loaders
def test_defect4_shuffled_loader_is_refused_and_nothing_is_written(tmp_path):
    data, m = Data(), make_model(0)
    shuffled = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=True.*pass the dataset itself|RandomSampler.*dataset itself"):
        extract(m, shuffled, LAYER, store=tmp_path / "s")
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="SubsetRandomSampler"):
        extract(m, torch.utils.data.DataLoader(data, sampler=torch.utils.data.SubsetRandomSampler(range(N))), LAYER)
    in_order = extract(m, torch.utils.data.DataLoader(data, batch_size=8, shuffle=False), LAYER, store=tmp_path / "s")
    assert np.array_equal(in_order.targets, data.y.numpy())
    assert np.allclose(in_order[LAYER], data.x.flatten(1).numpy())


# ------------------------------------------------------------ defects 6 and 12: corrupt and escaping stores
@pytest.fixture
def store(tmp_path):
    s = tmp_path / "s"
    extract(make_model(0), Data(), [LAYER, "3"], store=s, batch_size=16)
    return s


def recompute_after_warning(s, match):
    m = make_model(0)
    calls = counted(m)
    with pytest.warns(UserWarning, match=match):
        healed = extract(m, Data(), [LAYER, "3"], store=s, batch_size=16)
    assert len(calls) == N // 16 + 1, "the corrupt store is recomputed"
    assert np.allclose(healed["3"], extract(make_model(0), Data(), "3")["3"], atol=1e-6)
    FeatureStore.open(s)  # and now passes every check


def rewrite_meta(s, **changes):
    """Change meta.json and re-sign it the way kaviz does, so only the other checks can catch it."""
    meta = json.loads((s / "meta.json").read_text())
    meta.update(changes)
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    meta["meta_sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (s / "meta.json").write_text(json.dumps(meta))


def test_defect6_truncated_npy_is_reported_by_path_and_recomputed(store):
    f = store / "layer__3.npy"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 8)
    with pytest.raises(CorruptStoreError, match=r"layer__3\.npy.*truncated"):
        FeatureStore.open(store)
    recompute_after_warning(store, r"layer__3\.npy")


def test_defect6_altered_npy_of_the_same_size_is_caught_by_its_hash(store):
    f = store / "layer__1_in.npy"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x10
    f.write_bytes(bytes(raw))
    FeatureStore.open(store, verify=False)  # the size still matches ...
    with pytest.raises(CorruptStoreError, match=r"layer__1_in\.npy.*sha256"):
        FeatureStore.open(store)  # ... the hash does not
    recompute_after_warning(store, r"layer__1_in\.npy")


@pytest.mark.parametrize("text, match", [("{not json", "not valid JSON"), ('["a list"]', "JSON object"),
                                         (None, "altered")])
def test_defect6_invalid_or_altered_meta_json_is_reported_and_recomputed(store, text, match):
    meta_file = store / "meta.json"
    if text is None:  # an edit that keeps valid JSON: another layer list
        meta = json.loads(meta_file.read_text())
        meta["layers"] = ["3", LAYER]
        text = json.dumps(meta)
    meta_file.write_text(text)
    with pytest.raises(CorruptStoreError, match=match) as err:
        FeatureStore.open(store)
    assert str(meta_file) in str(err.value)
    recompute_after_warning(store, "meta.json")


def test_defect6_store_without_hashes_from_an_older_kaviz_is_recomputed_quietly(store):
    meta = json.loads((store / "meta.json").read_text())
    meta["files"] = list(meta["files"])
    for k in ("format", "meta_sha256"):
        meta.pop(k)
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptStoreError, match="older kaviz"):
        FeatureStore.open(store)
    m = make_model(0)
    calls = counted(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stale like a store of other weights, not corrupt: no warning
        extract(m, Data(), [LAYER, "3"], store=store, batch_size=16)
    assert len(calls) == N // 16 + 1
    assert FeatureStore.open(store).meta["format"] == 2


@pytest.mark.parametrize("entry", ["../outside", "/tmp/outside", "..", "a/../../outside"])
def test_defect12_file_entry_outside_the_store_folder_is_refused(store, entry):
    outside = store.parent / "outside.npy"
    np.save(outside, np.zeros((N, 48), np.float32))
    raw = outside.read_bytes()
    meta = json.loads((store / "meta.json").read_text())
    files = meta["files"]
    if isinstance(files, list):  # the format before content hashes: a list of names
        files = files + [entry]
    else:
        files = {**files, entry: {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}}
    rewrite_meta(store, files=files)
    with pytest.raises(CorruptStoreError, match="refusing to read outside"):
        FeatureStore.open(store)
    recompute_after_warning(store, "not a plain name")


def test_defect12_symlinked_npy_is_refused(store):
    f = store / "layer__3.npy"
    target = store.parent / "elsewhere.npy"
    os.rename(f, target)
    os.symlink(target, f)
    with pytest.raises(CorruptStoreError, match=r"layer__3\.npy.*not a plain file"):
        FeatureStore.open(store)
    recompute_after_warning(store, "not a plain file")
