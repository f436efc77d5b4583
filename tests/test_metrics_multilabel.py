"""Multi-label metrics: VOC all-point AP with difficult pairs ignored, mAP, COCO-style P/R/F1."""
import warnings

import numpy as np
import pytest
import torch

from kaviz import metrics


def _voc_reference_ap(scores, targets):
    """The devkit's loop (sort, cumulate, envelope, sum over recall steps), written independently.
    Only for inputs without tied scores, where the order of ties cannot matter."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    npos = sum(targets)
    tp = fp = 0
    rec, prec = [], []
    for i in order:
        tp += targets[i] == 1
        fp += targets[i] == 0
        rec.append(tp / npos)
        prec.append(tp / (tp + fp))
    mrec = [0.0] + rec + [1.0]
    mpre = [0.0] + prec + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def test_ap_hand_computed_ranking():
    # ranks 1..5: + - + - +  ->  (R, P) = (1/3, 1), (2/3, 2/3), (1, 3/5)
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    t = np.array([1, 0, 1, 0, 1])
    expected = (1 + 2 / 3 + 3 / 5) / 3
    assert metrics.average_precision(s, t)[0] == pytest.approx(expected)
    # the envelope: a later, higher precision lifts the earlier recall step
    s2 = np.array([0.9, 0.8, 0.7, 0.6])
    t2 = np.array([0, 1, 0, 1])  # (1/2, 1/2), (1, 1/2)
    assert metrics.average_precision(s2, t2)[0] == pytest.approx(0.5)
    t3 = np.array([0, 0, 1, 1])  # (1/2, 1/3), (1, 1/2) -> envelope 1/2 over both steps
    assert metrics.average_precision(s2, t3)[0] == pytest.approx(0.5)
    assert metrics.average_precision(s2, np.array([1, 1, 0, 0]))[0] == 1.0


def test_ap_matches_reference_loop_on_random_scores():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(60, 5))
    t = (rng.random((60, 5)) < 0.3).astype(int)
    t[0] = 1  # every class has a positive
    ap = metrics.average_precision(s, t)
    ref = [_voc_reference_ap(list(s[:, k]), list(t[:, k])) for k in range(5)]
    np.testing.assert_allclose(ap, ref, rtol=0, atol=1e-12)
    assert metrics.multilabel_map(s, t) == pytest.approx(np.mean(ref))
    assert np.all((ap >= 0) & (ap <= 1))


def test_ties_form_one_threshold_and_order_does_not_matter():
    # the tied block {-, +} at 0.8 is one threshold: (1/2, 1) then (1, 2/3) -> 1/2 + 1/2 * 2/3
    s = np.array([0.9, 0.8, 0.8, 0.1])
    t = np.array([1, 0, 1, 0])
    assert metrics.average_precision(s, t)[0] == pytest.approx(5 / 6)
    for perm in ([0, 2, 1, 3], [3, 2, 1, 0], [1, 0, 3, 2]):
        assert metrics.average_precision(s[perm], t[perm])[0] == pytest.approx(5 / 6)
    # all scores tied: one threshold, precision = prevalence
    assert metrics.average_precision(np.zeros(4), np.array([1, 0, 0, 1]))[0] == pytest.approx(0.5)


def test_difficult_pairs_are_ignored():
    s = np.array([[0.95], [0.9], [0.8], [0.7], [0.6]])
    t = np.array([[0], [1], [0], [1], [1]])
    d = np.array([[True], [False], [False], [False], [True]])
    # without rows 0 and 4: + - +  at (1/2, 1), (1, 2/3)
    expected = 0.5 + 0.5 * 2 / 3
    assert metrics.average_precision(s, t, difficult=d)[0] == pytest.approx(expected)
    # a difficult positive is not missed (recall) and a difficult negative is not a false positive
    assert metrics.average_precision(s, t)[0] != pytest.approx(expected)
    assert metrics.average_precision(s[[1, 2, 3]], t[[1, 2, 3]])[0] == pytest.approx(expected)
    assert metrics.multilabel_map(torch.tensor(s), torch.tensor(t),
                                  difficult=torch.tensor(d)) == pytest.approx(expected)


def test_class_without_positives_is_reported_and_left_out():
    s = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.6], [0.4, 0.3, 0.9]])
    t = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1]])
    d = np.array([[False, False, False], [False, False, True], [False, False, True]])
    ap = metrics.average_precision(s, t, difficult=d)
    assert ap[0] == 1.0 and np.isnan(ap[1]) and np.isnan(ap[2])  # class 2's positives are all difficult
    with pytest.warns(metrics.MissingPositivesWarning, match=r"2 class\(es\).*1, 2"):
        m = metrics.multilabel_map(s, t, difficult=d)
    assert m == 1.0
    rep = metrics.multilabel_report(s, t, difficult=d, class_names=["a", "b", "c"])
    assert rep["missing"] == ["b", "c"] and rep["mAP"] == 1.0 and np.isnan(rep["ap"][1])
    with pytest.raises(ValueError, match="no class has a positive"):
        metrics.multilabel_map(s, np.zeros_like(t))


def test_prf_hand_computed():
    # probabilities given directly (logits=False); threshold 0.5
    p = np.array([[0.9, 0.6, 0.1],
                  [0.7, 0.2, 0.4],
                  [0.3, 0.8, 0.9],
                  [0.6, 0.1, 0.2]])
    t = np.array([[1, 1, 0],
                  [0, 0, 1],
                  [1, 1, 1],
                  [1, 0, 0]])
    # class 0: predicted rows {0,1,3}, gt {0,2,3}: Nc=2, Np=3, Ng=3
    # class 1: predicted {0,2}, gt {0,2}: 2, 2, 2
    # class 2: predicted {2}, gt {1,2}: 1, 1, 2
    r = metrics.multilabel_prf(p, t, threshold=0.5, logits=False)
    cp = (2 / 3 + 1 + 1) / 3
    cr = (2 / 3 + 1 + 1 / 2) / 3
    op, orc = 5 / 6, 5 / 7
    assert r["CP"] == pytest.approx(cp) and r["CR"] == pytest.approx(cr)
    assert r["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))
    assert r["OP"] == pytest.approx(op) and r["OR"] == pytest.approx(orc)
    assert r["OF1"] == pytest.approx(2 * op * orc / (op + orc))
    # logits: the same decisions through sigmoid(logit) >= 0.5
    logits = np.log(p / (1 - p))
    assert metrics.multilabel_prf(logits, t) == pytest.approx(r)
    # difficult pairs leave every count: drop (row 1, class 0), a false positive of class 0
    d = np.zeros_like(t, dtype=bool)
    d[1, 0] = True
    r2 = metrics.multilabel_prf(p, t, difficult=d, logits=False)
    assert r2["CP"] == pytest.approx((1 + 1 + 1) / 3) and r2["OP"] == pytest.approx(1.0)


def test_prf_never_predicted_class_has_precision_zero():
    p = np.array([[0.9, 0.1], [0.8, 0.2]])
    t = np.array([[1, 1], [1, 0]])
    r = metrics.multilabel_prf(p, t, logits=False)
    assert r["CP"] == pytest.approx(0.5) and r["CR"] == pytest.approx(0.5)


@pytest.mark.parametrize("call, match", [
    (lambda: metrics.average_precision(np.zeros((3, 2)), np.zeros((3, 3))), "same shape|one shape"),
    (lambda: metrics.average_precision(np.zeros((3, 2)), np.full((3, 2), 2)), "multi-hot"),
    (lambda: metrics.average_precision(np.array([[np.nan], [0.1]]), np.array([[1], [0]])), "finite"),
    (lambda: metrics.average_precision(np.zeros((0, 2)), np.zeros((0, 2))), "empty"),
    (lambda: metrics.average_precision(np.zeros((3, 2)), np.ones((3, 2)), difficult=np.zeros((3, 1), bool)),
     "difficult"),
    (lambda: metrics.multilabel_prf(np.zeros((2, 2)), np.ones((2, 2)), threshold=1.5), "threshold"),
    (lambda: metrics.multilabel_prf(np.full((2, 2), 3.0), np.ones((2, 2)), logits=False), "probabilities"),
])
def test_bad_inputs_raise_teaching_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_supervised_bce_reports_map_now_that_it_exists():
    from kaviz.train import Supervised

    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 4, 4, generator=g)
    y = (torch.rand(12, 3, generator=g) < 0.5).float()
    y[0] = 1
    data = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = Supervised(model, loss="bce").evaluate(data)
    assert set(out) == {"mAP"} and 0 <= out["mAP"] <= 1
