import numpy as np
import pytest
import torch
from torch import nn

from kaviz import data
from kaviz.methods import customize as cz
from kaviz.models import weights_hash

ATTRS = ["red", "bright", "left_heavy", "top_heavy"]


def tiny_attributes(n=48, size=8, seed=0):
    """Random images whose attributes are read off their pixels (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, size, size, generator=g) * 255).to(torch.uint8)
    f = x.float()
    bits = torch.stack([
        f[:, 0].mean((1, 2)) > f[:, 1].mean((1, 2)),
        f.mean((1, 2, 3)) > 127.5,
        f[..., : size // 2].mean((1, 2, 3)) > f[..., size // 2:].mean((1, 2, 3)),
        f[:, :, : size // 2].mean((1, 2, 3)) > f[:, :, size // 2:].mean((1, 2, 3)),
    ], 1).long()
    return data.ImageDataset(x, bits, classes=ATTRS, name="tiny_attributes")


def head(attrs, width=4):
    return cz.MultiHead("cifar_resnet8", attrs, width=width)


SOURCES = {"A": ["red", "bright"], "B": ["red", "left_heavy"], "C": ["bright", "top_heavy"]}


def tiny_sources(seed=0):
    torch.manual_seed(seed)
    return {s: head(a).eval() for s, a in SOURCES.items()}


# ------------------------------------------------------------------------------------- multi-head
def test_multihead_shapes_names_and_generic_backbone():
    m = head(["a", "b", "c"])
    out = m(torch.rand(5, 3, 8, 8))
    assert out.shape == (5, 3, 2)
    assert m.attributes == ["a", "b", "c"] and m.head_index("c") == 2
    assert isinstance(m.backbone.fc, nn.Identity)
    # any module ending in a Linear works as a backbone; heads replace the classifier
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3))
    m2 = cz.MultiHead(mlp, ["x", "y"], n_way=3)
    assert m2.in_features == 7 and m2(torch.rand(4, 3, 2, 2)).shape == (4, 2, 3)


def test_multihead_bad_inputs():
    with pytest.raises(ValueError, match="at least one head"):
        head([])
    with pytest.raises(ValueError, match="distinct"):
        head(["a", "a"])
    with pytest.raises(ValueError, match="without '.'"):
        head(["a.b"])
    with pytest.raises(KeyError, match="no head 'z'"):
        head(["a"]).head_index("z")
    with pytest.raises(ValueError, match="only apply"):
        cz.MultiHead(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), ["a"], width=4)
    with pytest.raises(ValueError, match="no default hooked blocks"):
        cz.default_blocks("vgg8_small")


def test_default_blocks_follow_the_family():
    assert cz.default_blocks("resnet18") == (("conv1", "layer1", "layer2", "layer3", "layer4"), (32, 32, 64, 128, 256))
    assert cz.default_blocks("cifar_resnet20")[0] == ("conv1", "layer1", "layer2", "layer3")


# -------------------------------------------------------------------------------------- selection
def test_entropy_is_stable_and_matches_the_formula():
    z = torch.tensor([[0.3, -1.2], [2.0, 2.0], [0.0, 1000.0], [-1e4, 1e4]])
    H = cz.head_entropy(z)
    p = z[:2].softmax(-1)
    assert torch.allclose(H[:2], -(p * p.log()).sum(-1), atol=1e-6)
    assert H[1] == pytest.approx(np.log(2), abs=1e-6)  # uniform: the maximum
    naive = -(z.softmax(-1) * z.softmax(-1).log()).sum(-1)
    assert torch.isnan(naive[2:]).all()  # what the stable form avoids
    assert torch.isfinite(H).all() and torch.all(H[2:] >= 0) and float(H[2:].max()) < 1e-6


def test_selection_picks_the_lowest_entropy_source_first_on_ties():
    logits = np.array([
        [[0.0, 0.1], [0.0, 3.0], [0.0, -1.0]],   # source 1 is the most confident
        [[5.0, 0.0], [0.0, 1.0], [0.0, 0.0]],    # source 0
        [[1.0, 0.0], [0.0, 1.0], [0.0, 0.5]],    # 0 and 1 tie: the first wins
    ])
    index, H = cz.select_from_logits(logits)
    assert index.tolist() == [1, 0, 0]
    assert H.shape == (3, 3) and np.all(H[np.arange(3), index] <= H.min(1) + 1e-12)
    with pytest.raises(ValueError, match="shape"):
        cz.select_from_logits(np.zeros((3, 2)))


def test_select_sources_prefers_a_sharper_copy_and_never_reads_labels():
    torch.manual_seed(0)
    ds = tiny_attributes()
    a = head(["red", "bright"]).eval()
    b = head(["bright", "red"]).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():  # same decisions, logits 10x larger: lower entropy wherever it is not a tie
        for h in b.heads.values():
            h.weight.mul_(10)
            h.bias.mul_(10)
    asg = cz.select_sources({"a": a, "b": b}, ["red", "bright"], ds)
    for attr in ("red", "bright"):
        assert asg[attr].sources == ["a", "b"]
        assert (asg[attr].index == 1).all()
        assert asg[attr].shares()["b"] == 1.0
        assert len(asg[attr].images_of("a")) == 0
    with pytest.raises(ValueError, match="no source covers attribute 'top_heavy'"):
        cz.select_sources({"a": a}, "top_heavy", ds)
    with pytest.raises(KeyError, match="does not cover"):
        asg["red"].images_of("c")


def test_assignment_examples_and_table():
    z = np.array([[[0, 3.0], [0, 0.1]], [[0, 0.2], [0, 0.1]], [[0, 5.0], [0, 0.1]], [[0, 0], [0, 4.0]]])
    idx, H = cz.select_from_logits(z)
    asg = cz.Assignment("red", ["a", "b"], idx, H, z)
    assert asg.images_of("a").tolist() == [0, 1, 2]
    assert cz.assigned_examples(asg, "a", k=2, order="confident").tolist() == [2, 0]
    assert cz.assigned_examples(asg, "a", k=1, order="unsure").tolist() == [1]
    table = cz.assignment_table({"red": asg})
    assert table.loc["red", "a"] == 0.75 and table.loc["red", "b"] == 0.25
    with pytest.raises(ValueError, match="order"):
        cz.assigned_examples(asg, "a", order="random")


# -------------------------------------------------------------------------------------- regulariser
def test_unit_norm_penalty_zero_exactly_for_unit_rows_and_pulls_towards_them():
    w = torch.randn(6, 5, 1, 1)
    unit = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert float(cz.unit_norm_penalty(unit)) == pytest.approx(0.0, abs=1e-10)
    assert float(cz.unit_norm_penalty(2 * unit)) == pytest.approx(9.0, rel=1e-5)  # (4 - 1)^2
    assert float(cz.unit_norm_penalty(torch.zeros(3, 4))) == pytest.approx(1.0)  # the collapse it prevents
    p = nn.Parameter(torch.randn(4, 7) * 0.1)
    opt = torch.optim.SGD([p], lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        cz.unit_norm_penalty(p).backward()
        opt.step()
    assert torch.allclose(p.norm(dim=1), torch.ones(4), atol=1e-2)


# -------------------------------------------------------------------------------------- components
def component_method(sources=None, attribute="red"):
    sources = sources or tiny_sources()
    covering = [m for m in sources.values() if attribute in m.attributes]
    return cz.ComponentAmalgamation(head([attribute]), covering, attribute, image_shape=(3, 8, 8),
                                    widths=(3, 3, 4, 5))


def test_component_loss_terms_and_gradients():
    torch.manual_seed(0)
    method = component_method()
    x = torch.rand(6, 3, 8, 8)
    index = torch.tensor([0, 0, 0, 0, 0, 0])  # every image to the first source
    terms = method((x, index))
    assert set(terms) == {"feat", "logit", "reg"} and all(torch.isfinite(v) for v in terms.values())
    assert float(terms["reg"].detach()) == pytest.approx(float(method.regulariser().detach()))
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in method.component.parameters() if p.requires_grad)
    assert all(p.weight.grad is not None for p in method.proj_c)
    assert all(p.weight.grad.abs().sum() > 0 for p in method.proj_t[0])
    # the second source was given no image: only its regulariser reaches it, and m_2 gets no gradient
    assert method.scale.grad[0] != 0 and method.scale.grad[1] == 0
    assert not any(p.requires_grad for s in method.sources for p in s.parameters())
    assert method.proj_t[0][0].weight.shape[:2] == (3, 4)  # source conv1 has 4 channels, width 3


def test_component_weights_the_sources_by_their_share_of_the_batch():
    torch.manual_seed(0)
    method = component_method()
    x = torch.rand(4, 3, 8, 8)
    # batch norm in train mode sees other batch statistics; compare in eval mode
    method.eval()
    with torch.no_grad():
        both = method((x, torch.tensor([0, 0, 1, 1])))
        first = method((x[:2], torch.tensor([0, 0])))
        second = method((x[2:], torch.tensor([1, 1])))
    for k in ("feat", "logit"):
        assert float(both[k]) == pytest.approx(0.5 * float(first[k]) + 0.5 * float(second[k]), rel=1e-5)


def test_component_recipe_options_per_source_projections_no_selection_sum_of_means():
    torch.manual_seed(0)
    sources = tiny_sources()
    covering = [m for m in sources.values() if "red" in m.attributes]

    def make(**kw):
        torch.manual_seed(0)
        return cz.ComponentAmalgamation(head(["red"]), covering, "red", image_shape=(3, 8, 8), widths=(3, 3, 4, 5),
                                        **kw).eval()

    x = torch.rand(4, 3, 8, 8)
    index = torch.tensor([0, 0, 1, 1])
    # per-source projections: one component-side set per source, every projection with a bias
    per = make(shared_projection=False)
    assert len(per.proj_c) == len(covering) and all(len(g) == 4 for g in per.proj_c)
    assert all(p.bias is not None for g in per.proj_c for p in g) and all(p.bias is not None for p in per.proj_t[0])
    assert make().proj_c[0].bias is None  # control: the shared default has no bias
    with torch.no_grad():
        both, first, second = per((x, index)), per((x[:2], index[:2])), per((x[2:], index[2:]))
    assert float(both["feat"]) == pytest.approx(0.5 * float(first["feat"]) + 0.5 * float(second["feat"]), rel=1e-5)
    per.train()
    terms = per((x, torch.tensor([0, 0, 0, 0])))
    sum(terms.values()).backward()
    assert all(p.weight.grad is not None for p in per.proj_c[0])
    assert all(p.weight.grad is None for p in per.proj_c[1])  # source 2 saw no image: its projections idle
    # sum of means: the per-source means are added, not weighted by batch share
    summed = make(reduction="sum_of_means")
    with torch.no_grad():
        b, f, s = summed((x, index)), summed((x[:2], index[:2])), summed((x[2:], index[2:]))
    for k in ("feat", "logit"):
        assert float(b[k]) == pytest.approx(float(f[k]) + float(s[k]), rel=1e-5)
    # without selective learning every source supervises every image; the assignment is ignored
    plain = make(selective=False)
    with torch.no_grad():
        a1 = plain((x, index))
        a2 = plain((x, torch.tensor([1, 1, 1, 1])))
        only = [make()((x, torch.full((4,), t))) for t in range(len(covering))]
    for k in ("feat", "logit"):
        assert float(a1[k]) == pytest.approx(float(a2[k]), rel=1e-6)
        assert float(a1[k]) == pytest.approx(np.mean([float(o[k]) for o in only]), rel=1e-5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        make(reduction="mean")


class Strided(nn.Module):
    """A net with blocks named like a ResNet's whose first block halves the resolution."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 2, 1)
        self.layer1 = nn.Conv2d(4, 4, 3, 1, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.pool(self.layer1(self.conv1(x))).flatten(1))


