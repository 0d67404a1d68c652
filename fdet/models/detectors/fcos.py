"""FCOS: what only FCOS has — its points, its assignment (inside the box, near its centre, in
the level's regression range, smallest box first), its objective (focal classification on
every point; box and centerness losses on the positives) and its postprocess (scores
``sqrt(cls · centerness)``, distances from points) — as pure functions of a padded batch, and
the detector module that calls them.

Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection" (ICCV 2019) and "FCOS: A
Simple and Strong Anchor-free Object Detector" (TPAMI 2020). docs/fcos.md puts each equation
next to the function that computes it.

The functions compose :mod:`fdet.ops` and the shared dense pieces of
:mod:`fdet.models.detectors.dense`; they work on the whole batch at once (no loop over images
or gts), keep every shape static and never sync with the host, so they run under
``torch.compile(fullgraph=True)``::

    outputs = detector(images)                                   # FCOSHeadOutputs, per level
    grid = fcos_points(outputs.feature_sizes, spec=spec.points,
                       image_size=outputs.image_size)            # PointGrid: points [A, 2] ...
    terms = fcos_loss(outputs, grid, gt_boxes, gt_labels, gt_valid, gt_crowd,
                      assigner=spec.assigner, coder=spec.coder, cls_loss=spec.cls_loss,
                      box_loss=spec.box_loss)                    # {"cls", "box", "centerness"}
    detections = fcos_postprocess(outputs, grid, image_sizes,
                                  coder=spec.coder, postprocess=spec.postprocess)

:class:`FCOS` does the same with the hyperparameters of the spec it was built from, on the
detector contract (:mod:`fdet.models.detectors.base`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, Int8
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import LossTerms, Targets, Term
from fdet.models.detectors.dense import (
    BoxCoder,
    DenseDetector,
    box_coder,
    box_loss_per_anchor,
    build_dense_parts,
    cls_loss_per_anchor,
    matched_targets,
    with_one_slot,
)
from fdet.models.detectors.retinanet import placed_strides
from fdet.models.heads.fcos import FCOSHeadOutputs
from fdet.ops.anchors import grid_points, level_index
from fdet.ops.assign import IGNORE, NEGATIVE, POSITIVE, crowd_covered
from fdet.ops.boxes import box_area
from fdet.ops.coding import centerness, decode_distances, encode_distances
from fdet.ops.losses import masked_sum
from fdet.ops.postprocess import Detections, detect_dense
from fdet.registry import register
from fdet.specs.fcos import DEFAULT_POSTPROCESS, RegressRange

__all__ = [
    "FCOS",
    "FCOSAssignment",
    "FCOSTargets",
    "PointGrid",
    "build_distance_coder",
    "build_fcos",
    "fcos_assign",
    "fcos_loss",
    "fcos_points",
    "fcos_postprocess",
    "fcos_scores",
    "fcos_targets",
    "point_cells",
]


# the specs' defaults (frozen, so safe to share as argument defaults)
_POINTS = specs.Points()
_ASSIGNER = specs.FCOSAssigner()
_CODER = specs.DistanceCoder()
_CLS_LOSS = specs.SigmoidFocalLoss()
_BOX_LOSS = specs.GIoULoss()
_POSTPROCESS = DEFAULT_POSTPROCESS


# --- points -------------------------------------------------------------------------------------


class PointGrid(NamedTuple):
    """The points of every level, flattened in the order of the head's outputs."""

    points: Float[Tensor, "A 2"]  # (x, y) in pixels
    strides: Float[Tensor, " A"]  # the nominal stride of each point's level
    levels: Int[Tensor, " A"]  # the level of each point, 0 for the first


