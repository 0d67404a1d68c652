"""Centre heatmaps (CenterNet, "Objects as Points", Zhou et al. 2019), top to bottom.

An object is a peak on a per-class heatmap at the output stride (4 in the paper). Training:

1. :func:`gaussian_radius` — how far a corner (or a centre) may move and the box still overlap
   the ground truth with IoU >= ``min_overlap`` (CornerNet's rule);
2. :func:`draw_heatmaps` — the target: a Gaussian at each object's integer centre,
   ``Y = exp(-(dx² + dy²) / (2σ²))``, ``σ = (2r + 1) / 6``, max-combined within a class;
3. :func:`heatmap_focal_loss` — the penalty-reduced pixel-wise focal loss against that target.

Inference: :func:`heatmap_peaks` — a 3×3 max-pool keeps the local maxima (the paper's stand-in
for NMS) and the top ``k`` (class, location) pairs over the whole map are the detections.

Every function works on padded batches with static shapes and no host synchronization, so they
trace under ``torch.compile(fullgraph=True)``. Coordinates on the heatmap are ``(x, y)`` in
output cells: cell ``(i, j)`` covers input pixels ``[j·s, (j+1)·s) × [i·s, (i+1)·s)`` at stride
``s``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

__all__ = [
    "HeatmapPeaks",
    "draw_heatmaps",
    "gaussian_radius",
    "heatmap_focal_loss",
    "heatmap_peaks",
    "scatter_max_by_class",
]

RadiusVariant = Literal["exact", "cornernet"]


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# 1. Gaussian radius (CornerNet, Law & Deng 2018, section 3.2)
# ---------------------------------------------------------------------------------------------


def _smaller_root(a: float | Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The smaller root of ``a r² - b r + c = 0`` (``a, b, c >= 0``), as ``2c / (b + √(b² -
    4ac))``: the same number as ``(b - √(b² - 4ac)) / 2a`` without its cancellation. 0 when
    ``b = c = 0``."""
    root = (b * b - 4 * a * c).clamp(min=0).sqrt()
    return 2 * c / (b + root).clamp(min=torch.finfo(b.dtype).tiny)


def gaussian_radius(
    heights: Float[Tensor, "*batch"],
    widths: Float[Tensor, "*batch"],
    *,
    min_overlap: float,
    variant: RadiusVariant = "exact",
) -> Float[Tensor, "*batch"]:
    """CornerNet's radius: how far the corners of a ``heights × widths`` box may move and the
    moved box still have IoU >= ``min_overlap`` (``o``) with it.

    Three ways of moving both corners by ``r`` (on each axis) bound the IoU, each a quadratic
    in ``r`` (``h``, ``w`` the box's size):

    1. one corner in, one out (the box shifted by ``(r, r)``, which is what a centre off by ``r``
       does): ``(w - r)(h - r) / (2wh - (w - r)(h - r)) = o``, i.e.
       ``r² - (h + w) r + wh (1 - o) / (1 + o) = 0``;
    2. both corners in (the box shrunk by ``r`` on every side):
       ``(w - 2r)(h - 2r) / wh = o``, i.e. ``4r² - 2(h + w) r + (1 - o) wh = 0``;
    3. both corners out (grown by ``r``): ``wh / ((w + 2r)(h + 2r)) = o``, i.e.
       ``4o r² + 2o (h + w) r - (1 - o) wh = 0``.

    The radius is the smallest of the three relevant roots (the smaller root in cases 1 and 2,
    the positive one in case 3).

    ``variant="exact"`` (the default) solves the three quadratics as written, so it keeps the
    promise the rule is named for: a box whose four coordinates each differ from the ground
    truth's by at most the radius has IoU >= ``min_overlap`` with it (the tests check this).
    ``variant="cornernet"`` reproduces the code released with CornerNet and CenterNet (and
    MMDetection's ``gaussian_radius``), which takes the larger root in cases 1 and 2 and
    divides by 2 instead of ``2a`` in cases 2 and 3; its radius is mostly case 3 times ``4o``:
    2.8 times the exact case-3 radius at ``o = 0.7``, so larger than the guarantee allows.

    ``min_overlap`` is 0.7 in the papers' code (with its formula). Reimplementations that solve
    the quadratics exactly use 0.3 instead, which gives radii close to the original ones (0.7
    to 0.83 of them, from 1:4 boxes to squares); fdet's spec default is ``exact`` with 0.3 for
    that reason.

    Args:
        heights, widths: box sizes (any unit; the radius is in the same unit), broadcasting;
            negative values count as 0.
        min_overlap: ``o`` in ``(0, 1)``.
        variant: ``"exact"`` or ``"cornernet"``.

    Returns:
        The radius, ``>= 0`` and real-valued (CenterNet floors it to whole cells), float32
        (float64 for float64 inputs); 0 for an empty box.
    """
    if not 0.0 < min_overlap < 1.0:
        raise ValueError(f"min_overlap must be in (0, 1), got {min_overlap}")
    if variant not in ("exact", "cornernet"):
        raise ValueError(f"variant must be 'exact' or 'cornernet', got {variant!r}")
    h = _at_least_float32(heights).clamp(min=0)
    w = _at_least_float32(widths).clamp(min=0).to(h.dtype)
    h, w = torch.broadcast_tensors(h, w)
    o = min_overlap
    if variant == "exact":
        r1 = _smaller_root(1.0, h + w, w * h * (1 - o) / (1 + o))  # case 1
        r2 = _smaller_root(4.0, 2 * (h + w), (1 - o) * w * h)  # case 2
        # case 3: the positive root of 4o r² + b r - c = 0 is 2c / (b + √(b² + 16 o c))
        b3, c3 = 2 * o * (h + w), (1 - o) * w * h
        r3 = 2 * c3 / (b3 + (b3 * b3 + 16 * o * c3).sqrt()).clamp(min=torch.finfo(h.dtype).tiny)
    else:  # the released code's expressions, term for term
        b1, c1 = h + w, w * h * (1 - o) / (1 + o)
        r1 = (b1 + (b1 * b1 - 4 * c1).clamp(min=0).sqrt()) / 2
        b2, c2 = 2 * (h + w), (1 - o) * w * h
        r2 = (b2 + (b2 * b2 - 16 * c2).clamp(min=0).sqrt()) / 2
        b3, c3 = -2 * o * (h + w), (o - 1) * w * h
        r3 = (b3 + (b3 * b3 - 16 * o * c3).sqrt()) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


