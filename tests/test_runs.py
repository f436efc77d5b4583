"""kaviz.runs: register, list and load trained networks by name."""
import json

import pytest
import torch

from kaviz import models, runs


@pytest.fixture(autouse=True)
def _registry(tmp_path, monkeypatch):
    monkeypatch.setenv("KAVIZ_DATA", str(tmp_path))
    return tmp_path / "runs"


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_register_list_and_load_round_trip(_registry):
    torch.manual_seed(0)
    student = models.build("cifar_resnet8", 10, width=4)
    with torch.no_grad():
        student(torch.rand(4, 3, 16, 16))  # batch-norm statistics are part of the run (train mode)
    rec = runs.register("cfl-student-seed0", student, paper="cfl", method="CFL", seed=0, data="shapes-96",
                        metrics={"accuracy": 0.8})
    assert rec["arch"] == "cifar_resnet8" and rec["arch_kwargs"] == {"width": 4} and rec["num_classes"] == 10
    assert (_registry / "cfl-student-seed0" / "weights.pt").exists()
    loaded = runs.load("cfl-student-seed0")
    assert _same(loaded, student) and not loaded.training and loaded.kaviz_run["paper"] == "cfl"
    x = torch.rand(3, 3, 16, 16)
    student.eval()
    torch.testing.assert_close(loaded(x), student(x), rtol=0, atol=0)
    # the weights file is a plain state dict that loads with weights_only=True
    state = torch.load(_registry / "cfl-student-seed0" / "weights.pt", weights_only=True)
    assert set(state) == set(student.state_dict())

    runs.register("kd-teacher", models.build("vgg8_small", 10), paper="kd", method="teacher", seed=1)
    df = runs.list()
    assert list(df.columns[:7]) == ["name", "paper", "method", "arch", "seed", "data", "metrics"]
    assert df["name"].tolist() == ["cfl-student-seed0", "kd-teacher"]
    assert df.set_index("name").loc["cfl-student-seed0", "metrics"] == {"accuracy": 0.8}
    assert runs.list(paper="kd")["name"].tolist() == ["kd-teacher"]
    assert runs.exists("kd-teacher") and not runs.exists("kd-teacher2")


def test_torchvision_models_and_checkpoints_register_the_same_way(tmp_path):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.squeezenet1_1(weights=None, num_classes=5)
    runs.register("tv-squeezenet", tv, arch="squeezenet1_1", num_classes=5, paper="torchvision")
    assert _same(runs.load("tv-squeezenet"), tv)
    with pytest.raises(ValueError, match="say which architecture"):
        runs.register("anonymous", tv)  # not built by kaviz: the architecture must be named
    with pytest.raises(models.ArchitectureMismatchError, match="does not fit"):
        runs.register("wrong-arch", tv, arch="squeezenet1_0", num_classes=5)
    assert not runs.exists("wrong-arch")  # nothing is written for a run that could not be loaded

    m = models.build("cifar_resnet8", 3, width=4)
    path = tmp_path / "mine.pt"
    torch.save(m.state_dict(), path)
    runs.register_checkpoint("mine", path, "cifar_resnet8", num_classes=3, arch_kwargs={"width": 4}, method="mine")
    assert _same(runs.load("mine"), m) and runs.info("mine")["method"] == "mine"
    torch.save({"model": m.state_dict(), "epoch": 3}, path)  # a kaviz checkpoint
    runs.register_checkpoint("mine-ckpt", path, "cifar_resnet8", num_classes=3, arch_kwargs={"width": 4})
    assert _same(runs.load("mine-ckpt"), m)


def test_names_are_validated_and_unknown_names_suggest_close_ones(_registry):
    m = models.build("cifar_resnet8", 3, width=4)
    for bad in ["../escape", "a/b", "", ".hidden", "a..b", "x" * 200, None, "/abs"]:
        with pytest.raises(ValueError, match="not allowed"):
            runs.register(bad, m)
    assert not any(_registry.parent.glob("escape*"))
    runs.register("lshfm-student-seed0", m)
    with pytest.raises(KeyError, match="Did you mean 'lshfm-student-seed0'"):
        runs.load("lshfm-student-sed0")
    with pytest.raises(runs.RunNotFoundError, match="kaviz.runs.list"):
        runs.info("nothing-like-it")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        runs.register("lshfm-student-seed0", m, overwrite=False)
    runs.remove("lshfm-student-seed0")
    assert runs.list().empty and not (_registry / "lshfm-student-seed0").exists()
    with pytest.raises(TypeError, match="JSON"):
        runs.register("bad-metrics", m, metrics={"model": m})


def test_a_tampered_or_half_written_run_is_caught(_registry):
    m = models.build("cifar_resnet8", 3, width=4)
    runs.register("r", m)
    other = models.build("cifar_resnet8", 3, width=4)
    torch.save(other.state_dict(), _registry / "r" / "weights.pt")
    with pytest.raises(ValueError, match="do not match its record"):
        runs.load("r")
    (_registry / "half").mkdir()
    torch.save(m.state_dict(), _registry / "half" / "weights.pt")  # weights without a record: not a run
    assert runs.list()["name"].tolist() == ["r"]
    rec = json.loads((_registry / "r" / "run.json").read_text())
    assert rec["format"] == "kaviz-run-2" and len(rec["weights_sha256"]) == 64
