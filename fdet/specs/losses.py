"""Loss specs. Each carries its ``weight`` in the total objective."""

import attrs

from fdet.specs._core import Spec, non_negative, positive


@attrs.frozen(kw_only=True)
class SigmoidFocalLoss(Spec):
    """Focal loss on per-class sigmoids; ``alpha < 0`` turns the class balancing off."""

    alpha: float = 0.25
    gamma: float = attrs.field(default=2.0, validator=non_negative)
    weight: float = attrs.field(default=1.0, validator=non_negative)


@attrs.frozen(kw_only=True)
class SmoothL1Loss(Spec):
    """Smooth L1 on box deltas: quadratic below ``beta``, linear above (beta=0 is L1)."""

    beta: float = attrs.field(default=1.0 / 9.0, validator=non_negative)
    weight: float = attrs.field(default=1.0, validator=non_negative)


@attrs.frozen(kw_only=True)
class L1Loss(Spec):
    """L1 on box deltas."""

    weight: float = attrs.field(default=1.0, validator=non_negative)


@attrs.frozen(kw_only=True)
class GIoULoss(Spec):
    """1 - generalized IoU between decoded and target boxes."""

    weight: float = attrs.field(default=1.0, validator=non_negative)
    eps: float = attrs.field(default=1e-7, validator=positive)


BoxLoss = SmoothL1Loss | L1Loss | GIoULoss
