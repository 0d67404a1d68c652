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
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.ops  # noqa: F401  (registers the torch.ops.torchvision.nms kernel)
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fdet.ops.boxes import clip_boxes, small_box_mask
from fdet.ops.coding import DEFAULT_SCALE_CLIP, decode_deltas

__all__ = [
    "Candidates",
    "Detections",
    "batched_nms",
    "detect_dense",
    "nms_keep_mask",
    "postprocess_dense",
    "select_topk_per_level",
    "top_detections",
]


class Detections(NamedTuple):
    """``N`` detection slots per image; valid ones first, by score descending.

    ``masks``: instance masks of detectors that predict them (Mask R-CNN), else None. Either
    boolean ``[B, N, H, W]`` over the padded input (the pixels of ``boxes``), False on padded
    slots and outside each image: binary rather than probabilities, one byte a pixel, what
    drawing uses; or, told apart by their float dtype, mask probabilities ``[B, N, m, m]`` in
    each box's frame, not yet pasted (``fdet.ops.masks.paste_masks`` pastes them; evaluation
    does, at each original image's size).
    """

    boxes: Float[Tensor, "B N 4"]
    scores: Float[Tensor, "B N"]
    labels: Int[Tensor, "B N"]
    valid: Bool[Tensor, "B N"]
    masks: Bool[Tensor, "B N H W"] | Float[Tensor, "B N m m"] | None = None


class Candidates(NamedTuple):
    """Top-scoring (anchor, class) pairs of each level, levels concatenated in order.

    ``T = sum_l min(k, A_l * K)``. Within a level, candidates are sorted by score descending.
    """

    scores: Float[Tensor, "B T"]
    anchor_index: Int[Tensor, "B T"]  # into the anchors of all levels concatenated
    labels: Int[Tensor, "B T"]
    valid: Bool[Tensor, "B T"]  # score > score_threshold


# Largest number of candidates that one NMS kernel call handles, by device type (see
# ``nms_keep_mask``). CPU: the fastest split measured (docs/benchmarks.md). CUDA and any other
# accelerator: small enough that a call's suppression mask stays small (C × ceil(C / 64) int64
# words: 2 MiB at 4 096 candidates), large enough that there are few calls.
_CPU_CALL_SIZE = 128
_CUDA_CALL_SIZE = 4096


def _call_size(device: torch.device) -> int:
    """The most candidates one NMS kernel call gets on ``device``."""
    return _CPU_CALL_SIZE if device.type == "cpu" else _CUDA_CALL_SIZE


def _call_ends(group_sizes: list[int], max_size: int) -> list[int]:
    """End offsets of consecutive runs of whole groups, each run at most ``max_size`` long.

    Groups stay whole and in order: a run ends where adding the next group would pass
    ``max_size``, and a group larger than ``max_size`` is a run of its own. The last end is the
    total size (``[0]`` for no groups).
    """
    ends: list[int] = []
    end = size = 0
    for count in group_sizes:
        if size and size + count > max_size:
            ends.append(end)
            size = 0
        end += count
        size += count
    ends.append(end)
    return ends


@torch.library.custom_op("fdet::nms_keep_mask", mutates_args=())
def _nms_keep_mask_op(
    boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, iou_threshold: float
) -> Tensor:
    num_candidates = valid.shape[1]
    keep = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)  # [B, C]
    index = valid.flatten().nonzero().squeeze(1)  # [V], flat indices of the valid candidates
    if index.numel() == 0:
        return keep
    label = labels.flatten()[index].long()  # [V]
    label = label - label.min()
    image = index // num_candidates  # [V]
    key, order = (image * (label.max() + 1) + label).sort(stable=True)  # [V], by (image, label)
    index = index[order]  # [V], grouped, in candidate order within a group
    group_ids, group_sizes = key.unique_consecutive(return_inverse=True, return_counts=True)[1:]
    group_boxes = boxes.reshape(-1, 4)[index].double()  # [V, 4]
    lowest = group_boxes.min()
    span = group_boxes.max() - lowest + 1
    group_boxes = group_boxes - lowest + (group_ids * span)[:, None]  # [V, 4], groups apart
    group_scores = scores.flatten()[index].double()  # [V]
    ends = _call_ends(group_sizes.tolist(), _call_size(keep.device))
    kept = []
    start = 0
    for end in ends:
        call_kept = torch.ops.torchvision.nms(
            group_boxes[start:end], group_scores[start:end], iou_threshold
        )
        kept.append(call_kept + start)
        start = end
    keep.view(-1)[index[torch.cat(kept)]] = True
    return keep