def test_component_bad_inputs():
    sources = tiny_sources()
    covering = [sources["A"], sources["B"]]
    with pytest.raises(ValueError, match="single head"):
        cz.ComponentAmalgamation(head(["red", "bright"]), covering, "red", image_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="has no head 'red'"):
        cz.ComponentAmalgamation(head(["red"]), [sources["C"]], "red", image_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="one common width per hooked block"):
        cz.ComponentAmalgamation(head(["red"]), covering, "red", image_shape=(3, 8, 8), widths=(3, 3))
    with pytest.raises(ValueError, match="no source"):
        cz.ComponentAmalgamation(head(["red"]), [], "red", image_shape=(3, 8, 8))
    method = component_method(sources)
    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match="AssignedImages"):
        method((x, torch.zeros(4, 4, dtype=torch.int64)))  # attribute targets, not an assignment
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        method((x, torch.tensor([0, 1, 2, 0])))
    # maps of another resolution cannot be compared position by position
    other = cz.MultiHead(Strided(), ["red"])
    with pytest.raises(ValueError, match="same resolution"):
        cz.ComponentAmalgamation(head(["red"]), [other], "red", image_shape=(3, 8, 8),
                                 blocks=["conv1", "layer1"], widths=(3, 3))


def test_assigned_images_check_lengths_and_hide_targets():
    ds = tiny_attributes(n=10)
    a = cz.AssignedImages(ds, np.zeros(10, dtype=np.int64))
    x, i = a[3]
    assert x.shape == (3, 8, 8) and i.dtype == torch.int64
    assert a.fingerprint != cz.AssignedImages(ds, np.ones(10, dtype=np.int64)).fingerprint
    with pytest.raises(ValueError, match="same data"):
        cz.AssignedImages(ds, np.zeros(9))


