"""Unit tests of kaviz.cache: keys, safe names, the atomic writer, the entry hash check, the lock."""
import errno
import fcntl
import json
import os
import re
import threading
import time

import pytest
import torch

from kaviz import cache as kc


def test_fp_signature_names_the_cpu_path_and_the_settings_in_force(monkeypatch):
    for name in kc.FP_ENV:
        monkeypatch.delenv(name, raising=False)
    sig = kc.fp_signature()
    assert sig["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert sig["torch"] == torch.__version__
    assert all(sig[name] is None for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR"))
    before = kc.key("teacher", arch="a")
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    assert kc.fp_signature()["MKL_CBWR"] == "AVX2"
    assert kc.key("teacher", arch="a") != before, "another floating-point path -> another key (issue 11 item 5)"


def test_key_covers_every_part_and_the_environment():
    k = kc.key("teacher", arch="a", settings={"lr": 0.1, "epochs": 2})
    assert re.fullmatch(r"[0-9a-f]{64}", k), "sha256 hex"
    assert k == kc.key("teacher", settings={"epochs": 2, "lr": 0.1}, arch="a"), "order of parts does not matter"
    assert k != kc.key("teacher", arch="a", settings={"lr": 0.2, "epochs": 2})
    assert k != kc.key("source", arch="a", settings={"lr": 0.1, "epochs": 2})
    assert k != kc.key("teacher", device="meta", arch="a", settings={"lr": 0.1, "epochs": 2}), "device type"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert k != kc.key("teacher", arch="a", settings={"lr": 0.1, "epochs": 2}), "thread count"
    finally:
        torch.set_num_threads(threads)
    env = kc.environment_key("cpu")
    assert env["device"] == "cpu" and env["threads"] == threads and env["fp"] == kc.fp_signature()


def test_key_refuses_parts_without_stable_text():
    with pytest.raises(TypeError, match="no stable text for a cache key"):
        kc.key("teacher", schedule=lambda e: e)
    with pytest.raises(TypeError, match="memory address"):
        kc.key("teacher", thing=object())


def test_data_key_is_kaviz_data_fingerprint():
    from kaviz.data import fingerprint

    x = torch.arange(12.0)
    assert kc.data_key(x) == fingerprint(x) and kc.data_key(None) is None
    assert kc.data_key(x) != kc.data_key(x.reshape(3, 4)), "shape is part of the fingerprint"


@pytest.mark.parametrize("name",
                         ["../x", "a/../../b", "..", "../../", "x\0y", "/etc/passwd", "a\\..\\b", ".hidden", ""])
def test_entry_names_never_leave_the_cache_folder(tmp_path, name):
    folder = tmp_path / "cache"
    entry = kc.Cache(folder).entry(name, kc.key("t", name=name))
    for p in (entry.weights, entry.meta, entry.lockfile):
        assert p.parent == folder and "\0" not in p.name and not p.name.startswith(".")
    entry.save({"w": torch.ones(2)}, {"history": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"], "nothing written beside the cache folder"
    assert kc.safe_name(name) not in ("", ".", "..")


def test_write_atomic_uses_a_unique_temporary_name_and_leaves_nothing_behind(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real(src, dst)

    monkeypatch.setattr(kc.os, "replace", spy)
    target = tmp_path / "x.pt"
    assert kc.write_atomic(target, b"abc") == 3
    kc.write_atomic(target, lambda f: f.write(b"defg"))
    assert target.read_bytes() == b"defg"
    assert all(re.fullmatch(rf"x\.pt\.{os.getpid()}\.[0-9a-f]{{12}}\.tmp", s) for s in seen), seen
    assert seen[0] != seen[1], "unique per write, not per process"
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_disk_full_while_writing_names_the_folder_and_the_bytes_and_removes_the_temporary(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kc.os, "fsync", full)
    with pytest.raises(kc.DiskFullError, match=rf"disk is full.*{re.escape(str(tmp_path))}.*\(1000 bytes\)") as err:
        kc.write_atomic(tmp_path / "big.pt", b"x" * 1000)
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert list(tmp_path.iterdir()) == [], "no temporary file and no partial target"


def test_entry_round_trip_holds_the_weights_hash(tmp_path):
    entry = kc.Cache(tmp_path).entry("net", kc.key("t"))
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.int64)}
    meta = entry.save(state, {"history": [{"epoch": 1}]})
    on_disk = json.loads(entry.meta.read_text())
    import hashlib

    assert on_disk["weights_sha256"] == hashlib.sha256(entry.weights.read_bytes()).hexdigest() == meta["weights_sha256"]
    tensors, meta2 = entry.load(required=("history",))
    assert tensors.keys() == state.keys() and all(torch.equal(tensors[k], state[k]) for k in state)
    assert meta2["history"] == [{"epoch": 1}] and meta2["key"] == entry.key


def test_clean_stale_tmp_removes_dead_writers_files_and_keeps_live_ones(tmp_path):
    dead = tmp_path / "a.pt.12345.0123456789ab.tmp"
    dead.write_bytes(b"x" * 100)
    old_style = tmp_path / ".last.pt.4242.tmp"
    old_style.write_bytes(b"")
    live = tmp_path / "b.pt.1.abcdefabcdef.tmp"
    live.write_bytes(b"y")
    keep = tmp_path / "c.pt"
    keep.write_bytes(b"z")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer still at work
        removed = kc.clean_stale_tmp(tmp_path)
    finally:
        os.close(fd)
    assert sorted(p.name for p in removed) == sorted([dead.name, old_style.name])
    assert live.exists() and keep.exists() and not dead.exists() and not old_style.exists()


def test_a_second_caller_waits_for_the_lock_and_reuses_the_result(tmp_path, capsys):
    entry = kc.Cache(tmp_path).entry("net", kc.key("t"))
    calls = []
    started = threading.Event()

    def compute(tag):
        def run():
            calls.append(tag)
            started.set()  # the first caller holds the entry's lock from here on
            time.sleep(0.3)
            return tag, {"w": torch.ones(1)}, {"history": [], "by": tag}
        return run

    results = {}

    def worker(tag):
        results[tag] = kc.get_or_compute(kc.Cache(tmp_path).entry("net", entry.key), compute(tag),
                                         lambda t, m: m["by"], required=("history",))

    first = threading.Thread(target=worker, args=("first",))
    first.start()
    assert started.wait(10)
    worker("second")
    first.join()
    assert calls == ["first"], "computed once"
    assert results["first"][2] is False and results["second"] == ("first", results["second"][1], True)
    assert "waiting for it" in capsys.readouterr().out
