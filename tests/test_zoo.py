"""The zoo of pretrained backbones (kaviz.models.zoo, build(..., pretrained=True), scripts/build_zoo.py)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from kaviz import pretrain
from kaviz.models import available, build, weights_hash, zoo

SMALL = ("vgg8_small", {"width": 4})


def _tiny_recipe(arch):
    r = pretrain.default_recipe(arch)
    return dict(r, n_train=192, n_val=64, epochs=2, batch_size=64, patience=1)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("zoo")
    entry = pretrain.build_entry(*SMALL, _tiny_recipe(SMALL[0]), out_dir=folder)
    return folder, entry


def test_entry_names_fill_in_defaults():
    assert zoo.entry_name("vgg8_small", {}) == "vgg8_small"
    assert zoo.entry_name("vgg8_small", {"width": 4}) == "vgg8_small-width=4"
    default_width = zoo.full_kwargs("vgg8_small", {})["width"]
    assert zoo.entry_name("vgg8_small", {"width": default_width}) == "vgg8_small"  # the default spelled out
    assert zoo.entry_name("segnet_small", {"widths": (8, 16, 32)}) == "segnet_small-widths=8x16x32"


def test_build_entry_writes_file_and_manifest(tiny_zoo):
    folder, entry = tiny_zoo
    name = zoo.entry_name(*SMALL)
    man = zoo.manifest(folder)
    assert man["entries"][name] == entry
    assert zoo.file_sha256(folder / entry["file"]) == entry["sha256"]
    assert entry["recipe"] == _tiny_recipe(SMALL[0])
    assert entry["num_classes"] == len(entry["classes"]) >= 24
    assert entry["result"]["epochs_run"] == len(entry["result"]["val_curve"]) <= 2
    assert entry["built"]["threads"] == 1
    table = zoo.entries(folder)
    assert list(table["entry"]) == [name]


def test_build_entry_is_deterministic(tiny_zoo, tmp_path):
    folder, entry = tiny_zoo
    again = pretrain.build_entry(*SMALL, _tiny_recipe(SMALL[0]), out_dir=tmp_path)
    assert again["weights_sha256"] == entry["weights_sha256"]
    assert again["result"]["val_curve"] == entry["result"]["val_curve"]
    # control: another seed gives other weights
    other = pretrain.build_entry(*SMALL, dict(_tiny_recipe(SMALL[0]), seed=1), out_dir=tmp_path / "seed1")
    assert other["weights_sha256"] != entry["weights_sha256"]


def test_pretrained_loads_the_entry_and_reinitialises_a_foreign_head(tiny_zoo):
    folder, entry = tiny_zoo
    state = torch.load(folder / entry["file"], weights_only=True)
    same = build(SMALL[0], entry["num_classes"], pretrained=True, zoo_dir=folder, **SMALL[1])
    for k, v in same.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert same.kaviz_spec["pretrained"] == {"entry": zoo.entry_name(*SMALL), "sha256": entry["sha256"],
                                             "head": "pretrained"}
    torch.manual_seed(5)
    fresh = build(SMALL[0], 10, **SMALL[1])
    torch.manual_seed(5)
    other = build(SMALL[0], 10, pretrained=True, zoo_dir=folder, **SMALL[1])
    head = "classifier" if "classifier.weight" in state else zoo.head_name(other)
    for k, v in other.state_dict().items():
        if k.startswith(head + "."):
            assert torch.equal(v, fresh.state_dict()[k]), k  # the freshly built head, untouched
        else:
            assert torch.equal(v, state[k]), k
    assert other.kaviz_spec["pretrained"]["head"].startswith("reinitialised")
    # control: without pretrained=True the backbone is random
    assert not all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items() if not k.startswith(head + "."))
    assert "pretrained" not in fresh.kaviz_spec


def test_a_damaged_or_missing_file_is_refused(tiny_zoo, tmp_path):
    folder, entry = tiny_zoo
    copy = tmp_path / "zoo"
    shutil.copytree(folder, copy)
    data = bytearray((copy / entry["file"]).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match="SHA-256"):
        build(SMALL[0], 10, pretrained=True, zoo_dir=copy, **SMALL[1])
    (copy / entry["file"]).unlink()
    with pytest.raises(zoo.ZooError, match="missing"):
        build(SMALL[0], 10, pretrained=True, zoo_dir=copy, **SMALL[1])
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(zoo.ZooError, match="not valid JSON"):
        build(SMALL[0], 10, pretrained=True, zoo_dir=copy, **SMALL[1])
    (copy / "manifest.json").write_text(json.dumps({"format": 99, "entries": {}}))
    with pytest.raises(zoo.ZooError, match="format"):
        zoo.manifest(copy)


def test_bad_requests_say_what_to_do(tiny_zoo):
    folder, _ = tiny_zoo
    with pytest.raises(zoo.ZooError, match="scripts/build_zoo.py --arch vgg8_small"):
        build("vgg8_small", 10, pretrained=True, zoo_dir=folder, width=6)
    with pytest.raises(TypeError, match="nope"):
        build("vgg8_small", 10, pretrained=True, zoo_dir=folder, nope=1)
    with pytest.raises(ValueError, match="weights_path"):
        build("resnet18", 10, pretrained=True)
    with pytest.raises(ValueError, match="not both"):
        build("vgg8_small", 10, pretrained=True, weights_path="x.pt")
    with pytest.raises(TypeError, match="True or False"):
        build("vgg8_small", 10, pretrained="yes")
    with pytest.raises(ValueError, match="needs pretrained=True"):
        build("vgg8_small", 10, zoo_dir=folder)
    with pytest.raises(zoo.ZooError, match="recipe lacks"):
        pretrain.build_entry("vgg8_small", {}, {"epochs": 1}, out_dir=folder / "bad")


# --- the shipped zoo ------------------------------------------------------------------------------

SHIPPED = zoo.manifest()["entries"]


def test_the_shipped_zoo_covers_every_small_family():
    """Every family of kaviz's small architectures has its smallest member pretrained with default arguments."""
    from kaviz.models import builder, family, param_count

    smallest = {}
    for arch in available(torchvision=False):
        if not builder(arch).__module__.startswith("kaviz.models."):
            continue  # an architecture registered by a user (or another test), not one of kaviz's own
        n = param_count(build(arch, 10))
        if family(arch) not in smallest or n < smallest[family(arch)][1]:
            smallest[family(arch)] = (arch, n)
    assert set(smallest) == {"cifar_resnet", "vgg", "mobilenet", "segnet"}
    for fam, (arch, _) in smallest.items():
        assert zoo.entry_name(arch, {}) in SHIPPED, f"no default {arch} (family {fam}) in the zoo"
    for name, e in SHIPPED.items():
        assert e["kwargs"] == zoo.full_kwargs(e["arch"], e["kwargs"]), name
        assert name == zoo.entry_name(e["arch"], e["kwargs"])
        assert e["recipe"] == pretrain.default_recipe(e["arch"]), f"{name} was not built by the default recipe"
        assert e["bytes"] < 4 * 2**20, f"{name}: {e['bytes']} bytes; entries must stay a few MB at most"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_entry_loads_and_matches_its_hash(name):
    e = SHIPPED[name]
    assert zoo.file_sha256(zoo.ZOO_DIR / e["file"]) == e["sha256"]
    model = build(e["arch"], 7, pretrained=True, **e["kwargs"])
    assert model.kaviz_spec["pretrained"]["entry"] == name
    same = build(e["arch"], e["num_classes"], pretrained=True, **e["kwargs"])  # the pretraining head kept
    assert weights_hash(same) == e["weights_sha256"]
    # converged: the best epoch is the curve's first maximum, and early stopping (not the epoch limit) ended the run
    r = e["result"]
    curve = r["val_curve"]
    assert r["best_epoch"] == curve.index(max(curve)) + 1
    assert r["stopped_epoch"] is not None and r["epochs_run"] < e["recipe"]["epochs"], \
        f"{name} was still improving at its last allowed epoch {curve}"


