"""FCOS specs: the point grid, the assignment by regression ranges, the distance coder, the
head, and the whole detector.

The defaults are torchvision's ``fcos_resnet50_fpn`` recipe (points at the anchor centres,
ReLU distances without learned scales, plain GIoU, score threshold 0.2, NMS at 0.6, 100
detections), except the placement of the points, which is fdet's nominal ``2**level`` grid,
and the regression ranges, closed as the paper states them; ``specs/fcos/r50_fpn_1x_coco.py``
is the paper's improved recipe.
"""

import math
from typing import Any, Literal

import attrs

from fdet.specs._core import (
    Spec,
    SpecError,
    each,
    int_tuple,
    non_empty,
    non_negative,
    one_of,
    open_unit,
    positive,
    probability,
    spec_of,
    to_tuple,
)
from fdet.specs.backbones import ResNet
from fdet.specs.dense import PLACEMENTS, DensePostprocess, Normalize, Placement
from fdet.specs.detectors import Detector, check_pyramid, check_strides
from fdet.specs.losses import BoxLoss, ClassificationLoss, GIoULoss, SigmoidFocalLoss
from fdet.specs.necks import FPN
from fdet.specs.norms import GroupNorm, Norm

RegressRange = tuple[float, float | None]
"""``(lower, upper)`` of one level: the level regresses a gt from a point whose largest
distance to the gt's sides lies between the two (see :attr:`FCOSAssigner.closed_ranges`);
``upper`` None is unbounded."""

DEFAULT_POSTPROCESS = DensePostprocess(
    score_threshold=0.2, topk_per_level=1000, nms_iou=0.6, max_detections=100
)
"""torchvision's FCOS postprocess: the threshold applies to ``sqrt(cls · centerness)``."""

DEFAULT_REGRESS_RANGES: tuple[RegressRange, ...] = (
    (-1.0, 64.0),
    (64.0, 128.0),
    (128.0, 256.0),
    (256.0, 512.0),
    (512.0, None),
)


@attrs.frozen(kw_only=True)
class Points(Spec):
    """The locations of every pyramid level, one point each.

    Level ``i`` has nominal stride ``strides[i]``; location ``(row, col)`` sits at
    ``((col + offset) · stride_x, (row + offset) · stride_y)``. ``offset`` is a fraction of the
    stride: 0.5 puts points at the centres of their cells (the FCOS paper's
    ``⌊s/2⌋ + x·s``), 0 at the cells' top-left corners (torchvision's FCOS, whose points are
    the centres of its anchors).

    ``placement``: ``"nominal"`` (the default) lays the points ``strides[i]`` apart;
    ``"image_ratio"`` takes ``(H // H_i, W // W_i)`` of the padded input instead, per axis, as
    torchvision does (see :class:`fdet.specs.Anchors`). Only the positions change: regression
    ranges, the center-sampling radius and the distance normalisation keep the nominal stride.
    """

    strides: tuple[int, ...] = attrs.field(
        default=(8, 16, 32, 64, 128), converter=int_tuple, validator=[non_empty, each(positive)]
    )
    offset: float = attrs.field(default=0.0, validator=probability)
    placement: Placement = attrs.field(default="nominal", validator=one_of(*PLACEMENTS))

    def __attrs_post_init__(self) -> None:
        if self.offset >= 1.0:
            raise SpecError(f"must be in [0, 1), got {self.offset}", "offset")


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _regress_ranges(_: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, tuple) or not value:
        raise SpecError("must be a non-empty list of [lower, upper] pairs", attribute.name)
    for i, pair in enumerate(value):
        where = f"{attribute.name}[{i}]"
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise SpecError(f"must be a [lower, upper] pair, got {pair!r}", where)
        lower, upper = pair
        if not _is_finite_number(lower):
            raise SpecError(f"lower bound must be a finite number, got {lower!r}", where)
        if upper is None:
            continue
        if not _is_finite_number(upper):
            raise SpecError(f"upper bound must be a finite number or null, got {upper!r}", where)
        if not upper > lower:
            raise SpecError(f"upper bound {upper} must be > lower bound {lower}", where)


def _float_pairs(value: Any) -> Any:
    """Lists become tuples and numbers floats, so that specs compare equal after JSON."""
    value = to_tuple(value)
    if not isinstance(value, tuple):
        return value
    out = []
    for pair in value:
        if isinstance(pair, tuple):
            pair = tuple(
                float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                for v in pair
            )
        out.append(pair)
    return tuple(out)


@attrs.frozen(kw_only=True)
class FCOSAssigner(Spec):
    """Which points learn which gt (FCOS): a point is positive for a gt when

    - it lies strictly inside the gt box;
    - with ``center_radius`` r (not None), it also lies within ``r`` nominal strides of the gt
      centre on both axes (center sampling; None turns it off);
    - its largest distance to the gt's sides, in pixels, lies in its level's regression range
      (``regress_ranges``, one ``(lower, upper)`` pair per level; ``upper`` None: unbounded):
      ``lower <= distance <= upper`` with ``closed_ranges`` (the paper, MMDetection; a box
      whose distance is a bound is learned on both levels), ``lower < distance < upper``
      without (torchvision; such a box is learned on neither there). Boxes clipped to the
      image border hit the bounds exactly quite often.

    Of several such gts the one with the smallest area wins. Crowd gts are never assigned; a
    point whose cell (the stride-wide square around it) lies more than ``crowd_ioa`` of its
    area inside a crowd box is ignored unless it is positive, as with anchors.
    """

    regress_ranges: tuple[RegressRange, ...] = attrs.field(
        default=DEFAULT_REGRESS_RANGES, converter=_float_pairs, validator=_regress_ranges
    )
    closed_ranges: bool = True
    center_radius: float | None = attrs.field(default=1.5)
    crowd_ioa: float = attrs.field(default=0.5, validator=probability)

    @center_radius.validator
    def _check_radius(self, attribute: attrs.Attribute, value: float | None) -> None:
        if value is not None:
            positive(self, attribute, value)


