"""RoI head specs: the multi-scale RoI Align, the box head, and one Fast R-CNN stage (targets,
losses, postprocess) of a two-stage or cascade detector.

The defaults are torchvision's ``fasterrcnn_resnet50_fpn`` recipe: 7×7 RoI Align with sampling
ratio 2 on P2–P5, two fully connected layers of 1024 (``"2fc"``; torchvision's v2 recipe is
``"4conv1fc"``), proposals labelled at IoU 0.5 (background below 0.5) with the gts appended,
512 sampled an image of which at most a quarter positive, class-specific deltas with
``stds = (0.1, 0.1, 0.2, 0.2)`` (torchvision's ``BoxCoder((10, 10, 5, 5))``), smooth L1 with
``beta = 1/9``, and detections above 0.05, NMS at 0.5 per class, 100 an image.
"""

from typing import Literal

import attrs

from fdet.constants import DEFAULT_SCALE_CLIP
from fdet.specs._core import (
    Spec,
    SpecError,
    each,
    int_tuple,
    non_empty,
    non_negative,
    one_of,
    positive,
    probability,
    spec_of,
)
from fdet.specs.dense import DeltaXYWHCoder, MaxIoUAssigner
from fdet.specs.losses import BoxLoss, SmoothL1Loss
from fdet.specs.norms import BatchNorm, Norm
from fdet.specs.rpn import Sampler

__all__ = [
    "BOX_HEAD_KINDS",
    "BoxHead",
    "BoxHeadKind",
    "RoIAlign",
    "RoIHead",
    "RoIPostprocess",
]

BoxHeadKind = Literal["2fc", "4conv1fc"]
"""The layout of a :class:`BoxHead`."""

BOX_HEAD_KINDS: tuple[BoxHeadKind, ...] = ("2fc", "4conv1fc")


@attrs.frozen(kw_only=True)
class RoIAlign(Spec):
    """RoI Align over a feature pyramid (:func:`fdet.ops.roi.multiscale_roi_align`).

    - ``levels``: the pyramid levels pooled from (consecutive; P2–P5 in Faster R-CNN, not the
      RPN's extra P6). Level ``l`` has spatial scale ``2 ** -l``.
    - ``output_size``: the ``output_size × output_size`` bins of each RoI (7 for boxes, 14 for
      masks).
    - ``sampling_ratio``: bilinear samples a bin side (2); ``<= 0`` adapts it to the bin size.
    - ``canonical_scale``, ``canonical_level``: an RoI of ``canonical_scale²`` pixels is pooled
      from ``canonical_level``; each halving of its side one level down (224 and 4, FPN's
      eq. 1), clamped to ``levels``.
    - ``aligned``: the half-pixel-corrected sampling of Detectron2 (False in torchvision).
    """

    levels: tuple[int, ...] = attrs.field(
        default=(2, 3, 4, 5), converter=int_tuple, validator=[non_empty, each(positive)]
    )
    output_size: int = attrs.field(default=7, validator=positive)
    sampling_ratio: int = 2
    canonical_scale: float = attrs.field(default=224.0, validator=positive)
    canonical_level: int = attrs.field(default=4, validator=non_negative)
    aligned: bool = False

    def __attrs_post_init__(self) -> None:
        levels = self.levels
        if list(levels) != list(range(levels[0], levels[0] + len(levels))):
            raise SpecError(f"must be consecutive increasing levels, got {levels}", "levels")


