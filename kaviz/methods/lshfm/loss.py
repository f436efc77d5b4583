"""LSH feature mimicking losses (SPEC §2): LSHLoss (hash-code BCE on random hyperplanes), the L2 mimic
term, binary (per-class sigmoid) KD and softmax KD."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BIAS_MODES = ("median", "mean", "zero")


def check_int(name, v, minimum=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def as_features(f, what) -> torch.Tensor:
    if isinstance(f, np.ndarray):
        f = torch.from_numpy(np.ascontiguousarray(f))
    if not torch.is_tensor(f):
        raise TypeError(f"{what} must be a tensor or a NumPy array (N, D), got {type(f).__name__}")
    if f.dim() != 2:
        raise ValueError(f"{what} must be (N, D) pooled feature vectors, got shape {tuple(f.shape)}; pool "
                         "conv maps first (extract(..., pool='avg')) or tap the classifier's input ('fc:in')")
    return f


class LSHLoss(nn.Module):
    """Locality-sensitive-hashing feature-mimicking loss (LSHFM, TPAMI 2021; SPEC §2).

    Buffers (frozen, saved with the state dict): ``weight`` W ∈ R^{N×D} with entries ~ N(0, std²)
    and ``bias`` b ∈ R^N. With ``h(f) = f Wᵀ + b`` and the teacher's bits ``y = 1[h(f_t) > 0]``:

    - ``lsh = mean over (batch × N) of BCEWithLogits(h(f_s), y)``
    - ``l2  = mean over (batch × D) of (f_s − f_t)²``  (only when ``with_l2``)

    ``forward(f_s, f_t, mask=None)`` returns ``{"l2": ..., "lsh": ...}`` (named terms for
    :func:`kaviz.train.fit`); ``mask`` (bool per sample) restricts the average to some samples
    — the single-label variant averages over the samples the teacher classifies correctly
    (:func:`teacher_correct`); a batch with no such sample gives 0.

    ``std`` acts as an inverse temperature: scaling W scales ``h(f_s)`` but leaves the teacher's
    bits unchanged (also with a fitted bias, which scales with W). ``bias``: ``"median"``
    (``b_j = −median_i(w_j·f_t,i)`` over the teacher's training features, the lower median for an
    even count, so each bit splits the data 50/50), ``"mean"``, or ``"zero"`` (then the probability
    that a bit differs is θ(f_s, f_t)/π, the angle between the features over π). Call
    :meth:`fit_bias` before the first forward unless ``bias="zero"``. ``seed`` draws W from a
    private generator (else from torch's global RNG).
    """

    def __init__(self, dim: int, n_hashes: int, std: float, bias: str = "median", with_l2: bool = True, *,
                 seed: int | None = None):
        super().__init__()
        dim = check_int("dim", dim)
        n_hashes = check_int("n_hashes", n_hashes)
        if torch.is_tensor(std) and std.numel() == 1:
            std = float(std)
        elif isinstance(std, (int, float, np.floating)) and not isinstance(std, bool):
            std = float(std)
        if not isinstance(std, float) or not math.isfinite(std) or std <= 0:
            raise ValueError(f"std must be a positive finite number (the std of the hyperplanes' entries; by "
                             f"default the std of the teacher classifier's weights), got {std!r}")
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
        g = None
        if seed is not None:
            g = torch.Generator().manual_seed(check_int("seed", seed, minimum=0))
        self.dim, self.n_hashes, self.std, self.bias_mode, self.with_l2 = dim, n_hashes, std, bias, bool(with_l2)
        self.register_buffer("weight", torch.randn(n_hashes, dim, generator=g) * std)
        self.register_buffer("bias", torch.zeros(n_hashes))
        self.register_buffer("bias_fitted", torch.tensor(bias == "zero"))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_hashes={self.n_hashes}, std={self.std:.4g}, bias={self.bias_mode!r}, "
                f"with_l2={self.with_l2}")

    @torch.no_grad()
    def fit_bias(self, teacher_features) -> "LSHLoss":
        """Set ``b = −stat_i(W f_t,i)`` over the teacher's training features (N_t, D): the lower
        median (``"median"``), the mean (``"mean"``) or 0 (``"zero"``). Returns self."""
        f = as_features(teacher_features, "teacher_features")
        if f.shape[1] != self.dim:
            raise ValueError(f"teacher features have {f.shape[1]} dimensions, this LSHLoss expects {self.dim}")
        if f.shape[0] == 0:
            raise ValueError("fit_bias needs at least one teacher feature vector")
        f = f.to(self.weight.device, self.weight.dtype)  # the module's dtype: a .double() loss works
        if not torch.isfinite(f).all():
            raise ValueError("teacher features contain NaN/inf; check the teacher")
        proj = f @ self.weight.T
        if self.bias_mode == "median":
            stat = proj.median(dim=0).values  # torch's median is the lower median for an even count
        elif self.bias_mode == "mean":
            stat = proj.mean(0)
        else:
            stat = torch.zeros_like(self.bias)
        self.bias.copy_(-stat)
        self.bias_fitted.fill_(True)
        return self

    def hash(self, f: torch.Tensor) -> torch.Tensor:
        """``h(f) = f Wᵀ + b``, (B, N): the hash logits (their signs are the bits), in the module's
        dtype (features of another floating dtype are cast, keeping their graph)."""
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be (B, {self.dim}), got {tuple(f.shape)}")
        if f.dtype != self.weight.dtype and f.is_floating_point():
            f = f.to(self.weight.dtype)
        return F.linear(f, self.weight, self.bias)

    def bits(self, f: torch.Tensor) -> torch.Tensor:
        """``1[h(f) > 0]`` as a bool tensor (B, N)."""
        return self.hash(f) > 0

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        if f_s.shape != f_t.shape:
            raise ValueError(f"student features {tuple(f_s.shape)} and teacher features {tuple(f_t.shape)} must "
                             "have the same shape: put an adaptation layer on the student (kaviz.methods.lshfm.adapt)")
        if not bool(self.bias_fitted):
            raise RuntimeError(f"the LSH bias ({self.bias_mode!r}) is not fitted: call "
                               "lsh.fit_bias(teacher_training_features) first, or use bias='zero'")
        f_t = f_t.detach()
        logits = self.hash(f_s)
        y = (self.hash(f_t) > 0).to(logits.dtype)
        per_sample = {"lsh": F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)}
        if self.with_l2:
            per_sample = {"l2": (f_s - f_t).pow(2).mean(1), **per_sample}
        return {k: _masked_mean(v, mask) for k, v in per_sample.items()}


def hash_std(teacher_features, logit_std: float = 1.0) -> float:
    """A hyperplane ``std`` for :class:`LSHLoss` that gives the teacher's centred hash logits the
    standard deviation ``logit_std``: with entries of W ~ N(0, σ²), ``w·(f − f̄)`` has variance
    σ²·‖f − f̄‖², so ``σ = logit_std / √mean_i ‖f_t,i − f̄_t‖²`` over the teacher's training features
    (N, D). The bits do not depend on σ; the loss does: with SPEC's default (the std of the teacher
    classifier's weights) a small teacher's logits can sit so close to 0 that the term stays near
    ln 2 for any student (docs/decisions.md, "Recipes"). An option, not the default."""
    f = as_features(teacher_features, "teacher_features").double()
    if f.shape[0] < 2:
        raise ValueError("hash_std needs at least two teacher feature vectors (their spread sets the scale)")
    if not (isinstance(logit_std, (int, float)) and math.isfinite(logit_std) and logit_std > 0):
        raise ValueError(f"logit_std must be a positive number, got {logit_std!r}")
    spread = float((f - f.mean(0)).pow(2).sum(1).mean().sqrt())
    if not spread > 0:
        raise ValueError("the teacher features are all equal: no scale gives the hash a spread")
    return logit_std / spread


def _masked_mean(v: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return v.mean()
    mask = mask.to(device=v.device, dtype=torch.bool)
    if mask.shape != v.shape:
        raise ValueError(f"mask must be one bool per sample {tuple(v.shape)}, got {tuple(mask.shape)}")
    w = mask.to(v.dtype)
    # the sum keeps the graph connected (a zero gradient) when the teacher gets no sample right
    return (v * w).sum() / w.sum().clamp_min(1.0)


def l2_loss(f_s, f_t, mask=None) -> torch.Tensor:
    """``mean over (batch × D) of (f_s − f_t)²`` (the L2 mimicking baseline)."""
    if f_s.shape != f_t.shape:
        raise ValueError(f"student features {tuple(f_s.shape)} and teacher features {tuple(f_t.shape)} differ")
    return _masked_mean((f_s - f_t.detach()).pow(2).mean(1), mask)


def teacher_correct(teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Single-label variant: which samples the teacher classifies correctly (argmax == target)."""
    return teacher_logits.argmax(1) == targets


def binary_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Logit KD for a multi-label (sigmoid) teacher: per class, the teacher's probability is a soft
    binary target, ``mean over (batch × K) of BCEWithLogits(s/T, sigmoid(t/T)) · T²``."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if T <= 0:
        raise ValueError(f"temperature T must be positive, got {T}")
    return F.binary_cross_entropy_with_logits(student_logits / T, torch.sigmoid(teacher_logits.detach() / T)) * T * T


def softmax_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """Logit KD as the LSHFM reference code runs its "KD" baseline, also for multi-label teachers: a
    softmax over the classes at temperature ``T`` and
    ``KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch, times ``T²`` (its gradient equals
    that of :func:`kaviz.losses.soft_cross_entropy`; the value is the KL, 0 when the student
    matches). The reference recipe: ``T = 4``, weight 0.001 (:data:`REFERENCE_SOFTMAX_KD`)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    if T <= 0:
        raise ValueError(f"temperature T must be positive, got {T}")
    log_p_t = F.log_softmax(teacher_logits.detach() / T, dim=-1)
    log_p_s = F.log_softmax(student_logits / T, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T
