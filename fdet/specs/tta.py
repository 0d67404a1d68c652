"""Test-time augmentation: which views of a batch a detector sees, and how their detections merge.

:func:`fdet.inference.tta.predict_tta` runs a detector on every view (each scale, and each
scale horizontally flipped when ``flip``), maps the views' boxes back to the input's pixels, and
merges them by class-aware NMS or by weighted box fusion (docs/inference.md).
"""

from __future__ import annotations

from typing import Literal

import attrs

from fdet.specs._core import (
    Spec,
    SpecError,
    each,
    float_tuple,
    non_empty,
    non_negative,
    one_of,
    positive,
    probability,
)

__all__ = ["TTA", "Merge", "WBFConf"]

Merge = Literal["nms", "wbf"]
WBFConf = Literal["avg", "max"]


def _scale(_: object, attribute: attrs.Attribute, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, float):
        raise SpecError(f"must be a number, got {value!r}", attribute.name)
    positive(_, attribute, value)


def _iou(_: object, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise SpecError(f"must be in [0, 1), got {value!r}", attribute.name)


def _bool(_: object, attribute: attrs.Attribute, value: bool) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"must be true or false, got {value!r}", attribute.name)


def _count(_: object, attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError(f"must be a positive integer, got {value!r}", attribute.name)


@attrs.frozen(kw_only=True)
class TTA(Spec):
    """Test-time augmentation.

    Views: every factor of ``scales`` (the padded batch resized by bilinear interpolation, its
    size rounded to the model's size divisor, so the factor applied is the nearest one that
    keeps it), each also horizontally flipped when ``flip``: ``len(scales) × (2 if flip else 1)``
    forward passes. ``(1.0,)`` without flip is the model alone.

    Merging the views' detections (all of them, in the input's pixels):

    - ``"nms"``: class-aware NMS at ``iou_threshold``; the ``max_detections`` best survivors.
    - ``"wbf"``: weighted box fusion (Solovyev et al., 2019). Detections scoring below
      ``skip_score`` and boxes of zero area are left out; clusters of one class form around the
      detections that class-aware NMS at ``iou_threshold`` keeps (the heads), and each other
      detection joins the head of its class it overlaps most (IoU > ``iou_threshold``). A
      cluster's box is the score-weighted mean of its members' boxes; its score, with
      ``conf_type="avg"``, is the members' mean score times ``min(members, views) / views``
      (the sum over the views when no view gives more than one member; with
      ``allow_overflow``, times ``members / views``, unclipped), with ``"max"``, the best
      member's score.
    """

    flip: bool = attrs.field(default=True, validator=_bool)
    scales: tuple[float, ...] = attrs.field(
        default=(1.0,), converter=float_tuple, validator=[non_empty, each(_scale)]
    )
    merge: Merge = attrs.field(default="nms", validator=one_of("nms", "wbf"))
    iou_threshold: float = attrs.field(default=0.55, validator=_iou)
    max_detections: int = attrs.field(default=100, validator=_count)
    skip_score: float = attrs.field(default=0.0, validator=[non_negative, probability])
    conf_type: WBFConf = attrs.field(default="avg", validator=one_of("avg", "max"))
    allow_overflow: bool = attrs.field(default=False, validator=_bool)

    @property
    def num_views(self) -> int:
        """The forward passes a batch takes: ``len(scales) × (2 if flip else 1)``."""
        return len(self.scales) * (2 if self.flip else 1)
