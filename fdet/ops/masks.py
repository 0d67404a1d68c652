"""Instance masks of region-based detectors: training targets cut from the ground truth, the
per-RoI mask loss, and pasting ``m × m`` mask predictions into image coordinates.

Everything works on padded batches with static shapes (``[B, S]`` RoIs with a ``positive``
mask, ``[B, N]`` detections with ``valid``), without host syncs, under
``torch.compile(fullgraph=True)``.

Equations (``m`` the mask resolution, 28 in Mask R-CNN):

- target of RoI ``r`` matched to gt ``g``: ``t_r = RoIAlign(mask_g, box_r, m × m)`` with one
  sample point a bin per pixel of the box (``sampling_ratio=-1``, adaptive) and
  ``aligned=False``: fractional values in ``[0, 1]``, used as soft BCE targets.
- loss of a positive RoI with class ``k``: ``Σ_{i,j} BCE(sigmoid(x_r[k, i, j]), t_r[i, j])``;
  Mask R-CNN's loss is the sum over positives divided by ``num_pos · m²``.
- pasting: the ``m × m`` probabilities, padded by ``p`` zeros on each side, are resized
  bilinearly (``align_corners=False``) onto the integer pixel window of the box expanded by
  ``(m + 2p) / m`` about its centre, and are 0 elsewhere (see :func:`paste_masks`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor
from torchvision.ops import roi_align

__all__ = [
    "PackedRois",
    "PositiveRois",
    "mask_loss",
    "mask_targets",
    "pack_positive_rois",
    "paste_masks",
    "select_mask_channel",
    "take_positive_rois",
]


def mask_targets(
    gt_masks: Shaped[Tensor, "B M H W"],
    roi_boxes: Float[Tensor, "B S 4"],
    gt_index: Int[Tensor, "B S"],
    *,
    size: int = 28,
    aligned: bool = False,
    image: Int[Tensor, "B S"] | None = None,
) -> Float[Tensor, "B S {size} {size}"]:
    """The ``size × size`` mask target of every RoI: RoI align of its matched gt mask.

    RoI ``s`` of image ``b`` is cut from ``gt_masks[b, gt_index[b, s]]`` over ``roi_boxes[b, s]``
    (xyxy pixels of the padded input) with ``torchvision.ops.roi_align`` at spatial scale 1 and
    adaptive sampling (``sampling_ratio=-1``). ``aligned=False`` samples as torchvision's Mask
    R-CNN projects its masks on the proposals; ``aligned=True`` (Detectron2's) samples at pixel
    centres, half a pixel from where ``aligned=False`` does, which is where
    :func:`paste_masks` puts the mask back: cut and pasted, a mask then comes back close to
    itself (on fdet's shapes set, the val gts cut at their own boxes and pasted back have segm AP
    0.861 against 0.705 without it; docs/masks.md). Values are fractions in ``[0, 1]`` (the
    loss uses them as soft targets; nothing is binarized). ``gt_index`` outside ``[0, M)`` (a
    negative RoI's) is clamped; such rows are meaningless and must be masked by the loss.

    ``gt_masks`` may be uint8, bool or float (``Batch.gt_masks`` is uint8). All ``B · M``
    masks are converted to ``roi_boxes``' float dtype at once, ``B · M · H · W`` floats: the
    memory of one ``roi_align`` input. With ``M = 0`` the targets are zeros.

    ``image``: the image of each RoI (default: row ``b`` is image ``b``), for RoIs of several
    images packed into one row (:func:`pack_positive_rois`).
    """
    m, height, width = gt_masks.shape[1:]
    b, s = roi_boxes.shape[:2]
    dtype = roi_boxes.dtype if roi_boxes.is_floating_point() else torch.float32
    if m == 0 or s == 0:
        return roi_boxes.new_zeros(b, s, size, size, dtype=dtype)
    masks = gt_masks.reshape(-1, 1, height, width).to(dtype)  # [B*M, 1, H, W]
    if image is None:
        image = torch.arange(b, device=gt_index.device)[:, None]  # [B, 1]
    flat_index = image * m + gt_index.clamp(0, m - 1)  # [B, S], into the B*M masks
    rois = torch.cat(
        (flat_index.reshape(-1, 1).to(dtype), roi_boxes.reshape(-1, 4).to(dtype)), dim=1
    )  # [B*S, 5]
    out = roi_align(
        masks, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=aligned
    )
    return out.reshape(b, s, size, size)  # [B, S, size, size]


def select_mask_channel(
    mask_logits: Float[Tensor, "B S K h w"], labels: Int[Tensor, "B S"]
) -> Float[Tensor, "B S h w"]:
    """The mask channel of each RoI's class: ``mask_logits[b, s, labels[b, s]]``.

    Labels are clamped to ``[0, K)`` (a padded or negative RoI's label is meaningless)."""
    b, s, k, h, w = mask_logits.shape
    index = labels.clamp(0, k - 1).reshape(b, s, 1, 1, 1).expand(b, s, 1, h, w)
    return mask_logits.gather(2, index).squeeze(2)  # [B, S, h, w]


def mask_loss(
    mask_logits: Float[Tensor, "B S K m m"],
    targets: Float[Tensor, "B S m m"],
    labels: Int[Tensor, "B S"],
    positive: Bool[Tensor, "B S"],
) -> Float[Tensor, "B S"]:
    """Per-RoI mask loss: BCE with logits of the RoI's class channel against its (soft)
    target, summed over the ``m × m`` pixels; exactly 0 where ``positive`` is False.

    Unreduced. Mask R-CNN's loss (torchvision's ``maskrcnn_loss``) is
    ``mask_loss(...).sum() / (positive.sum() · m²)``: the mean over every pixel of every
    positive RoI. ``labels`` are the class channels ``0..K-1`` of the logits. Computed in at
    least float32; entries of non-positive RoIs get zero gradient.
    """
    logits = select_mask_channel(mask_logits, labels)  # [B, S, m, m]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(
        logits, targets.to(logits.dtype), reduction="none"
    ).sum(dim=(-2, -1))  # [B, S]
    return torch.where(positive, bce, torch.zeros_like(bce))


class PositiveRois(NamedTuple):
    """At most ``P`` RoIs of each image, its positives first (in RoI order), padded."""

    roi_index: Int[Tensor, "B P"]  # into the S RoIs of the image
    valid: Bool[Tensor, "B P"]  # a positive RoI (False: padding, index meaningless)


class PackedRois(NamedTuple):
    """The valid slots of a ``[B, P]`` batch of RoIs, packed into ``T`` slots of one row."""

    index: Int[Tensor, " T"]  # into the B·P slots flattened (image b, slot p: b·P + p)
    image: Int[Tensor, " T"]  # the image of each packed slot
    valid: Bool[Tensor, " T"]  # False: padding (index meaningless)


def pack_positive_rois(valid: Bool[Tensor, "B P"], *, multiple: int) -> PackedRois:
    """The valid slots of every image, in order (image by image), packed into ``T`` slots:
    the smallest multiple of ``multiple`` that holds them all (at least ``multiple``, at most
    ``B · P``), padded at the end.

    With ``B`` images whose counts of positive RoIs differ, the ``[B, P]`` layout of
    :func:`take_positive_rois` runs a head on ``B · P`` slots for as many RoIs as the busiest
    image has, times ``B``; packed, it runs on about as many slots as there are RoIs. The
    price: ``T`` is read on the host (a sync on an accelerator) and changes from batch to
    batch, so this is for eager code (the mask head uses it only outside ``torch.compile``).
    """
    b, p = valid.shape
    total = b * p
    flat = valid.reshape(-1)
    count = int(flat.sum())
    slots = min(total, max(multiple, -(-count // multiple) * multiple))
    position = torch.arange(total, device=valid.device)
    key = torch.where(flat, position, position + total)  # valid first, in order
    index = key.topk(slots, largest=False, sorted=True).indices  # [T]
    packed = flat[index]
    index = torch.where(packed, index, torch.zeros_like(index))
    return PackedRois(index, torch.div(index, p, rounding_mode="floor"), packed)


def take_positive_rois(positive: Bool[Tensor, "B S"], *, max_rois: int) -> PositiveRois:
    """The first ``min(max_rois, S)`` positive RoIs of each image, in RoI order, padded.

    The mask branch of Mask R-CNN learns from positive RoIs only; of ``S`` sampled RoIs at
    most a fraction are positive (a quarter in the usual sampling), so gathering them into
    ``P = max_rois`` slots first saves the head's convolutions on the rest with a static
    shape. With ``max_rois`` at least the sampler's most positives an image, no positive is
    left out. Padded slots point at RoI 0 with ``valid`` False.
    """
    s = positive.shape[1]
    p = min(max_rois, s)
    position = torch.arange(s, device=positive.device)
    key = torch.where(positive, position, position + s)  # positives first, in order
    index = key.topk(p, dim=1, largest=False, sorted=True).indices  # [B, P]
    valid = positive.gather(1, index)  # [B, P]
    return PositiveRois(torch.where(valid, index, torch.zeros_like(index)), valid)


def _window_weights(
    start: Float[Tensor, "B N"],
    end: Float[Tensor, "B N"],
    size: int,
    source: int,
) -> tuple[Int[Tensor, "B N X"], Int[Tensor, "B N X"], Float[Tensor, "B N X"], Tensor]:
    """Along one image axis of ``size`` pixels: for each box the two source indices and
    weights of bilinear resizing (``align_corners=False``) of ``source`` samples onto the
    integer window ``[start, end]`` (truncated towards zero), and which pixels lie in it.

    Follows PyTorch's ``upsample_bilinear2d`` step by step: ``scale = source / length`` in
    float32 (a true division), ``src = scale · (j + 0.5) - 0.5`` rounded once to float32 (the
    kernels' fused multiply-add) and clamped at 0, ``i0 = min(floor(src), source - 1)``,
    ``λ1 = clamp(src - i0, 0, 1)``, ``i1 = i0 + 1`` unless ``i0`` is the last index.
    """
    first = start.trunc().long()  # [B, N]
    last = end.trunc().long()  # [B, N]
    length = (last - first + 1).clamp(min=1)  # [B, N]
    pixel = torch.arange(size, device=start.device)  # [X]
    j = pixel - first[..., None]  # [B, N, X], position in the window
    inside = (j >= 0) & (pixel <= last[..., None])  # [B, N, X]
    length_f = length.float()
    scale = (torch.full_like(length_f, source) / length_f).double()  # [B, N], a float32 value
    # One rounding of scale·(j + 0.5) - 0.5 to float32, as the fused multiply-add of PyTorch's
    # CPU and CUDA kernels: the float32 product is exact in float64.
    src = (scale[..., None] * (j.double() + 0.5) - 0.5).float().clamp(min=0)  # [B, N, X]
    i0 = src.floor().long().clamp(max=source - 1)
    lam1 = (src - i0.float()).clamp(0, 1)
    i1 = i0 + (i0 < source - 1).long()
    return i0.clamp(min=0), i1.clamp(min=0), lam1, inside


def paste_masks(
    mask_probs: Float[Tensor, "B N m m"],
    boxes: Float[Tensor, "B N 4"],
    image_size: tuple[int, int],
    *,
    padding: int = 1,
    threshold: float | None = None,
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"] | None = None,
    valid: Bool[Tensor, "B N"] | None = None,
) -> Float[Tensor, "B N H W"] | Bool[Tensor, "B N H W"]:
    """``m × m`` mask probabilities pasted into ``H × W`` images at their boxes, all at once.

    For each box, as torchvision's ``paste_masks_in_image`` does one box at a time:

    1. the mask is padded with ``padding`` zeros on each side (``s = m + 2·padding``), and the
       box expanded about its centre by ``s / m``, so that the padded mask covers it;
    2. the expanded box's corners are truncated to integers ``x0, y0, x1, y1``; the window is
       the pixels ``x0 <= x <= x1``, ``y0 <= y <= y1`` (``w = x1 - x0 + 1`` wide);
    3. pixel ``(y, x)`` of the window takes the padded mask resized bilinearly
       (``align_corners=False``) from ``s × s`` to ``h × w`` at ``(y - y0, x - x0)``;
       every pixel outside the window is 0.

    The resize is separable: along x, the two source columns and weights of every image
    column, then along y, each as a product with a resize matrix that has two non-zero weights
    a row and none outside the window (``[B, N, s, W]`` and ``[B, N, H, s]``); two batched
    matrix products in PyTorch's order (x first), which agree with torchvision's per-box
    ``interpolate`` to float32 rounding (a product with the zeros adds nothing; sums may fuse
    differently, an ulp apart) and write each ``[B, N, H, W]`` pixel once: on a 2-core CPU,
    2 × 100 masks pasted at 512² take 130 ms, against 435 ms for gathering the four
    neighbours of every pixel and 141 ms for torchvision's loop. On CUDA with TF32 matrix products
    allowed (``torch.backends.cuda.matmul.allow_tf32``), the weights are rounded to TF32's
    10-bit mantissa, a few pixels on mask edges. Memory: one ``[B, N, H, W]`` float
    tensor.

    ``threshold``: None returns the float probabilities; a number returns the boolean
    ``probability > threshold`` (torchvision's evaluation binarizes at ``> 0.5``).
    ``image_sizes`` (height, width of each image in a padded batch) and ``valid`` (the slots
    that hold a mask): the result is 0 outside each image and on the other slots, at no cost
    (the resize weights there are 0).
    """
    m, m2 = mask_probs.shape[-2:]
    if m != m2:
        raise ValueError(f"paste_masks: masks must be square, got {m}x{m2}")
    if threshold is not None and threshold < 0:
        raise ValueError(f"paste_masks: threshold must be >= 0, got {threshold}")
    height, width = int(image_size[0]), int(image_size[1])
    probs = mask_probs.float()
    if padding:
        probs = F.pad(probs, (padding,) * 4)  # [B, N, s, s]
    s = m + 2 * padding
    scale = float(s) / m
    box = boxes.float()
    half_w = (box[..., 2] - box[..., 0]) * 0.5 * scale  # [B, N]
    half_h = (box[..., 3] - box[..., 1]) * 0.5 * scale
    cx = (box[..., 2] + box[..., 0]) * 0.5
    cy = (box[..., 3] + box[..., 1]) * 0.5
    x_i0, x_i1, x_l1, x_in = _window_weights(cx - half_w, cx + half_w, width, s)  # [B, N, W]
    y_i0, y_i1, y_l1, y_in = _window_weights(cy - half_h, cy + half_h, height, s)  # [B, N, H]
    if image_sizes is not None:
        sizes = torch.as_tensor(image_sizes, device=probs.device)
        x_in = x_in & (torch.arange(width, device=probs.device) < sizes[:, 1:])[:, None, :]
        y_in = y_in & (torch.arange(height, device=probs.device) < sizes[:, :1])[:, None, :]
    if valid is not None:
        y_in = y_in & valid[..., None]
    # Along x: each of the s rows of the padded mask at every image column, as a product with
    # the [s, W] resize matrix of the box (two weights a column, none outside the window).
    source = torch.arange(s, device=probs.device)
    zero = probs.new_zeros(())
    x_l1 = torch.where(x_in, x_l1, zero)
    x_l0 = torch.where(x_in, 1 - x_l1, zero)
    x_w = torch.where(x_i0[:, :, None, :] == source[:, None], x_l0[:, :, None, :], zero)
    x_w = x_w + torch.where(x_i1[:, :, None, :] == source[:, None], x_l1[:, :, None, :], zero)
    rows = probs @ x_w  # [B, N, s, W]
    # Along y: every image row, with the [H, s] resize matrix (zero rows outside the window).
    y_l1 = torch.where(y_in, y_l1, zero)
    y_l0 = torch.where(y_in, 1 - y_l1, zero)
    y_w = torch.where(y_i0[..., None] == source, y_l0[..., None], zero)  # [B, N, H, s]
    y_w = y_w + torch.where(y_i1[..., None] == source, y_l1[..., None], zero)
    pasted = y_w @ rows  # [B, N, H, W], 0 outside the window
    if threshold is not None:
        return pasted > threshold
    return pasted