def test_all_components_train_and_the_schedule_steps_per_epoch():
    ds = tiny_attributes(n=40)
    sources = tiny_sources()
    comps = {a: head([a]) for a in ("red", "bright")}
    before = {a: weights_hash(c) for a, c in comps.items()}
    calls = {a: 0 for a in comps}

    def counter(a):
        def hook(module, inp, out):
            if module.training:
                calls[a] += 1
        return hook

    handles = [c.register_forward_hook(counter(a)) for a, c in comps.items()]
    try:
        trained, hists, asg = cz.amalgamate_components(
            sources, ["red", "bright"], ds, ds, components=comps, epochs=4, lr=1e-2, batch_size=8,
            widths=(3, 3, 4, 5), schedule="step")
    finally:
        for h in handles:
            h.remove()
    assert set(trained) == {"red", "bright"} and set(asg) == {"red", "bright"}
    for a in comps:
        assert trained[a] is comps[a]
        assert weights_hash(trained[a]) != before[a], f"component {a!r} was not trained"
        assert len(hists[a]) == 4
        # a fresh pass over the data every epoch: 40 images / 8 = 5 steps in each of the 4 epochs
        assert calls[a] == 4 * 5
        # x0.1 at half the epochs, stepped per epoch (a per-iteration schedule would have dropped
        # after the second step of the first epoch)
        assert hists[a]["lr"].tolist() == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
        assert "val/accuracy" in hists[a] and hists[a].attrs["best_epoch"] in (1, 2, 3, 4)