# ---------------------------------------------------------------------------------------------
# 2. Target heatmaps (CenterNet, section 3: Y_xyc = exp(-((x - p̃x)² + (y - p̃y)²) / (2σp²)))
# ---------------------------------------------------------------------------------------------


def scatter_max_by_class(
    maps: Float[Tensor, "B M H W"],
    labels: Int[Tensor, "B M"],
    valid: Bool[Tensor, "B M"],
    *,
    num_classes: int,
) -> Float[Tensor, "B K H W"]:
    """``out[b, k] = max(0, max of maps[b, m] over the valid slots m with labels[b, m] == k)``.

    One ``scatter_reduce(amax)`` over the slot dim: no loop over slots, and the result does not
    depend on the order of the writes. Invalid slots take no part (their maps and labels may
    hold anything, NaN included).
    """
    batch, _, height, width = maps.shape
    safe = torch.where(valid[..., None, None], maps, torch.zeros_like(maps))  # [B, M, H, W]
    index = torch.where(valid, labels, torch.zeros_like(labels)).long()  # [B, M]
    index = index[..., None, None].expand_as(safe)  # [B, M, H, W]
    out = safe.new_zeros(batch, num_classes, height, width)
    return out.scatter_reduce(1, index, safe, reduce="amax", include_self=True)


def draw_heatmaps(
    centres_int: Shaped[Tensor, "B M 2"],
    radii: Shaped[Tensor, "B M"],
    labels: Int[Tensor, "B M"],
    valid: Bool[Tensor, "B M"],
    *,
    num_classes: int,
    size: tuple[int, int],
) -> Float[Tensor, "B K H W"]:
    """Per-class target heatmaps ``[B, K, H, W]``: a Gaussian peak at each valid object's centre.

    Object ``m`` of class ``c`` with integer centre ``(cx, cy)`` (``x`` first, in cells) and
    integer radius ``r`` adds, on channel ``c``,

        ``G(x, y) = exp(-((x - cx)² + (y - cy)²) / (2σ²))``, ``σ = (2r + 1) / 6``,

    cut to the ``(2r + 1)²`` window ``|x - cx| <= r``, ``|y - cy| <= r`` (0 outside; the window
    is ±3σ). Where objects of one class overlap, the heatmap takes the element-wise maximum.
    The centre cell is exactly 1.0 (``exp(0) · exp(0)``); a centre outside the map draws the
    part of its window that falls inside.

    Computed for every slot at once as ``[B, M, H, W]`` (a separable product of ``[B, M, H]``
    and ``[B, M, W]`` Gaussians) and scattered into the class channels with
    :func:`scatter_max_by_class`: no loop over images or objects, no host sync. Memory is
    ``B·M·H·W`` floats.

    Args:
        centres_int: ``[B, M, 2]`` integer ``(x, y)`` cells (any dtype holding integers).
        radii: ``[B, M]`` integer radii in cells (``floor`` of :func:`gaussian_radius`),
            negative values count as 0.
        labels: ``[B, M]`` classes in ``[0, num_classes)`` on valid slots.
        valid: ``[B, M]``; invalid slots may hold anything (NaN centres or radii included).
        num_classes: ``K``.
        size: ``(H, W)`` of the heatmap.

    Returns:
        float32 ``[B, K, H, W]`` in ``[0, 1]``.
    """
    height, width = size
    device = labels.device
    zero = torch.zeros((), device=device)
    cx = torch.where(valid, centres_int[..., 0], zero).float()  # [B, M]
    cy = torch.where(valid, centres_int[..., 1], zero).float()  # [B, M]
    r = torch.where(valid, radii, zero).float().clamp(min=0)  # [B, M]
    two_var = 2 * ((2 * r + 1) / 6) ** 2  # 2σ², [B, M]
    dx = torch.arange(width, device=device, dtype=torch.float32) - cx[..., None]  # [B, M, W]
    dy = torch.arange(height, device=device, dtype=torch.float32) - cy[..., None]  # [B, M, H]
    gx = torch.exp(-(dx * dx) / two_var[..., None]) * (dx.abs() <= r[..., None])  # [B, M, W]
    gy = torch.exp(-(dy * dy) / two_var[..., None]) * (dy.abs() <= r[..., None])  # [B, M, H]
    gaussians = gy[..., :, None] * gx[..., None, :]  # [B, M, H, W]
    return scatter_max_by_class(gaussians, labels, valid, num_classes=num_classes)


