"""Box coding: regression targets relative to anchors (delta-xywh) or to points (distances).

Two codings:

- **delta-xywh** (R-CNN, RPN, RetinaNet): with an anchor of center (ax, ay) and size (aw, ah), a
  box of center (x, y) and size (w, h) is ``((x - ax) / aw, (y - ay) / ah, log(w / aw),
  log(h / ah))``, then normalised as ``(delta - means) / stds``. Width is ``x2 - x1`` (no +1).
- **distances** (FCOS, GFL): a point (px, py) and a box give ``(px - x1, py - y1, x2 - px,
  y2 - py)`` (left, top, right, bottom), optionally divided by the level's stride.

All functions broadcast over leading dims (``anchors[A, 4]`` against ``targets[B, A, 4]`` works)
and compute in float32 at least: float16/bfloat16 inputs (a head under autocast) are upcast and the
result is float32; float64 stays float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from fdet.constants import DEFAULT_SCALE_CLIP
from fdet.ops.boxes import ImageSize, clip_boxes

__all__ = [
    "DEFAULT_SCALE_CLIP",
    "centerness",
    "decode_deltas",
    "decode_distances",
    "distribution_to_distances",
    "encode_deltas",
    "encode_distances",
    "stds_from_weights",
]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check4(name: str, values: Sequence[float]) -> tuple[float, float, float, float]:
    if len(values) != 4:
        raise ValueError(f"{name} must have 4 entries (x, y, w, h), got {tuple(values)}")
    a, b, c, d = (float(v) for v in values)
    return a, b, c, d


def stds_from_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    """Convert torchvision ``BoxCoder`` weights ``(wx, wy, ww, wh)`` to ``stds`` (and back).

    torchvision multiplies raw deltas by ``weights``; ``encode_deltas`` divides them by ``stds``,
    so ``stds = 1 / weights``: ``BoxCoder((10, 10, 5, 5))`` is ``stds=(0.1, 0.1, 0.2, 0.2)`` with
    zero means. The map is its own inverse, so ``stds_from_weights(stds)`` gives the weights.
    """
    w = _check4("weights", weights)
    if not all(v > 0 for v in w):
        raise ValueError(f"weights must be positive, got {w}")
    return 1.0 / w[0], 1.0 / w[1], 1.0 / w[2], 1.0 / w[3]


def _centers_sizes(boxes: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x1, y1, x2, y2 = boxes.unbind(-1)
    w = (x2 - x1).clamp(min=eps)
    h = (y2 - y1).clamp(min=eps)
    return (x1 + x2) * 0.5, (y1 + y2) * 0.5, w, h


def encode_deltas(
    anchors: Float[Tensor, "... 4"],
    targets: Float[Tensor, "... 4"],
    *,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    eps: float = 1e-6,
) -> Float[Tensor, "... 4"]:
    """Delta-xywh regression targets of ``targets`` relative to ``anchors`` (shapes broadcast).

    Args:
        anchors: ``[..., 4]`` xyxy reference boxes.
        targets: ``[..., 4]`` xyxy boxes to encode.
        means, stds: per-component normalisation, ``(delta - means) / stds``; see
            ``stds_from_weights`` for torchvision's ``BoxCoder`` weights.
        eps: widths and heights are clamped to at least ``eps`` (pixels), so degenerate boxes
            (all-zero padding slots) encode to large but finite deltas instead of inf/NaN.

    Returns:
        ``[..., 4]`` deltas ``(dx, dy, dw, dh)``, float32 (float64 for float64 inputs).
    """
    m, s = _check4("means", means), _check4("stds", stds)
    dtype = _compute_dtype(anchors, targets)
    ax, ay, aw, ah = _centers_sizes(anchors.to(dtype), eps)
    tx, ty, tw, th = _centers_sizes(targets.to(dtype), eps)
    dx = (tx - ax) / aw
    dy = (ty - ay) / ah
    dw = torch.log(tw / aw)
    dh = torch.log(th / ah)
    return torch.stack(
        ((dx - m[0]) / s[0], (dy - m[1]) / s[1], (dw - m[2]) / s[2], (dh - m[3]) / s[3]), dim=-1
    )


def decode_deltas(
    anchors: Float[Tensor, "... 4"],
    deltas: Float[Tensor, "... 4"],
    *,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float | None = DEFAULT_SCALE_CLIP,
    image_size: ImageSize | None = None,
) -> Float[Tensor, "... 4"]:
    """Boxes from delta-xywh ``deltas`` relative to ``anchors``; the inverse of ``encode_deltas``.

    Args:
        anchors: ``[..., 4]`` xyxy reference boxes.
        deltas: ``[..., 4]`` normalised deltas; un-normalised as ``deltas * stds + means``.
        clip: upper bound on the un-normalised ``dw``, ``dh`` before ``exp`` (torchvision's
            ``bbox_xform_clip``), so a wild prediction cannot overflow; ``None`` disables it.
            Only the upper side is bounded, as in torchvision: ``exp`` of a very negative value
            is a harmless 0.
        image_size: if given, decoded boxes are clipped to the image, with ``clip_boxes``'s
            convention: ``(height, width)`` or a tensor ``[..., 2]`` broadcasting against
            ``deltas.shape[:-2]``.

    Returns:
        ``[..., 4]`` xyxy boxes, float32 (float64 for float64 inputs).
    """
    m, s = _check4("means", means), _check4("stds", stds)
    dtype = _compute_dtype(anchors, deltas)
    ax, ay, aw, ah = _centers_sizes(anchors.to(dtype), 0.0)
    dx, dy, dw, dh = deltas.to(dtype).unbind(-1)
    dx, dy, dw, dh = dx * s[0] + m[0], dy * s[1] + m[1], dw * s[2] + m[2], dh * s[3] + m[3]
    if clip is not None:
        dw = dw.clamp(max=clip)
        dh = dh.clamp(max=clip)
    cx = ax + dx * aw
    cy = ay + dy * ah
    half_w = 0.5 * aw * torch.exp(dw)
    half_h = 0.5 * ah * torch.exp(dh)
    boxes = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)
    return boxes if image_size is None else clip_boxes(boxes, image_size)


def _stride_factor(stride: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """A per-point stride ``[...]`` broadcasts against ``[..., 4]`` as ``[..., 1]``."""
    return stride.to(dtype)[..., None] if isinstance(stride, Tensor) else float(stride)


def encode_distances(
    points: Float[Tensor, "... 2"],
    boxes: Float[Tensor, "... 4"],
    *,
    stride: float | Float[Tensor, "*batch"] = 1.0,
    max_distance: float | None = None,
    eps: float = 0.01,
) -> Float[Tensor, "... 4"]:
    """Distances ``(left, top, right, bottom)`` from ``points`` to the sides of ``boxes``.

    Args:
        points: ``[..., 2]`` (x, y) locations.
        boxes: ``[..., 4]`` xyxy boxes (shapes broadcast with ``points``).
        stride: distances are divided by it: a number, or a per-point tensor ``[...]`` (the
            stride of each point's pyramid level).
        max_distance: if given, distances (in stride units) are clamped to
            ``[0, max_distance - eps]``, as distribution-style heads (GFL) need targets strictly
            inside their last bin. Without it nothing is clamped: a point outside its box has a
            negative distance, so ``ltrb.amin(-1) > 0`` tests "strictly inside".
        eps: margin below ``max_distance``; unused without it.

    Returns:
        ``[..., 4]`` distances, float32 (float64 for float64 inputs).
    """
    dtype = _compute_dtype(points, boxes)
    px, py = points.to(dtype).unbind(-1)
    x1, y1, x2, y2 = boxes.to(dtype).unbind(-1)
    ltrb = torch.stack((px - x1, py - y1, x2 - px, y2 - py), dim=-1)
    ltrb = ltrb / _stride_factor(stride, dtype)
    if max_distance is not None:
        ltrb = ltrb.clamp(min=0, max=max_distance - eps)
    return ltrb


def decode_distances(
    points: Float[Tensor, "... 2"],
    ltrb: Float[Tensor, "... 4"],
    *,
    stride: float | Float[Tensor, "*batch"] = 1.0,
    image_size: ImageSize | None = None,
) -> Float[Tensor, "... 4"]:
    """Boxes from ``points`` and distances ``(left, top, right, bottom)``; see ``encode_distances``.

    Args:
        points: ``[..., 2]`` (x, y) locations.
        ltrb: ``[..., 4]`` distances, in units of ``stride`` (multiplied by it first).
        stride: a number or a per-point tensor ``[...]``.
        image_size: if given, boxes are clipped with ``clip_boxes``'s convention.

    Returns:
        ``[..., 4]`` xyxy boxes, float32 (float64 for float64 inputs).
    """
    dtype = _compute_dtype(points, ltrb)
    px, py = points.to(dtype).unbind(-1)
    l, t, r, b = (ltrb.to(dtype) * _stride_factor(stride, dtype)).unbind(-1)
    boxes = torch.stack((px - l, py - t, px + r, py + b), dim=-1)
    return boxes if image_size is None else clip_boxes(boxes, image_size)


def centerness(ltrb: Float[Tensor, "... 4"]) -> Float[Tensor, " *batch"]:
    """FCOS centerness of a point in a box, from its distances ``(l, t, r, b)`` to the sides:

    ``sqrt(min(l, r) / max(l, r) · min(t, b) / max(t, b))``

    1 at the box centre, falling to 0 on its border; 0 for a point on or outside the border
    (negative distances are taken as 0). The unit of the distances does not matter. A target:
    computed without gradient-safe care for points outside boxes, so mask it to the positives.

    Returns:
        ``[...]`` in ``[0, 1]``, float32 (float64 for float64 inputs).
    """
    d = ltrb.to(_compute_dtype(ltrb)).clamp(min=0)
    lr, tb = d[..., 0::2], d[..., 1::2]
    ratio_x = lr.amin(-1) / lr.amax(-1).clamp(min=torch.finfo(d.dtype).tiny)
    ratio_y = tb.amin(-1) / tb.amax(-1).clamp(min=torch.finfo(d.dtype).tiny)
    return (ratio_x * ratio_y).sqrt()


def distribution_to_distances(
    logits: Float[Tensor, "*batch N"], *, reg_max: int
) -> Float[Tensor, " *batch"]:
    """The expected value of a discretised distance (GFL's integral decoding).

    Generalized Focal Loss (Li et al., NeurIPS 2020) represents a distance ``y`` in
    ``[0, reg_max]`` (in stride units) by a distribution over the ``N = reg_max + 1`` bins
    ``y_i = i``; the prediction is its mean::

        ŷ = Σ_{i=0}^{reg_max} P(y_i) · y_i,    P = softmax(logits)

    It inverts the discretisation of :func:`fdet.ops.losses.distribution_focal_loss` in
    expectation: the distribution with mass ``y_{i+1} - y`` on ``y_i`` and ``y - y_i`` on
    ``y_{i+1}`` integrates to exactly ``y``.

    Args:
        logits: ``[..., reg_max + 1]`` unnormalised log-probabilities of the bins (e.g.
            ``[B, A, 4, reg_max + 1]``, one distribution per box side).
        reg_max: the last bin; ``logits.shape[-1]`` must be ``reg_max + 1``.

    Returns:
        ``[...]`` distances in ``[0, reg_max]``, float32 (float64 for float64 logits), also under
        autocast.
    """
    if logits.shape[-1] != reg_max + 1:
        raise ValueError(
            f"distribution_to_distances: the last dim ({logits.shape[-1]}) must be "
            f"reg_max + 1 = {reg_max + 1}"
        )
    probs = torch.softmax(logits.to(_compute_dtype(logits)), dim=-1)  # [..., N]
    bins = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)  # [N]
    return (probs * bins).sum(dim=-1)
