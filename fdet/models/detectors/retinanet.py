"""RetinaNet: the objective and the postprocess as pure functions of a padded batch, and the
detector module that calls them.

The functions are compositions of ``fdet.ops``; they work on the whole batch at once (no loop
over images), keep every shape static and never sync with the host, so they run under
``torch.compile(fullgraph=True)``::

    outputs = detector(images)                                     # RetinaHeadOutputs, per level
    anchors = retinanet_anchors(outputs.feature_sizes, spec=spec.anchors)             # [A, 4]
    losses = retinanet_loss(outputs, anchors, gt_boxes, gt_labels, gt_valid, gt_crowd,
                            assigner=spec.assigner, coder=spec.coder,
                            cls_loss=spec.cls_loss, box_loss=spec.box_loss)
    detections = retinanet_postprocess(outputs, anchors, image_sizes,
                                       coder=spec.coder, postprocess=spec.postprocess)

:class:`RetinaNet` does the same with the hyperparameters of the spec it was built from:
``detector.loss(outputs, batch)``, ``detector.postprocess(outputs, image_sizes)`` and
``detector.predict(images)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.single_stage import SingleStageDetector
from fdet.models.heads.retina import RetinaHeadOutputs
from fdet.ops.anchors import anchor_offsets, grid_anchors, level_sizes
from fdet.ops.assign import IGNORE, POSITIVE, Assignment, assign_max_iou
from fdet.ops.boxes import box_ioa, clip_boxes, small_box_mask
from fdet.ops.coding import decode_deltas, encode_deltas
from fdet.ops.losses import (
    giou_loss,
    l1_loss,
    masked_sum,
    normalize,
    sigmoid_focal_loss_labels,
    smooth_l1_loss,
)
from fdet.ops.postprocess import (
    Detections,
    batched_nms,
    postprocess_dense,
    select_topk_per_level,
)
from fdet.registry import build, register
from fdet.specs.losses import BoxLoss

__all__ = [
    "CROWD_IOA",
    "RetinaNet",
    "RetinaNetLoss",
    "build_retinanet",
    "retinanet_anchors",
    "retinanet_assign",
    "retinanet_loss",
    "retinanet_postprocess",
]

CROWD_IOA = 0.5
"""An anchor whose area lies more than this fraction inside a crowd region is ignored."""


# the specs' defaults (frozen, so safe to share as argument defaults)
_ANCHORS = specs.Anchors()
_ASSIGNER = specs.MaxIoUAssigner()
_CODER = specs.DeltaXYWHCoder()
_CLS_LOSS = specs.SigmoidFocalLoss()
_BOX_LOSS: BoxLoss = specs.L1Loss()
_POSTPROCESS = specs.DensePostprocess()


class RetinaNetLoss(NamedTuple):
    """The RetinaNet objective of a batch; every field is a float32 scalar tensor.

    ``cls_loss`` and ``box_loss`` are already weighted by their spec's ``weight`` and divided by
    the normalizer (by default ``max(num_pos, 1)``); ``loss`` is their sum.
    """

    loss: Float[Tensor, ""]
    cls_loss: Float[Tensor, ""]
    box_loss: Float[Tensor, ""]
    num_pos: Float[Tensor, ""]  # positive anchors in the whole batch, not clamped


def retinanet_anchors(
    feature_sizes: Sequence[tuple[int, int]],
    *,
    spec: specs.Anchors,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "A 4"]:
    """Anchors of every level, flattened in the order of the head's outputs.

    ``feature_sizes``: ``(H_l, W_l)`` of each level as Python ints (``outputs.feature_sizes``).
    Level ``l`` has sizes ``level_sizes(spec.base_sizes[l], spec.octave_scales)`` (cut to integers
    with ``spec.truncate_sizes``), ``spec.ratios`` and stride ``spec.strides[l]``.
    """
    if len(feature_sizes) != len(spec.strides):
        raise ValueError(
            f"got {len(feature_sizes)} feature maps for {len(spec.strides)} anchor levels "
            f"(anchors.strides {spec.strides})"
        )
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
    return grid_anchors(offsets, feature_sizes, spec.strides)


def _with_one_slot(
    gt_boxes: Tensor, gt_labels: Tensor, gt_valid: Tensor, gt_crowd: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """A batch with ``M = 0`` gets one padded slot, so that gathers by slot index stay in range."""
    if gt_valid.shape[1] > 0:
        return gt_boxes, gt_labels, gt_valid, gt_crowd
    batch = gt_valid.shape[0]
    return (
        gt_boxes.new_zeros(batch, 1, 4),
        gt_labels.new_zeros(batch, 1),
        gt_valid.new_zeros(batch, 1),
        None if gt_crowd is None else gt_crowd.new_zeros(batch, 1),
    )


def retinanet_assign(
    anchors: Float[Tensor, "A 4"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.MaxIoUAssigner,
    crowd_ioa: float = CROWD_IOA,
) -> Assignment:
    """Max-IoU assignment (``assign_max_iou`` with the ``assigner`` spec) that respects crowds.

    Crowd gts (``gt_crowd``, COCO ``iscrowd``) are never matched and never claim a low-quality
    match. An anchor whose intersection with a valid crowd box covers more than ``crowd_ioa`` of
    the anchor's own area is IGNORE, unless it is POSITIVE for a real gt. Padded slots play no
    part. An image without valid gts is all NEGATIVE (apart from crowd-covered anchors).
    """
    crowd = torch.zeros_like(gt_valid) if gt_crowd is None else gt_valid & gt_crowd  # [B, M]
    assignment = assign_max_iou(
        anchors,
        gt_boxes,
        gt_valid & ~crowd,
        pos_iou=assigner.pos_iou,
        neg_iou=assigner.neg_iou,
        low_quality_matches=assigner.low_quality_matches,
        min_low_quality_iou=assigner.min_low_quality_iou,
    )
    if gt_crowd is None:
        return assignment
    ioa = box_ioa(anchors, gt_boxes)  # [B, A, M] share of each anchor inside each gt box
    in_crowd = ((ioa > crowd_ioa) & crowd[:, None, :]).any(dim=2)  # [B, A]
    ignore = in_crowd & (assignment.label != POSITIVE)  # [B, A]
    label = torch.where(ignore, IGNORE, assignment.label).to(torch.int8)
    return assignment._replace(label=label)


def _box_loss_per_anchor(
    box_loss: BoxLoss,
    coder: specs.DeltaXYWHCoder,
    anchors: Float[Tensor, "B A 4"],
    deltas: Float[Tensor, "B A 4"],
    matched: Float[Tensor, "B A 4"],
) -> Float[Tensor, "B A"]:
    if isinstance(box_loss, specs.GIoULoss):
        boxes = decode_deltas(anchors, deltas, means=coder.means, stds=coder.stds, clip=coder.clip)
        return giou_loss(boxes, matched, eps=box_loss.eps)
    targets = encode_deltas(anchors, matched, means=coder.means, stds=coder.stds)  # [B, A, 4]
    if isinstance(box_loss, specs.SmoothL1Loss):
        return smooth_l1_loss(deltas, targets, beta=box_loss.beta).sum(dim=-1)
    if isinstance(box_loss, specs.L1Loss):
        return l1_loss(deltas, targets).sum(dim=-1)
    raise TypeError(f"unsupported box loss spec {type(box_loss).__name__}")


def retinanet_loss(
    outputs: RetinaHeadOutputs,
    anchors: Float[Tensor, "A 4"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.MaxIoUAssigner = _ASSIGNER,
    coder: specs.DeltaXYWHCoder = _CODER,
    cls_loss: specs.SigmoidFocalLoss = _CLS_LOSS,
    box_loss: BoxLoss = _BOX_LOSS,
    normalizer: Float[Tensor, ""] | None = None,
    crowd_ioa: float = CROWD_IOA,
) -> RetinaNetLoss:
    """The RetinaNet objective of a padded batch.

    1. Assignment: :func:`retinanet_assign` (max IoU, crowds never matched, crowd-covered
       anchors ignored).
    2. Classification: sigmoid focal loss over every anchor that is not IGNORE and every class,
       with one-hot targets on the positives (the class of their gt) and all-zero targets on the
       negatives.
    3. Box regression, on the positives only: ``L1Loss`` / ``SmoothL1Loss`` between the predicted
       deltas and the gt boxes encoded with the coder's ``means`` / ``stds`` (summed over the 4
       coordinates), or ``GIoULoss`` between the decoded predictions and the gt boxes.
    4. Each sum is multiplied by its spec's ``weight`` and divided by the number of positives in
       the whole batch, clamped to 1 (``normalizer`` replaces that count, e.g. with its mean over
       data-parallel processes; it is clamped to 1 as well).

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
        A :class:`RetinaNetLoss` of float32 scalars, also when the outputs are float16/bfloat16
        (autocast). An image without valid gts only contributes negatives; a batch without any
        gives a box loss of 0 and a finite classification loss.
    """
    gt_boxes, gt_labels, gt_valid, gt_crowd = _with_one_slot(
        gt_boxes, gt_labels, gt_valid, gt_crowd
    )
    cls_logits = torch.cat(list(outputs.cls_logits), dim=1).float()  # [B, A, K]
    deltas = torch.cat(list(outputs.box_deltas), dim=1).float()  # [B, A, 4]
    if cls_logits.shape[1] != anchors.shape[0]:
        raise ValueError(
            f"the head predicts for {cls_logits.shape[1]} anchors but {anchors.shape[0]} were given"
        )
    anchors = anchors.float()
    gt_boxes = gt_boxes.float()

    assignment = retinanet_assign(
        anchors, gt_boxes, gt_valid, gt_crowd, assigner=assigner, crowd_ioa=crowd_ioa
    )
    positive = assignment.label == POSITIVE  # [B, A]
    counted = assignment.label != IGNORE  # [B, A]
    num_pos = positive.sum(dtype=torch.float32)
    count = num_pos if normalizer is None else normalizer.float()

    # classification: one-hot targets on positives, zeros on negatives
    labels = gt_labels.gather(1, assignment.gt_index)  # [B, A], garbage where not positive
    focal = sigmoid_focal_loss_labels(
        cls_logits, labels, positive, valid=counted, alpha=cls_loss.alpha, gamma=cls_loss.gamma
    )  # [B, A, K], 0 on IGNORE anchors
    cls_total = focal.sum()

    # box regression on positives; the rest get harmless stand-ins so that no NaN or inf from
    # padded slots or wild predictions reaches the (masked) gradient
    batch_anchors = anchors.expand_as(deltas)  # [B, A, 4]
    matched = gt_boxes.gather(1, assignment.gt_index[..., None].expand(-1, -1, 4))  # [B, A, 4]
    matched = torch.where(positive[..., None], matched, batch_anchors)
    safe_deltas = torch.where(positive[..., None], deltas, torch.zeros_like(deltas))
    per_anchor = _box_loss_per_anchor(box_loss, coder, batch_anchors, safe_deltas, matched)
    box_total = masked_sum(per_anchor, positive)

    cls_value = cls_loss.weight * normalize(cls_total, count)
    box_value = box_loss.weight * normalize(box_total, count)
    return RetinaNetLoss(
        loss=cls_value + box_value, cls_loss=cls_value, box_loss=box_value, num_pos=num_pos
    )


def _four(values: Sequence[float]) -> tuple[float, float, float, float]:
    a, b, c, d = values
    return float(a), float(b), float(c), float(d)


def retinanet_postprocess(
    outputs: RetinaHeadOutputs,
    anchors: Float[Tensor, "A 4"],
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    coder: specs.DeltaXYWHCoder = _CODER,
    postprocess: specs.DensePostprocess = _POSTPROCESS,
) -> Detections:
    """Detections ``[B, max_detections]`` of a batch: :func:`fdet.ops.postprocess_dense`.

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
    per_level = anchors.split(counts)
    means, stds = _four(coder.means), _four(coder.stds)
    clip = math.inf if coder.clip is None else coder.clip
    if postprocess.min_box_size == 0:
        return postprocess_dense(
            outputs.cls_logits,
            outputs.box_deltas,
            per_level,
            image_sizes,
            score_threshold=postprocess.score_threshold,
            topk_per_level=postprocess.topk_per_level,
            iou_threshold=postprocess.nms_iou,
            max_detections=postprocess.max_detections,
            means=means,
            stds=stds,
            clip=clip,
        )
    # postprocess_dense's steps, with small boxes masked out before NMS
    scores = [torch.sigmoid(level.float()) for level in outputs.cls_logits]  # [B, A_l, K]
    candidates = select_topk_per_level(
        scores, k=postprocess.topk_per_level, score_threshold=postprocess.score_threshold
    )
    index = candidates.anchor_index  # [B, T]
    deltas = torch.cat(list(outputs.box_deltas), dim=1)  # [B, A, 4]
    deltas = deltas.gather(1, index[..., None].expand(-1, -1, 4))  # [B, T, 4]
    boxes = decode_deltas(anchors[index], deltas, means=means, stds=stds, clip=clip)
    boxes = clip_boxes(boxes, image_sizes)  # [B, T, 4]
    valid = candidates.valid & ~small_box_mask(boxes, min_size=postprocess.min_box_size)
    return batched_nms(
        boxes,
        candidates.scores,
        candidates.labels,
        valid,
        iou_threshold=postprocess.nms_iou,
        max_detections=postprocess.max_detections,
    )


