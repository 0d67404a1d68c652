"""From dense head outputs to a fixed number of detections per image: top-k, decode, NMS.

Everything works on padded batches with static shapes. A candidate that would be dropped in a
per-image implementation (below the score threshold, suppressed, padding) is marked invalid
instead, and the result has exactly ``max_detections`` slots per image. These functions run under
``torch.compile(fullgraph=True)`` and ``torch.export``.

Padded slots of a ``Detections`` have ``valid`` False, score 0, label 0 and an all-zero box. Label 0
is a real class; ``valid`` is the only padding marker (a padded slot is never told apart by its
label).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.ops  # noqa: F401  (registers the torch.ops.torchvision.nms kernel)
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fdet.ops.boxes import clip_boxes
from fdet.ops.coding import decode_deltas

__all__ = [
    "Candidates",
    "Detections",
    "batched_nms",
    "nms_keep_mask",
    "postprocess_dense",
    "select_topk_per_level",
    "top_detections",
]


class Detections(NamedTuple):
    """``N`` detection slots per image; valid ones first, by score descending."""

    boxes: Float[Tensor, "B N 4"]
    scores: Float[Tensor, "B N"]
    labels: Int[Tensor, "B N"]
    valid: Bool[Tensor, "B N"]


class Candidates(NamedTuple):
    """Top-scoring (anchor, class) pairs of each level, levels concatenated in order.

    ``T = sum_l min(k, A_l * K)``. Within a level, candidates are sorted by score descending.
    """

    scores: Float[Tensor, "B T"]
    anchor_index: Int[Tensor, "B T"]  # into the anchors of all levels concatenated
    labels: Int[Tensor, "B T"]
    valid: Bool[Tensor, "B T"]  # score > score_threshold


def nms_keep_mask(
    boxes: Float[Tensor, "B C 4"],
    scores: Float[Tensor, "B C"],
    labels: Int[Tensor, "B C"],
    valid: Bool[Tensor, "B C"],
    *,
    iou_threshold: float,
) -> Bool[Tensor, "B C"]:
    """Class-aware non-maximum suppression of every image of a batch at once.

    A valid candidate is kept unless a valid candidate of the same image and label with a higher
    score overlaps it with IoU > ``iou_threshold``. Invalid candidates are never kept and never
    suppress anything; their boxes may hold anything, even NaN.

    The whole batch goes through one call of ``torch.ops.torchvision.nms``. Each (image, label)
    group, and one more group for all invalid candidates, is translated by
    ``group * (coordinate range + 1)`` so that boxes of different groups never overlap. The
    translated boxes are float64, so large offsets cost the IoUs no precision. The kernel's
    variable-length result is scattered back into a ``[B, C]`` mask.

    One kernel call over ``B * C`` boxes costs time (and, on CUDA, a suppression bitmask of about
    ``(B * C)² / 8`` bytes) quadratic in ``B * C``, cross-image pairs included.

    The NMS kernel's fake (tracing) implementation declares that it keeps at least 2 boxes, and
    ``torch.compile`` and ``torch.export`` turn that into a run-time assertion. Two extra boxes,
    each alone in a group of its own and so always kept, make it hold for any input.
    """
    num_images, num_candidates = scores.shape
    if num_images * num_candidates == 0:
        return torch.zeros_like(valid)
    device = valid.device
    boxes = torch.where(valid[..., None], boxes, torch.zeros_like(boxes)).double()  # [B, C, 4]
    labels = torch.where(valid, labels, torch.zeros_like(labels)).long()  # [B, C]
    shifted = boxes - boxes.min()  # [B, C, 4], >= 0
    span = shifted.max() + 1
    label_min = labels.min()
    num_labels = labels.max() - label_min + 1
    image = torch.arange(num_images, device=device)[:, None]  # [B, 1]
    invalid_group = num_images * num_labels
    group = torch.where(valid, image * num_labels + (labels - label_min), invalid_group)  # [B, C]
    boxes_for_nms = shifted + (group * span)[..., None]  # [B, C, 4]
    scores_for_nms = torch.where(valid, scores, -math.inf).double()  # [B, C]
    extra_group = invalid_group + torch.arange(1, 3, device=device)  # [2]
    unit_box = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=device)
    extra_boxes = unit_box + (extra_group * span)[:, None]  # [2, 4]
    flat_boxes = torch.cat((boxes_for_nms.reshape(-1, 4), extra_boxes))  # [B * C + 2, 4]
    flat_scores = F.pad(scores_for_nms.reshape(-1), (0, 2), value=-math.inf)  # [B * C + 2]
    keep = torch.ops.torchvision.nms(flat_boxes, flat_scores, iou_threshold)  # [num_kept]
    keep_mask = torch.zeros(flat_scores.shape, dtype=torch.bool, device=device)
    keep_mask = keep_mask.index_fill(0, keep, True)[: num_images * num_candidates]
    return keep_mask.view(num_images, num_candidates) & valid


def top_detections(
    boxes: Float[Tensor, "B C 4"],
    scores: Float[Tensor, "B C"],
    labels: Int[Tensor, "B C"],
    valid: Bool[Tensor, "B C"],
    *,
    max_detections: int,
) -> Detections:
    """The ``max_detections`` highest-scoring valid candidates of each image, padded.

    Valid slots come first, by score descending (a valid ``-inf`` score still ranks above every
    invalid slot); if fewer than ``max_detections`` are valid (or ``C < max_detections``), the rest
    are padding: ``valid`` False, score 0, label 0, box zeros. Scores must not be NaN.
    """
    num_candidates = scores.shape[1]
    k = min(max_detections, num_candidates)
    lowest = torch.finfo(scores.dtype).min
    key = torch.where(valid, scores.clamp(min=lowest), -math.inf)  # [B, C]
    _, index = key.topk(k, dim=1)  # [B, k], sorted by key descending
    out_valid = valid.gather(1, index)  # [B, k]
    out_scores = torch.where(out_valid, scores.gather(1, index), 0)
    out_labels = torch.where(out_valid, labels.gather(1, index), 0).long()
    out_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))  # [B, k, 4]
    out_boxes = torch.where(out_valid[..., None], out_boxes, torch.zeros_like(out_boxes))
    pad = max_detections - k
    return Detections(
        boxes=F.pad(out_boxes, (0, 0, 0, pad)),
        scores=F.pad(out_scores, (0, pad)),
        labels=F.pad(out_labels, (0, pad)),
        valid=F.pad(out_valid, (0, pad)),
    )


def batched_nms(
    boxes: Float[Tensor, "B C 4"],
    scores: Float[Tensor, "B C"],
    labels: Int[Tensor, "B C"],
    valid: Bool[Tensor, "B C"],
    *,
    iou_threshold: float,
    max_detections: int,
) -> Detections:
    """Class-aware NMS per image, then the ``max_detections`` best survivors per image.

    Per image this keeps what ``torchvision.ops.batched_nms`` on the valid candidates keeps,
    truncated to ``max_detections``, for a whole padded batch in one NMS kernel call and with
    static output shapes (see ``nms_keep_mask`` and ``top_detections``).
    """
    kept = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=iou_threshold)
    return top_detections(boxes, scores, labels, kept, max_detections=max_detections)


def select_topk_per_level(
    scores_per_level: Sequence[Float[Tensor, "B A_l K"]],
    *,
    k: int,
    score_threshold: float,
) -> Candidates:
    """The ``min(k, A_l * K)`` best (anchor, class) pairs of each level, over all pairs.

    Candidates scoring ``<= score_threshold`` are marked invalid rather than removed. Because
    they sort last, the valid candidates of a level are exactly those that thresholding first and
    then taking the top ``k`` would give (ties at the k-th score aside).
    """
    scores, anchor_index, labels = [], [], []
    first_anchor = 0
    for level_scores in scores_per_level:
        _, num_anchors, num_classes = level_scores.shape
        flat = level_scores.flatten(1)  # [B, A_l * K], anchor-major
        top_scores, flat_index = flat.topk(min(k, flat.shape[1]), dim=1)  # [B, k_l]
        scores.append(top_scores)
        anchor_index.append(flat_index // num_classes + first_anchor)
        labels.append(flat_index % num_classes)
        first_anchor += num_anchors
    all_scores = torch.cat(scores, dim=1)  # [B, T]
    return Candidates(
        scores=all_scores,
        anchor_index=torch.cat(anchor_index, dim=1),
        labels=torch.cat(labels, dim=1),
        valid=all_scores > score_threshold,
    )


def postprocess_dense(
    cls_logits: Sequence[Float[Tensor, "B A_l K"]],
    box_deltas: Sequence[Float[Tensor, "B A_l 4"]],
    anchors: Sequence[Float[Tensor, "A_l 4"]],
    image_sizes: Float[Tensor, "B 2"] | Int[Tensor, "B 2"],
    *,
    score_threshold: float,
    topk_per_level: int,
    iou_threshold: float,
    max_detections: int,
    means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
    stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = math.log(1000.0 / 16),
) -> Detections:
    """Detections of a dense sigmoid-classifier head (RetinaNet), batched and padded.

    Per level: sigmoid scores over all anchor × class pairs, the ``min(topk_per_level, A_l * K)``
    best pairs, invalid where ``score <= score_threshold``. The selected anchors' deltas are
    decoded (``decode_deltas`` with ``means``, ``stds``, ``clip``) and the boxes clipped to their
    image. Then class-aware NMS over all levels of each image and the ``max_detections`` best.
    Nothing is removed by box size. Per image this matches torchvision's RetinaNet
    ``postprocess_detections`` (ties aside).

    Args:
        cls_logits: per level ``[B, A_l, K]``.
        box_deltas: per level ``[B, A_l, 4]``.
        anchors: per level ``[A_l, 4]``, shared by the images of the batch.
        image_sizes: ``[B, 2]`` (height, width) of each image's valid area, for clipping.
    """
    scores = [torch.sigmoid(logits.float()) for logits in cls_logits]  # [B, A_l, K]
    candidates = select_topk_per_level(scores, k=topk_per_level, score_threshold=score_threshold)
    index = candidates.anchor_index  # [B, T]
    deltas = torch.cat(list(box_deltas), dim=1)  # [B, A, 4]
    deltas = deltas.gather(1, index[..., None].expand(-1, -1, 4))  # [B, T, 4]
    selected_anchors = torch.cat(list(anchors), dim=0)[index]  # [B, T, 4]
    boxes = decode_deltas(selected_anchors, deltas, means=means, stds=stds, clip=clip)
    boxes = clip_boxes(boxes, image_sizes)  # [B, T, 4], float32 (float64 for float64 inputs)
    return batched_nms(
        boxes,
        candidates.scores,
        candidates.labels,
        candidates.valid,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
    )
