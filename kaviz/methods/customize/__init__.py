"""Customised amalgamation from heterogeneous teachers (SPEC.md §5).

Shen, Wang, Song, Wang & Song, "Customizing Student Networks From Heterogeneous Teachers via
Adaptive Knowledge Amalgamation", ICCV 2019 (the attribute experiment).

Sources are multi-head classifiers (:class:`MultiHead`, one 2-way head per attribute) covering
overlapping attribute sets. A user wants a network for a *group* of attributes that no single
source covers. Three steps, each trained with :func:`kaviz.train.fit`:

1. **Selective learning** (:func:`select_sources`): for every unlabeled image and every source
   covering attribute a, the entropy of that head, ``H = -Σ_k p_k log p_k`` with
   ``log p = log_softmax(z)`` (finite for any logits); the image is assigned to the source with the
   lowest entropy (ties: the first source).
2. **Component net** per attribute (:class:`ComponentAmalgamation`, a single 2-way head), learned
   from its sources, each on its own assigned images, at the hooked blocks l (ResNet's ``conv1``,
   ``layer1``..``layer4``): 1×1 projections into common widths from the component (``P^s_l``, shared)
   and from each source (``P^t_l``); per source t::

       Σ_l MSE(P^s_l(F^comp_l), P^t_l(F^src_l)) + MSE(m_t · z^comp, z^src_a) + R(P^t)

   with a learnable scalar ``m_t`` (init 1) on the component's logits and the unit-norm regulariser
   ``R(P) = Σ_l mean_o (‖w_o‖² − 1)²`` over the rows ``w_o`` of the source-side projections (without
   it, both projections collapse to zero and the feature term vanishes).
3. **Target net** (:class:`TargetAmalgamation`): one network, wider than a component, one head per
   attribute of the group; for each component a (frozen)::

       Σ_l MSE(P_{a,l}(F^target_l), F^comp_a_l) + MSE(m_a · z^target_a, z^comp_a)

Labels are never read while amalgamating (only to pick the best epoch on the validation split and
to report accuracy). The reference implementation's faults are avoided: a data iterator that dies
after two passes (``fit`` makes a fresh one every epoch), a step schedule stepped per iteration
(``schedule="step"`` steps per epoch), a loop that trains only the last component (each component
is its own ``fit`` run; :func:`amalgamate_components` returns all of them with their histories),
misspelt attribute names (names are checked against the data's ``classes``).
"""
from .amalgamation import (
    ComponentAmalgamation,
    TargetAmalgamation,
    amalgamate_component,
    amalgamate_components,
    amalgamate_target,
    block_shapes,
    unit_norm_penalty,
)
from .multihead import (
    BLOCKS,
    MultiHead,
    default_blocks,
)
from .runs import (
    CELEBA_GROUP,
    CELEBA_SOURCES,
    EMBEDDED_GROUP,
    EMBEDDED_SOURCES,
    AttributeTask,
    CustomizeResult,
    attribute_task,
    run,
)
from .selection import (
    AssignedImages,
    Assignment,
    head_entropy,
    predict,
    select_from_logits,
    select_sources,
)
from .sources import (
    MultiHeadSupervised,
    train_source,
)
from .tables import (
    accuracy_table,
    assigned_examples,
    assignment_table,
    attribute_accuracy,
    comparison,
    coverage_table,
    example_images,
    majority_baseline,
    selection_controls,
    selection_table,
    summarise,
    summarize,
)

__all__ = [
    "BLOCKS",
    "default_blocks",
    "MultiHead",
    "MultiHeadSupervised",
    "train_source",
    "head_entropy",
    "predict",
    "select_from_logits",
    "Assignment",
    "select_sources",
    "AssignedImages",
    "unit_norm_penalty",
    "block_shapes",
    "ComponentAmalgamation",
    "TargetAmalgamation",
    "amalgamate_component",
    "amalgamate_components",
    "amalgamate_target",
    "attribute_accuracy",
    "accuracy_table",
    "AttributeTask",
    "attribute_task",
    "EMBEDDED_GROUP",
    "EMBEDDED_SOURCES",
    "CELEBA_GROUP",
    "CELEBA_SOURCES",
    "run",
    "CustomizeResult",
    "summarize",
    "summarise",
    "comparison",
    "assignment_table",
    "assigned_examples",
    "example_images",
    "selection_controls",
    "selection_table",
    "coverage_table",
    "majority_baseline",
]
