"""What dense detectors share: normalize → backbone → neck → head, box coders and per-anchor
box and classification losses chosen by spec type, padded ground truth with at least one slot.

A dense family (RetinaNet, FCOS, ATSS, GFL ...) subclasses :class:`DenseDetector`, assigns
targets with an assigner from :mod:`fdet.ops.assign` (which also handles crowd regions), and
reuses the pieces here:

- :func:`box_coder` turns a coder spec into encode/decode functions (``DeltaXYWHCoder`` →
  :func:`fdet.ops.coding.encode_deltas` / ``decode_deltas``);
- :func:`box_loss_per_anchor` applies any ``BoxLoss`` spec to the positives' predictions
  (L1 and smooth L1 on encoded targets, GIoU on decoded boxes);
- :func:`cls_loss_per_anchor` applies any ``ClassificationLoss`` spec to per-class logits;
- :func:`fdet.ops.postprocess.detect_dense` selects, decodes, suppresses and pads detections
  given the family's scores and decoding step.

Each of these dispatches through the registry (``fdet.register``), so a loss or a coder that a
user defines and registers works in every dense family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import Detector
from fdet.ops.coding import decode_deltas, encode_deltas
from fdet.ops.losses import giou_loss, l1_loss, sigmoid_focal_loss_labels, smooth_l1_loss
from fdet.registry import build, register

__all__ = [
    "BoxCoder",
    "BoxLossFn",
    "ClsLossFn",
    "DenseDetector",
    "box_coder",
    "box_loss_per_anchor",
    "build_dense_parts",
    "check_anchors_per_location",
    "cls_loss_per_anchor",
    "matched_targets",
    "with_one_slot",
]


class DenseDetector(Detector):
    """``forward(images)`` normalizes ``images[B, 3, H, W]`` (values in ``[0, input_range]``),
    runs ``head(neck(backbone(x)))`` and returns the head's outputs unchanged.

    Subclasses add ``loss`` and ``postprocess`` (see :class:`~fdet.models.detectors.RetinaNet`).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        **normalize: Any,
    ) -> None:
        super().__init__(**normalize)
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.num_classes = int(getattr(head, "num_classes", 0))

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> Any:
        """The head's outputs for ``images[B, 3, H, W]`` (values in ``[0, input_range]``); where
        the outputs have an ``image_size`` field, it is set to the padded size ``(H, W)`` they
        were computed from (anchors and points are placed from it)."""
        outputs = self.head(self.neck(self.backbone(self.normalize(images))))
        if "image_size" in getattr(outputs, "_fields", ()):
            outputs = outputs._replace(image_size=(int(images.shape[-2]), int(images.shape[-1])))
        return outputs


def check_anchors_per_location(head: nn.Module, anchors: specs.Anchors) -> None:
    """Raises if ``head`` predicts another number of anchors a location than ``anchors`` has
    (a head without a ``num_anchors`` attribute is taken at its word)."""
    per_location = getattr(head, "num_anchors", anchors.per_location)
    if per_location != anchors.per_location:
        raise ValueError(
            f"the head predicts {per_location} anchors a location but the anchors spec has "
            f"{anchors.per_location} ({len(anchors.octave_scales)} scales × "
            f"{len(anchors.ratios)} ratios)"
        )


def build_dense_parts(spec: Any, *, head_input: str = "channels", **head_kwargs: Any) -> dict:
    """The keyword arguments every dense detector's constructor takes, built from ``spec``
    (a detector spec with ``backbone``, ``neck``, ``head`` and ``normalize``): the backbone,
    the neck on the backbone's levels, the head on the neck's ``head_input`` attribute (its
    output channels) with ``head_kwargs``, and the input normalization."""
    return {
        "backbone": build(spec.backbone),
        "neck": build(
            spec.neck,
            in_channels=spec.backbone.out_channels,
            input_levels=spec.backbone.out_levels,
        ),
        "head": build(spec.head, in_channels=getattr(spec.neck, head_input), **head_kwargs),
        "mean": spec.normalize.mean,
        "std": spec.normalize.std,
        "input_range": spec.normalize.input_range,
    }


# --- box coders ---------------------------------------------------------------------------------


class BoxCoder(NamedTuple):
    """A box coding as two functions: ``encode(anchors, boxes) -> codes`` and
    ``decode(anchors, codes) -> boxes`` (``[..., 4]``, broadcasting over leading dims)."""

    encode: Callable[[Tensor, Tensor], Tensor]
    decode: Callable[[Tensor, Tensor], Tensor]


def box_coder(spec: specs.Spec) -> BoxCoder:
    """The :class:`BoxCoder` registered for the coder ``spec``'s type."""
    coder = build(spec)
    if not isinstance(coder, BoxCoder):
        raise TypeError(
            f"the builder of {type(spec).__name__} must return a BoxCoder, got "
            f"{type(coder).__name__}"
        )
    return coder


@register(specs.DeltaXYWHCoder)
def build_delta_coder(spec: specs.DeltaXYWHCoder) -> BoxCoder:
    """R-CNN deltas with the spec's ``means``, ``stds`` and ``clip``."""
    means, stds = spec.means, spec.stds
    clip = spec.clip

    def encode(anchors: Tensor, boxes: Tensor) -> Tensor:
        return encode_deltas(anchors, boxes, means=means, stds=stds)

    def decode(anchors: Tensor, deltas: Tensor) -> Tensor:
        return decode_deltas(anchors, deltas, means=means, stds=stds, clip=clip)

    return BoxCoder(encode=encode, decode=decode)