@attrs.frozen(kw_only=True)
class BoxHead(Spec):
    """The layers between pooled RoI features and the predictor.

    - ``kind="2fc"``: flatten, then two fully connected layers of ``fc_channels`` with ReLU
      (torchvision's ``TwoMLPHead``, Detectron2's ``2fc``).
    - ``kind="4conv1fc"``: ``num_convs`` 3×3 convs of ``conv_channels`` with ``norm`` and ReLU,
      then flatten and one fully connected layer of ``fc_channels`` with ReLU (torchvision's
      v2 ``FastRCNNConvFCHead`` with batch norm: 4 convs of 256, 1 fc of 1024). The convs have
      a bias only without a norm.

    ``num_convs``, ``conv_channels`` and ``norm`` are read by ``"4conv1fc"`` only.
    """

    kind: BoxHeadKind = attrs.field(default="2fc", validator=one_of(*BOX_HEAD_KINDS))
    fc_channels: int = attrs.field(default=1024, validator=positive)
    num_convs: int = attrs.field(default=4, validator=positive)
    conv_channels: int = attrs.field(default=256, validator=positive)
    norm: Norm | None = attrs.field(default=BatchNorm(), validator=spec_of(Norm, optional=True))

    def __attrs_post_init__(self) -> None:
        if self.kind == "4conv1fc" and self.norm is not None:
            try:
                self.norm.check_channels(self.conv_channels, "the conv channels")
            except SpecError as e:
                raise e.under("norm") from None


@attrs.frozen(kw_only=True)
class RoIPostprocess(Spec):
    """From per-RoI class scores and deltas to detections
    (:func:`fdet.ops.roi.roi_detections`): softmax scores without the background, one candidate
    per (RoI, class) scoring above ``score_threshold`` whose box sides are at least
    ``min_box_size`` pixels, NMS at ``nms_iou`` within each class, the ``max_detections`` best
    an image."""

    score_threshold: float = attrs.field(default=0.05, validator=probability)
    nms_iou: float = attrs.field(default=0.5, validator=probability)
    max_detections: int = attrs.field(default=100, validator=positive)
    min_box_size: float = attrs.field(default=1e-2, validator=non_negative)


@attrs.frozen(kw_only=True)
class RoIHead(Spec):
    """One Fast R-CNN stage: pool each proposal's features, classify it into ``K + 1`` classes
    (0 = background) and regress its box.

    - ``roi_align``, ``box_head``: the features and layers (see :class:`RoIAlign`,
      :class:`BoxHead`).
    - ``class_agnostic``: one set of deltas for all classes (Cascade R-CNN) instead of one per
      class (``K + 1`` sets, background included, as torchvision lays them out).
    - ``assigner``: proposal labelling by max IoU: positive at ``pos_iou``, background below
      ``neg_iou`` (0.5 / 0.5 in Faster R-CNN; 0.5, 0.6, 0.7 in Cascade R-CNN's stages), no
      low-quality matches; proposals inside crowd regions (``crowd_ioa``) are not sampled.
    - ``add_gt_boxes``: the gts join the proposals as RoIs while training.
    - ``sampler``: the RoIs an image that enter the losses (512, at most 25 % positive).
    - ``coder``: the deltas' normalisation (``stds`` 0.1, 0.1, 0.2, 0.2; Cascade R-CNN's
      later stages 0.05, 0.05, 0.1, 0.1 and 0.033, 0.033, 0.067, 0.067).
    - ``cls_weight``: the weight of the softmax cross-entropy term; ``box_loss``: the
      regression loss on the positives' deltas (or decoded boxes, for GIoU) with its own
      ``weight``. Both terms are normalised by the number of sampled RoIs.
    - ``postprocess``: see :class:`RoIPostprocess`.

    The number of classes is the detector's: builders take it as ``num_classes``.
    """

    roi_align: RoIAlign = RoIAlign()
    box_head: BoxHead = BoxHead()
    class_agnostic: bool = False
    assigner: MaxIoUAssigner = MaxIoUAssigner(pos_iou=0.5, neg_iou=0.5, low_quality_matches=False)
    add_gt_boxes: bool = True
    sampler: Sampler = Sampler(num_samples=512, positive_fraction=0.25)
    coder: DeltaXYWHCoder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2), clip=DEFAULT_SCALE_CLIP)
    cls_weight: float = attrs.field(default=1.0, validator=non_negative)
    box_loss: BoxLoss = attrs.field(
        default=SmoothL1Loss(beta=1.0 / 9.0), validator=spec_of(BoxLoss)
    )
    postprocess: RoIPostprocess = RoIPostprocess()
