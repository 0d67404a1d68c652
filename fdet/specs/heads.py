"""Head specs."""

import attrs

from fdet.specs._core import Spec, SpecError, non_negative, open_unit, positive, spec_of
from fdet.specs.norms import Norm


@attrs.frozen(kw_only=True)
class RetinaHead(Spec):
    """Two conv towers (classification, box regression) shared over every pyramid level.

    ``num_convs`` 3×3 convs of ``channels`` channels with ReLU in each tower, then a 3×3 conv
    predicting ``num_anchors × num_classes`` logits (bias set from ``prior_prob``) or
    ``num_anchors × 4`` box deltas. ``norm`` (e.g. ``GroupNorm(groups=32)``, torchvision's v2
    head) goes after each tower conv, which then has no bias; None: plain convs with bias.
    """

    num_classes: int = attrs.field(validator=positive)
    num_convs: int = attrs.field(default=4, validator=non_negative)
    channels: int = attrs.field(default=256, validator=positive)
    prior_prob: float = attrs.field(default=0.01, validator=open_unit)
    norm: Norm | None = attrs.field(default=None, validator=spec_of(Norm, optional=True))

    def __attrs_post_init__(self) -> None:
        if self.norm is not None and self.num_convs > 0:
            try:
                self.norm.check_channels(self.channels, "the tower channels")
            except SpecError as e:
                raise e.under("norm") from None
