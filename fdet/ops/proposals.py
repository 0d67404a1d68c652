"""Region proposals: from a region proposal network's objectness and box deltas on anchors to a
fixed number of class-agnostic boxes an image.

The steps are those of Faster R-CNN's RPN (and torchvision's ``RegionProposalNetwork``), on a
padded batch with static shapes: a candidate that a per-image implementation would remove (too
small, below the score threshold, suppressed) is marked invalid instead, and every image gets
exactly ``post_nms_topk`` slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fdet.constants import DEFAULT_SCALE_CLIP
from fdet.ops.boxes import clip_boxes, small_box_mask
from fdet.ops.coding import decode_deltas
from fdet.ops.postprocess import nms_keep_mask, top_detections

__all__ = ["Proposals", "generate_proposals"]


class Proposals(NamedTuple):
    """``R`` proposal slots an image; valid ones first, by score descending.

    Attributes:
        boxes: ``[B, R, 4]`` xyxy pixels, clipped to the image; zeros in padded slots.
        scores: ``[B, R]`` objectness probabilities (the sigmoid of the logits); 0 in padded
            slots.
        valid: ``[B, R]`` True for real proposals.
    """

    boxes: Float[Tensor, "B R 4"]
    scores: Float[Tensor, "B R"]
    valid: Bool[Tensor, "B R"]


def generate_proposals(
    objectness: Float[Tensor, "B A"],
    deltas: Float[Tensor, "B A 4"],
    anchors: Float[Tensor, "A 4"],
    num_per_level: Sequence[int],
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_threshold: float,
    min_size: float = 1e-3,
    score_threshold: float = 0.0,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float | None = DEFAULT_SCALE_CLIP,
) -> Proposals:
    """The ``post_nms_topk`` best proposals of every image.

    1. On each pyramid level ``l`` (``num_per_level[l]`` consecutive anchors), the
       ``k_l = min(pre_nms_topk, A_l)`` anchors with the highest objectness logits:
       ``T = Σ_l k_l`` candidates an image.
    2. Their deltas decoded on their anchors (:func:`fdet.ops.coding.decode_deltas` with
       ``means``, ``stds`` and ``clip``, the bound on ``dw, dh`` before ``exp``; the default is
       torchvision's ``bbox_xform_clip = log(1000 / 16)``), clipped to the image
       (``image_sizes``: ``(height, width)`` of each image's valid area).
    3. Score ``p = sigmoid(logit)``. A candidate is invalid if its width or height is below
       ``min_size`` or ``p < score_threshold``.
    4. NMS per image with the level as the category: a valid candidate is dropped if a valid
       candidate of the same image and level with a higher score overlaps it with IoU >
       ``nms_threshold`` (:func:`fdet.ops.postprocess.nms_keep_mask`).
    5. The ``post_nms_topk`` survivors with the highest ``p`` over all levels, padded.

    Per image this is what torchvision's ``RegionProposalNetwork.filter_proposals`` returns
    (ties in score aside), for the whole batch at once. Nothing here is differentiated: the
    inputs are detached, as Faster R-CNN does not back-propagate through its proposals.

    Args:
        objectness: ``[B, A]`` logits, levels concatenated in anchor order.
        deltas: ``[B, A, 4]`` box deltas.
        anchors: ``[A, 4]`` shared by the images of the batch.
        num_per_level: ``A_l`` of each level (Python ints), ``Σ A_l = A``.
        image_sizes: ``[B, 2]`` (height, width).

    Returns:
        :class:`Proposals` with ``R = post_nms_topk`` slots an image.

    Static shapes; the only host synchronisation is inside the NMS operator, which
    ``torch.compile(fullgraph=True)`` sees as one fixed-shape call.
    """
    num_per_level = [int(n) for n in num_per_level]
    if sum(num_per_level) != anchors.shape[0] or objectness.shape[1] != anchors.shape[0]:
        raise ValueError(
            f"generate_proposals: num_per_level {num_per_level} adds up to {sum(num_per_level)}, "
            f"objectness has {objectness.shape[1]} anchors and anchors {anchors.shape[0]}"
        )
    if pre_nms_topk < 1 or post_nms_topk < 1:
        raise ValueError(
            f"generate_proposals: pre_nms_topk ({pre_nms_topk}) and post_nms_topk "
            f"({post_nms_topk}) must be >= 1"
        )
    logits = objectness.detach().float()  # [B, A]
    deltas = deltas.detach()

    # 1. the best anchors of each level
    parts: list[Tensor] = []
    levels: list[Tensor] = []
    start = 0
    for level, count in enumerate(num_per_level):  # a loop over pyramid levels
        if count == 0:
            continue
        k = min(pre_nms_topk, count)
        best = logits[:, start : start + count].topk(k, dim=1).indices + start  # [B, k]
        parts.append(best)
        levels.append(torch.full((k,), level, dtype=torch.int64, device=logits.device))
        start += count
    if not parts:  # no anchors at all: nothing to propose
        batch = logits.shape[0]
        return Proposals(
            boxes=logits.new_zeros(batch, post_nms_topk, 4),
            scores=logits.new_zeros(batch, post_nms_topk),
            valid=torch.zeros(batch, post_nms_topk, dtype=torch.bool, device=logits.device),
        )
    index = torch.cat(parts, dim=1)  # [B, T]
    labels = torch.cat(levels)[None].expand_as(index)  # [B, T] the level of each candidate

    # 2. decode and clip
    selected = deltas.gather(1, index[..., None].expand(-1, -1, 4))  # [B, T, 4]
    boxes = decode_deltas(anchors[index], selected, means=means, stds=stds, clip=clip)
    boxes = clip_boxes(boxes, image_sizes)  # [B, T, 4]

    # 3. scores, small and low-scoring boxes
    scores = torch.sigmoid(logits.gather(1, index))  # [B, T]
    valid = ~small_box_mask(boxes, min_size=min_size) & (scores >= score_threshold)  # [B, T]

    # 4. NMS within each level of each image; 5. the best survivors
    keep = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=nms_threshold)  # [B, T]
    top = top_detections(boxes, scores, labels, keep, max_detections=post_nms_topk)
    return Proposals(boxes=top.boxes, scores=top.scores, valid=top.valid)
