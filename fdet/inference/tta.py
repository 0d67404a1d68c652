"""Test-time augmentation: a detector run on flipped and rescaled views of a batch, merged.

::

    views = tta_views(model, images, image_sizes, tta)        # Detections per view, input pixels
    detections = predict_tta(model, images, image_sizes, tta)  # merged: NMS or weighted fusion

Every view is the whole padded batch at once (one ``model.predict`` call a view) and every step
is batched with static shapes: flipping gathers each image's columns inside its own width, the
merge is one class-aware NMS call (:func:`fdet.ops.postprocess.batched_nms`) or
:func:`weighted_box_fusion` on the views' detections concatenated. No per-image Python loops.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fdet import specs
from fdet.ops.boxes import box_area, box_iou, clip_boxes
from fdet.ops.postprocess import Detections, batched_nms, nms_keep_mask, top_detections

__all__ = [
    "TTAModel",
    "flip_boxes",
    "flip_images",
    "predict_tta",
    "tta_views",
    "view_size",
    "weighted_box_fusion",
]


class _Predicts(Protocol):
    def predict(self, images: Tensor, image_sizes: Tensor) -> Detections: ...


def flip_images(
    images: Float[Tensor, "B C H W"] | Int[Tensor, "B C H W"],
    widths: Int[Tensor, " B"] | Float[Tensor, " B"],
) -> Tensor:
    """Each image of a padded batch mirrored left–right inside its own width.

    Image ``b`` occupies columns ``[0, widths[b])`` (padding to the right, as collation pads);
    its column ``x`` takes column ``widths[b] - 1 - x``, and the padding stays where it is, so
    the result is a padded batch of the same layout. Widths are rounded to whole pixels.
    """
    width = images.shape[-1]
    cols = torch.arange(width, device=images.device)  # [W]
    w = widths.to(images.device).round().long()[:, None]  # [B, 1]
    source = torch.where(cols < w, w - 1 - cols, cols)  # [B, W]
    return images.gather(-1, source[:, None, None, :].expand_as(images))


def flip_boxes(
    boxes: Float[Tensor, "B N 4"], widths: Int[Tensor, " B"] | Float[Tensor, " B"]
) -> Float[Tensor, "B N 4"]:
    """xyxy boxes mirrored about the vertical centre line of each image (``x → width - x``):
    where :func:`flip_images` moves what they frame. Its own inverse."""
    w = widths.to(boxes)[:, None]  # [B, 1]
    x1, y1, x2, y2 = boxes.unbind(-1)  # [B, N] each
    return torch.stack((w - x2, y1, w - x1, y2), dim=-1)


def view_size(height: int, width: int, scale: float, divisor: int) -> tuple[int, int]:
    """The padded size of a view at ``scale``: each side times ``scale``, rounded to the nearest
    multiple of ``divisor`` (at least one)."""
    return (
        max(divisor, round(height * scale / divisor) * divisor),
        max(divisor, round(width * scale / divisor) * divisor),
    )


def tta_views(
    model: _Predicts,
    images: Float[Tensor, "B 3 H W"] | Int[Tensor, "B 3 H W"],
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    tta: specs.TTA,
    *,
    size_divisor: int = 32,
) -> list[Detections]:
    """``model.predict`` on each view of a padded batch, boxes mapped back to the input's pixels.

    Views come scale by scale, each scale's unflipped view first. A view at scale ``s`` is the
    (flipped) padded batch resized by bilinear interpolation to :func:`view_size`, with image
    sizes multiplied by the factors actually applied (``H' / H``, ``W' / W``), which also map the
    boxes back; a flipped view's boxes are flipped back about each image's width. A view whose
    size equals the input's is the input tensor itself (no resampling). Boxes are clipped to
    ``image_sizes``; invalid slots are all zeros. Masks are not carried (``masks`` is None).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    if image_sizes.shape != (images.shape[0], 2):
        raise ValueError(
            f"expected image_sizes [{images.shape[0]}, 2], got {tuple(image_sizes.shape)}"
        )
    if size_divisor < 1:
        raise ValueError(f"size_divisor: must be >= 1, got {size_divisor}")
    height, width = images.shape[-2:]
    sizes = image_sizes.to(images.device, torch.float32)  # [B, 2] (h, w)
    widths = sizes[:, 1]  # [B]
    views = []
    for scale in tta.scales:
        new_h, new_w = view_size(height, width, scale, size_divisor)
        sy, sx = new_h / height, new_w / width
        for flip in (False, True) if tta.flip else (False,):
            view = flip_images(images, widths) if flip else images
            if (new_h, new_w) != (height, width):
                view = F.interpolate(
                    view.float(), size=(new_h, new_w), mode="bilinear", align_corners=False
                )
            view_sizes = sizes * sizes.new_tensor([sy, sx])  # [B, 2]
            det = model.predict(view, view_sizes)
            boxes = det.boxes.float() / det.boxes.new_tensor([sx, sy, sx, sy])  # [B, N, 4]
            boxes = clip_boxes(boxes, sizes)
            if flip:
                boxes = flip_boxes(boxes, widths)
            boxes = torch.where(det.valid[..., None], boxes, torch.zeros_like(boxes))
            views.append(Detections(boxes, det.scores, det.labels, det.valid))
    return views


