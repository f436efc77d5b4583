import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from kaviz import models
from kaviz.features import (
    OUTPUT,
    FeatureStore,
    FeatureTap,
    LayerError,
    extract,
    layer_table,
    list_layers,
    pool_features,
)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


def test_tap_bitwise_equal_to_torchvision_feature_extractor(resnet18):
    layers = ["layer1", "layer2.1.conv2", "layer3", "layer4.0.conv1", "avgpool", "fc"]
    x = torch.randn(2, 3, 64, 64)
    ref = create_feature_extractor(resnet18, return_nodes=layers)(x)
    with FeatureTap(resnet18, layers) as tap:
        resnet18(x)
    for name in layers:
        assert torch.equal(tap[name], ref[name]), name


def test_input_tap_and_output(resnet18):
    x = torch.randn(2, 3, 32, 32)
    with FeatureTap(resnet18, ["fc:in", "avgpool", OUTPUT]) as tap:
        y = resnet18(x)
    assert torch.equal(tap["fc:in"], torch.flatten(tap["avgpool"], 1))
    assert torch.equal(tap[OUTPUT], y)


def test_unknown_layer_lists_closest(resnet18):
    with pytest.raises(LayerError, match="layer1.0.conv1"):
        FeatureTap(resnet18, ["layer1.0.convl"])
    with pytest.raises(LayerError, match="non-empty"):
        FeatureTap(resnet18, [""])


def test_module_firing_twice_is_reported(resnet18):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(LayerError, match="fired 2 times"):
        with FeatureTap(resnet18, ["layer1.0.relu"]):
            resnet18(x)
    with FeatureTap(resnet18, ["layer1.0.relu"], on_repeat="all") as tap:
        resnet18(x)
    assert len(tap["layer1.0.relu"]) == 2
    with FeatureTap(resnet18, ["layer1.0.relu"], on_repeat="first") as first:
        resnet18(x)
    assert torch.equal(first["layer1.0.relu"], tap["layer1.0.relu"][0])


def test_in_place_modification_after_capture_is_caught(resnet18):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(LayerError, match="modified in place"):  # BasicBlock does `out += identity`
        with FeatureTap(resnet18, ["layer2.1.bn2"]):
            resnet18(x)
    with pytest.raises(LayerError, match="modified in place"):
        with FeatureTap(resnet18, ["bn1"]):
            resnet18(x)
    with FeatureTap(resnet18, ["bn1", "relu"], clone=True, on_repeat="first") as tap:
        resnet18(x)
    assert (tap["bn1"] < 0).any() and not torch.equal(tap["bn1"], tap["relu"])


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.spare = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x)


def test_layer_that_never_fired_is_an_error_and_hooks_are_removed():
    m = Unused()
    with pytest.raises(LayerError, match="never fired"):
        with FeatureTap(m, ["spare"]):
            m(torch.randn(2, 3))
    assert not m._forward_hooks and not m._forward_pre_hooks and not m.spare._forward_hooks
    tap = FeatureTap(m, ["a"])
    with tap:
        m(torch.randn(2, 3))
    assert not m.a._forward_hooks and not m._forward_pre_hooks


def test_each_forward_starts_a_fresh_capture_and_detach_flag():
    m = Unused()
    with FeatureTap(m, ["a"], detach=False) as tap:
        m(torch.randn(2, 3))
        m(torch.randn(5, 3))
        assert tap["a"].shape == (5, 3) and tap["a"].requires_grad
        tap["a"].sum().backward()
    assert m.a.weight.grad is not None
    with FeatureTap(m, ["a"]) as tap:
        m(torch.randn(2, 3))
        assert not tap["a"].requires_grad


def test_list_layers_and_table():
    m = models.build("cifar_resnet8", 3)
    names = list_layers(m)
    assert "layer2.0.merge" in names and "fc" in names and "" not in names
    table = layer_table(m, torch.randn(1, 3, 32, 32))
    row = table.set_index("name").loc["layer3"]
    assert row["shape"] == "(64, 8, 8)" and row["calls"] == 1
    by_shape = layer_table(m, (3, 32, 32))  # the shape of one input is enough
    assert by_shape["shape"].tolist() == table["shape"].tolist()
    with pytest.raises(ValueError, match="positive integers"):
        layer_table(m, (3, 0, 32))
    with pytest.raises(TypeError, match="input shape"):
        layer_table(m, "3x32x32")


def test_pooling_modes():
    x = torch.randn(4, 5, 3, 3)
    assert pool_features(x, "none") is x
    assert torch.allclose(pool_features(x, "avg"), x.mean((2, 3)))
    flat = x.flatten(1)
    expected = (flat / flat.norm(dim=1, keepdim=True)).view_as(x).mean((2, 3))
    assert torch.allclose(pool_features(x, "normalize-avg"), expected)
    v = torch.randn(4, 6)
    assert pool_features(v, "normalize-avg") is v
    with pytest.raises(ValueError, match="pool must be one of"):
        pool_features(x, "max")