def test_component_reduces_its_loss():
    torch.manual_seed(0)
    ds = tiny_attributes(n=48)
    sources = tiny_sources()
    comp, hist, asg = cz.amalgamate_component("red", sources, ds, None, arch_kwargs={"width": 4},
                                              widths=(3, 3, 4, 5), epochs=6, lr=1e-2, batch_size=16,
                                              schedule=None)
    assert hist["train/loss"].iloc[-1] < 0.5 * hist["train/loss"].iloc[0]
    assert asg.sources == ["A", "B"] and comp.attributes == ["red"] and not comp.training
    with pytest.raises(ValueError, match="assignment is for"):
        cz.amalgamate_component("bright", sources, ds, None, assignment=asg, epochs=1)


# ------------------------------------------------------------------------------------------ target
def test_target_terms_training_and_bad_inputs():
    torch.manual_seed(0)
    ds = tiny_attributes(n=32)
    comps = {a: head([a]).eval() for a in ("red", "bright")}
    method = cz.TargetAmalgamation(head(["red", "bright"], width=8), comps, image_shape=(3, 8, 8))
    assert method.proj[3].weight.shape[:2] == (32, 32)  # target layer3 (32) -> both components (16 + 16)
    assert method.projection("bright", 3).shape[:2] == (16, 32)
    terms = method(torch.rand(4, 3, 8, 8))
    assert set(terms) == {"feat", "logit"}
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in method.target.parameters())
    assert method.scale.grad.abs().min() > 0
    target, hist = cz.amalgamate_target(comps, ds, ds, arch_kwargs={"width": 8}, epochs=4, lr=1e-2, batch_size=8)
    assert hist["lr"].tolist() == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    assert hist["train/loss"].iloc[-1] < hist["train/loss"].iloc[0]
    assert {"val/accuracy", "val/accuracy/red", "val/accuracy/bright"} <= set(hist.columns)
    with pytest.raises(ValueError, match="one head per component"):
        cz.TargetAmalgamation(head(["red"]), comps, image_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="at least one component"):
        cz.TargetAmalgamation(head(["red"]), {}, image_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="single head"):
        cz.TargetAmalgamation(head(["red", "bright"]), {"red": head(["red", "bright"]), "bright": comps["bright"]},
                              image_shape=(3, 8, 8))


