"""Label assignment: which anchors learn which ground-truth box.

An assignment labels every anchor of every image POSITIVE (regress towards and classify as
``gt_index``), NEGATIVE (background) or IGNORE (no loss), on padded batches with static shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int, Int8
from torch import Tensor

from fdet.ops.boxes import box_ioa, box_iou
from fdet.ops.coding import encode_distances

__all__ = [
    "IGNORE",
    "NEGATIVE",
    "POSITIVE",
    "Assignment",
    "assign_atss",
    "assign_max_iou",
    "crowd_covered",
    "ignore_crowd_covered",
]

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1


class Assignment(NamedTuple):
    """Per-anchor result of an assignment.

    Attributes:
        gt_index: ``[B, A]`` int64, the gt slot with the highest IoU among the image's valid slots.
            Meaningful where ``label == POSITIVE``; elsewhere it is still the best valid slot, and
            ``0`` in an image without valid gts, so never index with it unmasked.
        label: ``[B, A]`` int8, ``POSITIVE`` (1), ``NEGATIVE`` (0) or ``IGNORE`` (-1).
        iou: ``[B, A]`` IoU with the ``gt_index`` box; ``0`` in an image without valid gts.
    """

    gt_index: Int[Tensor, "B A"]
    label: Int8[Tensor, "B A"]
    iou: Float[Tensor, "B A"]


def assign_max_iou(
    anchors: Float[Tensor, "A 4"] | Float[Tensor, "B A 4"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_valid: Bool[Tensor, "B M"],
    *,
    pos_iou: float,
    neg_iou: float,
    low_quality_matches: bool = True,
    min_low_quality_iou: float = 0.0,
    ignore_mask: Bool[Tensor, " A"] | Bool[Tensor, "B A"] | None = None,
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    crowd_ioa: float = 0.5,
) -> Assignment:
    """Max-IoU labelling, as in RetinaNet and the RPN of Faster R-CNN.

    Each anchor takes the valid gt it overlaps most (``gt_index``, with IoU ``iou``) and is
    labelled by that IoU:

    - ``iou >= pos_iou``: POSITIVE;
    - ``neg_iou <= iou < pos_iou``: IGNORE;
    - ``iou < neg_iou``: NEGATIVE.

    With ``low_quality_matches``, a gt whose best anchor falls short of ``pos_iou`` still gets
    one: every anchor that reaches some valid gt's highest IoU over all anchors (ties included)
    becomes POSITIVE. Such an anchor keeps its own ``gt_index``, the gt it overlaps most, which is
    not necessarily the gt that promoted it. Only maxima strictly above ``min_low_quality_iou``
    count.

    Worked example, ``pos_iou=0.5, neg_iou=0.4``, one image, two valid gts g0 and g1, four anchors::

        IoU     a0    a1    a2    a3
        g0     0.9   0.0   0.35  0.0
        g1     0.0   0.3   0.2   0.0

        gt_index   g0    g1    g0    g0      (a3 ties at 0 and takes the first valid slot)
        iou       0.9   0.3   0.35  0.0
        label     POS   NEG   NEG   NEG      (thresholds only)
        label     POS   POS   NEG   NEG      (with low_quality_matches: a1 is g1's best anchor)

    Had a2's IoU with g1 been 0.3 as well, a2 would tie with a1 for g1's best, and become POSITIVE
    with ``gt_index`` g0 (its own best, at 0.35).

    Where fdet differs from torchvision's ``Matcher(allow_low_quality_matches=True)``: there, a gt
    that overlaps no anchor (or has zero area) has highest IoU 0, so every anchor with IoU 0 to it
    (typically all of them) "reaches its maximum" and is turned POSITIVE. Here such a gt promotes
    nothing, because 0 is not above the default ``min_low_quality_iou=0``. A negative
    ``min_low_quality_iou`` restores torchvision's behaviour exactly; a positive one (e.g. 0.3,
    much like MMDetection's ``min_pos_iou``) also drops gts that are only grazed.

    Padding and empty images: slots with ``gt_valid`` False never match and never promote; an
    image with no valid gt is all NEGATIVE (apart from ``ignore_mask``) with ``iou`` 0.
    Degenerate (zero-area) valid gts have IoU 0 with everything, so they behave like gts
    overlapping nothing; no NaNs arise.

    ``ignore_mask`` (``[A]`` or ``[B, A]``, True = ignore) marks anchors to leave out, e.g. those
    crossing the image border: they are labelled IGNORE and take no part in the low-quality
    matching, so a gt's best anchor is sought among the others. ``gt_index`` and ``iou`` are still
    reported for them.

    Crowd regions (``gt_crowd``, COCO ``iscrowd``; only valid slots count): never matched and
    never promote a low-quality match; an anchor that lies more than ``crowd_ioa`` inside a crowd
    box is IGNORE unless it is POSITIVE for a real gt (:func:`ignore_crowd_covered`).

    Args:
        anchors: ``[A, 4]`` shared by the batch, or ``[B, A, 4]`` per image.
        gt_boxes: ``[B, M, 4]`` padded gt boxes; padded slots may hold anything, even NaN.
        gt_valid: ``[B, M]`` True for real gts.
        pos_iou, neg_iou: thresholds, ``0 <= neg_iou <= pos_iou``.

    Returns:
        An :class:`Assignment` of ``[B, A]`` tensors.

    Static shapes, no host syncs: safe under ``torch.compile(fullgraph=True)``.
    """
    if not 0.0 <= neg_iou <= pos_iou:
        raise ValueError(
            f"assign_max_iou: need 0 <= neg_iou <= pos_iou, got neg_iou={neg_iou}, "
            f"pos_iou={pos_iou}"
        )
    batch, num_gt = gt_valid.shape
    if num_gt == 0:  # static: give the batch one padded slot, so that every image is empty
        gt_boxes = gt_boxes.new_zeros(batch, 1, 4)
        gt_valid = gt_valid.new_zeros(batch, 1)
        gt_crowd = None
    crowd = None if gt_crowd is None else gt_crowd & gt_valid  # [B, M]
    if crowd is not None:
        gt_valid = gt_valid & ~crowd

    valid = gt_valid[:, :, None]  # [B, M, 1]
    # Not differentiated: without autograd box_iou works in place, and so does the rest.
    iou = box_iou(gt_boxes.detach(), anchors.detach())  # [B, M, A]
    iou = iou.masked_fill_(~valid, -1.0)  # padded slots (even NaN boxes) rank last
    best_iou, gt_index = iou.max(dim=1)  # [B, A] -1 in images without valid gts: NEGATIVE

    positive = best_iou >= pos_iou  # [B, A]
    negative = best_iou < neg_iou  # [B, A]
    if low_quality_matches and anchors.shape[-2] > 0:
        candidates = iou  # [B, M, A], no longer needed as it is
        if ignore_mask is not None:
            candidates = candidates.masked_fill_(ignore_mask[..., None, :], -1.0)
        gt_best = candidates.max(dim=2, keepdim=True).values  # [B, M, 1]
        # NaN where a slot promotes nothing: no IoU equals it
        promotes = (gt_best > min_low_quality_iou) & valid  # [B, M, 1]
        gt_best = gt_best.masked_fill_(~promotes, float("nan"))
        reaches_best = candidates == gt_best  # [B, M, A]
        positive = positive | reaches_best.any(dim=1)  # [B, A]

    label = torch.where(negative, NEGATIVE, IGNORE)  # [B, A]
    label = torch.where(positive, POSITIVE, label)
    if ignore_mask is not None:
        label = torch.where(ignore_mask, IGNORE, label)
    assignment = Assignment(
        gt_index=gt_index,
        label=label.to(torch.int8),
        iou=best_iou.clamp(min=0.0),
    )
    if crowd is None:
        return assignment
    return ignore_crowd_covered(assignment, anchors, gt_boxes, crowd, crowd_ioa=crowd_ioa)


def crowd_covered(
    anchors: Float[Tensor, "A 4"] | Float[Tensor, "B A 4"],
    gt_boxes: Float[Tensor, "B M 4"],
    crowd: Bool[Tensor, "B M"],
    *,
    crowd_ioa: float,
) -> Bool[Tensor, "B A"]:
    """Anchors lying more than ``crowd_ioa`` of their own area inside a crowd box of their image
    (a zero-area anchor is never covered). ``crowd`` must be False on padded slots, whose boxes
    may hold anything, even NaN."""
    ioa = box_ioa(anchors.detach(), gt_boxes.detach())  # [B, A, M]: share of each anchor inside
    return ((ioa > crowd_ioa) & crowd[:, None, :]).any(dim=2)  # [B, A]


def ignore_crowd_covered(
    assignment: Assignment,
    anchors: Float[Tensor, "A 4"] | Float[Tensor, "B A 4"],
    gt_boxes: Float[Tensor, "B M 4"],
    crowd: Bool[Tensor, "B M"],
    *,
    crowd_ioa: float,
) -> Assignment:
    """``assignment`` with every non-POSITIVE anchor covered by a crowd region
    (:func:`crowd_covered`) relabelled IGNORE: every assigner calls this after matching the
    non-crowd gts, so crowds are handled the same way in every family."""
    covered = crowd_covered(anchors, gt_boxes, crowd, crowd_ioa=crowd_ioa)  # [B, A]
    ignore = covered & (assignment.label != POSITIVE)
    label = torch.where(ignore, IGNORE, assignment.label).to(torch.int8)
    return assignment._replace(label=label)


# How far below the float64 threshold an IoU may fall and still reach it: far above the rounding
# of the statistics (~1e-16), far below the spacing of float32 IoUs (~6e-8).
_THRESHOLD_SLACK = 1e-12


def _nearest_per_level(
    distance: Float[Tensor, "B M A"], num_per_level: Sequence[int], k: int
) -> Bool[Tensor, "B M A"]:
    """For each row (one gt) and each level, the ``min(k, A_l)`` anchors nearest to it.

    Ties at the k-th distance go to the lowest anchor index, so the choice never depends on how
    ``topk`` orders equal values (anchors of one location share a centre, and a gt centre at a
    cell corner is equally far from four of them): anchors strictly nearer than the k-th
    distance are taken, then the first of those at exactly that distance fill the remaining
    places.
    """
    parts = []
    start = 0
    for count in num_per_level:  # a loop over pyramid levels
        level = distance[..., start : start + count]  # [B, M, A_l]
        start += count
        if count == 0:
            parts.append(torch.zeros_like(level, dtype=torch.bool))
            continue
        take = min(k, count)
        kth = level.topk(take, dim=-1, largest=False).values[..., take - 1 :]  # [B, M, 1]
        nearer = level < kth  # [B, M, A_l]
        tied = level == kth  # [B, M, A_l]
        room = take - nearer.sum(dim=-1, keepdim=True)  # [B, M, 1] places left for ties
        parts.append(nearer | (tied & (tied.cumsum(dim=-1) <= room)))
    return torch.cat(parts, dim=-1)  # [B, M, A]


def assign_atss(
    anchors: Float[Tensor, "A 4"],
    num_per_level: Sequence[int],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    topk: int,
    unbiased_std: bool = True,
    inside_eps: float = 0.01,
    crowd_ioa: float = 0.5,
) -> Assignment:
    """Adaptive Training Sample Selection (ATSS; Zhang et al., "Bridging the Gap Between
    Anchor-based and Anchor-free Detection", CVPR 2020, Algorithm 1).

    For every valid gt ``g`` (batched over images and gts, no loop but over levels):

    1. Candidates ``C_g``: on each pyramid level ``l`` the ``k`` anchors whose centres are
       nearest to the centre of ``g`` (L2), all ``A_l`` of them if the level has fewer; ties at
       the k-th distance go to the lowest anchor index. ``|C_g| = n = Σ_l min(k, A_l)``.
    2. Threshold ``t_g = m_g + v_g``, with ``m_g`` the mean and ``v_g`` the standard deviation
       of the IoUs ``D_g = {IoU(c, g) : c ∈ C_g}``. ``unbiased_std`` (the default) divides the
       squared deviations by ``n - 1`` (Bessel's correction), as ``torch.std`` does by default
       and so as the authors' code and MMDetection do; False divides by ``n``. With ``n = 1``
       the deviation is 0. The statistics and the comparison are computed in float64 from the
       float32 IoUs, and an IoU within ``1e-12`` below ``t_g`` counts as reaching it, so that
       rounding never decides a tie that is exact in real arithmetic: when all of ``D_g`` is
       equal every candidate reaches ``t_g`` (in float32 the mean of three equal IoUs can land
       above them), and with the population deviation two candidates give ``t_g = max(D_g)``.
    3. Positives of ``g``: ``P_g = {c ∈ C_g : IoU(c, g) >= t_g and the centre of c lies inside
       g}``, "inside" meaning more than ``inside_eps`` pixels from every side (0.01, as the
       reference implementations).
    4. An anchor in several ``P_g`` goes to the gt it overlaps most (the lowest slot on ties).

    Nothing guarantees a gt a positive: ``max(D_g) < m_g + v_g`` happens when most candidates
    share the top IoU and a few lag far behind (IoUs ``1, 1, 0``: ``t_g = 2/3 + 0.577``, or
    ``2/3 + 0.471`` with ``n`` in the denominator), and a gt whose centre is near no anchor
    centre or whose positives all go to a better-overlapping gt gets none either. There is no
    fallback (as in the paper and its reference implementations).

    Labels: POSITIVE (``gt_index`` the chosen gt, ``iou`` its IoU), NEGATIVE for every other
    anchor (ATSS ignores nothing), except IGNORE for anchors more than ``crowd_ioa`` inside a
    crowd region that are not POSITIVE (:func:`ignore_crowd_covered`). Crowd gts are never
    matched; padded slots (``gt_valid`` False; their boxes may hold anything, even NaN) play no
    part. For non-positive anchors ``gt_index`` is the valid gt they overlap most (0 in an image
    without valid gts) and ``iou`` that IoU, as :func:`assign_max_iou` reports them.

    Args:
        anchors: ``[A, 4]`` shared by the batch, levels concatenated.
        num_per_level: ``A_l`` of each level (Python ints), ``Σ A_l = A``.
        gt_boxes: ``[B, M, 4]`` padded gt boxes.
        gt_valid: ``[B, M]`` True for real gts (crowd ones included).
        gt_crowd: ``[B, M]`` True for crowd regions, or None.
        topk: ``k``, candidates a level (9 in the paper).

    Returns:
        An :class:`Assignment` of ``[B, A]`` tensors.

    Static shapes, no host syncs: safe under ``torch.compile(fullgraph=True)``. Not
    differentiable (inputs are detached). Memory: a few ``[B, M, A]`` tensors, like
    :func:`assign_max_iou`.
    """
    num_per_level = [int(n) for n in num_per_level]
    if sum(num_per_level) != anchors.shape[0]:
        raise ValueError(
            f"assign_atss: num_per_level {num_per_level} adds up to {sum(num_per_level)}, "
            f"but there are {anchors.shape[0]} anchors"
        )
    if topk < 1:
        raise ValueError(f"assign_atss: topk must be >= 1, got {topk}")
    batch, num_gt = gt_valid.shape
    if num_gt == 0:  # static: give the batch one padded slot, so that every image is empty
        gt_boxes = gt_boxes.new_zeros(batch, 1, 4)
        gt_valid = gt_valid.new_zeros(batch, 1)
        gt_crowd = None
    crowd = None if gt_crowd is None else gt_crowd & gt_valid  # [B, M]
    usable = gt_valid if crowd is None else gt_valid & ~crowd  # [B, M] real, matchable gts

    anchors = anchors.detach().float()
    # padded slots become all-zero boxes, so that no NaN enters any row
    gt = torch.where(gt_valid[..., None], gt_boxes.detach().float(), 0.0)  # [B, M, 4]
    centres = (anchors[:, :2] + anchors[:, 2:]) * 0.5  # [A, 2]
    gt_centres = (gt[..., :2] + gt[..., 2:]) * 0.5  # [B, M, 2]

    # 1. candidates: the k nearest anchor centres of each level
    dx = gt_centres[..., 0:1] - centres[:, 0]  # [B, M, A]
    dy = gt_centres[..., 1:2] - centres[:, 1]  # [B, M, A]
    candidate = _nearest_per_level(dx * dx + dy * dy, num_per_level, topk)  # [B, M, A]
    n = sum(min(topk, count) for count in num_per_level)

    # 2. the IoU threshold of each gt: mean + std of its candidates' IoUs (float64)
    iou = box_iou(gt, anchors)  # [B, M, A]
    iou64 = iou.double()
    mean = torch.where(candidate, iou64, 0.0).sum(dim=-1, keepdim=True) / max(n, 1)  # [B, M, 1]
    squares = torch.where(candidate, (iou64 - mean).square(), 0.0).sum(dim=-1, keepdim=True)
    dof = n - 1 if unbiased_std and n > 1 else n
    threshold = mean + (squares / max(dof, 1)).sqrt()  # [B, M, 1]

    # 3. positives of each gt: candidates over the threshold whose centre lies inside it
    inside = encode_distances(centres, gt[:, :, None, :]).amin(dim=-1) > inside_eps  # [B, M, A]
    reaches = iou64 >= threshold - _THRESHOLD_SLACK  # [B, M, A]
    positive_for = candidate & reaches & inside & usable[..., None]  # [B, M, A]

    # 4. an anchor positive for several gts takes the one it overlaps most
    best_pos, pos_index = iou.masked_fill(~positive_for, -1.0).max(dim=1)  # [B, A]
    best_any, any_index = iou.masked_fill(~usable[..., None], -1.0).max(dim=1)  # [B, A]
    positive = positive_for.any(dim=1)  # [B, A]
    assignment = Assignment(
        gt_index=torch.where(positive, pos_index, any_index),
        label=torch.where(positive, POSITIVE, NEGATIVE).to(torch.int8),
        iou=torch.where(positive, best_pos, best_any.clamp(min=0.0)),
    )
    if crowd is None:
        return assignment
    return ignore_crowd_covered(assignment, anchors, gt, crowd, crowd_ioa=crowd_ioa)
