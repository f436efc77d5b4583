import numpy as np
import pytest
import torch

from kaviz import metrics


def test_accuracy_and_topk():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0], [1.0, 2.0, 0.0]])
    assert metrics.accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
    assert metrics.accuracy(logits, [0, 1, 1], topk=2) == 1.0
    assert metrics.accuracy(np.array([0, 2, 1]), np.array([0, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="targets"):
        metrics.accuracy(logits, [0, 1])
    with pytest.raises(ValueError, match="3 classes"):
        metrics.accuracy(logits, [0, 1, 5])
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_task_aware_vs_agnostic_on_a_hand_example():
    # two sources: labels 0-1 (source 0) and 2-4 (source 1)
    slices = [slice(0, 2), slice(2, 5)]
    logits = np.array([
        [2.0, 1.0, 5.0, 0.0, 0.0],   # source 0, label 0: agnostic wrong (2), aware right (0)
        [0.0, 1.0, 0.0, 0.0, 0.0],   # source 0, label 1: both right
        [9.0, 0.0, 0.0, 1.0, 0.0],   # source 1, label 3: agnostic wrong (0), aware right (3)
        [0.0, 0.0, 1.0, 0.0, 2.0],   # source 1, label 2: both wrong (4)
    ])
    targets = np.array([0, 1, 3, 2])
    origin = np.array([0, 0, 1, 1])
    assert metrics.task_agnostic_accuracy(logits, targets) == 0.25
    assert metrics.task_aware_accuracy(logits, targets, origin, slices) == 0.75
    res = metrics.union_accuracies(logits, targets, origin, slices, names=["a", "b"])
    assert res["task_aware/a"] == 1.0 and res["task_aware/b"] == 0.5 and res["task_agnostic/b"] == 0.0
    with pytest.raises(ValueError, match="slices"):
        metrics.task_aware_accuracy(logits, targets, np.array([0, 0, 2, 2]), slices)


def test_confusion_matrix_many_classes_no_small_int_aliasing():
    t = np.array([0, 255, 256, 299, 299])
    p = np.array([0, 256, 256, 1, 299])
    cm = metrics.confusion_matrix(p, t, num_classes=300)
    assert cm.shape == (300, 300) and cm.dtype == np.int64
    assert cm[256, 256] == 1 and cm[255, 256] == 1 and cm[299, 1] == 1 and cm.sum() == 5
    scores = np.eye(300)[p]
    assert np.array_equal(metrics.confusion_matrix(scores, t), cm)
    with pytest.raises(ValueError, match="class ids"):
        metrics.confusion_matrix([0, 5], [0, 1], num_classes=3)


def test_per_class_accuracy_nan_for_missing_class():
    acc = metrics.per_class_accuracy([0, 1, 1], [0, 1, 0], num_classes=3)
    assert acc[0] == 0.5 and acc[1] == 1.0 and np.isnan(acc[2])


def test_knn_accuracy_separated_vs_shuffled_and_hand_example():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = np.eye(3)[y] * 5 + rng.normal(size=(60, 3)) * 0.1
    assert metrics.knn_accuracy(x, y, k=5) == 1.0
    assert metrics.knn_accuracy(x, rng.permutation(y), k=5) < 0.6
    # 1-D hand example, euclidean, k=1: nearest neighbour of each point
    x1 = np.array([[0.0], [0.1], [1.0], [1.05]])
    assert metrics.knn_accuracy(x1, [0, 0, 1, 0], k=1, metric="euclidean") == 0.5
    with pytest.raises(ValueError, match="k must be"):
        metrics.knn_accuracy(x, y, k=60)
    with pytest.raises(ValueError, match="metric"):
        metrics.knn_accuracy(x, y, metric="l1")