class RetinaNet(SingleStageDetector):
    """A RetinaNet: ``forward`` gives the head's outputs; ``loss``, ``postprocess`` and
    ``predict`` apply the pure functions of this file with the detector's hyperparameters.

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

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        anchors: specs.Anchors = _ANCHORS,
        assigner: specs.MaxIoUAssigner = _ASSIGNER,
        coder: specs.DeltaXYWHCoder = _CODER,
        cls_loss: specs.SigmoidFocalLoss = _CLS_LOSS,
        box_loss: BoxLoss = _BOX_LOSS,
        postprocess: specs.DensePostprocess = _POSTPROCESS,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_range: float = 255.0,
    ) -> None:
        super().__init__(
            backbone=backbone, neck=neck, head=head, mean=mean, std=std, input_range=input_range
        )
        per_location = getattr(head, "num_anchors", anchors.per_location)
        if per_location != anchors.per_location:
            raise ValueError(
                f"the head predicts {per_location} anchors a location but the anchors spec has "
                f"{anchors.per_location} ({len(anchors.octave_scales)} scales × "
                f"{len(anchors.ratios)} ratios)"
            )
        self.anchor_spec = anchors
        self.assigner_spec = assigner
        self.coder_spec = coder
        self.cls_loss_spec = cls_loss
        self.box_loss_spec = box_loss
        self.postprocess_spec = postprocess

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> RetinaHeadOutputs:
        """Head outputs for ``images[B, 3, H, W]`` with values in ``[0, input_range]``."""
        outputs: RetinaHeadOutputs = super().forward(images)
        return outputs

    def anchors_for(self, outputs: RetinaHeadOutputs) -> Float[Tensor, "A 4"]:
        """The anchors ``[A, 4]`` that line up with ``outputs`` (float32, on their device)."""
        return retinanet_anchors(
            outputs.feature_sizes, spec=self.anchor_spec, device=outputs.cls_logits[0].device
        )

    def loss(
        self,
        outputs: RetinaHeadOutputs,
        batch: Any,
        *,
        normalizer: Float[Tensor, ""] | None = None,
    ) -> RetinaNetLoss:
        """:func:`retinanet_loss` of ``outputs`` against ``batch``'s ``gt_boxes``, ``gt_labels``,
        ``gt_valid`` and ``gt_crowd`` (any object with those attributes, e.g. a
        :class:`fdet.data.Batch`; ``gt_crowd`` may be missing or None). ``normalizer`` replaces
        the batch's positive count (1 gives plain sums, for accumulation over micro-batches)."""
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
            normalizer=normalizer,
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

    @torch.no_grad()
    def predict(
        self,
        images: Float[Tensor, "B 3 H W"],
        image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"] | None = None,
    ) -> Detections:
        """Detections of ``images`` in eval mode without gradients (the module's train/eval mode
        is restored afterwards). ``image_sizes`` ``[B, 2]`` (height, width) clip the boxes;
        default: the padded size of ``images``."""
        if image_sizes is None:
            height, width = images.shape[-2:]
            image_sizes = torch.tensor([height, width], device=images.device).expand(
                images.shape[0], 2
            )
        was_training = self.training
        self.eval()
        try:
            return self.postprocess(self(images), image_sizes)
        finally:
            self.train(was_training)


@register(specs.RetinaNet)
def build_retinanet(spec: specs.RetinaNet) -> RetinaNet:
    """A :class:`RetinaNet` with the modules and the hyperparameters of ``spec``."""
    backbone = build(spec.backbone)
    neck = build(
        spec.neck, in_channels=spec.backbone.out_channels, input_levels=spec.backbone.out_levels
    )
    head = build(spec.head, in_channels=spec.neck.channels, num_anchors=spec.anchors.per_location)
    return RetinaNet(
        backbone=backbone,
        neck=neck,
        head=head,
        anchors=spec.anchors,
        assigner=spec.assigner,
        coder=spec.coder,
        cls_loss=spec.cls_loss,
        box_loss=spec.box_loss,
        postprocess=spec.postprocess,
        mean=spec.normalize.mean,
        std=spec.normalize.std,
        input_range=spec.normalize.input_range,
    )
