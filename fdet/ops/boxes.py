"""Box geometry: format conversions, areas, overlaps (pairwise and elementwise), clipping.

Every function broadcasts over leading dims. Boxes are ``xyxy`` in absolute pixels unless the
name says otherwise. Pairwise functions map ``[..., N, 4] × [..., M, 4] -> [..., N, M]``;
elementwise (``aligned_*``) functions map ``[..., 4] × [..., 4] -> [...]`` with broadcasting, so
``aligned_box_iou(a[..., :, None, :], b[..., None, :, :])`` equals ``box_iou(a, b)``.

Overlap measures are computed in float32 at least (float16/bfloat16 inputs are upcast: a 256×256
box already overflows float16) and are finite for every input of finite coordinates, gradients
included: a ratio whose denominator is zero (two empty boxes, an empty enclosing box) is 0. So two
empty boxes have IoU 0 and GIoU 0. A degenerate box (``x2 < x1`` or ``y2 < y1``) counts as empty:
its width, height and area are 0.

The names and the meaning of ``box_iou``, ``generalized_box_iou``, ``distance_box_iou``,
``complete_box_iou``, ``box_area`` and ``remove_small_boxes`` are those of ``torchvision.ops``;
they agree with torchvision wherever torchvision's result is finite and boxes are well formed.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

__all__ = [
    "ImageSize",
    "aligned_box_iou",
    "aligned_complete_box_iou",
    "aligned_distance_box_iou",
    "aligned_generalized_box_iou",
    "box_area",
    "box_ioa",
    "box_iou",
    "clip_boxes",
    "complete_box_iou",
    "cxcywh_to_xyxy",
    "distance_box_iou",
    "generalized_box_iou",
    "remove_small_boxes",
    "small_box_mask",
    "xywh_to_xyxy",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]

# (height, width) of one image as Python numbers, or a tensor [..., 2] of (height, width) per image.
ImageSize = tuple[float, float] | Shaped[Tensor, "... 2"]


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def xyxy_to_cxcywh(boxes: Float[Tensor, "... 4"]) -> Float[Tensor, "... 4"]:
    """(x1, y1, x2, y2) -> (center x, center y, width, height)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes_cxcywh: Float[Tensor, "... 4"]) -> Float[Tensor, "... 4"]:
    """(center x, center y, width, height) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_xywh(boxes: Float[Tensor, "... 4"]) -> Float[Tensor, "... 4"]:
    """(x1, y1, x2, y2) -> (x1, y1, width, height), the COCO annotation format."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((x1, y1, x2 - x1, y2 - y1), dim=-1)


def xywh_to_xyxy(boxes_xywh: Float[Tensor, "... 4"]) -> Float[Tensor, "... 4"]:
    """(x1, y1, width, height) -> (x1, y1, x2, y2)."""
    x1, y1, w, h = boxes_xywh.unbind(-1)
    return torch.stack((x1, y1, x1 + w, y1 + h), dim=-1)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _upcast(t: Tensor) -> Tensor:
    """Floating tensors below float32 (and integer tensors) -> float32; float32/64 unchanged."""
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0; the gradient is finite (0) where ``den <= 0``."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), 0.0)


def _wh(boxes: Float[Tensor, "... 4"]) -> Float[Tensor, "... 2"]:
    """Width and height, 0 for degenerate boxes."""
    return (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)


def _inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Intersection, union and area of ``boxes1``, for broadcastable ``[..., 4]`` (upcast)."""
    wh1, wh2 = _wh(boxes1), _wh(boxes2)  # unbroadcast: areas cost N + M, not N·M
    area1 = wh1[..., 0] * wh1[..., 1]
    area2 = wh2[..., 0] * wh2[..., 1]
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])  # [..., 2], broadcast
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter_wh = (rb - lt).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    return inter, area1 + area2 - inter, area1


def _enclosing_wh(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Width and height of the smallest box enclosing both boxes."""
    lt = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    return (rb - lt).clamp(min=0)


