"""Cascade R-CNN specs: a region proposal network, then several Fast R-CNN stages, each trained
on the boxes the stage before it refined, at a rising IoU threshold; with a mask head, Cascade
Mask R-CNN.

The defaults are the paper's three stages (Cai & Vasconcelos, CVPR 2018) on Faster R-CNN's
backbone, FPN and RPN (:class:`fdet.specs.FasterRCNN`): RoIs labelled positive at IoU 0.5, 0.6
and 0.7, class-agnostic deltas normalised by ``stds`` (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1,
0.1) and (0.033, 0.033, 0.067, 0.067), 512 RoIs an image a quarter positive, the stage losses
weighted 1, 0.5 and 0.25. ``num_classes`` has no default.
"""

from typing import Literal

import attrs

from fdet.constants import DEFAULT_SCALE_CLIP
from fdet.specs._core import (
    SpecError,
    float_tuple,
    non_negative,
    one_of,
    positive,
    spec_of,
    to_tuple,
)
from fdet.specs.backbones import ResNet
from fdet.specs.dense import DeltaXYWHCoder, MaxIoUAssigner, Normalize
from fdet.specs.detectors import Detector
from fdet.specs.mask import MaskHead
from fdet.specs.necks import FPN
from fdet.specs.roi import RoIHead
from fdet.specs.rpn import RPN
from fdet.specs.two_stage import FasterRCNN, check_two_stage, pyramid_levels_of

__all__ = ["CASCADE_STAGES", "CascadeRCNN", "ScoreRoIs", "cascade_from", "cascade_stage"]

ScoreRoIs = Literal["last", "own"]
"""Which RoIs the stages' classifiers score at test time (see :class:`CascadeRCNN`)."""


def cascade_stage(
    base: RoIHead,
    *,
    iou: float,
    stds: tuple[float, float, float, float],
) -> RoIHead:
    """``base`` as a cascade stage: proposals labelled positive at ``iou`` and background below
    it (no low-quality matches), class-agnostic deltas normalised by ``stds``. Everything else
    (RoI Align, box head, sampler, losses, postprocess) is ``base``'s."""
    return attrs.evolve(
        base,
        class_agnostic=True,
        assigner=attrs.evolve(base.assigner, pos_iou=iou, neg_iou=iou, low_quality_matches=False),
        coder=attrs.evolve(base.coder, stds=stds),
    )


_PAPER = (
    (0.5, (0.1, 0.1, 0.2, 0.2)),
    (0.6, (0.05, 0.05, 0.1, 0.1)),
    (0.7, (0.033, 0.033, 0.067, 0.067)),
)

CASCADE_STAGES: tuple[RoIHead, ...] = tuple(
    cascade_stage(
        RoIHead(
            assigner=MaxIoUAssigner(pos_iou=0.5, neg_iou=0.5, low_quality_matches=False),
            coder=DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2), clip=DEFAULT_SCALE_CLIP),
        ),
        iou=iou,
        stds=stds,
    )
    for iou, stds in _PAPER
)
"""The paper's three stages on :class:`fdet.specs.RoIHead`'s defaults (7×7 RoI Align on P2–P5,
two fully connected layers of 1024, 512 RoIs an image a quarter positive): IoU 0.5, 0.6, 0.7,
class-agnostic, ``stds`` halved, then divided by 1.5."""


def _check_stages(_: object, attribute: attrs.Attribute, value: tuple[object, ...]) -> None:
    if not isinstance(value, tuple) or not value:
        raise SpecError("must be a non-empty list of RoIHead specs", attribute.name)
    check = spec_of(RoIHead)
    for i, stage in enumerate(value):
        try:
            check(None, attribute, stage)
        except SpecError as e:
            raise SpecError(e.message, f"{attribute.name}[{i}]") from None


def _check_weights(_: object, attribute: attrs.Attribute, value: tuple[float, ...]) -> None:
    for i, weight in enumerate(value):
        try:
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise SpecError(f"must be a number, got {weight!r}", attribute.name)
            non_negative(None, attribute, weight)
        except SpecError as e:
            raise SpecError(e.message, f"{attribute.name}[{i}]") from None