def fcos_points(
    feature_sizes: Sequence[tuple[int, int]],
    *,
    spec: specs.Points,
    image_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> PointGrid:
    """The points of every level (paper: location ``(x, y)`` of level ``i`` maps to
    ``(⌊s/2⌋ + x·s, ⌊s/2⌋ + y·s)``).

    Location ``(row, col)`` of level ``l`` sits at ``((col + spec.offset) · s_x, (row +
    spec.offset) · s_y)`` with ``s = spec.strides[l]`` (``"nominal"`` placement) or ``s =
    image_size // feature_sizes[l]`` per axis (``"image_ratio"``, torchvision's; needs
    ``image_size``, the padded input ``(H, W)`` as Python ints). ``strides`` in the result are
    always the nominal ones, which scale the center-sampling radius, the cells and the distance
    coding (torchvision's anchor sizes do not move with the placement either).
    """
    if len(feature_sizes) != len(spec.strides):
        raise ValueError(
            f"got {len(feature_sizes)} feature maps for {len(spec.strides)} point levels "
            f"(points.strides {spec.strides})"
        )
    placed = placed_strides(feature_sizes, spec.strides, spec.placement, image_size)
    points = grid_points(feature_sizes, placed, offset=spec.offset, dtype=dtype, device=device)
    levels = level_index(feature_sizes, device=device)  # [A]
    nominal = torch.tensor(spec.strides, dtype=dtype, device=device)  # [L]
    return PointGrid(points=points, strides=nominal[levels], levels=levels)


def point_cells(grid: PointGrid) -> Float[Tensor, "A 4"]:
    """The cell of each point: the square of its nominal stride centred on it, ``[A, 4]`` xyxy.

    Cells are the reference boxes of the distance coder (centre = the point, width = the
    stride: torchvision's FCOS anchors exactly) and what a crowd region must cover for a point
    to be ignored.
    """
    half = (grid.strides / 2)[:, None]  # [A, 1]
    return torch.cat((grid.points - half, grid.points + half), dim=1)  # [A, 4]


@register(specs.DistanceCoder)
def build_distance_coder(spec: specs.DistanceCoder) -> BoxCoder:
    """Distances ``(l, t, r, b)`` from the centre of a reference box to a box's sides, divided
    by the reference box's width with ``normalize_by_stride`` (FCOS's references are its point
    cells, :func:`point_cells`, whose width is the stride)."""
    normalize = spec.normalize_by_stride

    def split(cells: Tensor) -> tuple[Tensor, Tensor | float]:
        centre = (cells[..., :2] + cells[..., 2:]) * 0.5  # [..., 2]
        return centre, (cells[..., 2] - cells[..., 0]) if normalize else 1.0

    def encode(cells: Tensor, boxes: Tensor) -> Tensor:
        centre, stride = split(cells)
        return encode_distances(centre, boxes, stride=stride)

    def decode(cells: Tensor, ltrb: Tensor) -> Tensor:
        centre, stride = split(cells)
        return decode_distances(centre, ltrb, stride=stride)

    return BoxCoder(encode=encode, decode=decode)


# --- assignment ---------------------------------------------------------------------------------


class FCOSAssignment(NamedTuple):
    """Per-point result of :func:`fcos_assign`.

    Attributes:
        gt_index: ``[B, A]`` the gt slot a point learns; meaningful where ``label == POSITIVE``
            (elsewhere 0 or another slot: never index with it unmasked).
        label: ``[B, A]`` int8, ``POSITIVE`` (1), ``NEGATIVE`` (0) or ``IGNORE`` (-1).
    """

    gt_index: Int[Tensor, "B A"]
    label: Int8[Tensor, "B A"]


def _range_bounds(
    ranges: Sequence[RegressRange], levels: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(lower[A], upper[A])`` of each point's level; an unbounded upper is ``inf``."""
    lower = torch.tensor([lo for lo, _ in ranges], dtype=dtype, device=levels.device)  # [L]
    upper = torch.tensor(
        [math.inf if up is None else up for _, up in ranges], dtype=dtype, device=levels.device
    )  # [L]
    return lower[levels], upper[levels]


def fcos_assign(
    grid: PointGrid,
    gt_boxes: Float[Tensor, "B M 4"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.FCOSAssigner,
) -> FCOSAssignment:
    """Which gt each point learns (paper §3.2 and, for center sampling, the TPAMI version §2.3).

    For a point ``p`` of nominal stride ``s`` and level range ``(lower, upper)``, and a gt
    ``B = (x1, y1, x2, y2)`` with centre ``c``, let ``(l, t, r, b) = (p_x - x1, p_y - y1, x2 -
    p_x, y2 - p_y)``. The gt is a candidate for the point when

    1. ``min(l, t, r, b) > 0``: the point is strictly inside the box;
    2. with ``center_radius`` r: ``|p_x - c_x| < r·s`` and ``|p_y - c_y| < r·s`` (center
       sampling; the sub-box of radius r·s around the centre, cut to the box by 1.);
    3. ``lower <= max(l, t, r, b) <= upper`` (``assigner.closed_ranges``, the paper) or
       ``lower < max(l, t, r, b) < upper`` (torchvision): the box is the size this level
       regresses;
    4. the slot is valid and not a crowd.

    The point is POSITIVE for the candidate of smallest area (the first slot among equal
    areas), NEGATIVE without a candidate, and IGNORE instead of NEGATIVE when its cell
    (:func:`point_cells`) lies more than ``assigner.crowd_ioa`` of its area inside a crowd box
    (:func:`fdet.ops.assign.crowd_covered`, as for anchors). Padded slots play no part and may
    hold anything, even NaN. Targets: no gradient flows through ``gt_boxes``.

    Returns:
        :class:`FCOSAssignment` ``[B, A]``. An image without valid gts is all NEGATIVE (apart
        from crowd-covered points).
    """
    ranges = assigner.regress_ranges  # one per level (the FCOS spec checks the count)
    if gt_valid.shape[1] == 0:  # a static decision on the shape: one padded slot instead
        gt_boxes, _, gt_valid, gt_crowd = with_one_slot(
            gt_boxes, gt_valid.long(), gt_valid, gt_crowd
        )
    boxes = gt_boxes.detach().float()  # [B, M, 4]
    points = grid.points.float()  # [A, 2]
    usable = gt_valid if gt_crowd is None else gt_valid & ~gt_crowd  # [B, M]

    # 1. distances from every point to the sides of every gt
    ltrb = encode_distances(points[None, :, None, :], boxes[:, None, :, :])  # [B, A, M, 4]
    candidate = ltrb.amin(dim=-1) > 0  # [B, A, M]
    # 2. center sampling: within radius · stride of the gt centre, on both axes
    if assigner.center_radius is not None:
        centres = (boxes[..., :2] + boxes[..., 2:]) * 0.5  # [B, M, 2]
        offsets = (points[None, :, None, :] - centres[:, None, :, :]).abs()  # [B, A, M, 2]
        radius = (assigner.center_radius * grid.strides.float())[None, :, None]  # [1, A, 1]
        candidate = candidate & (offsets.amax(dim=-1) < radius)
    # 3. the level's regression range
    lower, upper = _range_bounds(ranges, grid.levels, torch.float32)  # [A], [A]
    reach = ltrb.amax(dim=-1)  # [B, A, M]
    lower, upper = lower[None, :, None], upper[None, :, None]  # [1, A, 1]
    if assigner.closed_ranges:
        candidate = candidate & (reach >= lower) & (reach <= upper)
    else:
        candidate = candidate & (reach > lower) & (reach < upper)
    # 4. valid, non-crowd slots only
    candidate = candidate & usable[:, None, :]  # [B, A, M]

    # the smallest candidate box wins; argmin takes the first of equal areas
    area = box_area(boxes)  # [B, M], NaN on padded slots: masked below
    key = torch.where(candidate, area[:, None, :], math.inf)  # [B, A, M]
    gt_index = key.argmin(dim=-1)  # [B, A]
    positive = candidate.any(dim=-1)  # [B, A]
    label = torch.where(positive, POSITIVE, NEGATIVE).to(torch.int8)  # [B, A]
    if gt_crowd is not None:
        crowd = gt_crowd & gt_valid  # [B, M]
        covered = crowd_covered(point_cells(grid), boxes, crowd, crowd_ioa=assigner.crowd_ioa)
        label = torch.where(covered & ~positive, IGNORE, label).to(torch.int8)  # [B, A]
    return FCOSAssignment(gt_index=gt_index, label=label)


class FCOSTargets(NamedTuple):
    """What the FCOS objective learns at each point of a batch."""

    assignment: FCOSAssignment
    labels: Int[Tensor, "B A"]  # class of the matched gt; 0 where not POSITIVE
    boxes: Float[Tensor, "B A 4"]  # matched gt box; the point's cell where not POSITIVE
    centerness: Float[Tensor, "B A"]  # centerness of the point in its box; 0 where not POSITIVE


def fcos_targets(
    grid: PointGrid,
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.FCOSAssigner,
) -> FCOSTargets:
    """:func:`fcos_assign`, then the targets of each positive point: its gt's class, its gt's
    box and its centerness (paper eq. 3, :func:`fdet.ops.coding.centerness`)

        centerness* = sqrt( min(l*, r*) / max(l*, r*) · min(t*, b*) / max(t*, b*) )

    with ``(l*, t*, r*, b*)`` the point's distances to the sides of its gt. Elsewhere the class
    is 0, the box is the point's cell and the centerness 0: harmless stand-ins that a mask on
    the positives removes. Works for ``M = 0`` (one padded slot is added).
    """
    gt_boxes, gt_labels, gt_valid, gt_crowd = with_one_slot(gt_boxes, gt_labels, gt_valid, gt_crowd)
    assignment = fcos_assign(grid, gt_boxes, gt_valid, gt_crowd, assigner=assigner)
    positive = assignment.label == POSITIVE  # [B, A]
    labels = torch.where(positive, gt_labels.gather(1, assignment.gt_index), 0)  # [B, A]
    cells = point_cells(grid).float().expand(positive.shape[0], -1, -1)  # [B, A, 4]
    boxes = matched_targets(gt_boxes.detach().float(), assignment.gt_index, positive, cells)
    ltrb = encode_distances(grid.points.float(), boxes)  # [B, A, 4]
    target = torch.where(positive, centerness(ltrb), 0.0)  # [B, A]
    return FCOSTargets(assignment=assignment, labels=labels, boxes=boxes, centerness=target)


# --- objective ----------------------------------------------------------------------------------


def fcos_loss(
    outputs: FCOSHeadOutputs,
    grid: PointGrid,
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.FCOSAssigner = _ASSIGNER,
    coder: specs.Spec = _CODER,
    cls_loss: specs.Spec = _CLS_LOSS,
    box_loss: specs.Spec = _BOX_LOSS,
    centerness_weight: float = 1.0,
    box_weight_by_centerness: bool = False,
) -> dict[str, Term]:
    """The FCOS objective of a padded batch (paper eq. 2 and the centerness BCE), as the terms
    ``"cls"``, ``"box"`` and ``"centerness"``:

        L = 1/N_pos Σ_p FL(p_p, c*_p) + 1/N_box Σ_{p pos} w_p L_box(b_p, b*_p)
            + 1/N_pos Σ_{p pos} BCE(o_p, centerness*_p)

    1. Targets: :func:`fcos_targets` (assignment, class, box, centerness of each point).
    2. ``"cls"``: the ``cls_loss`` spec (sigmoid focal loss) over every point that is not
       IGNORE and every class, one-hot targets on the positives, summed; count ``N_pos``.
    3. ``"box"``: the ``box_loss`` spec on the positives (GIoU between the decoded distances
       and the gt box; L1 / smooth L1 between the distances and the encoded gt), summed. By
       default ``w_p = 1`` and the count is ``N_pos`` (the same tensor as ``"cls"``); with
       ``box_weight_by_centerness`` (the improved recipe) ``w_p = centerness*_p`` and the count
       is ``N_box = Σ_{p pos} centerness*_p``.
    4. ``"centerness"``: binary cross-entropy between the centerness logit ``o_p`` and the
       target, on the positives, summed; count ``N_pos``; weight ``centerness_weight``.

    With one image, or a batch, this is torchvision's FCOS loss (which also normalises once
    over the batch).

    Args:
        outputs: the head's per-level ``cls_logits[B, A_l, K]``, ``box_ltrb[B, A_l, 4]`` (in the
            coder's units) and ``centerness[B, A_l]``.
        grid: :func:`fcos_points` for the outputs' feature sizes.
        gt_boxes: ``[B, M, 4]`` xyxy pixels; padded slots may hold anything, even NaN.
        gt_labels: ``[B, M]`` classes in ``[0, K)`` on valid slots.
        gt_valid: ``[B, M]`` True for real annotations (crowd ones included).
        gt_crowd: ``[B, M]`` True for crowd regions, or None for none.

    Returns:
        ``{"cls", "box", "centerness"}`` :class:`Term` s of float32 scalars, also when the
        outputs are float16/bfloat16 (autocast). A batch without positives gives box and
        centerness totals of 0, a finite classification total and counts of 0.
    """
    cls_logits = torch.cat(list(outputs.cls_logits), dim=1).float()  # [B, A, K]
    ltrb = torch.cat(list(outputs.box_ltrb), dim=1).float()  # [B, A, 4]
    ctr_logits = torch.cat(list(outputs.centerness), dim=1).float()  # [B, A]
    if cls_logits.shape[1] != grid.points.shape[0]:
        raise ValueError(
            f"the head predicts for {cls_logits.shape[1]} points but {grid.points.shape[0]} "
            "were given"
        )
    targets = fcos_targets(grid, gt_boxes, gt_labels, gt_valid, gt_crowd, assigner=assigner)
    positive = targets.assignment.label == POSITIVE  # [B, A]
    counted = targets.assignment.label != IGNORE  # [B, A]
    num_pos = positive.sum(dtype=torch.float32)

    # classification on every counted point
    cls_total = cls_loss_per_anchor(cls_loss, cls_logits, targets.labels, positive, counted).sum()

    # box regression on the positives; the others get zero distances and their own cell as
    # the target, so nothing from padded slots or wild predictions reaches the gradient
    cells = point_cells(grid).float().expand_as(ltrb)  # [B, A, 4]
    safe_ltrb = torch.where(positive[..., None], ltrb, torch.zeros_like(ltrb))
    per_point = box_loss_per_anchor(
        box_loss, box_coder(coder), safe_ltrb, cells, targets.boxes
    )  # [B, A]
    if box_weight_by_centerness:
        box_total = masked_sum(per_point * targets.centerness, positive)
        box_count = masked_sum(targets.centerness, positive)
    else:
        box_total = masked_sum(per_point, positive)
        box_count = num_pos

    # centerness on the positives
    bce = F.binary_cross_entropy_with_logits(
        ctr_logits, targets.centerness, reduction="none"
    )  # [B, A]
    ctr_total = masked_sum(bce, positive)
    return {
        "cls": Term(cls_total, num_pos, float(getattr(cls_loss, "weight", 1.0))),
        "box": Term(box_total, box_count, float(getattr(box_loss, "weight", 1.0))),
        "centerness": Term(ctr_total, num_pos, float(centerness_weight)),
    }


# --- inference ----------------------------------------------------------------------------------


def fcos_scores(outputs: FCOSHeadOutputs) -> list[Float[Tensor, "B A_l K"]]:
    """Per level, the score of each point and class (paper §3.3):
    ``sqrt(sigmoid(cls) · sigmoid(centerness))``, in float32 at least."""
    return [
        torch.sqrt(torch.sigmoid(cls.float()) * torch.sigmoid(ctr.float())[..., None])
        for cls, ctr in zip(outputs.cls_logits, outputs.centerness)
    ]


def fcos_postprocess(
    outputs: FCOSHeadOutputs,
    grid: PointGrid,
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    coder: specs.Spec = _CODER,
    postprocess: specs.DensePostprocess = _POSTPROCESS,
) -> Detections:
    """Detections ``[B, max_detections]`` of a batch: :func:`fdet.ops.postprocess.detect_dense`
    with the scores of :func:`fcos_scores` and the distances decoded from the points.

    As torchvision's FCOS: per level the ``topk_per_level`` best (point, class) pairs whose
    combined score ``sqrt(sigmoid(cls) · sigmoid(centerness))`` is above ``score_threshold``
    (the threshold applies to the combined score), their boxes decoded and clipped to
    ``image_sizes`` (``(height, width)`` of each image's valid area), class-aware NMS at
    ``nms_iou`` over all levels and the ``max_detections`` best. Valid detections come first in
    each row, by score; the rest are padding (``valid`` False).
    """
    if sum(int(level.shape[1]) for level in outputs.cls_logits) != grid.points.shape[0]:
        raise ValueError(
            f"the head's outputs do not line up with the {grid.points.shape[0]} points given"
        )
    decode_fn = box_coder(coder).decode
    ltrb = torch.cat(list(outputs.box_ltrb), dim=1)  # [B, A, 4]
    cells = point_cells(grid)  # [A, 4]

    def decode(index: Tensor) -> Tensor:  # [B, T] -> [B, T, 4]
        selected = ltrb.gather(1, index[..., None].expand(-1, -1, 4))  # [B, T, 4]
        return decode_fn(cells[index], selected)

    return detect_dense(
        fcos_scores(outputs),
        decode,
        image_sizes,
        score_threshold=postprocess.score_threshold,
        topk_per_level=postprocess.topk_per_level,
        iou_threshold=postprocess.nms_iou,
        max_detections=postprocess.max_detections,
        min_box_size=postprocess.min_box_size,
    )


# --- the detector -------------------------------------------------------------------------------


class FCOS(DenseDetector):
    """An FCOS on the detector contract: ``forward`` gives the head's outputs (and the padded
    input size); ``loss`` and ``postprocess`` apply the pure functions of this file with the
    detector's hyperparameters; ``predict`` is the shared one.

    The hyperparameters are frozen specs kept as plain attributes (``points_spec``,
    ``assigner_spec``, ``coder_spec``, ``cls_loss_spec``, ``box_loss_spec``,
    ``postprocess_spec``) and two plain numbers (``centerness_weight``,
    ``box_weight_by_centerness``); parameters are the module's only state.

    Args:
        backbone, neck, head: modules with ``head(neck(backbone(x)))`` returning
            :class:`FCOSHeadOutputs`.
        points, assigner, coder, cls_loss, box_loss, postprocess: the specs of those steps.
        centerness_weight, box_weight_by_centerness: as in :func:`fcos_loss`.
        mean, std, input_range: input normalization, ``(x / input_range - mean) / std``.
    """

    box_terms = frozenset({"box", "centerness"})
    """The box regression, and the centerness, whose target is the location's place in its box."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        points: specs.Points = _POINTS,
        assigner: specs.FCOSAssigner = _ASSIGNER,
        coder: specs.Spec = _CODER,
        cls_loss: specs.Spec = _CLS_LOSS,
        box_loss: specs.Spec = _BOX_LOSS,
        centerness_weight: float = 1.0,
        box_weight_by_centerness: bool = False,
        postprocess: specs.DensePostprocess = _POSTPROCESS,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_range: float = 255.0,
    ) -> None:
        super().__init__(
            backbone=backbone, neck=neck, head=head, mean=mean, std=std, input_range=input_range
        )
        if len(assigner.regress_ranges) != len(points.strides):
            raise ValueError(
                f"assigner.regress_ranges has {len(assigner.regress_ranges)} levels, "
                f"points.strides {len(points.strides)}"
            )
        self.points_spec = points
        self.assigner_spec = assigner
        self.coder_spec = coder
        self.cls_loss_spec = cls_loss
        self.box_loss_spec = box_loss
        self.centerness_weight = float(centerness_weight)
        self.box_weight_by_centerness = bool(box_weight_by_centerness)
        self.postprocess_spec = postprocess

    def points_for(self, outputs: FCOSHeadOutputs) -> PointGrid:
        """The points that line up with ``outputs`` (float32, on their device)."""
        return fcos_points(
            outputs.feature_sizes,
            spec=self.points_spec,
            image_size=outputs.image_size,
            device=outputs.cls_logits[0].device,
        )

    def loss(self, outputs: FCOSHeadOutputs, batch: Targets) -> LossTerms:
        """:func:`fcos_loss` of ``outputs`` against ``batch``'s ``gt_boxes``, ``gt_labels``,
        ``gt_valid`` and ``gt_crowd`` (any object with those attributes, e.g. a
        :class:`fdet.data.Batch`; ``gt_crowd`` may be missing or None)."""
        return fcos_loss(
            outputs,
            self.points_for(outputs),
            batch.gt_boxes,
            batch.gt_labels,
            batch.gt_valid,
            getattr(batch, "gt_crowd", None),
            assigner=self.assigner_spec,
            coder=self.coder_spec,
            cls_loss=self.cls_loss_spec,
            box_loss=self.box_loss_spec,
            centerness_weight=self.centerness_weight,
            box_weight_by_centerness=self.box_weight_by_centerness,
        )

    def postprocess(
        self, outputs: FCOSHeadOutputs, image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"]
    ) -> Detections:
        """:func:`fcos_postprocess` of ``outputs``; boxes clipped to ``image_sizes[B, 2]``
        (height, width)."""
        return fcos_postprocess(
            outputs,
            self.points_for(outputs),
            image_sizes,
            coder=self.coder_spec,
            postprocess=self.postprocess_spec,
        )


@register(specs.FCOS)
def build_fcos(spec: specs.FCOS) -> FCOS:
    """An :class:`FCOS` with the modules and the hyperparameters of ``spec``."""
    return FCOS(
        **build_dense_parts(spec, num_levels=len(spec.neck.out_levels)),
        points=spec.points,
        assigner=spec.assigner,
        coder=spec.coder,
        cls_loss=spec.cls_loss,
        box_loss=spec.box_loss,
        centerness_weight=spec.centerness_weight,
        box_weight_by_centerness=spec.box_weight_by_centerness,
        postprocess=spec.postprocess,
    )