@attrs.frozen(kw_only=True)
class DistanceCoder(Spec):
    """Boxes as distances ``(left, top, right, bottom)`` from a point to their sides (FCOS).

    With ``normalize_by_stride`` the distances are in units of the level's nominal stride
    (torchvision's ``BoxLinearCoder(normalize_by_size=True)`` on FCOS's stride-sized
    anchors, and the paper's improved recipe); without it, in pixels (the first FCOS paper).
    """

    normalize_by_stride: bool = True


@attrs.frozen(kw_only=True)
class FCOSHead(Spec):
    """Two conv towers (classification, regression) shared over every pyramid level, each
    ``num_convs`` 3×3 convs of ``channels`` channels with ``norm`` (group norm in FCOS) and
    ReLU; then 3×3 predictors of ``num_classes`` logits (bias from ``prior_prob``), 4
    distances and one centerness logit a location.

    - ``tower_bias``: the tower convs keep their bias before the norm (the FCOS code and
      torchvision do); False drops it where a norm follows.
    - ``centerness_on``: the tower the centerness predictor reads, ``"box"`` (the paper's
      improved recipe, torchvision) or ``"cls"`` (the first paper).
    - ``distance_activation``: ``"relu"`` (distances ``relu(s·x)``, torchvision and the
      improved recipe) or ``"exp"`` (``exp(s·x)``, the first paper).
    - ``learned_scales``: ``s`` above is a learned scalar per level, starting at 1 (the paper);
      False: ``s = 1``, no parameter (torchvision).
    """

    num_classes: int = attrs.field(validator=positive)
    num_convs: int = attrs.field(default=4, validator=non_negative)
    channels: int = attrs.field(default=256, validator=positive)
    prior_prob: float = attrs.field(default=0.01, validator=open_unit)
    norm: Norm | None = attrs.field(
        default=GroupNorm(groups=32), validator=spec_of(Norm, optional=True)
    )
    tower_bias: bool = True
    centerness_on: Literal["box", "cls"] = attrs.field(
        default="box", validator=one_of("box", "cls")
    )
    distance_activation: Literal["relu", "exp"] = attrs.field(
        default="relu", validator=one_of("relu", "exp")
    )
    learned_scales: bool = False

    def __attrs_post_init__(self) -> None:
        if self.norm is not None and self.num_convs > 0:
            try:
                self.norm.check_channels(self.channels, "the tower channels")
            except SpecError as e:
                raise e.under("norm") from None


@attrs.frozen(kw_only=True)
class FCOS(Detector):
    """FCOS: backbone → FPN → FCOSHead on points; focal classification on every point, GIoU
    and centerness BCE on the positives.

    ``centerness_weight`` multiplies the centerness term. ``box_weight_by_centerness`` (the
    paper's improved recipe): each positive's box loss is weighted by its centerness target
    and the box term is normalised by the sum of those targets instead of the positives. The
    defaults are torchvision's ``fcos_resnet50_fpn`` but for the placement of the points and
    the closed regression ranges; ``head`` (which holds ``num_classes``) has no default.
    """

    backbone: ResNet = ResNet()
    neck: FPN = FPN()
    head: FCOSHead
    points: Points = Points()
    assigner: FCOSAssigner = FCOSAssigner()
    coder: DistanceCoder = DistanceCoder()
    cls_loss: ClassificationLoss = attrs.field(
        default=SigmoidFocalLoss(), validator=spec_of(ClassificationLoss)
    )
    box_loss: BoxLoss = attrs.field(default=GIoULoss(), validator=spec_of(BoxLoss))
    centerness_weight: float = attrs.field(default=1.0, validator=non_negative)
    box_weight_by_centerness: bool = False
    postprocess: DensePostprocess = DEFAULT_POSTPROCESS
    normalize: Normalize = Normalize()

    def __attrs_post_init__(self) -> None:
        check_pyramid(self.backbone, self.neck)
        check_strides(self.points.strides, self.neck, field="points.strides")
        ranges = self.assigner.regress_ranges
        if len(ranges) != len(self.points.strides):
            raise SpecError(
                f"has {len(ranges)} levels but points.strides has {len(self.points.strides)}",
                "assigner.regress_ranges",
            )

    @property
    def num_classes(self) -> int:
        return self.head.num_classes


__all__ = [
    "DEFAULT_POSTPROCESS",
    "DEFAULT_REGRESS_RANGES",
    "FCOS",
    "DistanceCoder",
    "FCOSAssigner",
    "FCOSHead",
    "Points",
    "RegressRange",
]