def test_extract_matches_manual_forward_restores_mode_and_stores_targets(tiny):
    torch.manual_seed(0)
    m = models.build("cifar_resnet8", 3)
    m.train()
    m.layer1.eval()  # a mixed state must come back exactly
    flags = {n: mod.training for n, mod in m.named_modules()}
    store = extract(m, tiny, ["layer2", "fc:in", OUTPUT], pool={"layer2": "none", "fc:in": "avg", OUTPUT: "none"},
                    batch_size=40)
    assert {n: mod.training for n, mod in m.named_modules()} == flags
    with torch.no_grad():
        m.eval()
        logits = m(tiny.images)
    assert np.allclose(store[OUTPUT], logits.numpy(), atol=1e-5)
    assert store["layer2"].shape == (96, 32, 4, 4)
    assert np.array_equal(store.targets, tiny.targets.numpy())
    assert len(store) == 96 and store.path is None


def test_extract_to_disk_float16_reuse_and_reopen(tmp_path, tiny):
    m = models.build("vgg8_small", 3)
    calls = []
    h = m.register_forward_pre_hook(lambda *_: calls.append(1))
    a = extract(m, tiny, ["features.9", "fc:in"], pool="normalize-avg", store=tmp_path / "s", batch_size=32)
    n_calls = len(calls)
    assert n_calls == 3 and a["fc:in"].dtype == np.float32 and isinstance(a["fc:in"], np.memmap)
    b = extract(m, tiny, ["features.9", "fc:in"], pool="normalize-avg", store=tmp_path / "s", batch_size=32)
    assert len(calls) == n_calls, "a complete store with the same key is reused, not recomputed"
    assert np.array_equal(a["fc:in"], b["fc:in"])
    mem = extract(m, tiny, ["features.9", "fc:in"], pool="normalize-avg")
    assert np.array_equal(mem["fc:in"], a["fc:in"])
    half = extract(m, tiny, ["fc:in"], store=tmp_path / "h", dtype="float16")
    assert half["fc:in"].dtype == np.float16
    with torch.no_grad():
        m.fc.bias += 1.0  # other weights -> other key -> recomputed
    extract(m, tiny, ["features.9", "fc:in"], pool="normalize-avg", store=tmp_path / "s", batch_size=32)
    assert len(calls) > n_calls + 2
    again = FeatureStore.open(tmp_path / "s")
    assert again.meta["layers"] == ["features.9", "fc:in"] and again.meta["model"]["name"] == "vgg8_small"
    assert again.meta["data"] == tiny.fingerprint
    h.remove()


def test_extract_inputs_and_bad_inputs(tmp_path):
    m = models.build("vgg8_small", 3)
    x = torch.rand(10, 3, 32, 32)
    s = extract(m, x, "fc:in", batch_size=4)
    assert s["fc:in"].shape == (10, 128) and s.targets is None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(10)), batch_size=3)
    s2 = extract(m, loader, "fc:in")
    assert np.allclose(s2["fc:in"], s["fc:in"], atol=1e-6) and list(s2.targets) == list(range(10))
    with pytest.raises(ValueError, match="empty"):
        extract(m, x[:0], "fc:in")
    with pytest.raises(ValueError, match="pool"):
        extract(m, x, "fc:in", pool="sum")
    with pytest.raises(ValueError, match="dtype"):
        extract(m, x, "fc:in", dtype="int8")
    with pytest.raises(LayerError, match="no layer"):
        extract(m, x, "fc2")
    with pytest.raises(LayerError, match="not in this store"):
        s["fc"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meta.json").write_text('{"complete": false}')
    with pytest.raises(FileNotFoundError, match="incomplete"):
        FeatureStore.open(tmp_path / "broken")


def test_npy_writer_streams_in_order(tmp_path):
    from kaviz.features import _NpyWriter

    w = _NpyWriter(tmp_path / "a.npy", (5, 2), np.float16)
    w[0:3] = np.arange(6, dtype=np.float32).reshape(3, 2)
    with pytest.raises(RuntimeError, match="in order"):
        w[4:5] = np.zeros((1, 2))
    with pytest.raises(ValueError, match="does not fit"):
        w[3:4] = np.zeros((1, 3))
    w[3:5] = np.ones((2, 2))
    w.close()
    a = np.load(tmp_path / "a.npy")
    assert a.dtype == np.float16 and a.shape == (5, 2) and a[2, 1] == 5 and a[4, 0] == 1
    short = _NpyWriter(tmp_path / "b.npy", (3, 1), np.float32)
    short[0:1] = np.zeros((1, 1))
    with pytest.raises(RuntimeError, match="wrote 1 of 3"):
        short.close()


def test_issue14_defect14_bad_layers_empty_module_name_and_uint8_teach(tmp_path):
    m = models.build("vgg8_small", 3)
    x = torch.rand(4, 3, 32, 32)
    for bad in (3, [3], {"fc:in": 1}):
        with pytest.raises(TypeError, match="layers must be a layer name .str. or a list of names"):
            extract(m, x, bad)
    with pytest.raises(TypeError, match="layers must be"):
        FeatureTap(m, 3)
    for spec in (":in", ":out"):
        with pytest.raises(LayerError, match="names no module.*'fc:in'.*OUTPUT"):
            FeatureTap(m, spec)  # was: silently the root's input
    with FeatureTap(m, ["fc:in", OUTPUT]) as tap:  # real module names and OUTPUT still work
        y = m(x)
    assert tap["fc:in"].shape == (4, 128) and torch.equal(tap[OUTPUT], y)
    u8 = (x * 255).round().to(torch.uint8)
    with pytest.raises(TypeError, match=r"uint8.*x\.float\(\) / 255"):
        extract(m, u8, "fc:in")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(u8), batch_size=2)
    with pytest.raises(TypeError, match=r"uint8.*x\.float\(\) / 255"):
        extract(m, loader, "fc:in", store=tmp_path / "s")
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.tmp-*"))


