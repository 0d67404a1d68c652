"""GFL: what only GFL has — its box representation (a distribution over distances for each
side, integrated into a box), its objective on ATSS assignment (quality focal loss on the joint
class–IoU score, GIoU and distribution focal loss weighted by the predicted score) and its
postprocess (scores ``sigmoid(cls)``, boxes from the integral) — as pure functions of a padded
batch, and the detector module that calls them.

Li et al., "Generalized Focal Loss: Learning Qualified and Distributed Bounding Boxes for Dense
Object Detection" (NeurIPS 2020). docs/gfl.md puts each equation next to the function that
computes it.

The functions compose :mod:`fdet.ops` and the shared dense pieces of
:mod:`fdet.models.detectors.dense`; they work on the whole batch at once (no loop over images
or gts), keep every shape static and never sync with the host, so they run under
``torch.compile(fullgraph=True)``::

    outputs = detector(images)                                       # GFLHeadOutputs, per level
    anchors = retinanet_anchors(outputs.feature_sizes, spec=spec.anchors)              # [A, 4]
    strides = gfl_strides(outputs.feature_sizes, spec=spec.anchors)                    # [A]
    terms = gfl_loss(outputs, anchors, strides, gt_boxes, gt_labels, gt_valid, gt_crowd,
                     assigner=spec.assigner, cls_loss=spec.cls_loss, box_loss=spec.box_loss,
                     dfl=spec.dfl)                                   # {"cls", "box", "dfl"}
    detections = gfl_postprocess(outputs, anchors, strides, image_sizes,
                                 postprocess=spec.postprocess)

:class:`GFL` does the same with the hyperparameters of the spec it was built from, on the
detector contract (:mod:`fdet.models.detectors.base`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.atss import atss_assign
from fdet.models.detectors.base import LossTerms, Targets, Term
from fdet.models.detectors.dense import (
    DenseDetector,
    build_dense_parts,
    check_anchors_per_location,
    matched_targets,
    with_one_slot,
)
from fdet.models.detectors.retinanet import retinanet_anchors
from fdet.models.heads.gfl import GFLHeadOutputs
from fdet.ops.anchors import level_index
from fdet.ops.assign import IGNORE, POSITIVE
from fdet.ops.boxes import aligned_box_iou, xyxy_to_cxcywh
from fdet.ops.coding import decode_distances, distribution_to_distances, encode_distances
from fdet.ops.losses import (
    distribution_focal_loss,
    giou_loss,
    masked_sum,
    quality_focal_loss_labels,
)
from fdet.ops.postprocess import Detections, detect_dense
from fdet.registry import register
from fdet.specs.atss import SINGLE_ANCHORS

__all__ = [
    "GFL",
    "build_gfl",
    "gfl_decode",
    "gfl_loss",
    "gfl_postprocess",
    "gfl_strides",
]


# the specs' defaults (frozen, so safe to share as argument defaults)
_ANCHORS = SINGLE_ANCHORS
_ASSIGNER = specs.ATSSAssigner()
_CLS_LOSS = specs.QualityFocalLoss()
_BOX_LOSS = specs.GIoULoss(weight=2.0)
_DFL = specs.DistributionFocalLoss()
_POSTPROCESS = specs.DensePostprocess(nms_iou=0.6, max_detections=100)


def gfl_strides(
    feature_sizes: Sequence[tuple[int, int]],
    *,
    spec: specs.Anchors,
    device: torch.device | str | None = None,
) -> Float[Tensor, " A"]:
    """The nominal stride of each anchor's level, ``[A]`` float32, in the order of
    :func:`retinanet_anchors`: the unit of the distances the distributions cover (``reg_max``
    strides at most)."""
    level = level_index(feature_sizes, spec.per_location, device=device)  # [A]
    return torch.tensor(spec.strides, dtype=torch.float32, device=device)[level]


def gfl_decode(
    centres: Float[Tensor, "*batch 2"],
    strides: Float[Tensor, " *batch"],
    dists: Float[Tensor, "*batch 4 N"],
) -> Float[Tensor, "*batch 4"]:
    """Boxes from the side distributions: each side's distance is the mean of its distribution
    over the bins ``0 … reg_max`` (the paper's integral,
    :func:`fdet.ops.coding.distribution_to_distances`), in strides, laid off from the anchor
    centre (:func:`fdet.ops.coding.decode_distances`)::

        ŷ = Σ_i P(y_i) y_i,    b = (x - ŷ_l s, y - ŷ_t s, x + ŷ_r s, y + ŷ_b s)
    """
    ltrb = distribution_to_distances(dists, reg_max=dists.shape[-1] - 1)  # [..., 4]
    return decode_distances(centres, ltrb, stride=strides)


def gfl_loss(
    outputs: GFLHeadOutputs,
    anchors: Float[Tensor, "A 4"],
    strides: Float[Tensor, " A"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.ATSSAssigner = _ASSIGNER,
    cls_loss: specs.QualityFocalLoss = _CLS_LOSS,
    box_loss: specs.GIoULoss = _BOX_LOSS,
    dfl: specs.DistributionFocalLoss = _DFL,
) -> dict[str, Term]:
    """The GFL objective of a padded batch, as the terms ``"cls"``, ``"box"`` and ``"dfl"``::

        L = 1/N_pos Σ_a QFL(σ_a, y_a) + 1/Σ_{a pos} w_a · Σ_{a pos} w_a L_GIoU(b_a, b*_a)
            + 1/Σ_{a pos} w_a · Σ_{a pos} w_a · 1/4 Σ_{sides} DFL(S_a, d*_a)

    1. Assignment: ATSS (:func:`fdet.models.detectors.atss.atss_assign`).
    2. Boxes ``b_a``: :func:`gfl_decode` of the side distributions from the anchor centres.
    3. ``"cls"``: the quality focal loss (``cls_loss``) of the class logits
       against the soft targets ``y``: on a positive, ``IoU(b_a, b*_a)`` (predicted box
       detached) at its gt's class, 0 at the others; 0 everywhere on negatives; nothing on
       IGNORE. Summed; count ``N_pos``.
    4. Weights ``w_a``: the largest predicted class probability ``max_k σ(cls)`` of a positive
       (detached), as the authors' code and MMDetection weight both box terms.
    5. ``"box"``: ``w_a · (1 - GIoU(b_a, b*_a))`` on the positives, summed; count ``Σ w_a``.
    6. ``"dfl"``: the distribution focal loss of each side's distribution against
       the distance to the gt side, in strides, clamped into ``[0, reg_max - dfl.eps]``
       (:func:`fdet.ops.coding.encode_distances` with ``max_distance``), averaged over the 4
       sides and weighted by ``w_a``; summed; count ``Σ w_a`` (the tensor of ``"box"``);
       weight ``dfl.weight`` (0.25).

    Args:
        outputs: the head's per-level ``cls_logits[B, A_l, K]`` and ``box_dists[B, A_l, 4,
            reg_max + 1]``.
        anchors: ``[A, 4]``, levels in the outputs' order (:func:`retinanet_anchors`).
        strides: ``[A]`` the distance unit of each anchor (:func:`gfl_strides`).
        gt_boxes: ``[B, M, 4]`` xyxy pixels; padded slots may hold anything, even NaN.
        gt_labels: ``[B, M]`` classes in ``[0, K)`` on valid slots.
        gt_valid: ``[B, M]`` True for real annotations (crowd ones included).
        gt_crowd: ``[B, M]`` True for crowd regions, or None for none.

    Returns:
        ``{"cls", "box", "dfl"}`` :class:`Term` s of float32 scalars, also when the outputs are
        float16/bfloat16 (autocast). A batch without positives gives box and DFL totals of 0, a
        finite classification total and counts of 0.
    """
    gt_boxes, gt_labels, gt_valid, gt_crowd = with_one_slot(gt_boxes, gt_labels, gt_valid, gt_crowd)
    num_per_level = [int(level.shape[1]) for level in outputs.cls_logits]
    cls_logits = torch.cat(list(outputs.cls_logits), dim=1).float()  # [B, A, K]
    dists = torch.cat(list(outputs.box_dists), dim=1).float()  # [B, A, 4, N]
    if cls_logits.shape[1] != anchors.shape[0]:
        raise ValueError(
            f"the head predicts for {cls_logits.shape[1]} anchors but {anchors.shape[0]} were given"
        )
    reg_max = dists.shape[-1] - 1
    anchors = anchors.float()
    strides = strides.float()
    gt_boxes = gt_boxes.float()

    assignment = atss_assign(
        anchors, num_per_level, gt_boxes, gt_valid, gt_crowd, assigner=assigner
    )
    positive = assignment.label == POSITIVE  # [B, A]
    counted = assignment.label != IGNORE  # [B, A]
    num_pos = positive.sum(dtype=torch.float32)

    # predicted boxes, and the gt box of each positive (the anchor itself elsewhere, so that
    # nothing from padded slots reaches the masked losses)
    centres = xyxy_to_cxcywh(anchors)[:, :2]  # [A, 2]
    boxes = gfl_decode(centres, strides, dists)  # [B, A, 4]
    matched = matched_targets(
        gt_boxes, assignment.gt_index, positive, anchors.expand_as(boxes)
    )  # [B, A, 4]

    # quality focal loss against the IoU of the predicted box on the positives
    quality = aligned_box_iou(boxes.detach(), matched)  # [B, A]
    labels = gt_labels.gather(1, assignment.gt_index)  # [B, A], garbage where not positive
    qfl = quality_focal_loss_labels(
        cls_logits, labels, quality, positive, valid=counted, beta=cls_loss.beta
    )  # [B, A, K]

    # box terms on the positives, weighted by the predicted score
    weight = torch.sigmoid(cls_logits.detach()).amax(dim=-1)  # [B, A]
    weight = torch.where(positive, weight, torch.zeros_like(weight))
    weight_sum = weight.sum()
    box_total = masked_sum(giou_loss(boxes, matched, eps=box_loss.eps) * weight, positive)
    target = encode_distances(
        centres, matched, stride=strides, max_distance=reg_max, eps=dfl.eps
    )  # [B, A, 4], in strides
    per_side = distribution_focal_loss(dists, target)  # [B, A, 4]
    dfl_total = masked_sum(per_side.mean(dim=-1) * weight, positive)
    return {
        "cls": Term(qfl.sum(), num_pos, float(cls_loss.weight)),
        "box": Term(box_total, weight_sum, float(box_loss.weight)),
        "dfl": Term(dfl_total, weight_sum, float(dfl.weight)),
    }


def gfl_postprocess(
    outputs: GFLHeadOutputs,
    anchors: Float[Tensor, "A 4"],
    strides: Float[Tensor, " A"],
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    postprocess: specs.DensePostprocess = _POSTPROCESS,
) -> Detections:
    """Detections ``[B, max_detections]`` of a batch: :func:`fdet.ops.postprocess.detect_dense`
    with the scores ``sigmoid(cls)`` (they already estimate the IoU: no centerness) and the
    boxes of :func:`gfl_decode`.

    Per level the ``topk_per_level`` best (anchor, class) pairs above ``score_threshold``, their
    boxes decoded and clipped to ``image_sizes`` (``(height, width)`` of each image's valid
    area), class-aware NMS at ``nms_iou`` over all levels and the ``max_detections`` best.
    Valid detections come first in each row, by score; the rest are padding (``valid`` False).
    """
    counts = [int(level.shape[1]) for level in outputs.cls_logits]
    if sum(counts) != anchors.shape[0]:
        raise ValueError(
            f"the head predicts for {sum(counts)} anchors but {anchors.shape[0]} were given"
        )
    dists = torch.cat(list(outputs.box_dists), dim=1)  # [B, A, 4, N]
    centres = xyxy_to_cxcywh(anchors)[:, :2]  # [A, 2]

    def decode(index: Tensor) -> Tensor:  # [B, T] -> [B, T, 4]
        selected = dists.gather(
            1, index[..., None, None].expand(-1, -1, *dists.shape[2:])
        )  # [B, T, 4, N]
        return gfl_decode(centres[index], strides[index], selected)

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


class GFL(DenseDetector):
    """A GFL detector on the detector contract: ``forward`` gives the head's outputs (and the
    padded input size); ``loss`` and ``postprocess`` apply the pure functions of this file with
    the detector's hyperparameters; ``predict`` is the shared one.

    The hyperparameters are frozen specs kept as plain attributes (``anchor_spec``,
    ``assigner_spec``, ``cls_loss_spec``, ``box_loss_spec``, ``dfl_spec``,
    ``postprocess_spec``); parameters are the module's only state.

    Args:
        backbone, neck, head: modules with ``head(neck(backbone(x)))`` returning
            :class:`GFLHeadOutputs`; the head predicts ``anchors.per_location`` anchors a
            location.
        anchors, assigner, cls_loss, box_loss, dfl, postprocess: the specs of those steps.
        mean, std, input_range: input normalization, ``(x / input_range - mean) / std``.
    """

    box_terms = frozenset({"box", "dfl"})
    """The box regression and the distribution focal loss of the box sides. (The quality focal
    loss ``"cls"`` also reads the boxes, its target being an IoU, but it is the classifier: it
    learns from every pseudo-label.)"""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        anchors: specs.Anchors = _ANCHORS,
        assigner: specs.ATSSAssigner = _ASSIGNER,
        cls_loss: specs.QualityFocalLoss = _CLS_LOSS,
        box_loss: specs.GIoULoss = _BOX_LOSS,
        dfl: specs.DistributionFocalLoss = _DFL,
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
        self.cls_loss_spec = cls_loss
        self.box_loss_spec = box_loss
        self.dfl_spec = dfl
        self.postprocess_spec = postprocess

    def anchors_for(self, outputs: GFLHeadOutputs) -> tuple[Float[Tensor, "A 4"], Tensor]:
        """The anchors ``[A, 4]`` that line up with ``outputs`` and the stride ``[A]`` of each
        (float32, on their device)."""
        device = outputs.cls_logits[0].device
        anchors = retinanet_anchors(
            outputs.feature_sizes,
            spec=self.anchor_spec,
            image_size=outputs.image_size,
            device=device,
        )
        return anchors, gfl_strides(outputs.feature_sizes, spec=self.anchor_spec, device=device)

    def loss(self, outputs: GFLHeadOutputs, batch: Targets) -> LossTerms:
        """:func:`gfl_loss` of ``outputs`` against ``batch``'s ``gt_boxes``, ``gt_labels``,
        ``gt_valid`` and ``gt_crowd`` (any object with those attributes, e.g. a
        :class:`fdet.data.Batch`; ``gt_crowd`` may be missing or None)."""
        anchors, strides = self.anchors_for(outputs)
        return gfl_loss(
            outputs,
            anchors,
            strides,
            batch.gt_boxes,
            batch.gt_labels,
            batch.gt_valid,
            getattr(batch, "gt_crowd", None),
            assigner=self.assigner_spec,
            cls_loss=self.cls_loss_spec,
            box_loss=self.box_loss_spec,
            dfl=self.dfl_spec,
        )

    def postprocess(
        self, outputs: GFLHeadOutputs, image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"]
    ) -> Detections:
        """:func:`gfl_postprocess` of ``outputs``; boxes clipped to ``image_sizes[B, 2]``
        (height, width)."""
        anchors, strides = self.anchors_for(outputs)
        return gfl_postprocess(
            outputs, anchors, strides, image_sizes, postprocess=self.postprocess_spec
        )


@register(specs.GFL)
def build_gfl(spec: specs.GFL) -> GFL:
    """A :class:`GFL` with the modules and the hyperparameters of ``spec``."""
    return GFL(
        **build_dense_parts(
            spec, num_anchors=spec.anchors.per_location, num_levels=len(spec.neck.out_levels)
        ),
        anchors=spec.anchors,
        assigner=spec.assigner,
        cls_loss=spec.cls_loss,
        box_loss=spec.box_loss,
        dfl=spec.dfl,
        postprocess=spec.postprocess,
    )