def weighted_box_fusion(
    boxes: Float[Tensor, "B C 4"],
    scores: Float[Tensor, "B C"],
    labels: Int[Tensor, "B C"],
    valid: Bool[Tensor, "B C"],
    *,
    num_views: int,
    iou_threshold: float,
    max_detections: int,
    skip_score: float = 0.0,
    conf_type: str = "avg",
    allow_overflow: bool = False,
) -> Detections:
    """Weighted box fusion (Solovyev et al., 2019) of the detections of ``num_views`` views,
    batched with static shapes.

    Candidates that are valid, score at least ``skip_score`` and have a positive area take
    part. Clusters form around *heads*, the candidates that class-aware NMS at
    ``iou_threshold`` keeps: every other candidate joins the head of its class and image that
    it overlaps most (IoU > ``iou_threshold``; NMS suppressed it, so one exists). A cluster's
    box is the score-weighted mean of its members' boxes; its score is, for ``conf_type="avg"``,
    the members' mean score times ``min(members, num_views) / num_views`` (with
    ``allow_overflow``: times ``members / num_views``), for ``"max"`` the best member's score.
    The ``max_detections`` best clusters of each image are returned, padded.

    The reference algorithm matches each candidate, in score order, against clusters' running
    fused boxes; heads found by NMS give the same clusters when clusters are well apart (each
    detection overlaps one cluster only), and need no sequential loop.
    """
    if num_views < 1:
        raise ValueError(f"num_views: must be >= 1, got {num_views}")
    if conf_type not in ("avg", "max"):
        raise ValueError(f"conf_type: must be 'avg' or 'max', got {conf_type!r}")
    valid = valid & (scores >= skip_score) & (box_area(boxes) > 0)  # [B, C]
    heads = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=iou_threshold)  # [B, C]
    iou = box_iou(boxes, boxes)  # [B, C, C]: candidate × head
    fits = (
        (labels[:, :, None] == labels[:, None, :]) & heads[:, None, :] & (iou > iou_threshold)
    )  # [B, C, C]
    best_iou, head = torch.where(fits, iou, -1.0).max(dim=2)  # [B, C]
    # a candidate NMS suppressed but no head fits (an IoU at the threshold, computed otherwise
    # by the NMS kernel) is a cluster of its own rather than dropped
    found = best_iou > iou_threshold
    own = torch.arange(boxes.shape[1], device=boxes.device).expand_as(head)
    head = torch.where(found, head, own)  # [B, C]
    is_head = valid & (heads | ~found)  # [B, C]

    weight = torch.where(valid, scores, 0.0).to(torch.float64)  # [B, C]
    score_sum = torch.zeros_like(weight).scatter_add(1, head, weight)  # [B, C], by head
    count = torch.zeros_like(weight).scatter_add(1, head, valid.to(weight.dtype))
    weighted = weight[..., None] * boxes.to(weight.dtype)  # [B, C, 4]
    box_sum = torch.zeros_like(weighted).scatter_add(
        1, head[..., None].expand(-1, -1, 4), weighted
    )  # [B, C, 4]
    fused = torch.where(
        (score_sum > 0)[..., None],
        box_sum / score_sum.clamp(min=torch.finfo(weight.dtype).tiny)[..., None],
        boxes.to(weight.dtype),
    )
    if conf_type == "max":
        fused_scores = torch.zeros_like(weight).scatter_reduce(
            1, head, weight, reduce="amax", include_self=True
        )
    else:
        mean = score_sum / count.clamp(min=1.0)
        factor = count if allow_overflow else count.clamp(max=float(num_views))
        fused_scores = mean * factor / num_views
    return top_detections(
        fused.to(boxes.dtype),
        fused_scores.to(scores.dtype),
        labels,
        is_head,
        max_detections=max_detections,
    )


