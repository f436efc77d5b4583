import numpy as np
import pytest
import torch

from kaviz import metrics, models
from kaviz.features import layer_table
from kaviz.models.dense import decoder_names, encoder_names


@pytest.mark.parametrize("skips", [False, True])
def test_segnet_small_shapes_names_and_single_firing(skips):
    m = models.build("segnet_small", 5, skips=skips)
    x = torch.randn(2, 3, 48, 64)  # non-square
    assert m(x).shape == (2, 5, 48, 64)
    assert encoder_names(m) == ["enc1", "enc2", "enc3"] and decoder_names(m) == ["dec3", "dec2", "dec1"]
    t = layer_table(m, x)
    assert t["calls"].max() == 1
    assert t.set_index("name").loc["enc3", "shape"] == "(64, 6, 8)"
    rec = models.build("segnet_small", 3, output="sigmoid")
    y = rec(x)
    assert y.min() >= 0 and y.max() <= 1
    with pytest.raises(ValueError, match="divisible by 8"):
        m(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="widths"):
        models.build("segnet_small", 2, widths=(8, 16))


def test_segmentation_scores_hand_computed():
    t = np.array([[[0, 0, 1, 1], [2, 2, 255, 255]]])
    p = np.array([[[0, 1, 1, 1], [2, 0, 1, 2]]])
    s = metrics.segmentation_scores(p, t, num_classes=4)
    # valid pixels: 6; correct: 0,1,1,2 -> 4
    assert s["pixel_accuracy"] == pytest.approx(4 / 6)
    # IoU: class0 tp1, union = (pred0: 2) + (true0: 2) - 1 = 3 ; class1 tp2, pred 3, true 2 -> 3 ; class2 tp1, pred1
    # true2 -> 2
    assert s["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert np.isnan(s["iou"][3]) and s["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    logits = np.eye(4)[p].transpose(0, 3, 1, 2)
    assert metrics.segmentation_scores(logits, t, 4)["mIoU"] == pytest.approx(s["mIoU"])
    with pytest.raises(ValueError, match="ignore_index"):
        metrics.segmentation_scores(p, np.full_like(t, 255), 4)


def test_depth_scores_hand_computed_and_invalid_pixels():
    t = np.array([1.0, 2.0, 4.0, 0.0])
    p = np.array([1.0, 2.5, 4.0, 7.0])
    s = metrics.depth_scores(p, t)
    assert s["rmse"] == pytest.approx(np.sqrt(0.25 / 3))
    assert s["abs_rel"] == pytest.approx(0.25 / 3)
    assert s["delta1"] == pytest.approx(2 / 3)  # 2.5/2 = 1.25 is not < 1.25
    assert metrics.depth_scores(np.array([1.0, 1.3]), np.array([1.0, 1.0]))["delta1"] == 0.5
    with pytest.raises(ValueError, match="no valid"):
        metrics.depth_scores(p, np.zeros(4))


def test_psnr_and_ssim_properties():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 16, 16)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    noisy = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    noisier = (a + 0.3 * torch.randn_like(a)).clamp(0, 1)
    assert 1 > metrics.ssim(noisy, a) > metrics.ssim(noisier, a)
    assert metrics.psnr(noisy, a) > metrics.psnr(noisier, a)
    assert metrics.psnr(a * 0 + 0.5, a * 0 + 0.6) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="smaller than"):
        metrics.ssim(a[..., :4, :4], a[..., :4, :4])


def test_ssim_default_window_is_the_standard_11_and_the_loss_is_one_minus_it():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    assert metrics.SSIM_WINDOW == 11
    assert metrics.ssim(a, b) == metrics.ssim(a, b, window=11) != metrics.ssim(a, b, window=7)
    assert metrics.ssim_loss(a, b).item() == pytest.approx(1 - metrics.ssim(a, b), abs=1e-12)
    with pytest.raises(ValueError, match="11×11"):
        metrics.ssim(a[..., :10, :10], b[..., :10, :10])
    x = a.float().requires_grad_()
    metrics.ssim_loss(x, b.float()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # the tensor SSIM in float64 is the number metrics.ssim returns
    assert metrics.ssim_index(a, b).item() == metrics.ssim(a, b)


def test_segmentation_meter_is_segmentation_scores_batch_by_batch():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(4, 3, 5, 5)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, 3, size=(4, 5, 5)))
    t[1, 0] = 255
    m = metrics.SegmentationMeter(3)
    for k in range(4):
        m.update(logits[k:k + 1], t[k:k + 1])
    whole = metrics.segmentation_scores(logits, t, 3)
    got = m.result(per_class=True)
    assert got["pixel_accuracy"] == whole["pixel_accuracy"] and got["mIoU"] == whole["mIoU"]
    assert np.array_equal(got["iou"], whole["iou"], equal_nan=True) and "iou" not in m.result()
    with pytest.raises(ValueError, match="num_classes >= 2"):
        metrics.SegmentationMeter(1)


def test_one_dense_supervised_method_for_sbm_and_recombination():
    from kaviz.data import scenes
    from kaviz.methods import dense, sbm
    from kaviz.methods import recombination as R

    assert sbm.DenseSupervised is dense.DenseSupervised and issubclass(R.Segmentation, dense.DenseSupervised)
    torch.manual_seed(0)
    data = scenes(n=6, size=16, max_objects=2, seed=1)
    seg = models.build("segnet_small", 11, widths=(4, 8, 8)).eval()
    x, y = next(iter(torch.utils.data.DataLoader(data, batch_size=6)))
    a = sbm.DenseSupervised(seg)((x, y))["ce"]
    b = R.Segmentation(seg, 11)((x, y))["ce"]
    c = R.Segmentation(seg, 11)((x, y["mask"]))["ce"]  # a plain (B, H, W) mask target
    assert torch.equal(a, b) and torch.equal(a, c)
    # the streamed scores are SBM's scores, and recombination's evaluate_dense gives the same numbers
    s = dense.dense_scores(seg, data, "segmentation", batch_size=4)
    assert s == sbm.score(seg, data, kinds={"seg": "segmentation"}, task="seg", prefix=False, batch_size=4)
    r = R.Segmentation(seg, 11).evaluate(data)
    assert r["mIoU"] == s["mIoU"] and r["pixel_accuracy"] == s["pixel_accuracy"]
    with pytest.raises(ValueError, match="num_classes is 5"):
        R.Segmentation(seg, 5)((x, y))