# --- per-anchor losses ----------------------------------------------------------------------------

BoxLossFn = Callable[[Tensor, Tensor, Tensor, BoxCoder], Tensor]
"""``(codes[B, A, 4], anchors[B, A, 4], target_boxes[B, A, 4], coder) -> loss[B, A]``: the
unweighted box loss of each anchor (summed over its coordinates)."""

ClsLossFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``(logits[B, A, K], labels[B, A], positive[B, A], counted[B, A]) -> loss[B, A, K]``: the
unweighted classification loss of each anchor and class; one-hot targets of ``labels`` on the
positives, all-zero targets elsewhere, exactly 0 where ``counted`` is False."""


def box_loss_per_anchor(
    spec: specs.Spec,
    coder: BoxCoder,
    codes: Float[Tensor, "B A 4"],
    anchors: Float[Tensor, "B A 4"],
    target_boxes: Float[Tensor, "B A 4"],
) -> Float[Tensor, "B A"]:
    """The box loss of ``spec`` (any registered ``BoxLoss``) for every anchor, unweighted.

    The caller masks the result to the positives and gives the others harmless stand-ins
    (``codes`` 0, ``target_boxes`` = ``anchors``), so no NaN reaches a masked gradient.
    """
    fn: BoxLossFn = build(spec)
    return fn(codes, anchors, target_boxes, coder)


def cls_loss_per_anchor(
    spec: specs.Spec,
    logits: Float[Tensor, "B A K"],
    labels: Int[Tensor, "B A"],
    positive: Bool[Tensor, "B A"],
    counted: Bool[Tensor, "B A"],
) -> Float[Tensor, "B A K"]:
    """The classification loss of ``spec`` (any registered ``ClassificationLoss``), unweighted."""
    fn: ClsLossFn = build(spec)
    return fn(logits, labels, positive, counted)


@register(specs.L1Loss)
def build_l1_loss(spec: specs.L1Loss) -> BoxLossFn:
    """L1 between the predicted codes and the encoded targets."""

    def loss(codes: Tensor, anchors: Tensor, targets: Tensor, coder: BoxCoder) -> Tensor:
        return l1_loss(codes, coder.encode(anchors, targets)).sum(dim=-1)

    return loss


@register(specs.SmoothL1Loss)
def build_smooth_l1_loss(spec: specs.SmoothL1Loss) -> BoxLossFn:
    """Smooth L1 (``beta``) between the predicted codes and the encoded targets."""
    beta = spec.beta

    def loss(codes: Tensor, anchors: Tensor, targets: Tensor, coder: BoxCoder) -> Tensor:
        return smooth_l1_loss(codes, coder.encode(anchors, targets), beta=beta).sum(dim=-1)

    return loss


@register(specs.GIoULoss)
def build_giou_loss(spec: specs.GIoULoss) -> BoxLossFn:
    """``1 - GIoU`` between the decoded predictions and the target boxes."""
    eps = spec.eps

    def loss(codes: Tensor, anchors: Tensor, targets: Tensor, coder: BoxCoder) -> Tensor:
        return giou_loss(coder.decode(anchors, codes), targets, eps=eps)

    return loss


@register(specs.SigmoidFocalLoss)
def build_sigmoid_focal_loss(spec: specs.SigmoidFocalLoss) -> ClsLossFn:
    """Sigmoid focal loss (``alpha``, ``gamma``) from integer labels."""
    alpha, gamma = spec.alpha, spec.gamma

    def loss(logits: Tensor, labels: Tensor, positive: Tensor, counted: Tensor) -> Tensor:
        return sigmoid_focal_loss_labels(
            logits, labels, positive, valid=counted, alpha=alpha, gamma=gamma
        )

    return loss


# --- ground truth ---------------------------------------------------------------------------------


def with_one_slot(
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """A batch with ``M = 0`` gets one padded slot, so that gathers by slot index stay in range
    (a static decision on the shape: no host sync)."""
    if gt_valid.shape[1] > 0:
        return gt_boxes, gt_labels, gt_valid, gt_crowd
    batch = gt_valid.shape[0]
    return (
        gt_boxes.new_zeros(batch, 1, 4),
        gt_labels.new_zeros(batch, 1),
        gt_valid.new_zeros(batch, 1),
        None if gt_crowd is None else gt_crowd.new_zeros(batch, 1),
    )


def matched_targets(
    gt_boxes: Float[Tensor, "B M 4"],
    gt_index: Int[Tensor, "B A"],
    positive: Bool[Tensor, "B A"],
    fallback: Float[Tensor, "B A 4"],
) -> Float[Tensor, "B A 4"]:
    """The gt box of each positive anchor; ``fallback`` (e.g. the anchor itself) elsewhere, so
    padded slots' garbage never reaches a loss."""
    matched = gt_boxes.gather(1, gt_index[..., None].expand(-1, -1, 4))  # [B, A, 4]
    return torch.where(positive[..., None], matched, fallback)
