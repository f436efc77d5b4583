import math

import pytest
import torch
import torch.nn.functional as F

from kaviz.losses import MMD_SIGMAS, mmd, soft_cross_entropy


def test_soft_ce_hand_computed():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    # p_t = (.5, .5); -Σ p_t log softmax(s) = -(.5 log σ(1) + .5 log σ(-1))
    expected = -(0.5 * math.log(1 / (1 + math.exp(-1))) + 0.5 * math.log(1 / (1 + math.exp(1))))
    assert soft_cross_entropy(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_soft_ce_gradient_equals_kl_gradient_and_t_squared():
    torch.manual_seed(0)
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7)
    for T in (1.0, 4.0):
        g1, = torch.autograd.grad(soft_cross_entropy(s, t, T), s)
        kl = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
        g2, = torch.autograd.grad(kl, s)
        assert torch.allclose(g1, g2, atol=1e-6)
    # minimum at s == t: soft_ce(t, t) = entropy(p_t) · T²
    p = F.softmax(t, 1)
    assert soft_cross_entropy(t, t).item() == pytest.approx(-(p * p.log()).sum(1).mean().item(), rel=1e-5)


def test_soft_ce_no_gradient_into_teacher_and_errors():
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    soft_cross_entropy(s, t).backward()
    assert t.grad is None
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="positive"):
        soft_cross_entropy(s, t, T=0)


def test_mmd_zero_for_identical_and_symmetric_nonnegative():
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    y = torch.randn(16, 32) + 0.3
    assert mmd(x, x).item() == pytest.approx(0.0, abs=1e-6)
    for threads in (1, 2):  # the matmul form of d² failed this at some thread counts
        torch.set_num_threads(threads)
        z = torch.randn(64, 2048)
        assert mmd(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    xg = x.clone().requires_grad_(True)
    mmd(xg, x).backward()
    assert torch.isfinite(xg.grad).all()
    assert mmd(x, y).item() == pytest.approx(mmd(y, x).item(), rel=1e-6)
    assert mmd(x, y).item() >= 0


def test_mmd_independent_unit_vectors_sit_near_two_small_sigmas_over_n():
    """SPEC §0.3: with the diagonal included, independent same-distribution batches of unit vectors
    in high dimension give about 2·|S_small|/N (≈ 0.18 at N=64), not 0."""
    torch.manual_seed(0)
    vals = {}
    for n in (32, 64, 128):
        vals[n] = sum(mmd(torch.randn(n, 2048), torch.randn(n, 2048)).item() for _ in range(3)) / 3
    assert 0.16 < vals[64] < 0.21
    assert vals[32] > vals[64] > vals[128]          # it shrinks like 1/N
    assert vals[32] * 32 == pytest.approx(vals[128] * 128, rel=0.1)
    small = sum(1 for s in MMD_SIGMAS if s <= 0.2)
    assert vals[64] > 2 * small / 64                 # plus what the wide kernels add


def test_mmd_paired_features_act_as_matching():
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    far = mmd(x, torch.randn(64, 256)).item()
    noisy = [mmd(x, x + eps * torch.randn_like(x)).item() for eps in (0.1, 0.01, 0.001, 0.0001)]
    assert far > noisy[0] > noisy[1] > noisy[2] > noisy[3]      # closer pairs, smaller MMD
    assert noisy[3] < 1e-3 * far


def test_mmd_normalize_and_flatten_and_errors():
    x = torch.randn(8, 2, 3, 3)
    assert mmd(x, 5 * x).item() == pytest.approx(0.0, abs=1e-6)         # scale-free when normalised
    assert mmd(x, 5 * x, normalize=False).item() > 0.01
    with pytest.raises(ValueError, match="same feature size"):
        mmd(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="batches"):
        mmd(torch.randn(4), torch.randn(4))
