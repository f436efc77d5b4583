"""Recombination: combine distinct-task teachers into one network, then prune it (SPEC.md §4.3).

The method of "Learning Semantic Image Compression from Distinct-task Teachers" (Zhejiang
University VIPA group; released as the *Recombination* example of KAmalEngine, which gives no
paper link). Re-implemented from SPEC.md §4.3; nothing of the reference code is used.

Teachers are SegNet-like encoder–decoders (:mod:`kaviz.models.dense`, ``skips=False``): an image
autoencoder (reconstruction, ``output="sigmoid"``) and a segmentation network.

1. **Combine** (:func:`combine`). Each encoder conv ``W_t`` of shape ``(C_out^t, C_in^t, k, k)`` is
   written into a zero tensor ``W`` of shape ``(ΣC_out, ΣC_in, k, k)`` at its own output *and*
   input offsets, ``W[o_t:o_t+C_out^t, i_t:i_t+C_in^t] = W_t`` with ``o_t = Σ_{s<t} C_out^s`` and
   ``i_t = Σ_{s<t} C_in^s``; batch-norm weights, biases and running statistics are concatenated;
   the image is repeated once per teacher on the channel axis (``i_t = 3t`` for the first conv).
   Per-channel operations (BN, ReLU, max-pooling) then keep the teachers apart, so channels
   ``o_t:o_t+C^t`` of every combined block are teacher t's features (:func:`reproduction_check`).
   (A reference version puts every teacher at input offset 0, so teacher 2 reads teacher 1's
   channels from the second conv on: ``combine(..., offset_bug=True)`` reproduces that for
   comparison.)
2. **Shared bottleneck and adaptors** (:class:`RecombinedNet`). A 1×1 conv over the combined code
   (identity-initialised when it keeps all ΣC channels), a uniform scalar quantiser
   ``q(z) = Δ·round(z/Δ)`` (:class:`Quantiser`; straight-through estimator: the backward pass
   treats rounding as the identity, Bengio et al. 2013, as in Theis et al. 2017), then per task a
   1×1 adaptor (initialised to select that teacher's channels) into a copy of the teacher's own
   decoder. Before any training, with the quantiser off, every task output equals its teacher's.
   ``combine(bottleneck="reference")`` (``bottleneck=16, bottleneck_norm=True``) builds the
   reference code's instead: 1×1 conv → BN → LeakyReLU → 1×1 conv down to 16 channels, the
   quantiser, and per task 1×1 conv → BN → LeakyReLU → 1×1 conv up to the teacher's width
   (:class:`Conv1x1Block`, randomly initialised; pruned like the rest).
3. **Prune and retrain** (:func:`prune`, :func:`recombine`). Each round removes from every
   prunable conv (by default those of the combined encoder and the shared bottleneck; the task
   decoders can be included) the ``fraction`` of filters with the **smallest** L1 norm
   ``‖W[o]‖₁`` (Li et al., ICLR 2017; one reference version removes the largest), together with
   their batch-norm channels and the next layer's input channels, then retrains with the
   label-free loss

   ``L = L1(x̂, x) + (1 − SSIM(x̂, x)) + soft_ce(s_seg, t_seg; T)``  (per pixel, T = 1)

   where x̂ is the reconstruction of the image x and ``t_seg`` the segmentation teacher's logits.

Everything is measured per round (:class:`RecombinationResult`): reconstruction PSNR/SSIM,
segmentation mIoU and pixel accuracy against the ground-truth masks, the number of parameters,
the code width and an empirical rate (bits per pixel, zeroth-order entropy of the quantised code).
"""
from .combine import (
    bottleneck_spec,
    combine,
    reproduction_check,
)
from .data import (
    load_splits,
)
from .evaluation import (
    ConstantDense,
    constant_baseline,
    evaluate_dense,
    teacher_scores,
)
from .method import (
    RECONSTRUCTION_LOSSES,
    RecombinationLoss,
)
from .network import (
    CRITERIA,
    DEFAULT_GROUPS,
    LEAKY_SLOPE,
    PRUNE_GROUPS,
    REFERENCE_BOTTLENECK,
    Conv1x1Block,
    PruneUnit,
    Quantiser,
    RecombinedNet,
    TaskDecoder,
)
from .prune import (
    filter_l1,
    prune,
)
from .runs import (
    RecombinationResult,
    compare_criteria,
    recombine,
    summarise,
    summarize,
)
from .tasks import (
    IGNORE_INDEX,
    SSIM_WINDOW,
    TASK_KINDS,
)
from .teachers import (
    Reconstruction,
    Segmentation,
    ssim_loss,
    train_dense_teacher,
)

__all__ = [
    "TASK_KINDS",
    "PRUNE_GROUPS",
    "DEFAULT_GROUPS",
    "CRITERIA",
    "IGNORE_INDEX",
    "SSIM_WINDOW",
    "ssim_loss",
    "Reconstruction",
    "Segmentation",
    "train_dense_teacher",
    "load_splits",
    "Quantiser",
    "TaskDecoder",
    "RecombinedNet",
    "Conv1x1Block",
    "REFERENCE_BOTTLENECK",
    "LEAKY_SLOPE",
    "combine",
    "bottleneck_spec",
    "reproduction_check",
    "PruneUnit",
    "filter_l1",
    "prune",
    "RecombinationLoss",
    "evaluate_dense",
    "teacher_scores",
    "constant_baseline",
    "ConstantDense",
    "RECONSTRUCTION_LOSSES",
    "recombine",
    "RecombinationResult",
    "compare_criteria",
    "summarize",
    "summarise",
]
