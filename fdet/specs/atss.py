"""Specs of ATSS (Adaptive Training Sample Selection, Zhang et al., CVPR 2020): its assigner,
its head and the whole detector. GFL (:mod:`fdet.specs.gfl`) reuses the assigner and anchors."""

import attrs

from fdet.specs._core import (
    Spec,
    SpecError,
    non_negative,
    open_unit,
    positive,
    probability,
    spec_of,
)
from fdet.specs.backbones import ResNet
from fdet.specs.dense import Anchors, DeltaXYWHCoder, DensePostprocess, Normalize
from fdet.specs.detectors import Detector, check_pyramid, check_strides
from fdet.specs.losses import BoxLoss, ClassificationLoss, GIoULoss, SigmoidFocalLoss
from fdet.specs.necks import FPN
from fdet.specs.norms import GroupNorm, Norm

SINGLE_ANCHORS = Anchors(
    strides=(8, 16, 32, 64, 128),
    base_sizes=(64.0, 128.0, 256.0, 512.0, 1024.0),
    octave_scales=(1.0,),
    ratios=(1.0,),
    truncate_sizes=False,
    round_offsets=False,
)
"""One square anchor a location of side ``8 × stride`` (octave base scale 8), P3–P7: the
anchors of the ATSS and GFL papers."""


@attrs.frozen(kw_only=True)
class ATSSAssigner(Spec):
    """Adaptive training sample selection (:func:`fdet.ops.assign.assign_atss`).

    ``topk`` anchors nearest to each gt's centre on every level are its candidates; those whose
    IoU reaches the mean + standard deviation of the candidates' IoUs and whose centre lies
    inside the gt are positive. ``unbiased_std``: divide by ``n - 1`` (``torch.std``'s default,
    used by the reference implementations) rather than ``n``. ``inside_eps``: how far inside
    every side (pixels) a centre must be. ``crowd_ioa``: an anchor more than this fraction
    inside a crowd region is ignored unless positive.
    """

    topk: int = attrs.field(default=9, validator=positive)
    unbiased_std: bool = True
    inside_eps: float = attrs.field(default=0.01, validator=non_negative)
    crowd_ioa: float = attrs.field(default=0.5, validator=probability)


def _check_norm(norm: Norm | None, num_convs: int, channels: int) -> None:
    if norm is not None and num_convs > 0:
        try:
            norm.check_channels(channels, "the tower channels")
        except SpecError as e:
            raise e.under("norm") from None


@attrs.frozen(kw_only=True)
class ATSSHead(Spec):
    """RetinaNet-style towers (classification, box regression) shared over the levels, with a
    learned scale a level on the box deltas and, with ``centerness``, a centerness logit a
    anchor predicted from the box tower (False: "RetinaNet + ATSS", without the branch).

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
    centerness: bool = True

    def __attrs_post_init__(self) -> None:
        _check_norm(self.norm, self.num_convs, self.channels)


@attrs.frozen(kw_only=True)
class ATSS(Detector):
    """ATSS: backbone → FPN → :class:`ATSSHead` on one anchor a location, ATSS assignment,
    focal classification, GIoU on decoded deltas weighted by the centerness target, centerness
    BCE; scores ``sigmoid(cls) · sigmoid(centerness)``.

    The defaults are the paper's R50-FPN recipe as MMDetection trains it (``head`` holds
    ``num_classes`` and has no default). ``centerness_weight`` multiplies the centerness term.
    """

    backbone: ResNet = ResNet(out_levels=(3, 4, 5))
    neck: FPN = FPN(out_levels=(3, 4, 5, 6, 7), extra_from="p5", extra_relu=False)
    head: ATSSHead
    anchors: Anchors = SINGLE_ANCHORS
    assigner: ATSSAssigner = ATSSAssigner()
    coder: DeltaXYWHCoder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    cls_loss: ClassificationLoss = attrs.field(
        default=SigmoidFocalLoss(alpha=0.25, gamma=2.0), validator=spec_of(ClassificationLoss)
    )
    box_loss: BoxLoss = attrs.field(default=GIoULoss(weight=2.0), validator=spec_of(BoxLoss))
    centerness_weight: float = attrs.field(default=1.0, validator=non_negative)
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


__all__ = ["ATSS", "SINGLE_ANCHORS", "ATSSAssigner", "ATSSHead"]
