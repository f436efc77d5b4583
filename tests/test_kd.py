import pytest
import torch
from torch import nn

from kaviz import data, metrics
from kaviz.methods import kd


def tiny_union():
    a = data.ImageDataset((torch.rand(30, 3, 8, 8) * 255).to(torch.uint8), torch.arange(30) % 3,
                          classes=["a0", "a1", "a2"], name="a")
    b = data.ImageDataset((torch.rand(20, 3, 8, 8) * 255).to(torch.uint8), torch.arange(20) % 2,
                          classes=["b0", "b1"], name="b")
    return data.union([a, b])


def net(k):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, k))


def test_kd_student_learns_the_concatenated_soft_targets_without_labels():
    torch.manual_seed(0)
    u = tiny_union()
    teachers = [net(3), net(2)]
    student = net(5)
    method = kd.MultiTeacherKD(student, teachers)
    x = torch.stack([u.get_image(i) for i in range(len(u))])
    with torch.no_grad():
        target = torch.cat([t(x) for t in teachers], 1)
    before = nn.functional.kl_div(student(x).log_softmax(1), target.softmax(1), reduction="batchmean").item()
    hist = kd.distill(student, teachers, u, epochs=30, lr=1e-2, batch_size=16)
    after = nn.functional.kl_div(student(x).log_softmax(1), target.softmax(1), reduction="batchmean").item()
    assert after < 0.2 * before
    assert "train/kd" in hist and not any(p.requires_grad for t in method.teachers for p in t.parameters())


def test_union_accuracy_matches_metrics_and_teacher_table():
    torch.manual_seed(0)
    u = tiny_union()
    teachers = [net(3), net(2)]
    x = torch.stack([u.get_image(i) for i in range(len(u))])
    with torch.no_grad():
        cat = torch.cat([t(x) for t in teachers], 1)

    class Concat(nn.Module):
        def forward(self, x):
            return torch.cat([t(x) for t in teachers], 1)

    res = kd.union_accuracy(Concat(), u)
    assert res["task_aware"] == pytest.approx(metrics.task_aware_accuracy(cat, u.targets, u.origin, u.slices))
    assert res["task_agnostic"] == pytest.approx(metrics.accuracy(cat, u.targets))
    table = kd.teacher_accuracy(teachers, u)
    rows = table.set_index("model")
    own = (cat[:30, :3].argmax(1) == u.targets[:30]).float().mean().item()
    assert rows.loc["teacher 1 (a)", "task_aware"] == pytest.approx(own)
    assert rows.loc["concatenated teachers", "task_agnostic"] == pytest.approx(res["task_agnostic"])
    with pytest.raises(ValueError, match="outputs"):
        kd.union_accuracy(net(4), u)


class Bomb:
    def __getattr__(self, name):
        raise AssertionError("a label was touched during distillation")


class BombLabels(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.x = torch.rand(n, 3, 8, 8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], Bomb()


def test_distill_never_reads_labels():
    kd.distill(net(5), [net(3), net(2)], BombLabels(), epochs=1, batch_size=8)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one teacher"):
        kd.MultiTeacherKD(net(2), [])
    with pytest.raises(TypeError, match="batch"):
        kd.images_of({"x": 1})
