"""kaviz.compare: recipes, networks by source, controls, figures and the NetworkPicker (headless)."""
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from kaviz import compare, models, runs


@pytest.fixture(autouse=True)
def _registry(tmp_path, monkeypatch):
    monkeypatch.setenv("KAVIZ_DATA", str(tmp_path))
    torch.set_num_threads(1)
    return tmp_path


class Images(torch.utils.data.Dataset):
    def __init__(self, n=40, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.targets = torch.rand(n, 3, size, size, generator=g), torch.arange(n) % 4
        self.fingerprint = f"images-{n}-{size}-{seed}"

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def test_recipes_name_three_papers_students_and_teachers():
    papers = {compare.recipe(n).paper for n in compare.RECIPES}
    assert papers == {"cfl", "lshfm", "born_again"}
    r = compare.recipe("cfl-student-seed7")
    assert (r.role, r.seed, r.method) == ("student", 7, "CFL")
    assert compare.recipe("ba-gen1-seed2").seed == 2 and compare.recipe("ba-gen0").role == "teacher"
    for student, teachers in compare.TEACHERS.items():
        assert all(compare.recipe(t).role == "teacher" for t in teachers)
        assert compare.recipe(f"{student}-seed0").paper == compare.recipe(next(iter(teachers))).paper
    with pytest.raises(KeyError, match="kaviz.compare.RECIPES"):
        compare.recipe("cfl-studnet-seed0")
    # different seeds are different recipes (keys), the same name the same key
    assert compare.recipe("lshfm-student-seed0").key != compare.recipe("lshfm-student-seed1").key
    assert compare.recipe("lshfm-student-seed0").key == compare.recipe("lshfm-student-seed0").key


def test_network_from_each_source(tmp_path):
    torch.manual_seed(0)
    m = models.build("cifar_resnet8", 3, width=4)
    runs.register("mine", m, paper="test")
    assert compare.network("registry", "mine").kaviz_run["paper"] == "test"
    tv = compare.network("torchvision", "squeezenet1_1", num_classes=5, seed=1)
    assert tv(torch.rand(1, 3, 64, 64)).shape == (1, 5) and not tv.training
    again = compare.network("torchvision", "squeezenet1_1", num_classes=5, seed=1)
    assert models.weights_hash(tv) == models.weights_hash(again)
    path = tmp_path / "w.pt"
    torch.save(m.state_dict(), path)
    ck = compare.network("checkpoint", str(path), num_classes=3, arch="cifar_resnet8", arch_kwargs={"width": 4})
    assert models.weights_hash(ck) == models.weights_hash(m)
    with pytest.raises(ValueError, match="say which architecture"):
        compare.network("checkpoint", str(path), num_classes=3)
    with pytest.raises(runs.RunNotFoundError, match="not a default recipe"):
        compare.network("registry", "nobody")
    with pytest.raises(ValueError, match="source must be"):
        compare.network("hub", "resnet18", num_classes=3)


def test_random_like_rebuilds_the_architecture_with_fresh_weights():
    from kaviz.methods import lshfm

    torch.manual_seed(0)
    student = lshfm.adapt(models.build("vgg8_small", 5, width=4), 12)
    runs.register("lsh", student)
    loaded = runs.load("lsh")
    a, b = compare.random_like(loaded, seed=3), compare.random_like(loaded, seed=3)
    assert list(a.state_dict()) == list(loaded.state_dict())  # adaptation layer included
    assert models.weights_hash(a) == models.weights_hash(b) != models.weights_hash(loaded)
    plain = models.build("cifar_resnet8", 3, width=4)
    assert list(compare.random_like(plain).state_dict()) == list(plain.state_dict())
    with pytest.raises(ValueError, match="not built by kaviz"):
        compare.random_like(torch.nn.Linear(2, 2))


def test_control_table_a_copy_beats_its_controls_and_an_unrelated_network_does_not():
    torch.manual_seed(0)
    teacher = models.build("cifar_resnet8", 4, width=4).eval()
    ds = Images(n=64)
    import copy

    students = {0: copy.deepcopy(teacher), 1: copy.deepcopy(teacher)}
    t = compare.control_table(students, teacher, ds, "layer2", "layer2")
    assert list(t.columns) == ["network", "random-init", "shuffled"] and list(t.index) == [0, 1]
    assert (t["network"] > 0.99).all() and (t["shuffled"].abs() < 0.2).all()
    assert (t["network"] > t["random-init"] + 0.1).all()
    torch.manual_seed(5)
    unrelated = {0: models.build("cifar_resnet8", 4, width=4).eval()}
    u = compare.control_table(unrelated, teacher, ds, "layer2", "layer2")
    # the control case: an unrelated network of the same architecture is no closer than a random-init one
    assert abs(u.loc[0, "network"] - u.loc[0, "random-init"]) < 0.25


def test_figures():
    df = pd.DataFrame([[1.0, 0.2], [0.3, np.nan]], index=pd.Index(["a1", "a2"], name="A"),
                      columns=pd.Index(["b1", "b2"], name="B"))
    fig = compare.cka_heatmap(df, title="t")
    assert isinstance(fig, go.Figure) and fig.data[0].text[1][1] == "—"
    probe = pd.DataFrame({"accuracy": [0.5, 0.8], "std": [0.1, 0.05], "chance": [0.25, 0.25],
                          "shuffled": [0.2, 0.25]}, index=pd.Index(["l1", "l2"], name="layer"))
    fig = compare.probe_curves({"student": probe, "teacher": probe})
    assert [t.name for t in fig.data] == ["student", "student, shuffled labels", "teacher", "teacher, shuffled labels"]
    table = pd.DataFrame({"share order 0": [0.5, 0.1], "share order 1": [0.1, 0.0], "share g(x_A)": [0.6, 0.1],
                          "share x^Δ": [0.4, 0.9]}, index=["t", "random-init t"])
    fig = compare.consistency_bars(table)
    assert [t.name for t in fig.data] == ["order 0", "order 1", "x^Δ"]


def _picker(**kw):
    torch.manual_seed(0)
    nets = {"a-net": models.build("cifar_resnet8", 4, width=4), "b-net": models.build("vgg8_small", 4, width=4)}
    calls = []

    def load(source, name, arch):
        if name not in nets:
            raise KeyError(f"no network {name!r}")
        return nets[name]

    def compute(a, b, la, lb):
        calls.append((la, lb))
        return pd.DataFrame(np.full((len(la), len(lb)), 0.5), index=la, columns=lb)

    p = compare.NetworkPicker(Images(), networks={"a": "a-net", "b": "b-net"}, registry=list(nets), load=load,
                              compute=compute, **kw)
    return p, calls


def test_network_picker_fills_layers_and_draws_the_heatmap():
    p, calls = _picker(max_layers=2)
    assert p.layers("a") == list(models.stages(p.models["a"]))[-2:]
    assert len(calls) == 1 and p.result.shape == (2, 2)
    fig = p.figure()
    assert isinstance(fig, go.Figure) and fig.data[0].type == "heatmap" and "a-net" in fig.layout.title.text
    p.sides["a"]["layers"].value = tuple(models.stages(p.models["a"])[:1])
    p.button.click()
    assert len(calls) == 2 and p.result.shape == (1, 2) and len(p.figure().data[0].y) == 1


def test_network_picker_reports_errors_and_keeps_the_last_result():
    p, _ = _picker()
    before = p.figure()
    p.sides["b"]["name"].value = "missing"
    assert "no network" in p.status.value and p.models["b"] is not None
    p.sides["a"]["layers"].value = ()
    assert p.run() is False and "at least one layer" in p.status.value
    assert np.array_equal(np.asarray(p.figure().data[0].z), np.asarray(before.data[0].z))
    with pytest.raises(ValueError, match="networks must name side"):
        compare.NetworkPicker(Images(), networks={"a": "a-net"}, registry=[], load=lambda *a: None,
                              compute=lambda *a: None)


def test_network_picker_default_compute_is_the_cka_matrix():
    torch.manual_seed(0)
    net = models.build("cifar_resnet8", 4, width=4)
    p = compare.NetworkPicker(Images(n=32), networks={"a": "x", "b": "x"}, registry=[], load=lambda *a: net,
                              batch_size=16, max_layers=2)
    diag = np.diag(p.result.loc[p.layers("a"), p.layers("b")].to_numpy())
    np.testing.assert_allclose(diag, 1.0, atol=1e-9)  # a network with itself: CKA 1 on the diagonal
    assert "N = 32" in p.status.value


def _cfl_default_settings():
    import copy

    return copy.deepcopy({"source": "embedded", **compare.PAPERS["cfl"]})


def test_a_network_registered_by_a_paper_notebook_is_obtained_without_training(monkeypatch):
    """The registration cell of the CFL notebook: its student of seed 0 under the recipe's name and key
    (settings equal to PAPERS) is what compare.obtain returns — the train function is never called."""
    def never(*a, **k):
        raise AssertionError("compare.obtain trained a network the notebook had registered")

    torch.manual_seed(3)
    s = compare.PAPERS["cfl"]["student"]
    student = models.build(s["arch"], 20, **s["arch_kwargs"])
    kd = models.build(s["arch"], 20, **s["arch_kwargs"])
    table = compare.register_paper("cfl", {
        "cfl-student-seed0": dict(model=student, method="CFL", seed=0, metrics={"ignored": 1.0}),
        "cfl-kd-student-seed0": dict(model=kd, method="KD", seed=0, metrics={"test task_agnostic": 0.5}),
    }, settings=_cfl_default_settings())
    assert list(table.index) == ["cfl-student-seed0", "cfl-kd-student-seed0"]
    assert list(table.columns) == compare.STABLE_COLUMNS[1:]
    assert table.loc["cfl-student-seed0", "params"] == sum(v.numel() for v in student.state_dict().values())
    monkeypatch.setattr(compare, "_cfl_student", never)
    got = compare.obtain("cfl-student-seed0")
    assert models.weights_hash(got) == models.weights_hash(student)
    # the record is the one obtain itself would write: recipe fields, metrics by the recipe's evaluate
    rec = got.kaviz_run
    assert (rec["paper"], rec["method"], rec["seed"]) == ("cfl", "CFL", 0)
    assert {"test task_agnostic", "test task_aware"} <= set(rec["metrics"]) and "ignored" not in rec["metrics"]
    assert runs.info("cfl-kd-student-seed0")["metrics"] == {"test task_agnostic": 0.5}
    # the other seed was not registered: obtain would train it (the train function is reached)
    with pytest.raises(AssertionError, match="trained a network"):
        compare.obtain("cfl-student-seed1")


def test_a_notebook_run_with_other_settings_never_passes_for_the_default(monkeypatch):
    torch.manual_seed(0)
    s = compare.PAPERS["cfl"]["student"]
    student = models.build(s["arch"], 20, **s["arch_kwargs"])
    other = _cfl_default_settings()
    other["settings"]["epochs"] = 1  # e.g. a QUICK run
    table = compare.register_paper("cfl", {"cfl-student-seed0": dict(model=student, method="CFL", seed=0)},
                                   settings=other)
    (name,) = table.index
    assert re.fullmatch(r"cfl-student-seed0-[0-9a-f]{8}", name) and not runs.exists("cfl-student-seed0")
    again = compare.register_paper("cfl", {"cfl-student-seed0": dict(model=student)}, settings=other)
    assert list(again.index) == [name]  # the same settings: the same name
    calls = []
    monkeypatch.setattr(compare, "_cfl_student", lambda seed: (calls.append(seed), student)[1])
    compare.obtain("cfl-student-seed0")
    assert calls == [0]
    # a paper without defaults in PAPERS keeps its names; bad input is explained
    t = compare.register_paper("layerwise", {"layerwise-teacher-0": dict(model=student, method="supervised")},
                               settings={"epochs": 2})
    assert list(t.index) == ["layerwise-teacher-0"] and runs.info("layerwise-teacher-0")["paper"] == "layerwise"
    with pytest.raises(ValueError, match="non-empty dict"):
        compare.register_paper("cfl", {}, settings=other)
    with pytest.raises(ValueError, match="must be a dict with 'model'"):
        compare.register_paper("cfl", {"x": student}, settings=other)
    with pytest.raises(ValueError, match="not a key of kaviz.compare.PAPERS"):
        compare.register_paper("kc", {"x": dict(model=student)}, settings=other, defaults="kc")


def test_born_again_students_are_the_knowledge_consistency_notebooks_chains():
    p = compare.PAPERS["born_again"]
    # seed s is the chain the KC notebook seeds BA_SEED + 100 * s (BA_SEED = 100)
    assert [p["first_seed"] + p["chain_step"] * s for s in range(3)] == [100, 200, 300]


def test_make_runs_every_notebook_once_with_the_comparison_notebook_last():
    """`make notebooks`/`portability`/`test` run the paper notebooks first: they register the networks the
    comparison notebook then loads instead of training them."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "notebooks", "portability", "VENV=/nonexistent"], cwd=repo,
                         capture_output=True, text=True, timeout=30).stdout
    every = sorted(p.relative_to(repo).as_posix() for p in (repo / "notebooks").glob("*.ipynb"))
    passes = [[w for w in line.split() if w.endswith(".ipynb")] for line in out.splitlines() if "--nbval" in line]
    assert len(passes) == 2
    for listed in passes:
        assert sorted(listed) == every and listed[-1] == "notebooks/compare_networks.ipynb"


class _Pictures(Images):
    def image_array(self, i):
        return (self.x[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def test_joint_maps_drive_the_embedding_explorer_select_switch_recompute_and_static_figures():
    """The comparison notebook's explorer: two panels (student, teacher) of the same images, linked by image."""
    from kaviz.widgets import EmbeddingExplorer

    torch.manual_seed(0)
    a, b = models.build("cifar_resnet8", 4, width=4).eval(), models.build("vgg8_small", 4, width=4).eval()
    data = {"P": _Pictures(n=40), "Q": _Pictures(n=32, seed=1)}
    labels = {p: np.asarray(d.targets) for p, d in data.items()}
    # P: layers of different widths (one map each); Q: the same network twice at one layer (one joint map)
    maps = compare.JointMaps({"P": (a, b, [("layer3", "features.20"), ("layer2", "features.14")]),
                              "Q": (a, a, [("layer3", "layer3")])}, data, labels)
    assert maps.layers() == {"P": ["layer3 | features.20", "layer2 | features.14"], "Q": ["layer3 | layer3"]}
    ex = EmbeddingExplorer(maps, models=["P", "Q"], layers=maps.layers(), images=maps.image, methods=("pca", "tsne"),
                           titles=("student", "teacher"))
    assert not ex.status.value.startswith("⚠") and len(ex.results) == 2
    assert [len(r) for r in ex.results] == [40, 40] and maps.current == "P"
    ex.select([3, 5])
    assert ex.selection == [3, 5]
    first = [f.data for f in ex.static_figures()]
    ex.layer_dd.value = "layer2 | features.14"  # another layer pair: recomputed, the selection kept
    assert not ex.status.value.startswith("⚠") and ex.selection == [3, 5]
    assert len(ex.static_figures()) == 2 and ex.static_figures()[0].data != first[0]
    ex.model_dd.value = "Q"  # another pair: its own images; one joint map of both networks
    assert maps.current == "Q" and [len(r) for r in ex.results] == [32, 32] and not ex.status.value.startswith("⚠")
    assert maps.image(0).shape == (16, 16, 3)
    s, t = ex.results
    np.testing.assert_allclose(s[["x", "y"]].to_numpy(), t[["x", "y"]].to_numpy(), atol=1e-6)  # a with itself
    assert ex.recompute() and all(isinstance(f, go.Figure) for f in ex.static_figures())


def test_network_picker_switches_a_network_and_recomputes():
    p, calls = _picker(max_layers=2)
    p.sides["b"]["name"].value = "a-net"  # side B becomes the other network: its layers, then the button
    assert p.models["b"] is p.models["a"] and p.layers("b") == list(models.stages(p.models["a"]))[-2:]
    assert p.run() and calls[-1] == (p.layers("a"), p.layers("b")) and "a-net" in p.figure().layout.title.text
