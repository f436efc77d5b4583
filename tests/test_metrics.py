import math

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


# ------------------------------------------------------------ reference-recipe metrics (issue 15)
def test_non_interpolated_ap_is_the_mean_precision_at_each_true_positive():
    # ranking: negative, positive, positive -> precisions at the positives 1/2 and 2/3
    s = np.array([[0.9], [0.8], [0.7]])
    t = np.array([[0], [1], [1]])
    assert metrics.average_precision(s, t, ap="non_interpolated")[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # VOC all-point takes the envelope: precision 2/3 over the whole recall range
    assert metrics.average_precision(s, t)[0] == pytest.approx(2 / 3)
    # two classes, the second with a difficult pair removed from its ranking
    s2 = np.array([[0.9, 0.1], [0.8, 0.9], [0.7, 0.8], [0.1, 0.7]])
    t2 = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    d2 = np.array([[0, 0], [0, 1], [0, 0], [0, 0]])
    ap = metrics.average_precision(s2, t2, difficult=d2, ap="non_interpolated")
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2) and ap[1] == pytest.approx(1.0)
    mean = metrics.multilabel_map(s2, t2, difficult=d2, ap="non_interpolated")
    assert mean == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    # ties form one threshold: both positives of the tied block get its precision 2/3
    tie = metrics.average_precision(np.array([[0.5], [0.5], [0.5]]), np.array([[1], [1], [0]]),
                                    ap="non_interpolated")
    assert tie[0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="non_interpolated"):
        metrics.multilabel_map(s, t, ap="coco")


def test_non_interpolated_ap_equals_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, size=(200, 4)) / 5.0           # few distinct scores: many ties
    t = rng.random((200, 4)) < 0.3
    ap = metrics.average_precision(s, t.astype(int), ap="non_interpolated")
    ref = [average_precision_score(t[:, c], s[:, c]) for c in range(4)]
    np.testing.assert_allclose(ap, ref, rtol=1e-12)
    # control: all-point (envelope) AP is a different number on the same data, never below
    allpoint = metrics.average_precision(s, t.astype(int))
    assert np.all(allpoint >= np.asarray(ref) - 1e-12) and not np.allclose(allpoint, ref)


def test_depth_full_metric_set_against_hand_values():
    p = np.array([1.0, 1.5, 1.9, 3.0])
    t = np.ones(4)
    full = metrics.depth_scores(p, t, full=True)
    assert list(full) == list(metrics.DEPTH_METRICS_FULL)
    assert full["abs_rel"] == pytest.approx((0 + 0.5 + 0.9 + 2.0) / 4)
    assert full["sq_rel"] == pytest.approx((0 + 0.25 + 0.81 + 4.0) / 4)
    assert full["rmse"] == pytest.approx(math.sqrt((0 + 0.25 + 0.81 + 4.0) / 4))
    logs = math.log(1.5) ** 2 + math.log(1.9) ** 2 + math.log(3.0) ** 2
    assert full["log_rmse"] == pytest.approx(math.sqrt(logs / 4))
    assert (full["delta1"], full["delta2"], full["delta3"]) == (0.25, 0.5, 0.75)  # 1.25, 1.5625, 1.953125
    # sq-rel divides by the target: same errors at a larger depth give a smaller sq-rel
    assert metrics.depth_scores(2 * p, 2 * t, full=True)["sq_rel"] == pytest.approx(2 * full["sq_rel"])
    # the default keys are unchanged
    assert list(metrics.depth_scores(p, t)) == ["rmse", "abs_rel", "delta1"]
    # the streaming meter gives the same numbers batch by batch (invalid pixels left out)
    meter = metrics.dense_meter("depth", full_depth=True)
    pt, tt = torch.tensor(p).reshape(1, 1, 2, 2), torch.tensor(t).reshape(1, 2, 2)
    meter.update(pt[:, :, :1], tt[:, :1])
    meter.update(pt[:, :, 1:], tt[:, 1:])
    meter.update(torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 2))  # no valid pixel
    for k, v in meter.result().items():
        assert v == pytest.approx(full[k]), k


def test_ms_ssim_on_the_same_ssim_code():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 48, 48, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    # one scale is SSIM itself
    assert metrics.ms_ssim(a, b, window=7, weights=(1.0,)) == pytest.approx(metrics.ssim(a, b, window=7), rel=1e-6)
    assert metrics.ms_ssim(a, a, window=7, weights=metrics.MS_SSIM_WEIGHTS[:3]) == pytest.approx(1.0)
    # constant images: contrast-structure is 1 at every scale, so MS-SSIM = luminance^(w_M / Σw)
    ca, cb = torch.full((1, 1, 176, 176), 0.5, dtype=torch.float64), torch.full((1, 1, 176, 176), 0.25,
                                                                                  dtype=torch.float64)
    c1 = 0.01 ** 2
    lum = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    w = metrics.MS_SSIM_WEIGHTS
    assert metrics.ms_ssim(ca, cb) == pytest.approx(lum ** (w[-1] / sum(w)), rel=1e-9)
    # noisier references score lower; the loss is differentiable
    worse = (a + 0.5 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert metrics.ms_ssim(a, worse, window=7, weights=w[:3]) < metrics.ms_ssim(a, b, window=7, weights=w[:3])
    x = b.clone().requires_grad_(True)
    metrics.ms_ssim_loss(x, a, window=7, weights=w[:3]).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 112×112"):
        metrics.ms_ssim(a, b, window=7)