def _iou(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    inter, union, _ = _inter_union(boxes1, boxes2)
    return _safe_div(inter, union + eps)


def _giou(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    inter, union, _ = _inter_union(boxes1, boxes2)
    enclose_wh = _enclosing_wh(boxes1, boxes2)
    enclose = enclose_wh[..., 0] * enclose_wh[..., 1]
    return _safe_div(inter, union + eps) - _safe_div(enclose - union, enclose + eps)


def _diou(boxes1: Tensor, boxes2: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(DIoU, IoU); ``eps`` goes to the squared diagonal only, as in torchvision."""
    inter, union, _ = _inter_union(boxes1, boxes2)
    iou = _safe_div(inter, union)
    enclose_wh = _enclosing_wh(boxes1, boxes2)
    diagonal_sq = enclose_wh[..., 0] ** 2 + enclose_wh[..., 1] ** 2
    # Twice the centers, differenced as a whole: swapping the boxes negates it exactly.
    offset = (boxes1[..., :2] + boxes1[..., 2:]) - (boxes2[..., :2] + boxes2[..., 2:])
    center_sq = (offset[..., 0] ** 2 + offset[..., 1] ** 2) * 0.25  # squared center distance
    return iou - _safe_div(center_sq, diagonal_sq + eps), iou


def _aspect_angle(boxes: Tensor) -> Tensor:
    """``atan(w / h)`` in [0, π/2]; finite with a finite gradient for w, h >= 0 (0 at w = h = 0)."""
    w, h = _wh(boxes).unbind(-1)
    ok = (w > 0) | (h > 0)
    one = torch.ones_like(w)
    return torch.where(ok, torch.atan2(torch.where(ok, w, one), torch.where(ok, h, one)), 0.0)


def _ciou(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    diou, iou = _diou(boxes1, boxes2, eps)
    v = (4 / math.pi**2) * (_aspect_angle(boxes1) - _aspect_angle(boxes2)) ** 2
    alpha = _safe_div(v, 1 - iou + v + eps).detach()  # a trade-off weight, not differentiated
    return diou - alpha * v


def _pair(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """``[..., N, 4], [..., M, 4] -> [..., N, 1, 4], [..., 1, M, 4]``, upcast."""
    return _upcast(boxes1)[..., :, None, :], _upcast(boxes2)[..., None, :, :]


def _aligned(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    return _upcast(boxes1), _upcast(boxes2)


# ---------------------------------------------------------------------------------------------
# Areas and pairwise overlaps
# ---------------------------------------------------------------------------------------------


def box_area(boxes: Float[Tensor, "*batch 4"]) -> Float[Tensor, "*batch"]:
    """Area of each box; a degenerate box (x2 < x1 or y2 < y1) has area 0, never negative.

    Computed in float32 at least, like the overlaps. (torchvision's ``box_area`` returns a
    negative area for a box with one inverted side.)
    """
    wh = _wh(_upcast(boxes))
    return wh[..., 0] * wh[..., 1]


def box_iou(
    boxes1: Float[Tensor, "... N 4"], boxes2: Float[Tensor, "... M 4"], *, eps: float = 0.0
) -> Float[Tensor, "... N M"]:
    """Pairwise intersection over union, in [0, 1]. Two empty boxes have IoU 0 (not NaN).

    ``eps`` is added to the union.
    """
    boxes1, boxes2 = _pair(boxes1, boxes2)
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (boxes1.requires_grad or boxes2.requires_grad)
    ):
        return _iou(boxes1, boxes2, eps)
    return _iou_no_grad(boxes1, boxes2, eps)


def _iou_no_grad(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    """``_iou`` of paired boxes in three full-size buffers written in place, for eager calls
    without autograd: the same operations on the same values, so the same result. The width and
    height of the intersection are computed separately rather than as one ``[..., N, M, 2]``."""
    x1a, y1a, x2a, y2a = boxes1.unbind(-1)  # [..., N, 1]
    x1b, y1b, x2b, y2b = boxes2.unbind(-1)  # [..., 1, M]
    wh1, wh2 = _wh(boxes1), _wh(boxes2)
    area1 = wh1[..., 0] * wh1[..., 1]  # [..., N, 1]
    area2 = wh2[..., 0] * wh2[..., 1]  # [..., 1, M]
    inter = torch.minimum(x2a, x2b)  # [..., N, M]
    scratch = torch.maximum(x1a, x1b)
    inter.sub_(scratch).clamp_(min=0)  # intersection width
    torch.maximum(y1a, y1b, out=scratch)
    height = torch.minimum(y2a, y2b).sub_(scratch).clamp_(min=0)
    inter.mul_(height)
    union = torch.add(area1, area2, out=scratch).sub_(inter)  # area1 + area2 - inter
    if eps != 0:
        union.add_(eps)
    outside = union.gt(0).logical_not_()  # zero, negative or NaN denominators give 0
    return inter.div_(union).masked_fill_(outside, 0.0)


def box_ioa(
    boxes1: Float[Tensor, "... N 4"], boxes2: Float[Tensor, "... M 4"], *, eps: float = 0.0
) -> Float[Tensor, "... N M"]:
    """Pairwise intersection over the area of the FIRST argument: ``|b1 ∩ b2| / |b1|``, in [0, 1].

    ``ioa[..., i, j]`` is the fraction of ``boxes1[i]`` covered by ``boxes2[j]`` (e.g. the share
    of a ground-truth box, ``boxes1``, that lies inside a crop or an ignore region, ``boxes2``).
    An empty ``boxes1[i]`` gives 0. ``eps`` is added to the area.
    """
    inter, _, area1 = _inter_union(*_pair(boxes1, boxes2))
    return _safe_div(inter, area1 + eps)


def generalized_box_iou(
    boxes1: Float[Tensor, "... N 4"], boxes2: Float[Tensor, "... M 4"], *, eps: float = 0.0
) -> Float[Tensor, "... N M"]:
    """Pairwise generalized IoU, ``IoU - |C \\ (b1 ∪ b2)| / |C|`` with C the enclosing box.

    In [-1, 1]. ``eps`` is added to the union and to ``|C|``; an empty C gives a penalty of 0.
    """
    return _giou(*_pair(boxes1, boxes2), eps)


def distance_box_iou(
    boxes1: Float[Tensor, "... N 4"], boxes2: Float[Tensor, "... M 4"], *, eps: float = 1e-7
) -> Float[Tensor, "... N M"]:
    """Pairwise distance IoU, ``IoU - ρ² / c²``.

    ρ is the distance between the box centers and c the diagonal of the enclosing box; in [-1, 1].
    ``eps`` is added to ``c²`` (as in torchvision).
    """
    return _diou(*_pair(boxes1, boxes2), eps)[0]


def complete_box_iou(
    boxes1: Float[Tensor, "... N 4"], boxes2: Float[Tensor, "... M 4"], *, eps: float = 1e-7
) -> Float[Tensor, "... N M"]:
    """Pairwise complete IoU, ``DIoU - α·v``, in [-1.5, 1].

    ``v = 4/π² (atan(w1/h1) - atan(w2/h2))²`` measures aspect-ratio disagreement and
    ``α = v / (1 - IoU + v + eps)`` is treated as a constant (no gradient flows through it), as in
    torchvision. ``eps`` is added to ``c²`` and to α's denominator.
    """
    return _ciou(*_pair(boxes1, boxes2), eps)


# ---------------------------------------------------------------------------------------------
# Elementwise overlaps (IoU-style losses)
# ---------------------------------------------------------------------------------------------


def aligned_box_iou(
    boxes1: Float[Tensor, "*batch 4"], boxes2: Float[Tensor, "*batch 4"], *, eps: float = 0.0
) -> Float[Tensor, "*batch"]:
    """Elementwise IoU of ``boxes1`` with ``boxes2`` (shapes broadcast); see ``box_iou``."""
    return _iou(*_aligned(boxes1, boxes2), eps)


def aligned_generalized_box_iou(
    boxes1: Float[Tensor, "*batch 4"], boxes2: Float[Tensor, "*batch 4"], *, eps: float = 0.0
) -> Float[Tensor, "*batch"]:
    """Elementwise generalized IoU; see ``generalized_box_iou``. Finite gradients everywhere."""
    return _giou(*_aligned(boxes1, boxes2), eps)


def aligned_distance_box_iou(
    boxes1: Float[Tensor, "*batch 4"], boxes2: Float[Tensor, "*batch 4"], *, eps: float = 1e-7
) -> Float[Tensor, "*batch"]:
    """Elementwise distance IoU; see ``distance_box_iou``. Finite gradients everywhere."""
    return _diou(*_aligned(boxes1, boxes2), eps)[0]


def aligned_complete_box_iou(
    boxes1: Float[Tensor, "*batch 4"], boxes2: Float[Tensor, "*batch 4"], *, eps: float = 1e-7
) -> Float[Tensor, "*batch"]:
    """Elementwise complete IoU; see ``complete_box_iou``. Finite gradients everywhere."""
    return _ciou(*_aligned(boxes1, boxes2), eps)


# ---------------------------------------------------------------------------------------------
# Clipping and size filtering
# ---------------------------------------------------------------------------------------------


def clip_boxes(boxes: Float[Tensor, "... N 4"], image_size: ImageSize) -> Float[Tensor, "... N 4"]:
    """Clamp x to [0, width] and y to [0, height].

    Args:
        boxes: ``[..., N, 4]`` xyxy boxes.
        image_size: ``(height, width)`` of one image, or a tensor ``[..., 2]`` of (height, width)
            per image whose leading dims broadcast against ``boxes.shape[:-2]`` (so ``[B, N, 4]``
            boxes clip with ``image_sizes[B, 2]``).

    Returns:
        ``[..., N, 4]`` boxes of the same dtype. A box entirely outside the image collapses onto
        the border (zero width or height); nothing is removed.
    """
    if isinstance(image_size, Tensor):
        hw = image_size.to(boxes.dtype)[..., None, :]  # [..., 1, 2]
        upper = torch.cat((hw.flip(-1), hw.flip(-1)), dim=-1)  # [..., 1, 4] = (w, h, w, h)
        return torch.minimum(boxes.clamp(min=0), upper)
    height, width = image_size
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), dim=-1
    )


def small_box_mask(boxes: Float[Tensor, "*batch 4"], *, min_size: float) -> Bool[Tensor, "*batch"]:
    """True where a box's width or height is below ``min_size`` (or is NaN); static shapes.

    The complement of torchvision's ``remove_small_boxes`` keep test
    (``w >= min_size and h >= min_size``); use it to mask boxes out in compiled code.
    """
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return ~((w >= min_size) & (h >= min_size))


def remove_small_boxes(boxes: Float[Tensor, "N 4"], *, min_size: float) -> Int[Tensor, " K"]:
    """Indices (ascending) of the boxes whose width and height are both at least ``min_size``.

    For eager, un-batched use only: the result has a data-dependent length K, so it breaks
    ``torch.compile(fullgraph=True)`` and batching; compiled paths use ``small_box_mask``.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(
            f"remove_small_boxes expects boxes of shape [N, 4], got {tuple(boxes.shape)}; "
            "for batched boxes use small_box_mask"
        )
    return torch.nonzero(~small_box_mask(boxes, min_size=min_size)).squeeze(1)
