"""Specs of GFL (Generalized Focal Loss, Li et al., NeurIPS 2020): its head, its two losses and
the whole detector, on ATSS assignment (:mod:`fdet.specs.atss`)."""

import attrs

from fdet.specs._core import Spec, non_negative, open_unit, positive, spec_of
from fdet.specs.atss import SINGLE_ANCHORS, ATSSAssigner, _check_norm
from fdet.specs.backbones import ResNet
from fdet.specs.dense import Anchors, DensePostprocess, Normalize
from fdet.specs.detectors import Detector, check_pyramid, check_strides
from fdet.specs.losses import GIoULoss
from fdet.specs.necks import FPN
from fdet.specs.norms import GroupNorm, Norm


@attrs.frozen(kw_only=True)
class GFLHead(Spec):
    """Towers shared over the levels predicting, a location, ``num_classes`` logits of the
    joint class–quality score (no centerness branch) and, for each box side, ``reg_max + 1``
    logits of a distribution over the distances ``0 … reg_max`` (in stride units), scaled by a
    learned factor a level.

    ``num_convs`` 3×3 convs of ``channels`` channels with ReLU in each tower, each followed by
    ``norm`` (group norm by default; the convs then have no bias); the classification
    predictor's bias starts at ``prior_prob``.
    """

    num_classes: int = attrs.field(validator=positive)
    num_convs: int = attrs.field(default=4, validator=non_negative)
    channels: int = attrs.field(default=256, validator=positive)
    prior_prob: float = attrs.field(default=0.01, validator=open_unit)
    norm: Norm | None = attrs.field(
        default=GroupNorm(groups=32), validator=spec_of(Norm, optional=True)
    )
    reg_max: int = attrs.field(default=16, validator=positive)

    def __attrs_post_init__(self) -> None:
        _check_norm(self.norm, self.num_convs, self.channels)


@attrs.frozen(kw_only=True)
class QualityFocalLoss(Spec):
    """Quality focal loss (:func:`fdet.ops.losses.quality_focal_loss`): BCE against the IoU of
    the predicted box on positives (0 elsewhere), modulated by ``|y - σ|^beta``."""

    beta: float = attrs.field(default=2.0, validator=non_negative)
    weight: float = attrs.field(default=1.0, validator=non_negative)


@attrs.frozen(kw_only=True)
class DistributionFocalLoss(Spec):
    """Distribution focal loss (:func:`fdet.ops.losses.distribution_focal_loss`) on the four
    side distributions, averaged over the sides. Targets are clamped into
    ``[0, reg_max - eps]`` (in stride units) so they fall strictly inside the last bin."""

    weight: float = attrs.field(default=0.25, validator=non_negative)
    eps: float = attrs.field(default=0.1, validator=open_unit)


@attrs.frozen(kw_only=True)
class GFL(Detector):
    """GFL: backbone → FPN → :class:`GFLHead` on one anchor a location, ATSS assignment,
    quality focal loss, GIoU on the boxes integrated from the side distributions and
    distribution focal loss (both weighted by the predicted score); scores ``sigmoid(cls)``.

    The defaults are the paper's R50-FPN recipe as MMDetection trains it (``head`` holds
    ``num_classes`` and has no default).
    """

    backbone: ResNet = ResNet(out_levels=(3, 4, 5))
    neck: FPN = FPN(out_levels=(3, 4, 5, 6, 7), extra_from="p5", extra_relu=False)
    head: GFLHead
    anchors: Anchors = SINGLE_ANCHORS
    assigner: ATSSAssigner = ATSSAssigner()
    cls_loss: QualityFocalLoss = QualityFocalLoss()
    box_loss: GIoULoss = GIoULoss(weight=2.0)
    dfl: DistributionFocalLoss = DistributionFocalLoss()
    postprocess: DensePostprocess = DensePostprocess(
        score_threshold=0.05, topk_per_level=1000, nms_iou=0.6, max_detections=100
    )
    normalize: Normalize = Normalize()

    def __attrs_post_init__(self) -> None:
        check_pyramid(self.backbone, self.neck)
        check_strides(self.anchors.strides, self.neck)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes


__all__ = ["GFL", "DistributionFocalLoss", "GFLHead", "QualityFocalLoss"]
