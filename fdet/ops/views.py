"""Views of one image: carrying boxes from one view to another through an axis-aligned map.

Two views of the same image (a teacher's weak view and a student's strong view, made from it by
crops, resizes and flips) are related by a per-image map ``x' = a_x x + b_x``,
``y' = a_y y + b_y``, stored as a row ``(a_x, b_x, a_y, b_y)`` of an ``affine[B, 4]`` tensor
(``a_x < 0`` for a horizontal flip). :func:`map_boxes` carries padded boxes through it and keeps
those still visible in the target view, by the rule of ``fdet.data.transforms.random_crop``.

Static shapes, no host syncs: safe under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Shaped
from torch import Tensor

from fdet.ops.boxes import box_area, clip_boxes

__all__ = ["compose_affine", "invert_affine", "map_boxes"]

# A visible fraction this close below ``min_visible`` still counts: a box on the border of the
# target view is not dropped by rounding (its mapped corner a few ulps outside the view).
_VISIBLE_SLACK = 1e-5


def _unpack(affine: Float[Tensor, "B 4"]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a_x, b_x, a_y, b_y = affine.float().unbind(-1)  # each [B]
    return a_x, b_x, a_y, b_y


def compose_affine(
    first: Float[Tensor, "B 4"], second: Float[Tensor, "B 4"]
) -> Float[Tensor, "B 4"]:
    """The map that applies ``first`` then ``second``: ``x'' = a2 (a1 x + b1) + b2``.

    Rows are ``(a_x, b_x, a_y, b_y)``; computed in float32 at least."""
    a1x, b1x, a1y, b1y = _unpack(first)
    a2x, b2x, a2y, b2y = _unpack(second)
    return torch.stack((a2x * a1x, a2x * b1x + b2x, a2y * a1y, a2y * b1y + b2y), dim=-1)


def invert_affine(affine: Float[Tensor, "B 4"]) -> Float[Tensor, "B 4"]:
    """The inverse map, ``x = (x' - b) / a``: ``compose_affine(affine, invert_affine(affine))``
    is the identity ``(1, 0, 1, 0)``. The scales ``a_x``, ``a_y`` must be non-zero."""
    a_x, b_x, a_y, b_y = _unpack(affine)
    return torch.stack((1 / a_x, -b_x / a_x, 1 / a_y, -b_y / a_y), dim=-1)


def map_boxes(
    boxes: Float[Tensor, "B M 4"],
    valid: Bool[Tensor, "B M"],
    affine: Float[Tensor, "B 4"],
    sizes: Shaped[Tensor, "B 2"],
    *,
    min_visible: float,
) -> tuple[Float[Tensor, "B M 4"], Bool[Tensor, "B M"]]:
    """Carry xyxy boxes into another view of their image.

    Args:
        boxes: ``[B, M, 4]`` xyxy pixel boxes in the source view (padded slots hold anything).
        valid: ``[B, M]`` which slots hold a box.
        affine: ``[B, 4]`` rows ``(a_x, b_x, a_y, b_y)``: ``x' = a_x x + b_x``,
            ``y' = a_y y + b_y`` maps source pixels to target pixels (``a_x < 0``: a horizontal
            flip; the mapped ``x1``, ``x2`` are swapped so that ``x1 <= x2``).
        sizes: ``[B, 2]`` (height, width) of each target view.
        min_visible: the least fraction of a mapped box's area that must lie inside the target
            view for it to stay.

    Returns:
        ``(boxes, valid)``: the mapped boxes clipped to ``[0, width] x [0, height]``, in the
        input dtype, and ``valid``: a slot stays valid when it was valid, its clipped box is not
        degenerate (``x2 > x1`` and ``y2 > y1``) and ``clipped area / mapped area >=
        min_visible`` (up to a float slack of 1e-5), the rule ``fdet.data.transforms.random_crop``
        applies to labeled boxes; the ratio does not change under a resize or a flip, so a crop
        followed by them keeps the same boxes. Invalid slots are zero boxes.

    Computed in float32 (bfloat16 and float16 inputs are upcast). Static shapes, no host syncs.
    """
    a_x, b_x, a_y, b_y = _unpack(affine)
    x1, y1, x2, y2 = boxes.float().unbind(-1)  # each [B, M]
    px1, px2 = a_x[:, None] * x1 + b_x[:, None], a_x[:, None] * x2 + b_x[:, None]
    py1, py2 = a_y[:, None] * y1 + b_y[:, None], a_y[:, None] * y2 + b_y[:, None]
    flip_x, flip_y = (a_x < 0)[:, None], (a_y < 0)[:, None]  # [B, 1]: swap the ends there
    mapped = torch.stack(
        (
            torch.where(flip_x, px2, px1),
            torch.where(flip_y, py2, py1),
            torch.where(flip_x, px1, px2),
            torch.where(flip_y, py1, py2),
        ),
        dim=-1,
    )  # [B, M, 4]; a degenerate box stays degenerate
    clipped = clip_boxes(mapped, sizes)  # [B, M, 4]
    before, after = box_area(mapped), box_area(clipped)  # [B, M]
    visible = torch.where(before > 0, after / before.clamp(min=1e-12), 0.0)  # [B, M]
    keep = (
        valid
        & (visible >= min_visible - _VISIBLE_SLACK)
        & (clipped[..., 2] > clipped[..., 0])
        & (clipped[..., 3] > clipped[..., 1])
    )  # [B, M]
    out = torch.where(keep[..., None], clipped, 0.0)
    return out.to(boxes.dtype), keep
