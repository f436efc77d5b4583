"""Distilling knowledge by mimicking features (Guo-Hua Wang, Yifan Ge & Jianxin Wu, "Distilling
Knowledge by Mimicking Features", IEEE TPAMI 2021, arXiv:2011.01424; SPEC.md §2).

The student mimics the teacher's penultimate feature (the global-pooled vector that feeds the
classifier) instead of its soft logits, so the method also works for teachers without a softmax
(multi-label BCE teachers). It mainly mimics the feature's *direction*: random hyperplanes
(locality-sensitive hashing) turn a direction into bits, and the student must reproduce the
teacher's bits.

- :class:`LSHLoss` — frozen projection ``W`` (N×D, entries ~ N(0, std²)) and bias ``b`` (N);
  ``h = f Wᵀ + b``; ``L_LSH = mean BCEWithLogits(h_s, 1[h_t > 0])``, ``L_L2 = mean (f_s − f_t)²``.
- :func:`adapt` — the adaptation layer: the student's classifier ``fc`` becomes
  :class:`AdaptedHead` ``fc.fc(fc.feat_fc(x))`` with ``feat_fc = Linear(d_s, d_t)``; the mimicked
  feature is ``feat_fc``'s output.
- :class:`FeatureMimic` — the method (one of :data:`VARIANTS`: ``bce``, ``l2``, ``lsh``, ``lshl2``,
  ``kd``), stage 1 (only ``feat_fc`` trains, β·L alone, batch-norm statistics updating) or stage 2
  (everything, ``BCE + β·L``).
- :func:`run` — stage 1 then stage 2 with :func:`kaviz.train.fit` (bias re-fitted before stage 2),
  model selection on the validation split.
- Data and analysis: :func:`load_data` (embedded scenes or VOC2007 / COCO 2014),
  :func:`teacher_outputs`, :func:`evaluate_model`, :func:`results_table`, :func:`per_class_table`,
  :func:`feature_agreement`, :func:`mean_feature_cosine`, :func:`feature_sets`,
  :func:`angle_hamming`, :func:`primary_labels`.

Why :func:`adapt` replaces the classifier module instead of wrapping the student: the adapted
student stays *one* ``nn.Module`` whose ``forward(x)`` returns logits, so everything that takes a
model (``extract``, ``FeatureTap``, ``Supervised``, the embedding explorer, checkpoints) works on
it unchanged, and the adaptation is part of its state dict. A wrapper that re-routes the
classifier's input with a hook would make ``student(x)`` behave differently inside and outside
the wrapper. The student's class is not edited: only its classifier attribute is replaced, and
the names stay tappable (``fc:in`` the pooled feature, ``fc.feat_fc`` the adapted one).
"""
from .analysis import (
    angle_hamming,
    evaluate_model,
    feature_agreement,
    feature_sets,
    mean_feature_cosine,
    per_class_table,
    primary_labels,
    results_table,
)
from .data import (
    DATA_SOURCES as DATA_SOURCES,
)
from .data import (
    label_summary,
    load_data,
)
from .heads import (
    AdaptedHead,
    adapt,
    adapted_layer,
    classifier_std,
    feature_layer,
    pooled_layer,
)
from .loss import (
    BIAS_MODES,
    LSHLoss,
    binary_kd,
    hash_std,
    softmax_kd,
    teacher_correct,
)
from .loss import (
    l2_loss as l2_loss,
)
from .method import (
    KD_LOSSES,
    REFERENCE_SOFTMAX_KD,
    VARIANTS,
    FeatureMimic,
)
from .method import (
    MIMIC_VARIANTS as MIMIC_VARIANTS,
)
from .runs import (
    RunResult,
    run,
)
from .teachers import (
    TeacherOutputs,
    teacher_outputs,
)

__all__ = [
    "LSHLoss",
    "BIAS_MODES",
    "VARIANTS",
    "AdaptedHead",
    "adapt",
    "adapted_layer",
    "pooled_layer",
    "feature_layer",
    "classifier_std",
    "teacher_correct",
    "binary_kd",
    "softmax_kd",
    "hash_std",
    "KD_LOSSES",
    "REFERENCE_SOFTMAX_KD",
    "TeacherOutputs",
    "teacher_outputs",
    "FeatureMimic",
    "RunResult",
    "run",
    "load_data",
    "label_summary",
    "evaluate_model",
    "results_table",
    "per_class_table",
    "feature_agreement",
    "mean_feature_cosine",
    "feature_sets",
    "angle_hamming",
    "primary_labels",
]
