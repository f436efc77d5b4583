"""Student Becoming the Master (SBM): one student for scene parsing and depth (SPEC.md §4.2).

Ye, Ji, Wang, Ou, Tao and Song, "Student Becoming the Master: Knowledge Amalgamation for Joint
Scene Parsing, Depth Estimation, and More", CVPR 2019.

Two (or more) encoder–decoder teachers, each expert in one dense task, are amalgamated into one
student without labels:

1. The student **trunk** (encoder and decoder blocks, :class:`~kaviz.models.dense.SegNetSmall`) is
   a copy of one teacher (the segmentation teacher by default).
2. For each task t and each candidate **branch point** p (the block after which the task leaves
   the trunk: ``enc3``, ``dec3``, ``dec2`` or ``dec1``) the trunk feature f_p goes through a
   squeeze-and-excitation **adaptor** and a **frozen copy of teacher t's remaining decoder
   blocks and head** (:class:`TeacherTail`), so the student is judged in the teacher's own domain::

       a(f) = f · σ(W₂ ReLU(W₁ GAP(f) + b₁) + b₂),  W₁: C → max(C/4, 16),  GAP = mean over all H×W
       ŷ_{t,p} = tail_{t,p}(a_{t,p}(f_p))

3. Losses against the teachers' predictions (labels are never read): segmentation — cross-entropy
   to the teacher's per-pixel argmax (``seg_loss="ce"``) or per-pixel KL(p_t ‖ p_s) at temperature
   T (``"kl"``); depth — L1 to the teacher's depth. In the *block phase* the trunk and adaptors of
   every candidate branch are trained together while the teacher copies stay frozen.
4. **Branch-out**: each task's loss is measured per branch point on the training data
   (:func:`branch_losses`); the point with the lowest loss is kept (:func:`select_branches`,
   :meth:`SBMStudent.branch_out`), and then everything — trunk, adaptors and the tails — is
   fine-tuned (:func:`run` does all of it with :func:`kaviz.train.fit`). ``run(...,
   schedule="blockwise")`` trains the block phase stage by stage along the trunk instead of every
   branch at once (:data:`SCHEDULES`); teachers built with ``segnet_small(..., unpool="indices")``
   (SegNet max-unpooling) get tails that unpool with the student trunk's pooling indices.

The tails start as *copies of the teachers' decoders*: one reference implementation built them
fresh by mistake, which costs half the mIoU on NYUv2 (0.52 → 0.28); :func:`check_tails` tells the
two apart, and ``SBMStudent(..., tails="fresh")`` rebuilds that variant as an ablation.

The teachers themselves are trained with :class:`DenseSupervised` (cross-entropy with an ignore
index; L1 over valid depth pixels; ``1 − cos`` over valid normals for a third task of kind
``"normals"`` on ``scene_splits(..., normals=True)``) through :func:`kaviz.train.train_teacher`
(:func:`train_teachers`).
"""
from ..dense import DenseSupervised
from .data import (
    scene_splits,
    train_teachers,
)
from .evaluation import (
    ConstantPredictor,
    constant_predictor,
    predict,
    score,
    score_table,
)
from .method import (
    SBM,
    TeacherTargets,
)
from .runs import (
    SCHEDULES,
    SBMResult,
    branch_losses,
    branch_summary,
    choice_shares,
    run,
    select_branches,
)
from .student import (
    Branch,
    SBMStudent,
    SEAdaptor,
    TeacherTail,
    check_tails,
)
from .tasks import (
    BRANCH_POINTS,
    KINDS,
    TARGET_KEYS,
    kind_channels,
    normals_loss,
    normals_target,
)
from .tasks import (
    IGNORE_INDEX as IGNORE_INDEX,
)

__all__ = [
    "KINDS",
    "TARGET_KEYS",
    "BRANCH_POINTS",
    "kind_channels",
    "normals_target",
    "normals_loss",
    "DenseSupervised",
    "SEAdaptor",
    "TeacherTail",
    "Branch",
    "SBMStudent",
    "SBM",
    "TeacherTargets",
    "check_tails",
    "branch_losses",
    "select_branches",
    "branch_summary",
    "choice_shares",
    "SBMResult",
    "run",
    "SCHEDULES",
    "train_teachers",
    "scene_splits",
    "score",
    "score_table",
    "ConstantPredictor",
    "constant_predictor",
    "predict",
]
