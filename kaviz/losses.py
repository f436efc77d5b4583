"""Losses shared by several methods (SPEC.md §0)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["soft_cross_entropy", "mmd", "MMD_SIGMAS"]

MMD_SIGMAS = (0.001, 0.01, 0.05, 0.1, 0.2, 1, 2)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Soft-target distillation loss (Hinton et al. 2015; SPEC §0.2):

    ``soft_ce(s, t; T) = mean_n [ −Σ_k softmax(t_n/T)_k · log_softmax(s_n/T)_k ] · T²``

    Its gradient in ``s`` equals that of KL(p_t ‖ p_s); the T² keeps gradient magnitudes comparable
    across temperatures. The teacher side carries no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must have the same shape (for amalgamation: concatenate the teachers' logits in teacher order)"
        )
    if T <= 0:
        raise ValueError(f"temperature T must be positive, got {T}")
    p_t = F.softmax(teacher_logits.detach() / T, dim=-1)
    log_p_s = F.log_softmax(student_logits / T, dim=-1)
    return -(p_t * log_p_s).sum(-1).mean() * (T * T)


def mmd(x: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float] = MMD_SIGMAS, normalize: bool = True) -> torch.Tensor:
    """Multi-kernel maximum mean discrepancy, the variant CFL uses (SPEC §0.3).

    Rows are flattened per sample to (N, D); with ``normalize`` each row is divided by its L2 norm;
    ``K(a, b) = Σ_σ exp(−‖a−b‖² / (2σ²))`` with squared distances clamped below at 1e-12; the biased
    V-statistic with the diagonal included:
    ``MMD² = max(0, mean K(x,x) + mean K(y,y) − 2 mean K(x,y))``.
    Because the diagonal is included and the small bandwidths only see it, two independent batches
    of the same distribution give about 2·|{σ small}|/N, not 0; on paired features (student and
    teacher codes of the same images) it acts as feature matching.
    """
    if x.dim() < 2 or y.dim() < 2:
        raise ValueError(f"mmd expects batches (N, ...), got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.flatten(1)
    y = y.flatten(1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd needs the same feature size per sample, got {x.shape[1]} and {y.shape[1]}")
    if normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        y = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
    z = torch.cat([x, y], 0)
    # d² in float64: with σ = 0.001 the kernel multiplies d² by 5·10⁵, so the float32 cancellation
    # error of ‖a‖²+‖b‖²−2a·b (~1e-7) would make K(a, a) visibly less than 1 (and MMD²(x, x) > 0)
    z64 = z.double()
    sq = z64.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * z64 @ z64.T).clamp_min(1e-12)
    gammas = torch.tensor([1.0 / (2.0 * s * s) for s in sigmas], dtype=d2.dtype, device=d2.device)
    k = torch.exp(-d2[None] * gammas[:, None, None]).sum(0)
    n = x.shape[0]
    kxx = k[:n, :n].mean()
    kyy = k[n:, n:].mean()
    kxy = k[:n, n:].mean()
    return (kxx + kyy - 2.0 * kxy).clamp_min(0.0).to(x.dtype)
