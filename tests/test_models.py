import pytest
import torch
from torch import nn

from kaviz import models
from kaviz.features import layer_table

SMALL = ["cifar_resnet8", "cifar_resnet14", "vgg8_small", "vgg11_small", "mobilenet_small"]


@pytest.mark.parametrize("name", SMALL)
def test_small_models_run_and_every_module_fires_at_most_once(name):
    m = models.build(name, 7)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 7)
    table = layer_table(m, x)
    assert table["calls"].max() == 1, table[table["calls"] > 1]
    assert not any(getattr(mod, "inplace", False) for mod in m.modules()), "no in-place ops: taps stay valid"
    assert models.spec(m) == {"name": name, "num_classes": 7}
    assert models.classifier_name(m) == "fc"


def test_three_distinct_families():
    fams = {models.family(n) for n in SMALL}
    assert {"cifar_resnet", "vgg", "mobilenet"} <= fams


def test_unknown_name_suggests_close_ones():
    with pytest.raises(KeyError, match="cifar_resnet8"):
        models.build("cifar_resnt8", 10)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        models.build("vgg8_small", 0)


def test_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        models.small.CifarResNet(depth=10)


def test_torchvision_by_name_and_small_input():
    m = models.build("resnet18", 5, small_input=True)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert isinstance(m.maxpool, nn.Identity)
    d = models.build("densenet121", 4, small_input=True)
    assert d.classifier.out_features == 4
    with pytest.raises(ValueError, match="small_input"):
        models.build("vgg11", 3, small_input=True)


def test_register_custom_and_duplicate():
    @models.register("test_tiny_mlp_xyz")
    def tiny(num_classes, hidden=4):
        return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    m = models.build("test_tiny_mlp_xyz", 3, hidden=5)
    assert m[1].out_features == 5 and models.spec(m)["hidden"] == 5
    assert "test_tiny_mlp_xyz" in models.available(torchvision=False)
    with pytest.raises(ValueError, match="already registered"):
        models.register("test_tiny_mlp_xyz")(lambda num_classes: None)


def test_weights_roundtrip_head_reinit_and_mismatch(tmp_path):
    a = models.build("cifar_resnet8", 10)
    path = tmp_path / "w.pt"
    torch.save(a.state_dict(), path)
    b = models.build("cifar_resnet8", 10, weights_path=path)
    assert models.weights_hash(a) == models.weights_hash(b)
    c = models.build("cifar_resnet8", 4, weights_path=path)  # new head, same trunk
    assert models.spec(c)["head_reinitialised"] is True
    assert torch.equal(c.conv1.weight, a.conv1.weight)
    with pytest.raises(models.ArchitectureMismatchError, match="does not fit architecture 'vgg8_small'"):
        models.build("vgg8_small", 10, weights_path=path)
    with pytest.raises(FileNotFoundError):
        models.build("vgg8_small", 10, weights_path=tmp_path / "missing.pt")


def test_weights_hash_changes_with_weights():
    m = models.build("vgg8_small", 3)
    h = models.weights_hash(m)
    with torch.no_grad():
        m.fc.bias += 1
    assert models.weights_hash(m) != h


def test_stages_shallow_to_deep_and_tappable():
    from kaviz.features import FeatureTap

    for name in SMALL + ["resnet18", "densenet121"]:
        m = models.build(name, 3).eval()
        st = models.stages(m)
        assert st[-1].endswith(":in") and len(st) >= 3, (name, st)
        with FeatureTap(m, st) as tap:
            m(torch.randn(1, 3, 32, 32))
        widths = [tap[s].shape[-1] * tap[s].shape[-2] if tap[s].dim() == 4 else 1 for s in st]
        assert widths == sorted(widths, reverse=True), (name, widths)  # resolution only shrinks
