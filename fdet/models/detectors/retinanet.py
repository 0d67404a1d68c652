"""RetinaNet: what only RetinaNet has — its anchors, its objective (max-IoU assignment, focal
classification, box regression on the positives) and its postprocess (sigmoid scores, deltas
on anchors) — as pure functions of a padded batch, and the detector module that calls them.

The functions compose :mod:`fdet.ops` and the shared dense pieces of
:mod:`fdet.models.detectors.dense`; they work on the whole batch at once (no loop over images),
keep every shape static and never sync with the host, so they run under
``torch.compile(fullgraph=True)``::

    outputs = detector(images)                                     # RetinaHeadOutputs, per level
    anchors = retinanet_anchors(outputs.feature_sizes, spec=spec.anchors,
                                image_size=outputs.image_size)                     # [A, 4]
    terms = retinanet_loss(outputs, anchors, gt_boxes, gt_labels, gt_valid, gt_crowd,
                           assigner=spec.assigner, coder=spec.coder,
                           cls_loss=spec.cls_loss, box_loss=spec.box_loss)  # {"cls", "box"}
    detections = retinanet_postprocess(outputs, anchors, image_sizes,
                                       coder=spec.coder, postprocess=spec.postprocess)

:class:`RetinaNet` does the same with the hyperparameters of the spec it was built from, on the
detector contract (:mod:`fdet.models.detectors.base`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import LossTerms, Targets, Term
from fdet.models.detectors.dense import (
    DenseDetector,
    box_coder,
    box_loss_per_anchor,
    build_dense_parts,
    check_anchors_per_location,
    cls_loss_per_anchor,
    matched_targets,
    with_one_slot,
)
from fdet.models.heads.retina import RetinaHeadOutputs
from fdet.ops.anchors import anchor_offsets, grid_anchors, image_strides, level_sizes
from fdet.ops.assign import IGNORE, POSITIVE, Assignment, assign_max_iou
from fdet.ops.losses import masked_sum
from fdet.ops.postprocess import Detections, detect_dense
from fdet.registry import register
from fdet.specs.dense import Placement

__all__ = [
    "RetinaNet",
    "build_retinanet",
    "placed_strides",
    "retinanet_anchors",
    "retinanet_assign",
    "retinanet_loss",
    "retinanet_postprocess",
]


# the specs' defaults (frozen, so safe to share as argument defaults)
_ANCHORS = specs.Anchors()
_ASSIGNER = specs.MaxIoUAssigner()
_CODER = specs.DeltaXYWHCoder()
_CLS_LOSS = specs.SigmoidFocalLoss()
_BOX_LOSS = specs.L1Loss()
_POSTPROCESS = specs.DensePostprocess()


def retinanet_anchors(
    feature_sizes: Sequence[tuple[int, int]],
    *,
    spec: specs.Anchors,
    image_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "A 4"]:
    """Anchors of every level, flattened in the order of the head's outputs.

    ``feature_sizes``: ``(H_l, W_l)`` of each level as Python ints (``outputs.feature_sizes``).
    Level ``l`` has sizes ``level_sizes(spec.base_sizes[l], spec.octave_scales)`` (cut to integers
    with ``spec.truncate_sizes``) and ``spec.ratios``. Its locations are ``spec.strides[l]``
    apart, or, with ``spec.placement == "image_ratio"``, ``image_size // feature_sizes[l]`` per
    axis (:func:`fdet.ops.anchors.image_strides`), which needs ``image_size``: ``(H, W)`` of the
    padded input as Python ints (``outputs.image_size``).
    """
    if len(feature_sizes) != len(spec.strides):
        raise ValueError(
            f"got {len(feature_sizes)} feature maps for {len(spec.strides)} anchor levels "
            f"(anchors.strides {spec.strides})"
        )
    strides = placed_strides(feature_sizes, spec.strides, spec.placement, image_size)
    offsets = [
        anchor_offsets(
            level_sizes(base, spec.octave_scales, truncate=spec.truncate_sizes),
            spec.ratios,
            round_to_int=spec.round_offsets,
            dtype=dtype,
            device=device,
        )
        for base in spec.base_sizes
    ]
    return grid_anchors(offsets, feature_sizes, strides)


def placed_strides(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    placement: Placement,
    image_size: tuple[int, int] | None,
) -> list[int] | list[tuple[int, int]]:
    """How far apart the locations of each level are: the nominal ``strides`` (``"nominal"``),
    or ``image_size // feature_size`` per axis (``"image_ratio"``, torchvision's placement)."""
    if placement == "nominal":
        return list(strides)
    if image_size is None:
        raise ValueError(
            f'placement "{placement}" takes the strides from the padded input size, but no '
            "image_size was given (head outputs get it from the detector's forward)"
        )
    return image_strides(image_size, feature_sizes)


