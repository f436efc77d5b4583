"""The one teacher-output cache (kaviz.cache.teacher_outputs / TeacherOutputs): computed once, shared by
every method, never memoised for augmented data, one batch format."""
import pytest
import torch
import torchvision.transforms.v2 as T2
from torch import nn

import kaviz.features as kf
from kaviz import cache
from kaviz.data import ImageDataset, Unlabeled
from kaviz.features import OUTPUT
from kaviz.train import freeze


def _data(n=12, transform=None):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.arange(n) % 3, classes=["a", "b", "c"], transform=transform)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.fixture
def counted(monkeypatch):
    cache.clear_teacher_outputs()
    calls = []
    real = kf.extract

    def spy(model, data, layers, **kw):
        calls.append(list(layers))
        return real(model, data, layers, **kw)

    monkeypatch.setattr(kf, "extract", spy)
    yield calls
    cache.clear_teacher_outputs()


def test_outputs_are_the_teachers_forward_and_are_computed_once(counted):
    torch.set_num_threads(1)
    data, net = _data(), _net()
    out = cache.teacher_outputs(freeze(net), data, [OUTPUT, "1"], batch_size=5)
    with torch.no_grad():
        x = torch.stack([data[i][0] for i in range(len(data))])
        ref = torch.cat([net(x[i:i + 5]) for i in range(0, len(x), 5)])
    assert torch.equal(out[OUTPUT], ref) and out["1"].shape == (12, 4, 6, 6)
    again = cache.teacher_outputs(net, data, [OUTPUT], batch_size=5)  # frozen or not: the same weights
    assert again[OUTPUT] is out[OUTPUT] and counted == [[OUTPUT, "1"]]
    # the images of Unlabeled(data) are data's: the same entry
    assert cache.teacher_outputs(net, Unlabeled(data), "1", batch_size=5)["1"] is out["1"] and len(counted) == 1
    # other weights, other data or another batch size: computed
    cache.teacher_outputs(net, data, [OUTPUT], batch_size=4)
    cache.teacher_outputs(net, data.subset(range(6)), [OUTPUT], batch_size=5)
    other = _net()
    with torch.no_grad():
        other[4].bias.add_(1.0)
    cache.teacher_outputs(other, data, [OUTPUT], batch_size=5)
    assert len(counted) == 4


def test_randomly_augmented_data_is_never_memoised(counted):
    data, net = _data(transform=T2.ColorJitter(0.4)), _net()
    a = cache.teacher_outputs(net, data, [OUTPUT])
    b = cache.teacher_outputs(net, data, [OUTPUT])
    assert len(counted) == 2 and not torch.equal(a[OUTPUT], b[OUTPUT])  # two reads, two views


def test_one_batch_format_shared_by_the_methods(counted):
    from kaviz.methods import cfl, lshfm

    data, net = _data(), _net()
    ds = cache.TeacherOutputs.compute(data, {"t": net}, {"t": [OUTPUT]}, keep=("target",))
    x, y = ds[3]
    assert torch.equal(x, data[3][0]) and y["target"] == data[3][1]
    assert torch.equal(y["teacher_outputs"]["t"][OUTPUT], cache.teacher_outputs(net, data, OUTPUT)[OUTPUT][3])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert cache.cached_teacher_outputs(batch)["t"][OUTPUT].shape == (4, 3)
    assert cache.cached_teacher_outputs((batch[0], batch[1]["target"])) is None
    # the methods' own constructors build the same class, and reuse what is already computed
    lsh = lshfm.TeacherOutputs(data, net, layer="4:in")
    pre = cfl.precompute_teachers([net], ["1"], data)
    assert isinstance(lsh, cache.TeacherOutputs) and isinstance(pre, cache.TeacherOutputs)
    assert lsh.logits is ds.outputs["t"][OUTPUT] and pre.outputs["t0"][OUTPUT] is ds.outputs["t"][OUTPUT]
    assert counted == [[OUTPUT], ["4:in"], ["1"]]
    assert lsh.fingerprint != ds.fingerprint and len({pre.fingerprint, lsh.fingerprint}) == 2


def test_lengths_must_match():
    with pytest.raises(ValueError, match="rows but the data has"):
        cache.TeacherOutputs(_data(4), {"t": {OUTPUT: torch.zeros(3, 2)}})
