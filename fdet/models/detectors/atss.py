"""ATSS: what only ATSS has — its assignment (adaptive training sample selection), its objective
(focal classification, box regression weighted by the centerness target, centerness BCE) and
its postprocess (scores ``sigmoid(cls) · sigmoid(centerness)``, deltas on anchors) — as pure
functions of a padded batch, and the detector module that calls them.

Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive
Training Sample Selection" (CVPR 2020). docs/atss.md puts each equation next to the function
that computes it.

The functions compose :mod:`fdet.ops` and the shared dense pieces of
:mod:`fdet.models.detectors.dense`; they work on the whole batch at once (no loop over images
or gts), keep every shape static and never sync with the host, so they run under
``torch.compile(fullgraph=True)``::

    outputs = detector(images)                                      # ATSSHeadOutputs, per level
    anchors = retinanet_anchors(outputs.feature_sizes, spec=spec.anchors)             # [A, 4]
    terms = atss_loss(outputs, anchors, gt_boxes, gt_labels, gt_valid, gt_crowd,
                      assigner=spec.assigner, coder=spec.coder, cls_loss=spec.cls_loss,
                      box_loss=spec.box_loss)                       # {"cls", "box", "centerness"}
    detections = atss_postprocess(outputs, anchors, image_sizes,
                                  coder=spec.coder, postprocess=spec.postprocess)

:class:`ATSS` does the same with the hyperparameters of the spec it was built from, on the
detector contract (:mod:`fdet.models.detectors.base`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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
from fdet.models.detectors.retinanet import retinanet_anchors
from fdet.models.heads.atss import ATSSHeadOutputs
from fdet.ops.assign import IGNORE, POSITIVE, Assignment, assign_atss
from fdet.ops.boxes import xyxy_to_cxcywh
from fdet.ops.coding import centerness, encode_distances
from fdet.ops.losses import masked_sum
from fdet.ops.postprocess import Detections, detect_dense
from fdet.registry import register
from fdet.specs.atss import SINGLE_ANCHORS

__all__ = [
    "ATSS",
    "atss_assign",
    "atss_loss",
    "atss_postprocess",
    "atss_scores",
    "build_atss",
]


# the specs' defaults (frozen, so safe to share as argument defaults)
_ANCHORS = SINGLE_ANCHORS
_ASSIGNER = specs.ATSSAssigner()
_CODER = specs.DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
_CLS_LOSS = specs.SigmoidFocalLoss()
_BOX_LOSS = specs.GIoULoss(weight=2.0)
_POSTPROCESS = specs.DensePostprocess(nms_iou=0.6, max_detections=100)


def atss_assign(
    anchors: Float[Tensor, "A 4"],
    num_per_level: Sequence[int],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.ATSSAssigner,
) -> Assignment:
    """ATSS assignment with the ``assigner`` spec (:func:`fdet.ops.assign.assign_atss`):
    ``assigner.topk`` candidates a level by centre distance, IoU threshold mean + std of the
    candidates' IoUs, centres inside the gt, ties to the best IoU. Crowd gts are never matched
    and anchors more than ``assigner.crowd_ioa`` inside one are IGNORE unless POSITIVE; padded
    slots play no part; an image without valid gts is all NEGATIVE."""
    return assign_atss(
        anchors,
        num_per_level,
        gt_boxes,
        gt_valid,
        gt_crowd,
        topk=assigner.topk,
        unbiased_std=assigner.unbiased_std,
        inside_eps=assigner.inside_eps,
        crowd_ioa=assigner.crowd_ioa,
    )


def atss_loss(
    outputs: ATSSHeadOutputs,
    anchors: Float[Tensor, "A 4"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.ATSSAssigner = _ASSIGNER,
    coder: specs.Spec = _CODER,
    cls_loss: specs.Spec = _CLS_LOSS,
    box_loss: specs.Spec = _BOX_LOSS,
    centerness_weight: float = 1.0,
) -> dict[str, Term]:
    """The ATSS objective of a padded batch, as the terms ``"cls"``, ``"box"`` and, with a
    centerness branch, ``"centerness"``::

        L = 1/N_pos Σ_a FL(p_a, c*_a) + 1/Σ_{a pos} ctr*_a · Σ_{a pos} ctr*_a · L_GIoU(b_a, b*_a)
            + 1/N_pos Σ_{a pos} BCE(o_a, ctr*_a)

    1. Assignment: :func:`atss_assign` (levels from the outputs' per-level sizes).
    2. ``"cls"``: the ``cls_loss`` spec (sigmoid focal loss) over every anchor that is not
       IGNORE and every class, one-hot targets on the positives, summed; count ``N_pos``.
    3. Centerness target of a positive (FCOS's, from the anchor's centre):
       ``ctr* = sqrt(min(l, r) / max(l, r) · min(t, b) / max(t, b))`` of the distances from the
       anchor centre to the sides of its gt (:func:`fdet.ops.coding.centerness` of
       :func:`fdet.ops.coding.encode_distances`); in ``(0, 1]``, as ATSS positives have their
       centre inside their gt.
    4. ``"box"``: the ``box_loss`` spec on the positives (GIoU between the decoded deltas and
       the gt box by default), each weighted by its ``ctr*``, summed; count ``Σ_{pos} ctr*``.
       Without a centerness branch ("RetinaNet + ATSS") the weights are 1 and the count is
       ``N_pos``.
    5. ``"centerness"`` (with the branch): binary cross-entropy between the centerness logit
       and ``ctr*`` on the positives, summed; count ``N_pos`` (the tensor of ``"cls"``);
       weight ``centerness_weight``.

    As the authors' code and MMDetection, but normalised once over the batch and by counts the
    training step adds over micro-batches and processes.

    Args:
        outputs: the head's per-level ``cls_logits[B, A_l, K]``, ``box_deltas[B, A_l, 4]`` and
            ``centerness[B, A_l]`` (or None).
        anchors: ``[A, 4]``, levels in the outputs' order (:func:`retinanet_anchors`).
        gt_boxes: ``[B, M, 4]`` xyxy pixels; padded slots may hold anything, even NaN.
        gt_labels: ``[B, M]`` classes in ``[0, K)`` on valid slots.
        gt_valid: ``[B, M]`` True for real annotations (crowd ones included).
        gt_crowd: ``[B, M]`` True for crowd regions, or None for none.

    Returns:
        :class:`Term` s of float32 scalars, also when the outputs are float16/bfloat16
        (autocast). A batch without positives gives box and centerness totals of 0, a finite
        classification total and counts of 0.
    """
    gt_boxes, gt_labels, gt_valid, gt_crowd = with_one_slot(gt_boxes, gt_labels, gt_valid, gt_crowd)
    num_per_level = [int(level.shape[1]) for level in outputs.cls_logits]
    cls_logits = torch.cat(list(outputs.cls_logits), dim=1).float()  # [B, A, K]
    deltas = torch.cat(list(outputs.box_deltas), dim=1).float()  # [B, A, 4]
    if cls_logits.shape[1] != anchors.shape[0]:
        raise ValueError(
            f"the head predicts for {cls_logits.shape[1]} anchors but {anchors.shape[0]} were given"
        )
    anchors = anchors.float()
    gt_boxes = gt_boxes.float()

    assignment = atss_assign(
        anchors, num_per_level, gt_boxes, gt_valid, gt_crowd, assigner=assigner
    )
    positive = assignment.label == POSITIVE  # [B, A]
    counted = assignment.label != IGNORE  # [B, A]
    num_pos = positive.sum(dtype=torch.float32)

    # classification: one-hot targets on positives, zeros on negatives, nothing on IGNORE
    labels = gt_labels.gather(1, assignment.gt_index)  # [B, A], garbage where not positive
    cls_total = cls_loss_per_anchor(cls_loss, cls_logits, labels, positive, counted).sum()

    # the gt box of each positive; the anchor itself elsewhere, so that nothing from padded
    # slots or wild predictions reaches the (masked) gradient
    batch_anchors = anchors.expand_as(deltas)  # [B, A, 4]
    matched = matched_targets(gt_boxes, assignment.gt_index, positive, batch_anchors)
    centres = xyxy_to_cxcywh(anchors)[:, :2]  # [A, 2]
    ctr_target = centerness(encode_distances(centres, matched))  # [B, A]
    ctr_target = torch.where(positive, ctr_target, torch.zeros_like(ctr_target))

    safe_deltas = torch.where(positive[..., None], deltas, torch.zeros_like(deltas))
    per_anchor = box_loss_per_anchor(
        box_loss, box_coder(coder), safe_deltas, batch_anchors, matched
    )  # [B, A]
    terms = {"cls": Term(cls_total, num_pos, float(getattr(cls_loss, "weight", 1.0)))}
    box_weight = float(getattr(box_loss, "weight", 1.0))
    if outputs.centerness is None:
        terms["box"] = Term(masked_sum(per_anchor, positive), num_pos, box_weight)
        return terms
    terms["box"] = Term(masked_sum(per_anchor * ctr_target, positive), ctr_target.sum(), box_weight)

    ctr_logits = torch.cat(list(outputs.centerness), dim=1).float()  # [B, A]
    bce = F.binary_cross_entropy_with_logits(ctr_logits, ctr_target, reduction="none")  # [B, A]
    terms["centerness"] = Term(masked_sum(bce, positive), num_pos, float(centerness_weight))
    return terms


def atss_scores(outputs: ATSSHeadOutputs) -> list[Float[Tensor, "B A_l K"]]:
    """Per level, the score of each anchor and class: ``sigmoid(cls) · sigmoid(centerness)``
    (``sigmoid(cls)`` without the branch), in float32 at least.

    MMDetection's ATSS scores and thresholds this product. The authors' code thresholds
    ``sigmoid(cls)`` alone, then reports ``sqrt(sigmoid(cls) · sigmoid(centerness))``: a
    monotone map of the same product, so the ranking, NMS and AP are the same; only the scale
    ``score_threshold`` applies to differs.
    """
    if outputs.centerness is None:
        return [torch.sigmoid(cls.float()) for cls in outputs.cls_logits]
    return [
        torch.sigmoid(cls.float()) * torch.sigmoid(ctr.float())[..., None]
        for cls, ctr in zip(outputs.cls_logits, outputs.centerness)
    ]


def atss_postprocess(
    outputs: ATSSHeadOutputs,
    anchors: Float[Tensor, "A 4"],
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    coder: specs.Spec = _CODER,
    postprocess: specs.DensePostprocess = _POSTPROCESS,
) -> Detections:
    """Detections ``[B, max_detections]`` of a batch: :func:`fdet.ops.postprocess.detect_dense`
    with the scores of :func:`atss_scores` and the coder's decoding of the deltas.

    Per level the ``topk_per_level`` best (anchor, class) pairs whose score is above
    ``score_threshold``, their boxes decoded and clipped to ``image_sizes`` (``(height,
    width)`` of each image's valid area), class-aware NMS at ``nms_iou`` over all levels and
    the ``max_detections`` best. Valid detections come first in each row, by score; the rest
    are padding (``valid`` False).
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
        atss_scores(outputs),
        decode,
        image_sizes,
        score_threshold=postprocess.score_threshold,
        topk_per_level=postprocess.topk_per_level,
        iou_threshold=postprocess.nms_iou,
        max_detections=postprocess.max_detections,
        min_box_size=postprocess.min_box_size,
    )


class ATSS(DenseDetector):
    """An ATSS detector on the detector contract: ``forward`` gives the head's outputs (and the
    padded input size); ``loss`` and ``postprocess`` apply the pure functions of this file with
    the detector's hyperparameters; ``predict`` is the shared one.

    The hyperparameters are frozen specs kept as plain attributes (``anchor_spec``,
    ``assigner_spec``, ``coder_spec``, ``cls_loss_spec``, ``box_loss_spec``,
    ``postprocess_spec``) and a number (``centerness_weight``); parameters are the module's
    only state.

    Args:
        backbone, neck, head: modules with ``head(neck(backbone(x)))`` returning
            :class:`ATSSHeadOutputs`; the head predicts ``anchors.per_location`` anchors a
            location.
        anchors, assigner, coder, cls_loss, box_loss, postprocess: the specs of those steps.
        centerness_weight: the weight of the centerness term.
        mean, std, input_range: input normalization, ``(x / input_range - mean) / std``.
    """

    box_terms = frozenset({"box", "centerness"})
    """The box regression, and the centerness (its target is the anchor centre's place in its
    box; without the head's centerness branch: ``{"box"}``)."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        anchors: specs.Anchors = _ANCHORS,
        assigner: specs.ATSSAssigner = _ASSIGNER,
        coder: specs.Spec = _CODER,
        cls_loss: specs.Spec = _CLS_LOSS,
        box_loss: specs.Spec = _BOX_LOSS,
        centerness_weight: float = 1.0,
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
        self.centerness_weight = float(centerness_weight)
        self.postprocess_spec = postprocess
        if getattr(head, "centerness", True) is None:  # a head without the centerness branch
            self.box_terms = frozenset({"box"})

    def anchors_for(self, outputs: ATSSHeadOutputs) -> Float[Tensor, "A 4"]:
        """The anchors ``[A, 4]`` that line up with ``outputs`` (float32, on their device)."""
        return retinanet_anchors(
            outputs.feature_sizes,
            spec=self.anchor_spec,
            image_size=outputs.image_size,
            device=outputs.cls_logits[0].device,
        )

    def loss(self, outputs: ATSSHeadOutputs, batch: Targets) -> LossTerms:
        """:func:`atss_loss` of ``outputs`` against ``batch``'s ``gt_boxes``, ``gt_labels``,
        ``gt_valid`` and ``gt_crowd`` (any object with those attributes, e.g. a
        :class:`fdet.data.Batch`; ``gt_crowd`` may be missing or None)."""
        return atss_loss(
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
            centerness_weight=self.centerness_weight,
        )

    def postprocess(
        self, outputs: ATSSHeadOutputs, image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"]
    ) -> Detections:
        """:func:`atss_postprocess` of ``outputs``; boxes clipped to ``image_sizes[B, 2]``
        (height, width)."""
        return atss_postprocess(
            outputs,
            self.anchors_for(outputs),
            image_sizes,
            coder=self.coder_spec,
            postprocess=self.postprocess_spec,
        )


@register(specs.ATSS)
def build_atss(spec: specs.ATSS) -> ATSS:
    """An :class:`ATSS` with the modules and the hyperparameters of ``spec``."""
    return ATSS(
        **build_dense_parts(
            spec, num_anchors=spec.anchors.per_location, num_levels=len(spec.neck.out_levels)
        ),
        anchors=spec.anchors,
        assigner=spec.assigner,
        coder=spec.coder,
        cls_loss=spec.cls_loss,
        box_loss=spec.box_loss,
        centerness_weight=spec.centerness_weight,
        postprocess=spec.postprocess,
    )
