"""Loss specs. Each carries its ``weight`` in the total objective.

:class:`ClassificationLoss` and :class:`BoxLoss` are extension points: subclass one with an
``@attrs.frozen(kw_only=True)`` class that has a ``weight`` field and register a builder with
:func:`fdet.register` returning its per-anchor loss function; dense detectors call it through
``fdet.models.detectors.dense`` (see docs/specs.md).
"""

import math

import attrs

from fdet.specs._core import Spec, SpecError, non_negative, positive


class ClassificationLoss(Spec):
    """Base of classification-loss specs (abstract: make a subclass). Every subclass has a
    ``weight`` field: its factor in the total loss."""

    __slots__ = ()
    weight: float


class BoxLoss(Spec):
    """Base of box-regression-loss specs (abstract: make a subclass). Every subclass has a
    ``weight`` field: its factor in the total loss."""

    __slots__ = ()
    weight: float


def _focal_alpha(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not (math.isfinite(value) and value <= 1.0):
        raise SpecError(
            f"must be in [0, 1], or negative to turn the class balancing off; got {value!r}",
            attribute.name,
        )


@attrs.frozen(kw_only=True)
class SigmoidFocalLoss(ClassificationLoss):
    """Focal loss on per-class sigmoids: ``alpha`` in [0, 1] weighs positives by ``alpha`` and
    negatives by ``1 - alpha``; a negative ``alpha`` turns that balancing off."""

    alpha: float = attrs.field(default=0.25, validator=_focal_alpha)
    gamma: float = attrs.field(default=2.0, validator=non_negative)
    weight: float = attrs.field(default=1.0, validator=non_negative)


@attrs.frozen(kw_only=True)
class SmoothL1Loss(BoxLoss):
    """Smooth L1 on box deltas: quadratic below ``beta``, linear above (beta=0 is L1)."""

    beta: float = attrs.field(default=1.0 / 9.0, validator=non_negative)
    weight: float = attrs.field(default=1.0, validator=non_negative)


@attrs.frozen(kw_only=True)
class L1Loss(BoxLoss):
    """L1 on box deltas."""

    weight: float = attrs.field(default=1.0, validator=non_negative)


@attrs.frozen(kw_only=True)
class GIoULoss(BoxLoss):
    """1 - generalized IoU between decoded and target boxes."""

    weight: float = attrs.field(default=1.0, validator=non_negative)
    eps: float = attrs.field(default=1e-7, validator=positive)


__all__ = [
    "BoxLoss",
    "ClassificationLoss",
    "GIoULoss",
    "L1Loss",
    "SigmoidFocalLoss",
    "SmoothL1Loss",
]