# -------------------------------------------------------------------------------- sources & metrics
def test_train_source_learns_its_heads_and_is_cached(tmp_path):
    ds = tiny_attributes(n=96)
    tr, va = ds.subset(range(64)), ds.subset(range(64, 96))
    kwargs = dict(epochs=8, lr=1e-2, batch_size=16, arch_kwargs={"width": 4}, cache=tmp_path)
    model, hist = cz.train_source("cifar_resnet8", ["red", "bright"], tr, va, **kwargs)
    assert model.attributes == ["red", "bright"] and not hist.attrs["cached"]
    assert hist["train/ce"].iloc[-1] < hist["train/ce"].iloc[0]
    assert {"val/accuracy/red", "val/accuracy/bright"} <= set(hist.columns)
    again, hist2 = cz.train_source("cifar_resnet8", ["red", "bright"], tr, va, **kwargs)
    assert hist2.attrs["cached"] and weights_hash(again) == weights_hash(model)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    other, hist3 = cz.train_source("cifar_resnet8", ["bright", "red"], tr, va, **{**kwargs, "epochs": 1})
    assert not hist3.attrs["cached"] and len(list(tmp_path.glob("*.pt"))) == 2
    with pytest.raises(KeyError, match="closest"):
        cz.train_source("cifar_resnet8", ["Red"], tr, va, **kwargs)


