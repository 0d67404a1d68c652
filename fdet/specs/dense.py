"""Specs of the dense-prediction pieces: anchors, assigners, box coders, postprocessing."""

from typing import Literal

import attrs

from fdet.constants import DEFAULT_SCALE_CLIP
from fdet.specs._core import (
    Spec,
    SpecError,
    each,
    finite,
    float_tuple,
    int_tuple,
    length,
    non_empty,
    non_negative,
    one_of,
    positive,
    probability,
)

Placement = Literal["nominal", "image_ratio"]
"""Where the locations of a pyramid level sit (:attr:`Anchors.placement`)."""

PLACEMENTS: tuple[Placement, ...] = ("nominal", "image_ratio")


@attrs.frozen(kw_only=True)
class Anchors(Spec):
    """Anchor boxes on every pyramid level.

    Level ``i`` has stride ``strides[i]`` and anchors of size ``base_sizes[i] * s`` for each
    ``s`` in ``octave_scales`` and each aspect ratio (height / width) in ``ratios``; an
    anchor of size ``z`` and ratio ``r`` has area ``z²``. ``truncate_sizes`` rounds sizes down
    to integers and ``round_offsets`` rounds corner offsets, as torchvision's RetinaNet does
    (the defaults), so that its weights work unchanged.

    ``placement``: how far apart the anchors of a level are laid. ``"nominal"`` (the default):
    ``strides[i]`` on both axes. ``"image_ratio"``: per axis, the padded input size over the
    level's feature size, ``(H // H_i, W // W_i)``, as torchvision's ``AnchorGenerator`` does;
    the two agree when the padded size is a multiple of the coarsest stride and differ otherwise
    (57 instead of 64 on P6 at 288 pixels). Models converted from torchvision use it, so that
    they reproduce its detections at any input size. Anchor sizes never change.
    """

    strides: tuple[int, ...] = attrs.field(
        default=(8, 16, 32, 64, 128), converter=int_tuple, validator=[non_empty, each(positive)]
    )
    base_sizes: tuple[float, ...] = attrs.field(
        default=(32.0, 64.0, 128.0, 256.0, 512.0),
        converter=float_tuple,
        validator=[non_empty, each(positive)],
    )
    octave_scales: tuple[float, ...] = attrs.field(
        default=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        converter=float_tuple,
        validator=[non_empty, each(positive)],
    )
    ratios: tuple[float, ...] = attrs.field(
        default=(0.5, 1.0, 2.0), converter=float_tuple, validator=[non_empty, each(positive)]
    )
    truncate_sizes: bool = True
    round_offsets: bool = True
    placement: Placement = attrs.field(default="nominal", validator=one_of(*PLACEMENTS))

    def __attrs_post_init__(self) -> None:
        if len(self.base_sizes) != len(self.strides):
            raise SpecError(
                f"has {len(self.base_sizes)} levels but strides has {len(self.strides)}",
                "base_sizes",
            )

    @property
    def per_location(self) -> int:
        """Anchors at each feature-map location."""
        return len(self.octave_scales) * len(self.ratios)


@attrs.frozen(kw_only=True)
class MaxIoUAssigner(Spec):
    """Label anchors by their best IoU with a ground-truth box (RetinaNet, RPN).

    IoU >= ``pos_iou``: positive; < ``neg_iou``: negative; in between: ignored. With
    ``low_quality_matches`` each ground truth also claims the anchors that overlap it best (if
    that IoU exceeds ``min_low_quality_iou``), so no object goes without a positive.
    ``crowd_ioa``: an anchor whose area lies more than this fraction inside a crowd region is
    ignored.
    """

    pos_iou: float = attrs.field(default=0.5, validator=probability)
    neg_iou: float = attrs.field(default=0.4, validator=probability)
    low_quality_matches: bool = True
    min_low_quality_iou: float = attrs.field(default=0.0, validator=probability)
    crowd_ioa: float = attrs.field(default=0.5, validator=probability)

    def __attrs_post_init__(self) -> None:
        if self.neg_iou > self.pos_iou:
            raise SpecError(f"must be <= pos_iou ({self.pos_iou}), got {self.neg_iou}", "neg_iou")


@attrs.frozen(kw_only=True)
class DeltaXYWHCoder(Spec):
    """R-CNN box deltas: ((dx, dy, dw, dh) - means) / stds. ``clip`` caps dw, dh before exp
    (None: no cap). torchvision's ``BoxCoder(weights)`` is ``stds = 1 / weights``."""

    means: tuple[float, ...] = attrs.field(
        default=(0.0, 0.0, 0.0, 0.0), converter=float_tuple, validator=[length(4), each(finite)]
    )
    stds: tuple[float, ...] = attrs.field(
        default=(1.0, 1.0, 1.0, 1.0), converter=float_tuple, validator=[length(4), each(positive)]
    )
    clip: float | None = attrs.field(default=DEFAULT_SCALE_CLIP, validator=finite)


@attrs.frozen(kw_only=True)
class DensePostprocess(Spec):
    """Dense detections to a padded set: sigmoid scores, ``score_threshold``, the top
    ``topk_per_level`` (anchor, class) pairs of each level, class-aware NMS at ``nms_iou``, at
    most ``max_detections`` an image."""

    score_threshold: float = attrs.field(default=0.05, validator=probability)
    topk_per_level: int = attrs.field(default=1000, validator=positive)
    nms_iou: float = attrs.field(default=0.5, validator=probability)
    max_detections: int = attrs.field(default=300, validator=positive)
    min_box_size: float = attrs.field(default=0.0, validator=non_negative)


@attrs.frozen(kw_only=True)
class Normalize(Spec):
    """Input normalisation done by the model: ``(x / input_range - mean) / std``, per channel.

    Images come in ``[0, input_range]`` (255 for uint8-valued tensors, 1 for torchvision-style
    float images); ``mean`` and ``std`` are in ``[0, 1]`` units.
    """

    mean: tuple[float, ...] = attrs.field(
        default=(0.485, 0.456, 0.406), converter=float_tuple, validator=[length(3), each(finite)]
    )
    std: tuple[float, ...] = attrs.field(
        default=(0.229, 0.224, 0.225), converter=float_tuple, validator=[length(3), each(positive)]
    )
    input_range: float = attrs.field(default=255.0, validator=positive)


__all__ = [
    "PLACEMENTS",
    "Anchors",
    "DeltaXYWHCoder",
    "DensePostprocess",
    "MaxIoUAssigner",
    "Normalize",
    "Placement",
]