def _smallest_shipped():
    return min(SHIPPED, key=lambda n: SHIPPED[n]["result"]["seconds"])


@pytest.mark.slow
def test_rebuilding_the_smallest_entry_gives_its_bits(tmp_path):
    """The recipe in the manifest is the whole recipe: rebuilt on the same floating-point path, the
    smallest entry comes out bit for bit (make pins the path; another path is skipped, not failed)."""
    name = _smallest_shipped()
    e = SHIPPED[name]
    here = pretrain.fp_path()
    built = e["built"]
    keys = ("torch", "cpu_capability", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")
    if any(here[k] != built[k] for k in keys):
        pytest.skip(f"{name} was built on {[built[k] for k in keys]}, this is {[here[k] for k in keys]}")
    again = pretrain.build_entry(e["arch"], e["kwargs"], e["recipe"], out_dir=tmp_path)
    assert again["result"]["val_curve"] == e["result"]["val_curve"]
    assert again["weights_sha256"] == e["weights_sha256"]


def test_pretrained_features_beat_random_init_on_a_notebook_task():
    """The point of the zoo: a backbone pretrained on the pretraining world (outlines disjoint from the
    notebooks' classes) gives features from which the notebooks' shape classes are more linearly
    decodable than from a randomly initialised one (the control)."""
    from kaviz.analysis import linear_probe
    from kaviz.data.synthetic import shapes
    from kaviz.features import OUTPUT, extract

    torch.set_num_threads(1)
    arch, kwargs = "cifar_resnet8", {"width": 8}
    if zoo.entry_name(arch, kwargs) not in SHIPPED:
        pytest.fail("the zoo must hold cifar_resnet8 width 8 (the notebooks use it)")
    data = shapes(600, seed=3)
    scores = {}
    for label, pre in (("pretrained", True), ("random", False)):
        torch.manual_seed(0)
        model = build(arch, 10, pretrained=pre, **kwargs).eval()
        layer = zoo.head_name(model) + ":in"
        store = extract(model, data, [layer], progress=False)
        scores[label] = float(linear_probe(store, cv=3)["accuracy"].iloc[0])
    assert OUTPUT  # the tap constant exists (the probe reads the classifier's input)
    assert scores["pretrained"] > scores["random"] + 0.05, scores


def test_the_zoo_command_lists_entries(tiny_zoo, tmp_path, capsys):
    from kaviz.runner import main

    folder, entry = tiny_zoo
    assert main(["zoo", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert zoo.entry_name(*SMALL) in out and "val accuracy" in out
    assert main(["zoo", "--dir", str(tmp_path)]) == 1  # control: an empty folder lists nothing
    assert "no zoo entries" in capsys.readouterr().err


def test_a_pretrained_network_registers_and_loads_by_name(tiny_zoo, tmp_path, monkeypatch):
    """The run registry rebuilds a network from its spec: the zoo provenance is recorded, not passed to the builder."""
    from kaviz import runs
    from kaviz.compare import random_like

    monkeypatch.setenv("KAVIZ_DATA", str(tmp_path))
    folder, _ = tiny_zoo
    model = build(SMALL[0], 10, pretrained=True, zoo_dir=folder, **SMALL[1])
    runs.register("zoo-start", model, paper="test", method="none")
    back = runs.load("zoo-start")
    assert weights_hash(back) == weights_hash(model)
    control = random_like(model, seed=0)
    assert weights_hash(control) != weights_hash(model)


def test_make_zoo_rebuilds_exactly_what_ships():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "build_zoo.py"
    spec = importlib.util.spec_from_file_location("build_zoo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert sorted(zoo.entry_name(a, k) for a, k in module.ENTRIES) == sorted(SHIPPED)
