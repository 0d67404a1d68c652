"""Head specs."""

from typing import Literal

import attrs

from fdet.specs._core import Spec, non_negative, one_of, open_unit, positive


@attrs.frozen(kw_only=True)
class RetinaHead(Spec):
    """Two conv towers (classification, box regression) shared over every pyramid level.

    ``num_convs`` 3×3 convs of ``channels`` channels with ReLU in each tower, then a 3×3 conv
    predicting ``num_anchors × num_classes`` logits (bias set from ``prior_prob``) or
    ``num_anchors × 4`` box deltas. ``norm="gn"`` puts group norm after each tower conv.
    """

    num_classes: int = attrs.field(validator=positive)
    num_convs: int = attrs.field(default=4, validator=non_negative)
    channels: int = attrs.field(default=256, validator=positive)
    prior_prob: float = attrs.field(default=0.01, validator=open_unit)
    norm: Literal["none", "gn"] = attrs.field(default="none", validator=one_of("none", "gn"))
    gn_groups: int = attrs.field(default=32, validator=positive)
