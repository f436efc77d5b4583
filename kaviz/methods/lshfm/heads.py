"""Adapting a student's classifier to the teacher's feature size (AdaptedHead) and naming the layers the method taps."""
from __future__ import annotations

from torch import nn

from .loss import check_int


class AdaptedHead(nn.Module):
    """The student's classifier on top of the adaptation layer: ``fc(feat_fc(x))`` with
    ``feat_fc = Linear(d_s, d_t)`` (no activation, SPEC §2). ``feat_fc``'s output is the student
    feature that mimics the teacher's."""

    def __init__(self, in_features: int, feature_dim: int, num_classes: int):
        super().__init__()
        self.feat_fc = nn.Linear(in_features, feature_dim)
        self.fc = nn.Linear(feature_dim, num_classes)

    @property
    def in_features(self) -> int:
        return self.feat_fc.in_features

    @property
    def out_features(self) -> int:
        return self.fc.out_features

    def forward(self, x):
        return self.fc(self.feat_fc(x))


def submodule_at(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        from ...features import unknown_layer_error

        raise unknown_layer_error(model, name)
    return modules[name]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = submodule_at(model, parent_name) if parent_name else model
    setattr(parent, child, module)


def head_name(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, AdaptedHead):
            return name
    return None


def adapt(student: nn.Module, feature_dim: int, classifier: str | None = None) -> nn.Module:
    """Put the adaptation layer on ``student`` (in place; returns it): its classifier (``classifier``,
    default :func:`kaviz.models.classifier_name`, e.g. ``fc``) becomes an :class:`AdaptedHead`
    ``Linear(d_s, feature_dim)`` → ``Linear(feature_dim, K)``, also when ``d_s == feature_dim``
    (SPEC §2: ResNet-18 ← ResNet-34 uses 512→512). Layer names afterwards: ``"<classifier>:in"``
    the pooled feature, ``"<classifier>.feat_fc"`` the adapted (mimicking) feature."""
    from ...models import classifier_name, spec

    feature_dim = check_int("feature_dim", feature_dim)
    if head_name(student) is not None:
        raise ValueError(f"{type(student).__name__} already has an adaptation layer at {head_name(student)!r}")
    name = classifier or classifier_name(student)
    old = submodule_at(student, name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"the classifier {name!r} must be an nn.Linear, got {type(old).__name__}; pass "
                        "classifier='<dotted name of the final Linear layer>'")
    head = AdaptedHead(old.in_features, feature_dim, old.out_features).to(old.weight.device)
    _set(student, name, head)
    student.kaviz_classifier = f"{name}.fc"
    student.kaviz_spec = {**spec(student), "adaptation": [name, feature_dim]}
    return student


def adapted_layer(student: nn.Module) -> str:
    """The name of the adapted (mimicking) feature of a student that went through :func:`adapt`."""
    name = head_name(student)
    if name is None:
        raise ValueError(f"{type(student).__name__} has no adaptation layer: call kaviz.methods.lshfm.adapt("
                         "student, teacher_feature_dim) first")
    return f"{name}.feat_fc"


def pooled_layer(student: nn.Module) -> str:
    """The student's own pooled feature (the adaptation layer's input)."""
    return f"{adapted_layer(student)}:in"


def feature_layer(model: nn.Module) -> str:
    """The pooled feature a (teacher) model's classifier reads: ``"<classifier>:in"``."""
    from ...models import classifier_name

    return f"{classifier_name(model)}:in"


def classifier_std(model: nn.Module) -> float:
    """Standard deviation of the classifier's weight matrix (the default LSH ``std``, SPEC §2)."""
    from ...models import classifier_name

    w = submodule_at(model, classifier_name(model)).weight.detach()
    return float(w.float().std())


def pooled_feature_dim(model: nn.Module) -> int:
    from ...models import classifier_name

    return int(submodule_at(model, classifier_name(model)).in_features)