def retinanet_assign(
    anchors: Float[Tensor, "A 4"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.MaxIoUAssigner,
) -> Assignment:
    """Max-IoU assignment with the ``assigner`` spec (:func:`fdet.ops.assign.assign_max_iou`).

    Crowd gts (``gt_crowd``, COCO ``iscrowd``) are never matched and never claim a low-quality
    match; an anchor lying more than ``assigner.crowd_ioa`` of its area inside a crowd box is
    IGNORE unless it is POSITIVE for a real gt. Padded slots play no part. An image without
    valid gts is all NEGATIVE (apart from crowd-covered anchors).
    """
    return assign_max_iou(
        anchors,
        gt_boxes,
        gt_valid,
        pos_iou=assigner.pos_iou,
        neg_iou=assigner.neg_iou,
        low_quality_matches=assigner.low_quality_matches,
        min_low_quality_iou=assigner.min_low_quality_iou,
        gt_crowd=gt_crowd,
        crowd_ioa=assigner.crowd_ioa,
    )


def retinanet_loss(
    outputs: RetinaHeadOutputs,
    anchors: Float[Tensor, "A 4"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.MaxIoUAssigner = _ASSIGNER,
    coder: specs.Spec = _CODER,
    cls_loss: specs.Spec = _CLS_LOSS,
    box_loss: specs.Spec = _BOX_LOSS,
) -> dict[str, Term]:
    """The RetinaNet objective of a padded batch, as the loss terms ``"cls"`` and ``"box"``.

    1. Assignment: :func:`retinanet_assign` (max IoU, crowds never matched, crowd-covered
       anchors ignored).
    2. Classification (``"cls"``): the ``cls_loss`` spec (sigmoid focal loss) over every anchor
       that is not IGNORE and every class, with one-hot targets on the positives (the class of
       their gt) and all-zero targets on the negatives, summed.
    3. Box regression (``"box"``), on the positives only: the ``box_loss`` spec — ``L1Loss`` /
       ``SmoothL1Loss`` between the predicted deltas and the gt boxes encoded with the coder,
       summed over the 4 coordinates, or ``GIoULoss`` between the decoded predictions and the
       gt boxes — summed.
    4. Both terms are normalized by the number of positive anchors (the same count tensor) and
       weighted by their spec's ``weight``: ``term.value()`` is ``weight · total / max(num_pos,
       1)``; the training step normalizes by the count of the whole step instead.

    With one image this is exactly torchvision's RetinaNet loss; with several it normalizes once
    over the batch (as MMDetection does) rather than per image.

    Args:
        outputs: the head's per-level ``cls_logits[B, A_l, K]`` and ``box_deltas[B, A_l, 4]``.
        anchors: ``[A, 4]`` from :func:`retinanet_anchors`, levels in the outputs' order.
        gt_boxes: ``[B, M, 4]`` xyxy pixels; padded slots may hold anything, even NaN.
        gt_labels: ``[B, M]`` classes in ``[0, K)`` on valid slots.
        gt_valid: ``[B, M]`` True for real annotations (crowd ones included).
        gt_crowd: ``[B, M]`` True for crowd regions, or None for none.

    Returns:
        ``{"cls": Term, "box": Term}`` of float32 scalars, also when the outputs are
        float16/bfloat16 (autocast). An image without valid gts only contributes negatives; a
        batch without any gives a box total of 0, a finite classification total and a count of 0.
    """
    gt_boxes, gt_labels, gt_valid, gt_crowd = with_one_slot(gt_boxes, gt_labels, gt_valid, gt_crowd)
    cls_logits = torch.cat(list(outputs.cls_logits), dim=1).float()  # [B, A, K]
    deltas = torch.cat(list(outputs.box_deltas), dim=1).float()  # [B, A, 4]
    if cls_logits.shape[1] != anchors.shape[0]:
        raise ValueError(
            f"the head predicts for {cls_logits.shape[1]} anchors but {anchors.shape[0]} were given"
        )
    anchors = anchors.float()
    gt_boxes = gt_boxes.float()

    assignment = retinanet_assign(anchors, gt_boxes, gt_valid, gt_crowd, assigner=assigner)
    positive = assignment.label == POSITIVE  # [B, A]
    counted = assignment.label != IGNORE  # [B, A]
    num_pos = positive.sum(dtype=torch.float32)

    # classification: one-hot targets on positives, zeros on negatives, nothing on IGNORE
    labels = gt_labels.gather(1, assignment.gt_index)  # [B, A], garbage where not positive
    cls_total = cls_loss_per_anchor(cls_loss, cls_logits, labels, positive, counted).sum()

    # box regression on positives; the rest get harmless stand-ins so that no NaN or inf from
    # padded slots or wild predictions reaches the (masked) gradient
    batch_anchors = anchors.expand_as(deltas)  # [B, A, 4]
    matched = matched_targets(gt_boxes, assignment.gt_index, positive, batch_anchors)
    safe_deltas = torch.where(positive[..., None], deltas, torch.zeros_like(deltas))
    per_anchor = box_loss_per_anchor(
        box_loss, box_coder(coder), safe_deltas, batch_anchors, matched
    )  # [B, A]
    box_total = masked_sum(per_anchor, positive)
    return {
        "cls": Term(cls_total, num_pos, float(getattr(cls_loss, "weight", 1.0))),
        "box": Term(box_total, num_pos, float(getattr(box_loss, "weight", 1.0))),
    }


def retinanet_postprocess(
    outputs: RetinaHeadOutputs,
    anchors: Float[Tensor, "A 4"],
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    coder: specs.Spec = _CODER,
    postprocess: specs.DensePostprocess = _POSTPROCESS,
) -> Detections:
    """Detections ``[B, max_detections]`` of a batch (:func:`fdet.ops.postprocess.detect_dense`
    with sigmoid scores and the coder's decoding).

    Per level the ``topk_per_level`` best (anchor, class) scores above ``score_threshold``, their
    boxes decoded and clipped to ``image_sizes`` (``(height, width)`` of each image's valid
    area), then class-aware NMS at ``nms_iou`` and the ``max_detections`` best. With
    ``min_box_size > 0`` boxes narrower or lower than it are dropped before NMS. Valid
    detections come first in each row, by score; the rest are padding (``valid`` False).
    """
    counts = [int(level.shape[1]) for level in outputs.cls_logits]
    if sum(counts) != anchors.shape[0]:
        raise ValueError(
            f"the head predicts for {sum(counts)} anchors but {anchors.shape[0]} were given"
        )
    decode_fn = box_coder(coder).decode
    deltas = torch.cat(list(outputs.box_deltas), dim=1)  # [B, A, 4]

    def decode(index: Tensor) -> Tensor:  # [B, T] -> [B, T, 4]
        selected = deltas.gather(1, index[..., None].expand(-1, -1, 4))  # [B, T, 4]
        return decode_fn(anchors[index], selected)

    return detect_dense(
        [torch.sigmoid(level.float()) for level in outputs.cls_logits],
        decode,
        image_sizes,
        score_threshold=postprocess.score_threshold,
        topk_per_level=postprocess.topk_per_level,
        iou_threshold=postprocess.nms_iou,
        max_detections=postprocess.max_detections,
        min_box_size=postprocess.min_box_size,
    )


class RetinaNet(DenseDetector):
    """A RetinaNet on the detector contract: ``forward`` gives the head's outputs; ``loss`` and
    ``postprocess`` apply the pure functions of this file with the detector's hyperparameters;
    ``predict`` is the shared one.

    The hyperparameters are frozen specs kept as plain attributes (``anchor_spec``,
    ``assigner_spec``, ``coder_spec``, ``cls_loss_spec``, ``box_loss_spec``,
    ``postprocess_spec``); parameters are the module's only state, and nothing is cached.

    Args:
        backbone, neck, head: modules with ``head(neck(backbone(x)))`` returning
            :class:`RetinaHeadOutputs`; the head predicts ``anchors.per_location`` anchors a
            location.
        anchors, assigner, coder, cls_loss, box_loss, postprocess: the specs of those steps.
        mean, std, input_range: input normalization, ``(x / input_range - mean) / std``.
    """

    box_terms = frozenset({"box"})
    """The box regression."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        anchors: specs.Anchors = _ANCHORS,
        assigner: specs.MaxIoUAssigner = _ASSIGNER,
        coder: specs.Spec = _CODER,
        cls_loss: specs.Spec = _CLS_LOSS,
        box_loss: specs.Spec = _BOX_LOSS,
        postprocess: specs.DensePostprocess = _POSTPROCESS,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_range: float = 255.0,
    ) -> None:
        super().__init__(
            backbone=backbone, neck=neck, head=head, mean=mean, std=std, input_range=input_range
        )
        check_anchors_per_location(head, anchors)
        self.anchor_spec = anchors
        self.assigner_spec = assigner
        self.coder_spec = coder
        self.cls_loss_spec = cls_loss
        self.box_loss_spec = box_loss
        self.postprocess_spec = postprocess

    def anchors_for(self, outputs: RetinaHeadOutputs) -> Float[Tensor, "A 4"]:
        """The anchors ``[A, 4]`` that line up with ``outputs`` (float32, on their device)."""
        return retinanet_anchors(
            outputs.feature_sizes,
            spec=self.anchor_spec,
            image_size=outputs.image_size,
            device=outputs.cls_logits[0].device,
        )

    def loss(self, outputs: RetinaHeadOutputs, batch: Targets) -> LossTerms:
        """:func:`retinanet_loss` of ``outputs`` against ``batch``'s ``gt_boxes``, ``gt_labels``,
        ``gt_valid`` and ``gt_crowd`` (any object with those attributes, e.g. a
        :class:`fdet.data.Batch`; ``gt_crowd`` may be missing or None)."""
        return retinanet_loss(
            outputs,
            self.anchors_for(outputs),
            batch.gt_boxes,
            batch.gt_labels,
            batch.gt_valid,
            getattr(batch, "gt_crowd", None),
            assigner=self.assigner_spec,
            coder=self.coder_spec,
            cls_loss=self.cls_loss_spec,
            box_loss=self.box_loss_spec,
        )

    def postprocess(
        self, outputs: RetinaHeadOutputs, image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"]
    ) -> Detections:
        """:func:`retinanet_postprocess` of ``outputs``; boxes clipped to ``image_sizes[B, 2]``
        (height, width)."""
        return retinanet_postprocess(
            outputs,
            self.anchors_for(outputs),
            image_sizes,
            coder=self.coder_spec,
            postprocess=self.postprocess_spec,
        )


@register(specs.RetinaNet)
def build_retinanet(spec: specs.RetinaNet) -> RetinaNet:
    """A :class:`RetinaNet` with the modules and the hyperparameters of ``spec``."""
    return RetinaNet(
        **build_dense_parts(spec, num_anchors=spec.anchors.per_location),
        anchors=spec.anchors,
        assigner=spec.assigner,
        coder=spec.coder,
        cls_loss=spec.cls_loss,
        box_loss=spec.box_loss,
        postprocess=spec.postprocess,
    )
