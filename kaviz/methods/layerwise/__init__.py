r"""Layer-wise knowledge amalgamation (Shen, Wang, Song, Sun & Song, "Amalgamating Knowledge towards
Comprehensive Classification", AAAI 2019; SPEC.md §4.1), and its one-stage variant as an ablation.

Several teachers, each trained on one *part* of a label set; a compact student of the same kind of
plain network covers all parts (one head of size ΣK_t, SPEC §0.1). Labels are never used to train it.

Three stages, each run with :func:`kaviz.train.fit`:

1. **Feature amalgamation** (:class:`FeatureAmalgamation`). Per layer l, the teachers' pre-activation
   features are concatenated along channels, ``F^l = [F_1^l ; F_2^l ; …]``, and a linear autoencoder
   learns a code of the student's width: encoder ``E_l`` = 1×1 conv ΣC_t → C_s(l), decoder ``D_l`` =
   1×1 conv back, loss ``MSE(D_l(E_l(F^l)), F^l)``. The amalgamated feature is ``F_a^l = E_l(F^l)``.
2. **Layer-wise parameter learning** (:class:`LayerwiseLearning`). Every student layer is trained
   independently (all in one pass, their losses do not interact) to map the previous amalgamated
   feature to the current one: by default ``ops_l`` (the parameter-free operations between the two
   layers: ReLU, pooling, flatten) → the layer's conv/linear ``W_l`` → an auxiliary 1×1 map ``A_l``
   → the layer's batch-norm (if any); loss ``MSE(·, F_a^l)``. The first layer reads the image; the last
   (the classifier) targets the concatenated teacher logits. Afterwards ``A_l`` is folded into
   ``W_l`` (:func:`fold_auxiliary`): ``W' = A·W``, ``b' = A·b + b_A``, exact because nothing
   non-linear lies between them. Where ``W_l`` has no bias, ``b'`` is absorbed into the following
   batch-norm's running mean (``μ' = μ − b'``), which is exact in eval mode and in training mode
   (the batch mean absorbs a constant). So the folded student has exactly the architecture it was
   built with.
3. **Joint fine-tuning** (:class:`LogitMatching`): the whole student, MSE to the concatenated
   teacher logits.

Where ``A`` sits (``placement``). The paper (SPEC §4.1) puts ``A_l`` on the *input* of layer l,
the pre-activation ``F_a^{l−1}``, before the ReLU/pooling, and after stage 2 folds it *backwards*
into layer l−1, whose output it consumed before any non-linearity: ``placement="input"``. That fold
is exact only if layer l−1 ends at its conv (no batch-norm, which in training mode re-standardises
the mixed channels) and has a bias, so it needs a BN-free student such as
``kaviz.models.build("vgg8_small", k, norm=False)`` (the paper's students are AlexNet-style, without
BN); :func:`check_placement` refuses anything else with a ValueError. kaviz's default,
``placement="output"``, puts ``A_l`` right after ``W_l`` (before the norm) and folds it into ``W_l``,
exactly in both modes and for students with batch-norm; there ``A`` only re-parametrises the
layer's linear map rather than widening its function class. Both start from the identity.

The one-stage variant (:class:`OneStageAmalgamation`) trains everything at once: per hooked layer an
encoder of the concatenated teacher features, a decoder back, and a 1×1 map of the student feature
onto the code; loss ``{"kd": soft_ce(student, [z_1 ‖ z_2 ‖ …]), "feat": Σ_l MSE(M_l(S^l),
E_l(F^l).detach()), "recon": Σ_l MSE(D_l(E_l(F^l)), F^l)}``.

Layers are found by name for any plain-chain network (:func:`infer_segments` traces one forward pass:
a conv/linear starts a layer, a batch-norm right after it ends it, parameter-free modules in between
are the ops); for networks with functional ops or skip connections, pass the :class:`Segment`\ s
yourself. Teachers and student may differ in width and family as long as paired layers have the
same spatial size.
"""
from .analysis import (
    accuracy_table,
    feature_maps,
    layer_errors,
    param_table,
    reconstruction_errors,
    seed_stats,
    summarize_seeds,
)
from .layers import (
    LayerPlan,
    Segment,
    infer_segments,
    plan_layers,
)
from .method import (
    ChannelLinear,
    FeatureAmalgamation,
    LayerwiseLearning,
    LogitMatching,
    OneStageAmalgamation,
    check_placement,
    fold_auxiliary,
    fold_check,
)
from .method import (
    teacher_features as teacher_features,
)
from .parts import (
    ClassPart,
    class_parts,
)
from .runs import (
    LayerwiseResult,
    run_layerwise,
    run_one_stage,
)

__all__ = [
    "ClassPart",
    "class_parts",
    "Segment",
    "infer_segments",
    "LayerPlan",
    "plan_layers",
    "ChannelLinear",
    "FeatureAmalgamation",
    "LayerwiseLearning",
    "fold_auxiliary",
    "check_placement",
    "LogitMatching",
    "OneStageAmalgamation",
    "LayerwiseResult",
    "run_layerwise",
    "run_one_stage",
    "accuracy_table",
    "summarize_seeds",
    "seed_stats",
    "reconstruction_errors",
    "layer_errors",
    "feature_maps",
    "param_table",
    "fold_check",
]
