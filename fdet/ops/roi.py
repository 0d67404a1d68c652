"""The region-of-interest stage of two-stage detectors (Fast R-CNN on top of an RPN): pooling
RoI features from a feature pyramid, sampling and labelling the RoIs a head trains on, picking
each RoI's class-specific box deltas, and turning per-RoI class scores and deltas into
detections.

Everything works on padded batches: RoIs come as ``boxes [B, R, 4]`` with ``valid [B, R]``, the
ground truth as ``gt_boxes [B, M, 4]`` with ``gt_valid [B, M]``, and every result has a static
shape. No function here synchronizes with the host or loops over images; all of them run under
``torch.compile(fullgraph=True)`` (postprocessing through the ``fdet::nms_keep_mask`` operator).

Class indices: the RoI classifier has ``K + 1`` outputs, **0 is background** and ``1 + c`` is
dataset class ``c``. Sampled RoIs carry those labels; :func:`roi_detections` returns fdet's
contiguous ``0 .. K-1`` (the class index without the background shift), like every other family.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torchvision.ops  # noqa: F401  (registers torch.ops.torchvision.roi_align)
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fdet.ops.assign import POSITIVE, assign_max_iou
from fdet.ops.boxes import ImageSize, box_area, clip_boxes, small_box_mask
from fdet.ops.coding import DEFAULT_SCALE_CLIP, decode_deltas, encode_deltas
from fdet.ops.postprocess import Detections, batched_nms
from fdet.ops.sample import sample_balanced

__all__ = [
    "SampledRoIs",
    "append_gt_boxes",
    "multiscale_roi_align",
    "roi_detections",
    "roi_levels",
    "sample_rois",
    "select_class_deltas",
]

# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------


def roi_levels(
    boxes: Float[Tensor, "*batch 4"],
    *,
    min_level: int,
    max_level: int,
    canonical_scale: float,
    canonical_level: int,
    eps: float = 1e-6,
) -> Int[Tensor, "*batch"]:
    """The pyramid level each RoI is pooled from (FPN, Lin et al. 2017, eq. 1)::

        level = clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps),
                      min_level, max_level)

    An RoI of ``canonical_scale²`` pixels (224², the ImageNet size) is pooled from
    ``canonical_level`` (P4); each halving of its side moves it one level down. ``eps`` keeps
    sides that are exact powers of two on the level the formula means despite rounding
    (torchvision's ``LevelMapper`` adds the same 1e-6). Zero-area RoIs go to ``min_level``.

    Returns:
        ``[...]`` int64 level numbers in ``[min_level, max_level]`` (not indices).
    """
    if min_level > max_level:
        raise ValueError(f"roi_levels: min_level {min_level} > max_level {max_level}")
    size = box_area(boxes).sqrt()  # [...], float32 at least
    level = torch.floor(canonical_level + torch.log2(size / canonical_scale) + eps)
    return level.clamp(min=min_level, max=max_level).to(torch.int64)


@torch.library.custom_op("fdet::roi_align_levels", mutates_args=())
def _roi_align_levels_op(
    features: list[Tensor],
    rois: Tensor,
    level: Tensor,
    scales: list[float],
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    channels = features[0].shape[1]
    out = rois.new_zeros((rois.shape[0], channels, pooled_height, pooled_width))
    for i, (feature, scale) in enumerate(zip(features, scales)):  # a loop over pyramid levels
        index = (level == i).nonzero().squeeze(1)
        if index.numel():
            out[index] = torch.ops.torchvision.roi_align(
                feature, rois[index], scale, pooled_height, pooled_width, sampling_ratio, aligned
            )
    return out


@_roi_align_levels_op.register_fake
def _(
    features: list[Tensor],
    rois: Tensor,
    level: Tensor,
    scales: list[float],
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    return rois.new_empty((rois.shape[0], features[0].shape[1], pooled_height, pooled_width))


@torch.library.custom_op("fdet::roi_align_levels_backward", mutates_args=())
def _roi_align_levels_backward_op(
    grad: Tensor,
    rois: Tensor,
    level: Tensor,
    shapes: list[int],
    scales: list[float],
    sampling_ratio: int,
    aligned: bool,
) -> list[Tensor]:
    pooled_height, pooled_width = grad.shape[-2:]
    grads = []
    for i, scale in enumerate(scales):  # a loop over pyramid levels
        shape = shapes[4 * i : 4 * i + 4]  # [B, C, H_l, W_l]
        index = (level == i).nonzero().squeeze(1)
        if index.numel():
            grads.append(
                torch.ops.torchvision._roi_align_backward(
                    grad[index].contiguous(),
                    rois[index],
                    scale,
                    pooled_height,
                    pooled_width,
                    *shape,
                    sampling_ratio,
                    aligned,
                )
            )
        else:
            grads.append(grad.new_zeros(shape))
    return grads


@_roi_align_levels_backward_op.register_fake
def _(
    grad: Tensor,
    rois: Tensor,
    level: Tensor,
    shapes: list[int],
    scales: list[float],
    sampling_ratio: int,
    aligned: bool,
) -> list[Tensor]:
    return [grad.new_empty(shapes[4 * i : 4 * i + 4]) for i in range(len(scales))]


def _roi_align_levels_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    features, rois, level, scales, _, _, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, level)
    ctx.shapes = [int(n) for f in features for n in f.shape]  # [B, C, H_l, W_l] a level
    ctx.scales, ctx.sampling_ratio, ctx.aligned = scales, sampling_ratio, aligned


def _roi_align_levels_grad(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
    rois, level = ctx.saved_tensors
    grads = _roi_align_levels_backward_op(
        grad, rois, level, ctx.shapes, ctx.scales, ctx.sampling_ratio, ctx.aligned
    )
    return grads, None, None, None, None, None, None, None


_roi_align_levels_op.register_autograd(
    _roi_align_levels_grad, setup_context=_roi_align_levels_setup
)


def multiscale_roi_align(
    features: Sequence[Float[Tensor, "B C H_l W_l"]],
    boxes: Float[Tensor, "B R 4"],
    *,
    levels: Sequence[int],
    output_size: int | tuple[int, int],
    sampling_ratio: int,
    canonical_scale: float,
    canonical_level: int,
    aligned: bool = False,
    eps: float = 1e-6,
    image: Int[Tensor, "B R"] | None = None,
) -> Float[Tensor, "B R C h w"]:
    """RoI Align (He et al., Mask R-CNN) of every RoI from its own pyramid level.

    ``features[i]`` is pyramid level ``levels[i]`` (consecutive, e.g. ``(2, 3, 4, 5)`` for
    P2–P5) with spatial scale ``2 ** -levels[i]``. Each RoI is pooled from the level that
    :func:`roi_levels` picks for it (clamped to ``levels``), by
    ``torchvision.ops.roi_align(feature, rois, output_size, 2 ** -level, sampling_ratio,
    aligned)``: a ``h × w`` grid of bins, each the mean of ``sampling_ratio²`` bilinear samples
    (``sampling_ratio <= 0``: ``ceil(bin size)`` samples a side).

    **How the levels are split.** The custom operator ``fdet::roi_align_levels`` runs the
    kernel once a level on that level's RoIs (found with ``nonzero`` inside the operator) and
    writes them into one ``[N, C, h, w]`` output; its backward operator runs torchvision's
    ``_roi_align_backward`` on the same shares. That is what torchvision's
    ``MultiScaleRoIAlign`` computes, bit for bit, values and gradients, at the same cost. To
    the caller and to ``torch.compile`` the operator has a static output shape (a fake
    implementation), so the graph has no data-dependent shape and no break; the split inside
    costs a host sync a level on CUDA, as torchvision's does.

    Measured on CPU (CPU time of one thread, best of 6), forward and backward, against the
    earlier static form that ran the kernel on every level over all RoIs with the other
    levels' RoIs moved off the map (where a sample reads nothing, but still costs its loop):
    16 images × 128 RoIs, 64 channels, P2–P5 of 128² (the shapes case): 266 against 521 ms;
    2 × 512 RoIs, 256 channels, P2–P5 of 800 × 1216: 805 against 1446 ms.

    **Matching torchvision.** ``MultiScaleRoIAlign`` infers each level's scale on its first
    call as ``2 ** round(log2(H_l / H))``, ``H_l`` the level's feature height and ``H`` the
    largest image height of that batch (before padding), then the level range from the first
    and last scales, and keeps them for every later call. For inputs padded to a multiple of
    32 this is ``2 ** -level`` whenever ``H`` exceeds about ``32 / (sqrt(2) - 1) ≈ 77`` pixels
    (the padded height is then less than ``sqrt(2) · H``), so with the same levels the outputs
    are identical; fdet never infers scales from the data.

    Args:
        features: per level ``[B, C, H_l, W_l]``, finest first.
        boxes: ``[B, R, 4]`` xyxy RoIs in input pixels. Padded rows should hold finite boxes
            (non-finite ones are pooled as off-map, giving zeros); their outputs are garbage to
            be masked by the caller.
        levels: the pyramid level of each feature map, consecutive and increasing.
        output_size: ``h`` or ``(h, w)``.
        sampling_ratio, aligned: as ``torchvision.ops.roi_align`` (``aligned`` shifts the
            pixel model by half a pixel, as Detectron2; torchvision's detectors use False).
        canonical_scale, canonical_level, eps: the level rule, see :func:`roi_levels`.
        image: the image of each RoI, an index into the features' batch (default: row ``b`` of
            ``boxes`` is image ``b``); RoIs of several images packed into one row (``[1, R]``)
            take it.

    Returns:
        ``[B, R, C, h, w]`` in the features' dtype (computed in float32 at least).
    """
    if len(features) != len(levels) or not features:
        raise ValueError(
            f"multiscale_roi_align: {len(features)} feature maps for levels {tuple(levels)}"
        )
    if any(b - a != 1 for a, b in itertools.pairwise(levels)):
        raise ValueError(
            f"multiscale_roi_align: levels must be consecutive and increasing, got {levels}"
        )
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    batch, num_rois = boxes.shape[:2]
    out_dtype = features[0].dtype
    # float32 at least, as torchvision's kernel under autocast: RoI coordinates in half
    # precision would be off by pixels
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    flat = boxes.detach().reshape(-1, 4).to(dtype)  # [N, 4], N = B * R
    finite = flat.isfinite().all(dim=-1)  # [N]
    flat = torch.where(finite[:, None], flat, 0.0)
    level = roi_levels(
        flat,
        min_level=levels[0],
        max_level=levels[-1],
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
        eps=eps,
    )  # [N]
    index = torch.where(finite, level - levels[0], -1)  # [N], -1: pooled from no level
    if image is None:
        image = torch.arange(batch, device=boxes.device).repeat_interleave(num_rois)  # [N]
    elif image.shape != boxes.shape[:2]:
        raise ValueError(
            f"multiscale_roi_align: image indices {tuple(image.shape)} for RoIs "
            f"{tuple(boxes.shape[:2])}"
        )
    else:
        image = image.reshape(-1)
    rois = torch.cat((image.to(dtype)[:, None], flat), dim=1)  # [N, 5]
    pooled = _roi_align_levels_op(
        [feature.to(dtype) for feature in features],
        rois,
        index,
        [2.0**-number for number in levels],
        size[0],
        size[1],
        sampling_ratio,
        aligned,
    )  # [N, C, h, w]
    return pooled.to(out_dtype).reshape(batch, num_rois, *pooled.shape[1:])


# ---------------------------------------------------------------------------------------------
# Training targets
# ---------------------------------------------------------------------------------------------


class SampledRoIs(NamedTuple):
    """The RoIs a box head trains on: ``S`` slots an image, chosen ones first (in the order of
    the RoIs they come from: proposals, then appended gts), padding after.

    Attributes:
        boxes: ``[B, S, 4]`` the RoIs (zeros on padding).
        labels: ``[B, S]`` int64 classifier targets: ``1 + gt label`` for positives, ``0`` for
            background and on padding.
        gt_index: ``[B, S]`` the gt slot each RoI overlaps most; meaningful where
            ``labels > 0``.
        valid: ``[B, S]`` True for the chosen RoIs (positive or background).
        target_boxes: ``[B, S, 4]`` the matched gt box of each positive, the RoI itself
            elsewhere (a harmless stand-in for box losses on decoded boxes).
        box_targets: ``[B, S, 4]`` the regression targets, ``encode_deltas(boxes,
            target_boxes)``: the positives' deltas, exactly 0 elsewhere.
        roi_index: ``[B, S]`` the candidate each slot holds: RoI ``r < R``, or appended gt slot
            ``m`` as ``R + m``; meaningful where ``valid``.
    """

    boxes: Float[Tensor, "B S 4"]
    labels: Int[Tensor, "B S"]
    gt_index: Int[Tensor, "B S"]
    valid: Bool[Tensor, "B S"]
    target_boxes: Float[Tensor, "B S 4"]
    box_targets: Float[Tensor, "B S 4"]
    roi_index: Int[Tensor, "B S"]

    @property
    def positive(self) -> Bool[Tensor, "B S"]:
        """``[B, S]`` the chosen positives (``labels > 0``)."""
        return self.labels > 0


def append_gt_boxes(
    boxes: Float[Tensor, "B R 4"],
    valid: Bool[Tensor, "B R"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_valid: Bool[Tensor, "B M"],
) -> tuple[Float[Tensor, "B R+M 4"], Bool[Tensor, "B R+M"]]:
    """The RoIs with the gt boxes appended (Fast R-CNN trains on its gts as RoIs too), valid
    where the gt is. Invalid rows become zero boxes, so padding's garbage (NaN) goes no further.
    """
    all_boxes = torch.cat((boxes, gt_boxes.to(boxes.dtype)), dim=1)  # [B, R + M, 4]
    all_valid = torch.cat((valid, gt_valid), dim=1)  # [B, R + M]
    return torch.where(all_valid[..., None], all_boxes, 0.0), all_valid


def sample_rois(
    boxes: Float[Tensor, "B R 4"],
    valid: Bool[Tensor, "B R"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    pos_iou: float,
    neg_iou: float,
    num_samples: int,
    positive_fraction: float,
    add_gt_boxes: bool = True,
    low_quality_matches: bool = False,
    min_low_quality_iou: float = 0.0,
    crowd_ioa: float = 0.5,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    keys: Float[Tensor, "B R+M"] | None = None,
    generator: torch.Generator | None = None,
) -> SampledRoIs:
    """Label the RoIs (proposals) of each image by their best gt and sample a fixed number of
    them: Fast R-CNN's training targets, for any stage of a cascade.

    1. With ``add_gt_boxes``, the non-crowd valid gts are appended to the RoIs
       (:func:`append_gt_boxes`): ``N = R + M`` candidates, so that every gt has at least one
       positive RoI (itself, IoU 1) from the start of training.
    2. Max-IoU labelling (:func:`fdet.ops.assign.assign_max_iou` with ``ignore_mask`` the
       invalid rows): positive if the best IoU with a valid, non-crowd gt is ``>= pos_iou``,
       background if ``< neg_iou``, neither in between. Faster R-CNN uses ``0.5 / 0.5``
       (background is ``[0, 0.5)``); Cascade R-CNN's stages ``0.5, 0.6, 0.7`` for both.
       Crowd gts are never matched; an RoI lying more than ``crowd_ioa`` of its area inside
       a crowd box is neither (never sampled) unless positive. ``low_quality_matches`` (off in
       Fast R-CNN) also makes each gt's best RoIs positive.
    3. :func:`fdet.ops.sample.sample_balanced`: at most ``floor(num_samples ·
       positive_fraction)`` positives, background to fill ``num_samples`` (512 and 0.25 in
       Faster R-CNN), uniformly at random (``keys`` fixes the draw: larger keys first).
    4. The chosen RoIs go first, in candidate order, into ``S = num_samples`` slots;
       ``labels = 1 + gt_labels[gt_index]`` on positives, 0 on background; regression targets
       ``encode_deltas(roi, gt, means, stds)`` (torchvision's ``BoxCoder((10, 10, 5, 5))`` is
       ``stds = (0.1, 0.1, 0.2, 0.2)``).

    An image without valid gts samples background only; an image with fewer than
    ``num_samples`` candidates to choose from gets padded slots (``valid`` False). Padded gt
    slots and padded RoIs are invisible: appending more of either changes nothing.

    Args:
        boxes, valid: ``[B, R, 4]`` RoIs (detached proposals) and their validity.
        gt_boxes, gt_labels, gt_valid, gt_crowd: ``[B, M, ...]`` padded ground truth, labels
            in ``[0, K)``.
        keys: ``[B, R + M]`` sampling keys (``[B, R]`` without ``add_gt_boxes``).

    Returns:
        :class:`SampledRoIs` of ``[B, S]`` tensors, ``S = num_samples``.

    Static shapes, no host syncs: safe under ``torch.compile(fullgraph=True)``.
    """
    batch = boxes.shape[0]
    crowd = None if gt_crowd is None else gt_crowd & gt_valid  # [B, M]
    matchable = gt_valid if crowd is None else gt_valid & ~crowd  # [B, M]
    gt_boxes = torch.where(gt_valid[..., None], gt_boxes, 0.0)  # no NaN past this point
    boxes = boxes.detach()
    if add_gt_boxes:
        boxes, valid = append_gt_boxes(boxes, valid, gt_boxes, matchable)  # [B, N, 4], [B, N]
    else:
        boxes = torch.where(valid[..., None], boxes, 0.0)
    if gt_valid.shape[1] == 0:  # static: one padded slot keeps gathers by slot in range
        gt_boxes = boxes.new_zeros(batch, 1, 4)
        gt_labels = gt_labels.new_zeros(batch, 1)
        gt_valid = gt_valid.new_zeros(batch, 1)
        crowd = None
    if keys is not None and keys.shape != valid.shape:
        raise ValueError(f"sample_rois: keys must be {tuple(valid.shape)}, got {keys.shape}")

    assignment = assign_max_iou(
        boxes,
        gt_boxes,
        gt_valid,
        pos_iou=pos_iou,
        neg_iou=neg_iou,
        low_quality_matches=low_quality_matches,
        min_low_quality_iou=min_low_quality_iou,
        ignore_mask=~valid,
        gt_crowd=crowd,
        crowd_ioa=crowd_ioa,
    )  # [B, N]
    positive = assignment.label == POSITIVE  # [B, N]
    negative = assignment.label == 0  # NEGATIVE, [B, N]
    sampled = sample_balanced(
        positive,
        negative,
        num_samples=num_samples,
        positive_fraction=positive_fraction,
        keys=keys,
        generator=generator,
    )
    chosen = sampled.positive | sampled.negative  # [B, N]
    gt_index = assignment.gt_index  # [B, N]
    is_pos = sampled.positive

    num_candidates = chosen.shape[1]
    if num_candidates < num_samples:  # static: room for every slot
        pad = num_samples - num_candidates
        boxes = F.pad(boxes, (0, 0, 0, pad))
        chosen, is_pos = F.pad(chosen, (0, pad)), F.pad(is_pos, (0, pad))
        gt_index = F.pad(gt_index, (0, pad))
    # chosen first, each group in candidate order
    order = chosen.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices
    order = order[:, :num_samples]  # [B, S]
    out_valid = chosen.gather(1, order)  # [B, S]
    out_pos = is_pos.gather(1, order)  # [B, S]
    out_boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))  # [B, S, 4]
    out_boxes = torch.where(out_valid[..., None], out_boxes, 0.0)
    out_gt = gt_index.gather(1, order)  # [B, S]
    labels = gt_labels.gather(1, out_gt).to(torch.int64) + 1  # [B, S]
    labels = torch.where(out_pos, labels, 0)
    matched = gt_boxes.to(out_boxes.dtype).gather(1, out_gt[..., None].expand(-1, -1, 4))
    target_boxes = torch.where(out_pos[..., None], matched, out_boxes)  # [B, S, 4]
    deltas = encode_deltas(out_boxes, target_boxes, means=means, stds=stds)  # [B, S, 4]
    return SampledRoIs(
        boxes=out_boxes,
        labels=labels,
        gt_index=out_gt,
        valid=out_valid,
        target_boxes=target_boxes,
        box_targets=torch.where(out_pos[..., None], deltas, 0.0),
        roi_index=order,
    )


def select_class_deltas(
    box_deltas: Float[Tensor, "B S C 4"], labels: Int[Tensor, "B S"]
) -> Float[Tensor, "B S 4"]:
    """Each RoI's deltas for class ``labels`` (``C = K + 1`` class-specific columns, background
    included) or the one class-agnostic column (``C = 1``, ``labels`` unused)."""
    if box_deltas.shape[2] == 1:
        return box_deltas[:, :, 0]
    index = labels.long()[:, :, None, None].expand(-1, -1, 1, 4)  # [B, S, 1, 4]
    return box_deltas.gather(2, index).squeeze(2)


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def roi_detections(
    class_logits: Float[Tensor, "B R K+1"],
    box_deltas: Float[Tensor, "B R C 4"],
    boxes: Float[Tensor, "B R 4"],
    valid: Bool[Tensor, "B R"],
    image_sizes: ImageSize | Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
    min_box_size: float,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float | None = DEFAULT_SCALE_CLIP,
) -> Detections:
    """Detections from the RoI head's outputs: one candidate per (RoI, class), as Fast R-CNN.

    1. ``p = softmax(class_logits)`` over ``K + 1`` classes; the background column is dropped,
       so candidate ``(r, c)`` has score ``p[r, 1 + c]`` and fdet label ``c`` (``0 .. K-1``).
    2. Its box is ``decode_deltas(boxes[r], box_deltas[r, 1 + c], means, stds, clip)`` (the
       one column of a class-agnostic head, ``C = 1``, for every class), clipped to the image.
    3. Valid where the RoI is valid, ``score > score_threshold`` and both sides of the box are
       ``>= min_box_size`` (torchvision: 0.05 and 0.01).
    4. Class-aware NMS at ``nms_iou`` within each image, and the ``max_detections`` best
       (:func:`fdet.ops.postprocess.batched_nms`).

    Per image this keeps what torchvision's ``RoIHeads.postprocess_detections`` keeps (ties
    aside), with labels one less (it counts the background as class 0).

    Args:
        class_logits: ``[B, R, K + 1]``, column 0 background.
        box_deltas: ``[B, R, K + 1, 4]`` class-specific or ``[B, R, 1, 4]`` class-agnostic.
        boxes, valid: ``[B, R, 4]`` the RoIs the outputs belong to and their validity.
        image_sizes: ``(height, width)`` or ``[B, 2]``, for clipping.

    Returns:
        :class:`fdet.ops.postprocess.Detections` with ``max_detections`` slots an image.
    """
    batch, num_rois, num_outputs = class_logits.shape
    num_classes = num_outputs - 1
    columns = box_deltas.shape[2]
    if columns not in (1, num_outputs):
        raise ValueError(
            f"roi_detections: box_deltas has {columns} columns; expected {num_outputs} "
            "(class-specific, background included) or 1 (class-agnostic)"
        )
    scores = torch.softmax(class_logits.float(), dim=-1)[..., 1:]  # [B, R, K]
    deltas = box_deltas if columns == 1 else box_deltas[:, :, 1:]  # [B, R, 1 or K, 4]
    decoded = decode_deltas(boxes[:, :, None, :], deltas, means=means, stds=stds, clip=clip)
    decoded = decoded.expand(batch, num_rois, num_classes, 4)  # [B, R, K, 4]
    flat_boxes = decoded.reshape(batch, num_rois * num_classes, 4)  # [B, R*K, 4]
    flat_boxes = clip_boxes(flat_boxes, image_sizes)
    flat_scores = scores.reshape(batch, -1)  # [B, R*K], RoI-major
    labels = torch.arange(num_classes, device=scores.device).repeat(batch, num_rois)  # [B, R*K]
    keep = (flat_scores > score_threshold) & valid[:, :, None].expand(-1, -1, num_classes).reshape(
        batch, -1
    )
    if min_box_size > 0:
        keep = keep & ~small_box_mask(flat_boxes, min_size=min_box_size)
    return batched_nms(
        flat_boxes,
        flat_scores,
        labels,
        keep,
        iou_threshold=nms_iou,
        max_detections=max_detections,
    )