# ---------------------------------------------------------------------------------------------
# 3. Penalty-reduced focal loss (CenterNet eq. 1, from CornerNet eq. 1)
# ---------------------------------------------------------------------------------------------


def heatmap_focal_loss(
    logits: Float[Tensor, "*shape"],
    target: Float[Tensor, "*shape"],
    *,
    alpha: float = 2.0,
    beta: float = 4.0,
) -> Float[Tensor, "*shape"]:
    """The penalty-reduced pixel-wise focal loss of heatmap ``logits`` against ``target``,
    unreduced (CenterNet eq. 1 before its sum and its division by the number of objects N):

        ``(1 - p)^α · (-log p)``                 where ``Y = 1`` (a peak),
        ``(1 - Y)^β · p^α · (-log(1 - p))``      elsewhere,

    with ``p = sigmoid(logits)``. Near a peak the Gaussian target lowers the penalty for
    predicting an object (``(1 - Y)^β``); ``α`` focuses on hard locations as in the focal loss.

    Computed from the logits with log-sigmoids: ``log p = logsigmoid(x)``, ``log(1 - p) =
    logsigmoid(-x)``, ``p^α = exp(α · logsigmoid(x))``, so saturated logits (±50, ±1e4) give
    finite values and gradients. (The paper's code clamps ``p`` to ``[1e-4, 1 - 1e-4]``
    instead, which stops the gradient of saturated locations; nothing is clamped here.)

    Args:
        logits: raw heatmap scores, any shape (``[B, K, H, W]``).
        target: same shape (or broadcastable), in ``[0, 1]``; exactly 1 marks a peak.
        alpha, beta: the exponents (2 and 4 in the paper).

    Returns:
        The loss of every element, float32 (float64 for float64 inputs), also under autocast.
        Sum it over the elements that count and divide by the number of objects.
    """
    x = _at_least_float32(logits)
    y = target.to(x.dtype)
    log_p = F.logsigmoid(x)  # log p
    log_not_p = F.logsigmoid(-x)  # log(1 - p)
    positive = -torch.exp(alpha * log_not_p) * log_p  # (1 - p)^α · -log p
    negative = -torch.pow(1 - y, beta) * torch.exp(alpha * log_p) * log_not_p
    return torch.where(y == 1, positive, negative)


# ---------------------------------------------------------------------------------------------
# 4. Peaks (CenterNet section 4: 3×3 max-pooling in place of NMS, then the top 100)
# ---------------------------------------------------------------------------------------------


class HeatmapPeaks(NamedTuple):
    """The top ``N`` local maxima of a heatmap, by score descending."""

    scores: Float[Tensor, "B N"]
    labels: Int[Tensor, "B N"]  # class channel
    ys: Int[Tensor, "B N"]  # row (cell)
    xs: Int[Tensor, "B N"]  # column (cell)


def heatmap_peaks(heatmap: Float[Tensor, "B K H W"], *, kernel: int = 3, topk: int) -> HeatmapPeaks:
    """The ``N = min(topk, K·H·W)`` best peaks of ``heatmap`` (scores in ``[0, 1]``).

    1. A location is a peak if it equals the maximum of its ``kernel × kernel`` neighbourhood
       on its own class channel (``max_pool2d`` with stride 1; beyond the border counts as
       -inf). Other locations get score 0. Equal neighbours (a plateau) are all peaks, as in
       the paper's code.
    2. The top ``N`` (class, row, column) triples by score over all ``K·H·W`` of each image,
       sorted by score descending (static shapes).
    """
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd number, got {kernel}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    _, num_classes, height, width = heatmap.shape
    local_max = F.max_pool2d(heatmap, kernel, stride=1, padding=(kernel - 1) // 2)  # [B, K, H, W]
    scores = torch.where(local_max == heatmap, heatmap, torch.zeros_like(heatmap))
    k = min(topk, num_classes * height * width)
    top, index = scores.flatten(1).topk(k, dim=1)  # [B, N], flat (class, row, column)
    cell = index % (height * width)  # [B, N]
    return HeatmapPeaks(
        scores=top, labels=index // (height * width), ys=cell // width, xs=cell % width
    )
