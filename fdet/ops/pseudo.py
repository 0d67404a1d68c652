"""Pseudo-labels for semi-supervised detection: a teacher's detections as padded ground truth,
the box-jitter reliability of each box (Soft Teacher, Xu et al. 2021) and the pseudo-labels'
precision and recall against hidden labels.

    pseudo = pseudo_labels(teacher_detections, score_threshold=0.5, max_labels=32)  # [B, K]
    jittered = jitter_boxes(pseudo.boxes, times=10, scale=0.06)                    # [B, K, J, 4]
    refined = <the teacher's box head on each jittered box, its class's regression> # [B, K, J, 4]
    unreliability = jitter_std(refined, pseudo.boxes)                               # [B, K]
    reliable = pseudo.valid & (unreliability <= 0.02)
    hits, count, found, gts = pseudo_quality(pseudo, gt_boxes, gt_labels, gt_valid)

Every function works on padded batches with static shapes and no host sync (``K``, ``J`` are
Python numbers), so it runs under ``torch.compile(fullgraph=True)``. Padded slots of a
:class:`PseudoLabels` have ``valid`` False, an all-zero box, label 0 and score 0, as the padded
slots of :class:`~fdet.ops.postprocess.Detections`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fdet.ops.boxes import box_iou
from fdet.ops.postprocess import Detections

__all__ = [
    "PseudoLabels",
    "PseudoQuality",
    "jitter_boxes",
    "jitter_std",
    "pseudo_labels",
    "pseudo_quality",
]


class PseudoLabels(NamedTuple):
    """``K`` pseudo-label slots an image: valid ones first, by score descending.

    The boxes, labels and validity are what a detector's loss reads as ``gt_boxes``,
    ``gt_labels`` and ``gt_valid``; ``scores`` are the teacher's scores of the detections.
    """

    boxes: Float[Tensor, "B K 4"]
    labels: Int[Tensor, "B K"]
    scores: Float[Tensor, "B K"]
    valid: Bool[Tensor, "B K"]


class PseudoQuality(NamedTuple):
    """Counts of pseudo-labels against the hidden labels of the same images, each a float32
    scalar summed over the batch. Precision is ``matched_pseudo / num_pseudo``, recall
    ``matched_gt / num_gt``."""

    matched_pseudo: Float[Tensor, ""]  # valid pseudo-labels overlapping a same-class valid gt
    num_pseudo: Float[Tensor, ""]  # valid pseudo-labels
    matched_gt: Float[Tensor, ""]  # valid gts overlapping a same-class valid pseudo-label
    num_gt: Float[Tensor, ""]  # valid gts


def _check_rank(name: str, tensor: Tensor, ndim: int, layout: str) -> None:
    if tensor.ndim != ndim:
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(tensor.shape)}")


def pseudo_labels(
    detections: Detections, *, score_threshold: float, max_labels: int
) -> PseudoLabels:
    """The teacher's confident detections of each image as padded ground truth.

    ``K = min(max_labels, N)`` slots an image: the valid detections scoring at least
    ``score_threshold``, highest score first, at most ``K`` of them; equal scores keep the
    detections' order (a stable sort). The remaining slots are padding (``valid`` False, zero
    box, label 0, score 0). A NaN score is never kept. The result carries no gradient.

    Args:
        detections: ``[B, N]`` padded detections (``masks`` are ignored).
        score_threshold: the lowest score kept.
        max_labels: the most pseudo-labels an image (at least 1).
    """
    if max_labels < 1:
        raise ValueError(f"max_labels: must be at least 1, got {max_labels}")
    if math.isnan(score_threshold):
        raise ValueError("score_threshold: must be a number, got nan")
    _check_rank("detections.boxes", detections.boxes, 3, "[B, N, 4]")
    _check_rank("detections.scores", detections.scores, 2, "[B, N]")
    boxes = detections.boxes.detach()  # [B, N, 4]
    scores = detections.scores.detach()  # [B, N]
    k = min(max_labels, scores.shape[1])
    keep = detections.valid.bool() & (scores >= score_threshold)  # [B, N]
    lowest = torch.finfo(scores.dtype).min
    key = torch.where(keep, scores.clamp(min=lowest), -math.inf)  # [B, N], kept ones above
    index = key.sort(dim=1, descending=True, stable=True).indices[:, :k]  # [B, K]
    valid = keep.gather(1, index)  # [B, K]
    out_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4))  # [B, K, 4]
    return PseudoLabels(
        boxes=torch.where(valid[..., None], out_boxes, torch.zeros_like(out_boxes)),
        labels=torch.where(valid, detections.labels.gather(1, index), 0).long(),
        scores=torch.where(valid, scores.gather(1, index), 0.0),
        valid=valid,
    )


def _box_scale(boxes: Float[Tensor, "... 4"], min_size: float) -> Float[Tensor, "... 4"]:
    """``(w, h, w, h)`` of each box, each clamped to at least ``min_size``."""
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=min_size)  # [..., 2]
    return torch.cat((wh, wh), dim=-1)


def jitter_boxes(
    boxes: Float[Tensor, "B K 4"],
    *,
    times: int,
    scale: float,
    generator: torch.Generator | None = None,
    noise: Float[Tensor, "B K J 4"] | None = None,
    min_size: float = 1.0,
) -> Float[Tensor, "B K J 4"]:
    """``times`` randomly displaced copies of every box (Soft Teacher's box jitter).

    Each coordinate moves on its own by a normal draw times ``scale`` times the box's width
    (``x1``, ``x2``) or height (``y1``, ``y2``)::

        x1' = x1 + scale · w · n1    y1' = y1 + scale · h · n2
        x2' = x2 + scale · w · n3    y2' = y2 + scale · h · n4      n ~ N(0, 1)

    with ``w`` and ``h`` clamped to at least ``min_size`` pixels (so a point-like box still
    moves), as Soft Teacher does. Unlike Soft Teacher, where a large draw can leave
    ``x1' > x2'``, each pair is then sorted (``x1 <= x2``, ``y1 <= y2``): a box whose sides
    crossed is the same region with its corners named in order. Nothing is clipped to the image
    (the refinement that follows clips).

    Args:
        boxes: ``[B, K, 4]`` (padded slots are jittered too; the caller masks them).
        times: copies a box (``J``, at least 1).
        scale: the standard deviation of an offset relative to the box's side (>= 0; 0 gives
            exact copies).
        generator: the random source of the draws; default: torch's global one on the boxes'
            device.
        noise: ``[B, K, J, 4]`` standard normal draws to use instead (``generator`` is then
            unused); fixes the jitter, e.g. under ``torch.compile`` or in tests.
        min_size: the smallest side used for the offsets' scale, in pixels.

    Returns:
        ``[B, K, J, 4]`` in the boxes' dtype: ``out[b, k, j]`` is copy ``j`` of box ``k``.
    """
    if times < 1:
        raise ValueError(f"times: must be at least 1, got {times}")
    if not scale >= 0:
        raise ValueError(f"scale: must be >= 0, got {scale}")
    _check_rank("boxes", boxes, 3, "[B, K, 4]")
    batch, num_boxes = boxes.shape[:2]
    shape = (batch, num_boxes, times, 4)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=boxes.device, dtype=torch.float32)
    elif tuple(noise.shape) != shape:
        raise ValueError(
            f"noise: expected shape {shape} ([B, K, times, 4]), got {tuple(noise.shape)}"
        )
    base = boxes.float()  # [B, K, 4]
    step = scale * _box_scale(base, min_size)  # [B, K, 4], (w, h, w, h) · scale
    moved = base[:, :, None, :] + noise.float() * step[:, :, None, :]  # [B, K, J, 4]
    low = torch.minimum(moved[..., :2], moved[..., 2:])  # [B, K, J, 2]
    high = torch.maximum(moved[..., :2], moved[..., 2:])
    return torch.cat((low, high), dim=-1).to(boxes.dtype)


def jitter_std(
    refined: Float[Tensor, "B K J 4"],
    boxes: Float[Tensor, "B K 4"],
    *,
    min_size: float = 1.0,
) -> Float[Tensor, "B K"]:
    """The unreliability of each box: how far apart the refinements of its jittered copies land.

    For each coordinate, the standard deviation over the ``J`` refined copies (with Bessel's
    correction, ``1 / (J - 1)``, as Soft Teacher's ``Tensor.std``; 0 when ``J = 1``), divided by
    the box's width (``x1``, ``x2``) or height (``y1``, ``y2``) clamped to at least
    ``min_size`` pixels; the mean of the four. Soft Teacher divides by the mean refined box:
    pass ``refined.mean(dim=2)`` as ``boxes`` for that.

    Args:
        refined: ``[B, K, J, 4]`` the refined boxes of ``J`` jittered copies of each box.
        boxes: ``[B, K, 4]`` the boxes whose size normalizes the spread.

    Returns:
        ``[B, K]`` float32, >= 0 (padded slots give finite values for the caller to mask).
    """
    _check_rank("refined", refined, 4, "[B, K, J, 4]")
    _check_rank("boxes", boxes, 3, "[B, K, 4]")
    if refined.shape[:2] != boxes.shape[:2] or refined.shape[-1] != 4 or boxes.shape[-1] != 4:
        raise ValueError(
            f"refined {tuple(refined.shape)} ([B, K, J, 4]) and boxes {tuple(boxes.shape)} "
            "([B, K, 4]) do not match"
        )
    correction = 1 if refined.shape[2] > 1 else 0
    spread = refined.float().std(dim=2, correction=correction)  # [B, K, 4]
    return (spread / _box_scale(boxes.float(), min_size)).mean(dim=-1)  # [B, K]


def pseudo_quality(
    pseudo: PseudoLabels,
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    *,
    iou_threshold: float = 0.5,
) -> PseudoQuality:
    """How well the pseudo-labels match the hidden ground truth of the same images.

    A valid pseudo-label is a hit when some valid gt of the same image and class overlaps it at
    ``IoU >= iou_threshold``; a valid gt is found when some valid pseudo-label of the same image
    and class does. Overlaps are not matched one to one (two pseudo-labels on one gt are both
    hits). Padded gt slots may hold anything (NaN boxes, any label).

    Returns:
        :class:`PseudoQuality` (a 4-tuple): ``(hits, valid pseudo-labels, found gts, valid
        gts)``, float32 scalars summed over the batch.
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold: must be in (0, 1], got {iou_threshold}")
    _check_rank("gt_boxes", gt_boxes, 3, "[B, M, 4]")
    if gt_boxes.shape[0] != pseudo.boxes.shape[0]:
        raise ValueError(
            f"gt_boxes has {gt_boxes.shape[0]} images, the pseudo-labels {pseudo.boxes.shape[0]}"
        )
    iou = box_iou(pseudo.boxes.detach(), gt_boxes.detach())  # [B, K, M]
    same = pseudo.labels[:, :, None] == gt_labels[:, None, :]  # [B, K, M]
    both = pseudo.valid[:, :, None] & gt_valid.bool()[:, None, :]  # [B, K, M]
    hit = (iou >= iou_threshold) & same & both  # [B, K, M]
    f32 = torch.float32
    return PseudoQuality(
        matched_pseudo=hit.any(dim=2).sum(dtype=f32),
        num_pseudo=pseudo.valid.sum(dtype=f32),
        matched_gt=hit.any(dim=1).sum(dtype=f32),
        num_gt=gt_valid.bool().sum(dtype=f32),
    )