@attrs.frozen(kw_only=True)
class CascadeRCNN(Detector):
    """Cascade R-CNN (Cai & Vasconcelos 2018) with a feature pyramid; Cascade Mask R-CNN with
    ``mask_head``.

    - ``num_classes``, ``backbone``, ``neck``, ``max_pool_levels``, ``rpn``, ``normalize``: as
      in :class:`fdet.specs.FasterRCNN` (the same checks: the neck reads backbone levels, the
      RPN's anchor strides are the pyramid's, ``max_pool_levels`` is 0 when the neck makes
      extra levels).
    - ``stages``: the Fast R-CNN stages in order, each a :class:`fdet.specs.RoIHead` (its RoI
      Align, box head, IoU thresholds, sampler, coder, losses; the last one's ``postprocess``
      makes the detections). Stage ``t + 1`` samples its RoIs from the boxes stage ``t``
      refined. Every stage pools from pyramid levels.
    - ``stage_weights``: one factor a stage, multiplying both of its terms' weights
      (``cls_weight``, ``box_loss.weight``); as many as ``stages``.
    - ``score_rois``: at test time every stage's classifier scores RoIs and the detection
      scores are the mean of their softmax probabilities. ``"last"``: all of them score the
      RoIs the last stage takes as input, the final boxes' own RoIs (the paper's ensemble);
      ``"own"``: each stage scores the RoIs it takes as input on the way (Detectron2's
      Cascade R-CNN, one head evaluation a stage instead of ``2T - 1``).
    - ``mask_head``: None, or the mask branch of Cascade Mask R-CNN
      (:class:`fdet.specs.MaskHead`, pooling from pyramid levels): one head, trained on the
      last stage's sampled positives, predicting the final detections' masks.
    """

    num_classes: int = attrs.field(validator=positive)  # type: ignore[misc]
    backbone: ResNet = ResNet()
    neck: FPN = FPN(in_levels=(2, 3, 4, 5), out_levels=(2, 3, 4, 5), channels=256)
    max_pool_levels: int = attrs.field(default=1, validator=non_negative)
    rpn: RPN = RPN()
    stages: tuple[RoIHead, ...] = attrs.field(
        default=CASCADE_STAGES, converter=to_tuple, validator=_check_stages
    )
    stage_weights: tuple[float, ...] = attrs.field(
        default=(1.0, 0.5, 0.25), converter=float_tuple, validator=_check_weights
    )
    score_rois: ScoreRoIs = attrs.field(default="last", validator=one_of("last", "own"))
    mask_head: MaskHead | None = attrs.field(
        default=None, validator=spec_of(MaskHead, optional=True)
    )
    normalize: Normalize = Normalize()

    def __attrs_post_init__(self) -> None:
        if len(self.stage_weights) != len(self.stages):
            raise SpecError(
                f"has {len(self.stage_weights)} weights for {len(self.stages)} stages",
                "stage_weights",
            )
        pooled = [(f"stages[{i}].roi_align", s.roi_align) for i, s in enumerate(self.stages)]
        if self.mask_head is not None:
            pooled.append(("mask_head.roi_align", self.mask_head.roi_align))
        check_two_stage(self.backbone, self.neck, self.max_pool_levels, self.rpn, pooled)

    @property
    def pyramid_levels(self) -> tuple[int, ...]:
        """The levels of the feature pyramid: the neck's ``out_levels``, then the
        ``max_pool_levels`` levels above them (as :attr:`fdet.specs.FasterRCNN.pyramid_levels`)."""
        return pyramid_levels_of(self.neck, self.max_pool_levels)

    @property
    def num_stages(self) -> int:
        """The number of Fast R-CNN stages."""
        return len(self.stages)


def cascade_from(faster: FasterRCNN) -> CascadeRCNN:
    """The paper's Cascade R-CNN on a Faster R-CNN spec: its backbone, neck, pooled levels, RPN
    and normalization, and three stages made of its RoI head by :func:`cascade_stage` (IoU
    0.5, 0.6, 0.7 with the paper's ``stds``), weighted 1, 0.5, 0.25. A change to the Faster
    R-CNN spec reaches the cascade."""
    return CascadeRCNN(
        num_classes=faster.num_classes,
        backbone=faster.backbone,
        neck=faster.neck,
        max_pool_levels=faster.max_pool_levels,
        rpn=faster.rpn,
        stages=tuple(cascade_stage(faster.roi_head, iou=iou, stds=stds) for iou, stds in _PAPER),
        stage_weights=(1.0, 0.5, 0.25),
        normalize=faster.normalize,
    )
