"""Common Feature Learning (CFL): amalgamating heterogeneous teachers into one student.

Luo, Wang, Feng, Song, Tao, Song, "Knowledge Amalgamation from Heterogeneous Networks by Common
Feature Learning", IJCAI 2019 (SPEC.md §1).

Teachers t = 1..M (different architectures, different datasets, disjoint label sets) are frozen. A
student with one head over the comprehensive label space (ΣK_t classes) learns from unlabeled images
of the union by

    L = soft_ce(s, [z_1 ‖ … ‖ z_M]; T=1) + λ·( Σ_t MMD²(h_s, h_t) + Σ_t MSE(f̂_t, f_t) ),  λ = 10,

where ``f_s``/``f_t`` are the features of the student's and each teacher's chosen layer (the last
conv stage), ``h = E(align(f))`` their codes in a *common space* (one alignment per network, a
shared extractor E), and ``f̂_t = dec_t(h_t)`` a reconstruction of teacher t's features from its
code, which keeps the teachers' information in the common space. The weights of the terms
``kd : mmd : recon`` are 1 : 10 : 10 (:data:`LOSS_WEIGHTS`); MMD is the multi-kernel variant of
SPEC §0.3 (:func:`kaviz.losses.mmd`).

**Spatial sizes.** Student and teacher features may have different spatial sizes (different
strides, e.g. an 8×8 ResNet stage and a 4×4 VGG stage). :func:`match_spatial` average-pools every
map to the smallest height and width among them (``adaptive_avg_pool2d``) before the block, so all
codes live on one grid and the reconstruction target is the pooled teacher map. Equal sizes are
left untouched (the paper's ResNets and DenseNet all give 7×7 at 224 px).

Public pieces: :class:`CFLBlock` (conv, SPEC §1) and :class:`CFLBlockFC` (the later fully-connected
variant), :class:`CommonFeatureLearning` (the method for :func:`kaviz.train.fit`),
:func:`amalgamate` (one call), :class:`KDBaseline` and :func:`run_students` (KD vs CFL over seeds
with the same budget), :func:`precompute_teachers` (frozen-teacher outputs computed once),
:class:`Spaces` (feature space vs common space for :class:`kaviz.widgets.EmbeddingExplorer`),
:func:`paired_distance_ratio`, :func:`load_data` (embedded shapes+digits or CUB-200+Stanford Dogs).
"""
from .block import (
    CFLBlock,
    CFLBlockFC,
    match_spatial,
)
from .data import (
    PairData,
    load_data,
)
from .method import (
    LOSS_WEIGHTS,
    POST_RELU,
    CommonFeatureLearning,
)
from .runs import (
    Run,
    lr_for,
    per_seed_table,
    results_table,
    run_students,
    step_schedule,
    term_gradients,
)
from .spaces import (
    Spaces,
    paired_distance_ratio,
    pick_per_class,
)
from .teachers import (
    KDBaseline,
    TeacherOutputs,
    amalgamate,
    precompute_teachers,
    train_teachers,
)

__all__ = [
    "LOSS_WEIGHTS",
    "CFLBlock",
    "CFLBlockFC",
    "match_spatial",
    "CommonFeatureLearning",
    "TeacherOutputs",
    "precompute_teachers",
    "amalgamate",
    "train_teachers",
    "KDBaseline",
    "Run",
    "run_students",
    "results_table",
    "per_seed_table",
    "term_gradients",
    "POST_RELU",
    "lr_for",
    "step_schedule",
    "Spaces",
    "paired_distance_ratio",
    "pick_per_class",
    "PairData",
    "load_data",
]
