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


def test_ensure_trains_once_then_loads_and_retrains_when_the_recipe_changes(_registry):
    calls = []

    def train():
        calls.append(1)
        torch.manual_seed(len(calls))
        return models.build("cifar_resnet8", 3, width=4), {"accuracy": 0.5}

    a = runs.ensure("demo-student", train, key={"epochs": 1}, paper="demo", method="KD", seed=0)
    assert len(calls) == 1 and a.kaviz_run["metrics"] == {"accuracy": 0.5} and not a.training
    b = runs.ensure("demo-student", train, key={"epochs": 1}, paper="demo", method="KD", seed=0)
    assert len(calls) == 1 and _same(a, b)  # loaded, not retrained
    c = runs.ensure("demo-student", train, key={"epochs": 2}, paper="demo", method="KD", seed=0)
    assert len(calls) == 2 and not _same(a, c)  # another recipe: trained again and replaced
    assert runs.info("demo-student")["key"] != a.kaviz_run["key"]
    # the key holds the floating-point environment: another thread count is another run
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        runs.ensure("demo-student", train, key={"epochs": 2})
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3
    with pytest.raises(TypeError, match="not an nn.Module"):
        runs.ensure("demo-bad", lambda: "a model", key=1)
    assert not runs.exists("demo-bad")
    with pytest.raises(TypeError, match="train_fn must be a function"):
        runs.ensure("demo-bad", None)


def test_ensure_retrains_a_damaged_run(_registry):
    calls = []

    def train():
        calls.append(1)
        return models.build("cifar_resnet8", 3, width=4)

    runs.ensure("demo", train, key="k")
    torch.save({"conv1.weight": torch.zeros(1)}, _registry / "demo" / "weights.pt")  # changed after registering
    with pytest.warns(UserWarning, match="training it again"):
        runs.ensure("demo", train, key="k")
    assert len(calls) == 2 and runs.load("demo") is not None


def test_an_adapted_lshfm_student_registers_and_loads_with_its_adaptation_layer(_registry):
    from kaviz.methods import lshfm

    torch.manual_seed(0)
    student = lshfm.adapt(models.build("vgg8_small", 5, width=4), 24)
    rec = runs.register("lsh-student", student, paper="lshfm", method="lshl2")
    assert rec["arch"] == "vgg8_small" and rec["arch_kwargs"] == {"width": 4}
    assert rec["adaptations"] == {"adaptation": ["fc", 24]}
    loaded = runs.load("lsh-student")
    assert _same(loaded, student) and lshfm.adapted_layer(loaded) == "fc.feat_fc"
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), student.eval()(x), rtol=0, atol=0)
    record = json.loads((_registry / "lsh-student" / "run.json").read_text())
    record["adaptations"] = {"pruned": [1]}
    (_registry / "lsh-student" / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="kaviz.runs.ADAPTERS"):
        runs.load("lsh-student")


def test_a_multi_head_network_of_customize_registers_and_loads(_registry):
    from kaviz.methods.customize import MultiHead

    torch.manual_seed(0)
    net = MultiHead("cifar_resnet8", ["smiling", "young"], width=4)
    rec = runs.register("customize-source-0", net, paper="customize", method="selective learning")
    assert rec["arch"] == "multihead:cifar_resnet8" and rec["num_classes"] == 2
    back = runs.load("customize-source-0")
    assert isinstance(back, MultiHead) and back.attributes == ["smiling", "young"] and _same(back, net)
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(back(x), net.eval()(x))