def test_multihead_supervised_reads_the_right_columns():
    ds = tiny_attributes(n=8)
    m = head(["top_heavy", "red"])
    method = cz.MultiHeadSupervised(m, ds.classes)
    assert method.columns == [3, 0]
    x, y = torch.stack([ds[i][0] for i in range(8)]), ds.targets
    logits = m(x)
    expected = nn.functional.cross_entropy(logits.reshape(-1, 2), y[:, [3, 0]].reshape(-1))
    assert float(method((x, y))["ce"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    with pytest.raises(TypeError, match=r"\(B, A\)"):
        method((x, y[:, 0]))


def test_attribute_accuracy_and_table():
    ds = tiny_attributes(n=20)
    m = head(["bright", "red"]).eval()
    logits = cz.predict(m, ds)
    acc = cz.attribute_accuracy(m, ds)
    y = ds.targets.numpy()
    assert acc["bright"] == pytest.approx(np.mean(logits[:, 0].argmax(-1) == y[:, 1]))
    assert acc["red"] == pytest.approx(np.mean(logits[:, 1].argmax(-1) == y[:, 0]))
    table = cz.accuracy_table({"m": m, "n": head(["top_heavy"]).eval()}, ds, ["red", "top_heavy"])
    assert list(table.columns) == ["red", "top_heavy"]
    assert table.loc["m", "red"] == pytest.approx(acc["red"]) and np.isnan(table.loc["m", "top_heavy"])
    with pytest.raises(KeyError, match="not in the data"):
        cz.attribute_accuracy(head(["shiny"]), ds)
    with pytest.raises(ValueError, match="attribute bits"):
        cz.attribute_accuracy(m, data.ImageDataset(ds.images, torch.zeros(20, dtype=torch.int64),
                                                   classes=ATTRS))


# ---------------------------------------------------------------------------------------- task & run
def test_attribute_task_embedded_parts_and_bad_inputs():
    task = cz.attribute_task(n=120, image_size=16)
    assert task.group == cz.EMBEDDED_GROUP and list(task.sources) == list(cz.EMBEDDED_SOURCES)
    n = len(task.train)
    assert n + len(task.val) + len(task.test) == 120
    parts = [set(ds.meta["index"]) for ds in task.source_train.values()]
    assert sum(len(p) for p in parts) == n and len(set().union(*parts)) == n
    shared = cz.attribute_task(n=120, image_size=16, source_data="shared")
    assert all(len(ds) == n for ds in shared.source_train.values())
    with pytest.raises(ValueError, match="source_data"):
        cz.attribute_task(n=120, image_size=16, source_data="overlap")
    with pytest.raises(KeyError, match="warm_colour"):
        cz.attribute_task(n=120, image_size=16, group=["warm_color"])
    with pytest.raises(ValueError, match="no source covers"):
        cz.attribute_task(n=120, image_size=16, group=["warm_colour", "pointy"], sources={"S": ["warm_colour"]})
    with pytest.raises(ValueError, match="'embedded' or 'celeba'"):
        cz.attribute_task("cub")


def test_attribute_task_celeba_path(tmp_path):
    from fixtures_real import make_celeba

    fx = make_celeba(tmp_path)
    task = cz.attribute_task("celeba", root=tmp_path, image_size=16)
    assert len(task.train) == fx["partition"].count(0) and len(task.test) == fx["partition"].count(2)
    wanted = list(dict.fromkeys([a for attrs in cz.CELEBA_SOURCES.values() for a in attrs] + cz.CELEBA_GROUP))
    assert task.train.classes == wanted
    x, y = task.train[0]
    assert x.shape == (3, 16, 16) and y.shape == (len(wanted),)
    with pytest.raises(TypeError, match="root=None"):
        cz.attribute_task("celeba", root=None)
    with pytest.raises(FileNotFoundError, match="list_attr_celeba"):  # the loader's layout error
        cz.attribute_task("celeba", root=tmp_path / "img_align_celeba")
    # the ResNet-18 path of the paper (five hooked blocks) on tiny inputs
    src = cz.MultiHead("resnet18", ["Black_Hair", "Smiling"]).eval()
    method = cz.ComponentAmalgamation(cz.MultiHead("resnet18", ["Black_Hair"]), [src], "Black_Hair",
                                      image_shape=(3, 32, 32))
    assert len(method.proj_c) == 5 and method.proj_t[0][4].weight.shape[:2] == (256, 512)
    xs = torch.stack([task.train[i][0] for i in range(len(task.train))])
    xs = nn.functional.interpolate(xs, size=32)
    terms = method((xs, torch.zeros(len(xs), dtype=torch.int64)))
    assert all(torch.isfinite(v) for v in terms.values())


def test_run_and_summary_on_tiny_data():
    ds = tiny_attributes(n=60)
    task = cz.AttributeTask(ds.subset(range(36)), ds.subset(range(36, 48)), ds.subset(range(48, 60)),
                            ["red", "bright"], SOURCES, {})
    res = cz.run(task, tiny_sources(), seeds=(0, 1), component_kwargs={"width": 4}, target_kwargs={"width": 8},
                 widths=(3, 3, 4, 5), component_epochs=1, target_epochs=1, batch_size=12)
    t = res.table
    assert set(t["model"]) == {"A", "B", "C", "component", "target"}
    assert len(t[t["model"] == "component"]) == 4 and len(t[t["model"] == "target"]) == 4
    assert set(res.components) == {0, 1} and set(res.components[0]) == {"red", "bright"}
    s = cz.summarise(t)
    assert ("group mean", "mean") in s.columns and ("red", "std") in s.columns
    comp = t[t["model"] == "component"]
    assert s.loc["component", ("red", "mean")] == pytest.approx(comp[comp.attribute == "red"]["accuracy"].mean(),
                                                                abs=1e-3)
    assert np.isnan(s.loc["C", ("red", "mean")])
    # a group mean only for models with every attribute: source A covers both, B only "red"
    assert np.isnan(s.loc["B", ("group mean", "mean")]) and not np.isnan(s.loc["A", ("group mean", "mean")])
    assert s.loc["target", ("group mean", "mean")] == pytest.approx(
        t[t.model == "target"].groupby("seed")["accuracy"].mean().mean(), abs=1e-3)
    c = cz.comparison(t, ["red", "bright"], majority={"red": 0.5, "bright": 0.6})
    src = t[(t.seed < 0) & (t.attribute == "red")].set_index("model")["accuracy"]
    assert c.loc["red", "best source name"] == src.idxmax() and c.loc["red", "best source"] == src.max()
    assert c.loc["red", "component − best source"] == pytest.approx(c.loc["red", "component"] - src.max())
    assert c.loc["bright",
                 "target − component"] == pytest.approx(c.loc["bright", "target"] - c.loc["bright", "component"])
    assert c.loc["bright", "majority"] == 0.6 and c.loc["red", "component std"] >= 0


# ------------------------------------------------------------------------------------ analysis helpers
def test_selection_table_counts_against_the_labels():
    ds = tiny_attributes(n=4)
    y = ds.targets[:, 0].numpy()  # "red"
    def vote(label, margin):  # logits whose argmax is `label`, with that margin
        return [0.0, margin] if label == 1 else [margin, 0.0]

    # source a: confident and right on images 0, 1; unsure and wrong on 2, 3. Source b: always right, unsure.
    za = np.array([vote(int(v), 5.0) if k < 2 else vote(1 - int(v), 0.1) for k, v in enumerate(y)])
    zb = np.array([vote(int(v), 0.2) for v in y])
    z = np.stack([za, zb], 1)
    idx, H = cz.select_from_logits(z)
    asg = cz.Assignment("red", ["a", "b"], idx, H, z)
    t = cz.selection_table({"red": asg}, ds)
    assert list(t.columns) == ["a", "b", "best single", "selected", "any source right"]
    assert t.loc["red", "a"] == 0.5 and t.loc["red", "b"] == 1.0 and t.loc["red", "best single"] == 1.0
    assert idx.tolist() == [0, 0, 1, 1]  # a where it is confident, b elsewhere
    assert t.loc["red", "selected"] == 1.0 and t.loc["red", "any source right"] == 1.0
    images, titles = cz.example_images(asg, ds, "a", k=4)
    assert len(images) == 2 and images[0].shape == (8, 8, 3) and titles[0].startswith("H=0.")
    assert titles[1].endswith(f"y={int(y[1])}")


def test_selection_controls_set_the_choice_against_an_anti_selector_and_random_picks():
    ds = tiny_attributes(n=40)
    y = ds.targets[:, 0].numpy()  # "red"
    rng = np.random.default_rng(1)
    right = np.stack([rng.random(len(y)) < 0.7, rng.random(len(y)) < 0.7], 1)
    pred = np.where(right, y[:, None], 1 - y[:, None])
    z = np.zeros((len(y), 2, 2))
    z[np.arange(len(y))[:, None], [[0, 1]], pred] = np.where(right, 3.0, 0.3)  # confident where right
    idx, H = cz.select_from_logits(z)
    assignments = {"red": cz.Assignment("red", ["a", "b"], idx, H, z)}
    c = cz.selection_controls(assignments, ds, draws=8, seed=0)
    t = cz.selection_table(assignments, ds)
    mean = t.loc["red", ["a", "b"]].mean()
    assert c.loc["red", "selected"] == pytest.approx(t.loc["red", "selected"] - mean) and c.loc["red", "selected"] > 0.1
    # two covering sources: the anti-selector takes the other source everywhere, so its gain is minus the choice's
    assert c.loc["red", "least confident (control)"] == pytest.approx(-c.loc["red", "selected"])
    assert abs(c.loc["red", "random pick (control)"]) < c.loc["red", "selected"] and c.loc["red", "random pick std"] > 0
    z_score = (c.loc["red", "selected"] - c.loc["red", "random pick (control)"]) / c.loc["red", "random pick std"]
    assert c.loc["red", "selected in random-pick std"] == pytest.approx(z_score)
    assert cz.selection_controls(assignments, ds, draws=8, seed=0).equals(c)  # seeded
    with pytest.raises(ValueError, match="draws"):
        cz.selection_controls(assignments, ds, draws=1)


def test_coverage_and_majority():
    cov = cz.coverage_table(SOURCES, ["bright"])
    assert list(cov.columns)[:1] == ["bright"] and cov.loc["A", "red"] == "✓" and cov.loc["C", "red"] == ""
    ds = tiny_attributes(n=30)
    base = cz.majority_baseline(ds, ["red", "bright"])
    p = ds.targets[:, 1].float().mean().item()
    assert base["bright"] == pytest.approx(max(p, 1 - p)) and 0.5 <= base["red"] <= 1
    with pytest.raises(KeyError, match="not in the data"):
        cz.majority_baseline(ds, ["blue"])


def test_run_passes_component_options_to_every_component(monkeypatch):
    from kaviz.methods.customize import amalgamation

    seen = []

    class Recording(amalgamation.ComponentAmalgamation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append((self.shared_projection, self.selective, self.reduction))

    monkeypatch.setattr(amalgamation, "ComponentAmalgamation", Recording)
    ds = tiny_attributes(n=36)
    task = cz.AttributeTask(ds.subset(range(24)), ds.subset(range(24, 30)), ds.subset(range(30, 36)),
                            ["red", "bright"], SOURCES, {})
    res = cz.run(task, tiny_sources(), seeds=(0,), component_kwargs={"width": 4}, target_kwargs={"width": 8},
                 widths=(3, 3, 4, 5), component_epochs=1, target_epochs=1, batch_size=12,
                 component_options={"shared_projection": False, "selective": False, "reduction": "sum_of_means"})
    assert seen == [(False, False, "sum_of_means")] * 2 and len(res.table[res.table.model == "component"]) == 2
