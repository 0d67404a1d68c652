"""Region proposal network specs: the balanced sampler (shared with the RoI heads) and the RPN.

The defaults are torchvision's ``fasterrcnn_resnet50_fpn`` recipe: one anchor size a level
(32 to 512 on P2 to P6) in three aspect ratios, one 3×3 conv in the head (two in the v2
recipe), max-IoU assignment at 0.7 / 0.3 with low-quality matches, 256 sampled anchors an image
of which at most half positive, deltas without normalisation, smooth L1 with ``beta = 1/9``, and
2000 / 2000 proposals before / after NMS in training, 1000 / 1000 in testing, NMS at 0.7.
"""

import attrs

from fdet.specs._core import Spec, non_negative, positive, probability, spec_of
from fdet.specs.dense import Anchors, DeltaXYWHCoder, MaxIoUAssigner
from fdet.specs.losses import BoxLoss, SmoothL1Loss

__all__ = ["RPN", "Sampler"]


@attrs.frozen(kw_only=True)
class Sampler(Spec):
    """A balanced random sample of labelled candidates an image
    (:func:`fdet.ops.sample.sample_balanced`): ``min(#positives, int(num_samples ·
    positive_fraction))`` positives, negatives for the rest of the ``num_samples`` (as many as
    there are). The RPN samples anchors with it (256, 0.5), the RoI heads proposals (512, 0.25).
    """

    num_samples: int = attrs.field(default=256, validator=positive)
    positive_fraction: float = attrs.field(default=0.5, validator=probability)


DEFAULT_ANCHORS = Anchors(
    strides=(4, 8, 16, 32, 64),
    base_sizes=(32.0, 64.0, 128.0, 256.0, 512.0),
    octave_scales=(1.0,),
    ratios=(0.5, 1.0, 2.0),
)
"""torchvision's Faster R-CNN anchors on P2–P6: one size a level, three aspect ratios."""


@attrs.frozen(kw_only=True)
class RPN(Spec):
    """The region proposal network of a two-stage detector.

    - ``anchors``: the anchor grid on every pyramid level it reads (levels as the neck's).
    - ``num_convs``: 3×3 conv + ReLU layers of the head before its two 1×1 predictors
      (objectness, 4 deltas a location and anchor), all at the neck's width; 1 in torchvision's
      Faster R-CNN, 2 in its v2 recipe (``conv_depth``).
    - ``assigner``: max-IoU labelling of the anchors (positive at ``pos_iou`` 0.7, negative
      below ``neg_iou`` 0.3, low-quality matches so that every gt gets an anchor); anchors
      covered by crowd regions are ignored.
    - ``sampler``: which labelled anchors enter the loss, per image.
    - ``coder``: the deltas the head predicts (torchvision's RPN: no normalisation, ``clip``
      ``log(1000/16)`` on decoding).
    - ``box_loss``: the regression loss on the sampled positives (smooth L1, ``beta = 1/9``),
      with its ``weight``; ``objectness_weight``: the weight of the objectness (binary
      cross-entropy) loss. Both are normalised by the number of sampled anchors.
    - ``pre_nms_topk_train`` / ``pre_nms_topk_test``: the best-scoring anchors kept on each
      level before NMS; ``post_nms_topk_train`` / ``post_nms_topk_test``: the proposals an image
      after NMS (the fixed ``R`` of the padded proposals).
    - ``nms_threshold``: IoU above which a proposal suppresses a lower-scoring one of the same
      level; ``min_size``: proposals narrower or lower than it (pixels) are dropped;
      ``score_threshold``: proposals whose objectness probability is below it are dropped.
    """

    anchors: Anchors = DEFAULT_ANCHORS
    num_convs: int = attrs.field(default=1, validator=non_negative)
    assigner: MaxIoUAssigner = MaxIoUAssigner(pos_iou=0.7, neg_iou=0.3)
    sampler: Sampler = Sampler()
    coder: DeltaXYWHCoder = DeltaXYWHCoder()
    box_loss: BoxLoss = attrs.field(
        default=SmoothL1Loss(beta=1.0 / 9.0), validator=spec_of(BoxLoss)
    )
    objectness_weight: float = attrs.field(default=1.0, validator=non_negative)
    pre_nms_topk_train: int = attrs.field(default=2000, validator=positive)
    post_nms_topk_train: int = attrs.field(default=2000, validator=positive)
    pre_nms_topk_test: int = attrs.field(default=1000, validator=positive)
    post_nms_topk_test: int = attrs.field(default=1000, validator=positive)
    nms_threshold: float = attrs.field(default=0.7, validator=probability)
    min_size: float = attrs.field(default=1e-3, validator=non_negative)
    score_threshold: float = attrs.field(default=0.0, validator=probability)

    def pre_nms_topk(self, training: bool) -> int:
        """Candidates kept on each level before NMS, in training or in testing."""
        return self.pre_nms_topk_train if training else self.pre_nms_topk_test

    def post_nms_topk(self, training: bool) -> int:
        """Proposals an image after NMS, in training or in testing."""
        return self.post_nms_topk_train if training else self.post_nms_topk_test