def predict_tta(
    model: _Predicts,
    images: Float[Tensor, "B 3 H W"] | Int[Tensor, "B 3 H W"],
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    tta: specs.TTA,
    *,
    size_divisor: int = 32,
) -> Detections:
    """Detections of a padded batch (pixel values 0–255, ``image_sizes`` (height, width)) merged
    over the views of ``tta``: :func:`tta_views`, concatenated along ``N``, then class-aware NMS
    (``tta.merge == "nms"``) or :func:`weighted_box_fusion` (``"wbf"``), keeping the
    ``tta.max_detections`` best of each image. ``size_divisor`` is the multiple the model's
    input sizes keep (the experiment's ``val_transforms.pad_divisor``).

    Masks are not merged: the result has boxes only (``masks`` None) even for a detector that
    predicts masks.
    """
    views = tta_views(model, images, image_sizes, tta, size_divisor=size_divisor)
    boxes = torch.cat([v.boxes for v in views], dim=1)  # [B, V * N, 4]
    scores = torch.cat([v.scores for v in views], dim=1)  # [B, V * N]
    labels = torch.cat([v.labels for v in views], dim=1)
    valid = torch.cat([v.valid for v in views], dim=1)
    if tta.merge == "wbf":
        return weighted_box_fusion(
            boxes,
            scores,
            labels,
            valid,
            num_views=len(views),
            iou_threshold=tta.iou_threshold,
            max_detections=tta.max_detections,
            skip_score=tta.skip_score,
            conf_type=tta.conf_type,
            allow_overflow=tta.allow_overflow,
        )
    return batched_nms(
        boxes,
        scores,
        labels,
        valid,
        iou_threshold=tta.iou_threshold,
        max_detections=tta.max_detections,
    )


class TTAModel:
    """A detector seen through test-time augmentation: ``predict`` is :func:`predict_tta`, and
    ``training`` / ``train`` are the detector's, so evaluation loops
    (:func:`fdet.eval.evaluate.evaluate_model`) take it in place of the detector."""

    def __init__(self, model: Any, tta: specs.TTA, *, size_divisor: int = 32) -> None:
        self.model = model
        self.tta = tta
        self.size_divisor = size_divisor

    @property
    def training(self) -> bool:
        return bool(self.model.training)

    def train(self, mode: bool = True) -> TTAModel:
        self.model.train(mode)
        return self

    def predict(
        self,
        images: Float[Tensor, "B 3 H W"] | Int[Tensor, "B 3 H W"],
        image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"] | None = None,
    ) -> Detections:
        if image_sizes is None:
            height, width = images.shape[-2:]
            image_sizes = torch.tensor([height, width], device=images.device).expand(
                images.shape[0], 2
            )
        return predict_tta(
            self.model, images, image_sizes, self.tta, size_divisor=self.size_divisor
        )