def test_issue14_store_key_uses_shape_aware_data_fingerprint(tmp_path):
    from kaviz.data import fingerprint

    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    calls = []
    m.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.rand(6, 3, 4, 4)
    a = extract(m, x, "1:in", store=tmp_path / "s")
    assert a.meta["data"] == fingerprint(x)
    n = len(calls)
    b = extract(m, x.reshape(6, 3, 16, 1), "1:in", store=tmp_path / "s")  # same bytes, other data
    assert len(calls) > n, "x.reshape(...) must not reuse the store of x"
    assert b.meta["data"] == fingerprint(x.reshape(6, 3, 16, 1)) != a.meta["data"]
    # torch's TensorDataset and Subset (no fingerprint attribute) get content keys too
    ds = torch.utils.data.TensorDataset(x, torch.arange(6))
    full = extract(m, torch.utils.data.DataLoader(ds, batch_size=4), "1:in", store=tmp_path / "t")
    rev = extract(m, torch.utils.data.Subset(ds, list(range(5, -1, -1))), "1:in", store=tmp_path / "t")
    assert full.meta["data"] != rev.meta["data"] and list(rev.targets) == [5, 4, 3, 2, 1, 0]


# ---------------------------------------------------------------------- GPU-ready options (tested on CPU)
def test_extract_amp_channels_last_and_workers(tiny, tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = models.build("cifar_resnet8", 3).eval()
    layers, pool = ["layer2", OUTPUT], {"layer2": "none", OUTPUT: "none"}
    ref = extract(m, tiny, layers, pool=pool, batch_size=40)
    # DataLoader workers (and pin_memory, a no-op without CUDA) read the same images in the same order
    par = extract(m, tiny, layers, pool=pool, batch_size=40, num_workers=2, pin_memory=True)
    for l in layers:
        assert np.array_equal(par[l], ref[l]), l
    assert np.array_equal(par.targets, ref.targets)
    # channels_last: the same numbers up to float rounding, and the model's layout is put back
    cl = extract(m, tiny, layers, pool=pool, batch_size=40, channels_last=True)
    for l in layers:
        assert np.allclose(cl[l], ref[l], rtol=1e-4, atol=1e-5), l
    assert m.conv1.weight.is_contiguous()
    # amp: the forward runs in bf16 on CPU (a hook sees it), the features are stored as float32 close to the
    # float32 ones (bf16 keeps 8 bits of mantissa), and differ from them (autocast did something)
    seen = set()
    h = m.layer1.register_forward_hook(lambda mod, i, o: seen.add(o.dtype))
    try:
        amp = extract(m, tiny, layers, pool=pool, batch_size=40, amp=True)
    finally:
        h.remove()
    assert seen == {torch.bfloat16}
    for l in layers:
        assert amp[l].dtype == np.float32 and not np.array_equal(amp[l], ref[l])
        scale = np.abs(ref[l]).max()
        assert np.abs(amp[l] - ref[l]).max() < 0.05 * scale, l
    # on disk, amp and channels_last are part of the key: a float32 store is not reused for amp
    extract(m, tiny, layers, pool=pool, batch_size=40, store=tmp_path / "s")
    on_disk = extract(m, tiny, layers, pool=pool, batch_size=40, store=tmp_path / "s", amp="bf16")
    assert on_disk.meta.get("amp") == "bfloat16" and np.array_equal(on_disk["layer2"], amp["layer2"])
    with pytest.raises(ValueError, match="amp='bf16' or amp='fp16'"):
        extract(m, tiny, layers, amp="half-ish")