@_nms_keep_mask_op.register_fake
def _(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    return torch.empty_like(valid)


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

    This is the custom operator ``torch.ops.fdet.nms_keep_mask``: opaque to ``torch.compile`` and
    ``torch.export``, which see one call with a ``[B, C]`` boolean result (its fake
    implementation is ``torch.empty_like(valid)``: no data-dependent size, no guard). Inside
    it, only the valid candidates are grouped by (image, label); each group is translated by
    ``group * (coordinate range + 1)`` in float64, so groups never overlap and the IoUs keep
    their precision, and ``torch.ops.torchvision.nms`` suppresses within the groups. The kept
    indices are scattered back into the mask.

    The NMS kernel compares each kept box with every lower-scored box of its call, groups
    apart or not, and each call has a fixed cost. So the groups are handed to it in runs of
    whole groups, in order, of at most a size set per device type; a group larger than that is
    one call of its own (groups are never split). That loop over runs is the operator's
    implementation, like the loop of a C++ kernel, and so are its host synchronizations (the
    number of valid candidates, the group sizes): none of it is ever part of a traced graph.
    The split never changes what is kept: groups are apart, so a call suppresses within groups
    only, whatever else it holds.

    - CPU: runs of at most 128 candidates. Fewer compared pairs than one call an image, fewer
      calls than one call a group, and faster than either on sparse and crowded batches alike
      (docs/benchmarks.md).
    - CUDA (and any other device): runs of at most 4 096 candidates. The CUDA kernel compares
      all pairs of a call at once into a suppression mask of ``C × ceil(C / 64)`` int64 words
      for ``C`` candidates: 2 MiB at 4 096, where one call of all 80 000 valid candidates of a
      batch of 16 images with 5 000 each (flat scores, early in training) would need 800 MB.
      Calls run one after another and each frees its mask, so the operator needs the memory
      of one call plus a few tensors over the valid candidates: it grows linearly with the
      number of candidates, not with its square. Only an (image, label) group larger than
      4 096 candidates makes a larger call (``C`` its size).

    ``iou_threshold`` must be >= 0: below 0, the IoU of 0 between groups would pass it.
    """
    if not iou_threshold >= 0:
        raise ValueError(f"iou_threshold: must be >= 0, got {iou_threshold}")
    return torch.ops.fdet.nms_keep_mask(
        boxes.detach(), scores.detach(), labels, valid.bool(), iou_threshold
    )


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
    truncated to ``max_detections``, for a whole padded batch in one operator call and with
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


def detect_dense(
    scores: Sequence[Float[Tensor, "B A_l K"]],
    decode: Callable[[Int[Tensor, "B T"]], Float[Tensor, "B T 4"]],
    image_sizes: Float[Tensor, "B 2"] | Int[Tensor, "B 2"],
    *,
    score_threshold: float,
    topk_per_level: int,
    iou_threshold: float,
    max_detections: int,
    min_box_size: float = 0.0,
) -> Detections:
    """Detections of any dense head, batched and padded: the steps every dense family shares.

    1. Per level, the ``min(topk_per_level, A_l * K)`` best (location, class) pairs of
       ``scores`` (already probabilities: sigmoid, ``sqrt(cls × centerness)``, a quality score
       ...), invalid where ``score <= score_threshold`` (:func:`select_topk_per_level`).
    2. ``decode(anchor_index)`` gives the boxes ``[B, T, 4]`` of the selected locations
       (``anchor_index`` indexes all levels concatenated): the family's own decoding (deltas on
       anchors, distances from points, an integral over distributions ...).
    3. Boxes clipped to ``image_sizes`` (height, width); with ``min_box_size > 0`` narrower or
       lower boxes are dropped; class-aware NMS at ``iou_threshold`` over all levels of each
       image and the ``max_detections`` best (:func:`batched_nms`).
    """
    candidates = select_topk_per_level(scores, k=topk_per_level, score_threshold=score_threshold)
    boxes = decode(candidates.anchor_index)  # [B, T, 4]
    boxes = clip_boxes(boxes, image_sizes)  # [B, T, 4]
    valid = candidates.valid
    if min_box_size > 0:
        valid = valid & ~small_box_mask(boxes, min_size=min_box_size)
    return batched_nms(
        boxes,
        candidates.scores,
        candidates.labels,
        valid,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
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
    clip: float = DEFAULT_SCALE_CLIP,
    min_box_size: float = 0.0,
) -> Detections:
    """Detections of a dense sigmoid-classifier head on anchors (RetinaNet), batched and padded:
    :func:`detect_dense` with sigmoid scores and delta decoding.

    Per level: sigmoid scores over all anchor × class pairs, the ``min(topk_per_level, A_l * K)``
    best pairs, invalid where ``score <= score_threshold``. The selected anchors' deltas are
    decoded (``decode_deltas`` with ``means``, ``stds``, ``clip``) and the boxes clipped to their
    image. Then class-aware NMS over all levels of each image and the ``max_detections`` best.
    With the default ``min_box_size=0`` nothing is removed by box size, and per image this
    matches torchvision's RetinaNet ``postprocess_detections`` (ties aside).

    Args:
        cls_logits: per level ``[B, A_l, K]``.
        box_deltas: per level ``[B, A_l, 4]``.
        anchors: per level ``[A_l, 4]``, shared by the images of the batch.
        image_sizes: ``[B, 2]`` (height, width) of each image's valid area, for clipping.
    """
    all_deltas = torch.cat(list(box_deltas), dim=1)  # [B, A, 4]
    all_anchors = torch.cat(list(anchors), dim=0)  # [A, 4]

    def decode(index: Tensor) -> Tensor:  # [B, T] -> [B, T, 4]
        deltas = all_deltas.gather(1, index[..., None].expand(-1, -1, 4))  # [B, T, 4]
        return decode_deltas(all_anchors[index], deltas, means=means, stds=stds, clip=clip)

    return detect_dense(
        [torch.sigmoid(logits.float()) for logits in cls_logits],
        decode,
        image_sizes,
        score_threshold=score_threshold,
        topk_per_level=topk_per_level,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        min_box_size=min_box_size,
    )
