r"""Knowledge consistency between two networks (Liang, Li, Li, Wang & Zhang, "Knowledge Consistency
between Neural Networks and Beyond", ICLR 2020; SPEC.md §3).

Explain network B's intermediate feature ``x_B`` from network A's feature ``x_A`` with a small
"Trans-Net" ``g`` whose output splits *exactly* into components of increasing non-linearity
("fuzziness"): ``x_B ≈ x⁽⁰⁾ + x⁽¹⁾ + … + x⁽ᴷ⁻¹⁾ = g(x_A)``, and ``x^Δ = x_B − g(x_A)`` is the part of
B's knowledge that A does not hold (the inconsistent part).

What is here:

- :class:`TransNet` (any number of orders K ≥ 1), its loss :class:`TransNetLoss` (MSE + the α
  penalty on the gates) and :func:`fit_transnet`, which extracts both networks' features ONCE into
  on-disk :class:`kaviz.features.FeatureStore`\ s (training and validation splits) and trains the
  Trans-Net on them with :func:`kaviz.train.fit` (Adam, log-linear lr decay);
- the variance analysis (:func:`component_variance`, :func:`variance_table`, :func:`compare`);
- trans-classification (:func:`tail_after`, :class:`TransClassifier`, :func:`trans_classification`):
  A's consistent components, chosen by an order mask, are fed into B's layers after the cut;
- Born-Again chains (:class:`BornAgain`, :func:`born_again_chain`);
- what the notebook's "visual contract" widget shows (:func:`contract_view`), and the data the
  notebook runs on (:func:`load_data`, :func:`coarse_task`).
"""
from .analysis import (
    CONTROLS,
    Consistency,
    Reordered,
    compare,
    derangement,
    fit_transnet,
)
from .born_again import (
    BornAgain,
    born_again_chain,
)
from .contract import (
    ContractView,
    contract_view,
)
from .data import (
    NotebookData,
    Relabelled,
    coarse_task,
    default_coarse_groups,
    halves,
    load_data,
)
from .features import (
    FeatureLabels,
    PairedFeatures,
    cached_features,
    check_pair,
)
from .transclass import (
    TransClassifier,
    tail_after,
    trans_classification,
)
from .transnet import (
    ReluState,
    TransNet,
    TransNetLoss,
    spatial_scale,
)
from .transnet import (
    order_name as order_name,
)
from .variances import (
    component_correlation,
    component_variance,
    variance_table,
)

__all__ = [
    "TransNet",
    "ReluState",
    "spatial_scale",
    "TransNetLoss",
    "PairedFeatures",
    "FeatureLabels",
    "cached_features",
    "check_pair",
    "fit_transnet",
    "Consistency",
    "CONTROLS",
    "derangement",
    "Reordered",
    "component_variance",
    "component_correlation",
    "variance_table",
    "compare",
    "tail_after",
    "TransClassifier",
    "trans_classification",
    "BornAgain",
    "born_again_chain",
    "ContractView",
    "contract_view",
    "Relabelled",
    "coarse_task",
    "default_coarse_groups",
    "NotebookData",
    "load_data",
    "halves",
]

# compression (magnitude pruning of a net vs the original; SPEC §3)
from .compression import (  # noqa: E402
    compression_consistency,
    magnitude_prune,
    prunable_modules,
    prune_masks,
    weight_sparsity,
)

__all__ += [
    "magnitude_prune",
    "prune_masks",
    "prunable_modules",
    "weight_sparsity",
    "compression_consistency",
]
