"""Semi-supervised training specs: a teacher–student experiment on labeled and unlabeled images.

An :class:`~fdet.specs.Experiment` with ``semi=SemiSupervised(...)`` trains with the
teacher–student step (:mod:`fdet.train.semi`): the teacher is the experiment's EMA of the
student (``Experiment.ema``), it labels the weak view of each unlabeled image, and the student
learns from the labeled batch and from the teacher's confident pseudo-labels on a strong view of
the same images (docs/semi_supervised.md).
"""

from typing import Literal

import attrs

from fdet.specs._core import (
    Spec,
    SpecError,
    float_tuple,
    non_negative,
    positive,
    probability,
)
from fdet.specs.data import Transforms

__all__ = ["SemiSupervised", "StrongAugment", "UnlabeledImages"]


def _range(lo_min: float, hi_max: float | None = None):  # type: ignore[no-untyped-def]
    """A validator of a ``(low, high)`` pair with ``lo_min <= low <= high (<= hi_max)``."""

    def check(_: object, attribute: attrs.Attribute, value: tuple[float, ...]) -> None:
        if len(value) != 2 or not lo_min <= value[0] <= value[1]:
            raise SpecError(
                f"must be a pair (low, high) with {lo_min} <= low <= high, got {value}",
                attribute.name,
            )
        if hi_max is not None and value[1] > hi_max:
            raise SpecError(f"high must be at most {hi_max}, got {value}", attribute.name)

    return check


@attrs.frozen(kw_only=True)
class StrongAugment(Spec):
    """The student's view of an unlabeled image, made from the teacher's (weak) view.

    In this order: a random crop (with ``crop_prob``: a window of at least ``crop_min_scale``
    of each side), a resize by a factor drawn uniformly from ``scale`` (scale jitter), a
    horizontal flip (with ``hflip_prob``), colour jitter (``brightness``, ``contrast``,
    ``saturation``: factors in ``[1 - s, 1 + s]``; ``hue``: a shift in ``[-hue, hue]``), then
    cutout: a number of patches drawn from ``cutout_count`` (inclusive), each a square whose
    side is a fraction ``cutout_size`` of the shorter image side, filled with gray (128).

    The geometric part is an axis-aligned map ``x' = a_x x + b_x``, ``y' = a_y y + b_y`` (``a_x``
    negative when flipped): the teacher's boxes are carried into the student's view by it, clipped
    to the view and dropped when less than ``crop_min_visible`` of their area is left, the same
    rule the training crop applies to labeled boxes.
    """

    scale: tuple[float, ...] = attrs.field(
        default=(0.75, 1.25), converter=float_tuple, validator=_range(1e-3)
    )
    hflip_prob: float = attrs.field(default=0.5, validator=probability)
    crop_prob: float = attrs.field(default=0.5, validator=probability)
    crop_min_scale: float = attrs.field(default=0.6, validator=probability)
    crop_min_visible: float = attrs.field(default=0.5, validator=probability)
    brightness: float = attrs.field(default=0.4, validator=non_negative)
    contrast: float = attrs.field(default=0.4, validator=non_negative)
    saturation: float = attrs.field(default=0.4, validator=non_negative)
    hue: float = attrs.field(default=0.1, validator=non_negative)
    cutout_count: tuple[int, ...] = attrs.field(default=(1, 5))
    cutout_size: tuple[float, ...] = attrs.field(
        default=(0.05, 0.2), converter=float_tuple, validator=_range(0.0, 1.0)
    )

    @cutout_count.validator
    def _check_count(self, attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
        value = tuple(value)
        if (
            len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] <= value[1]
        ):
            raise SpecError(
                f"must be a pair of integers (low, high) with 0 <= low <= high, got {value}",
                attribute.name,
            )

    def __attrs_post_init__(self) -> None:
        if self.hue > 0.5:
            raise SpecError(f"must be at most 0.5, got {self.hue}", "hue")
        object.__setattr__(self, "cutout_count", tuple(self.cutout_count))


@attrs.frozen(kw_only=True)
class UnlabeledImages(Spec):
    """Unlabeled images: every image file under the folder ``images`` (``.jpg``, ``.jpeg``,
    ``.png``, ``.bmp``, ``.webp``, sorted by path), or, with ``annotations``, the images a COCO
    file lists (its annotations are ignored for training; where present they measure the
    pseudo-labels' precision and recall in the log)."""

    images: str
    annotations: str | None = None


@attrs.frozen(kw_only=True)
class SemiSupervised(Spec):
    """Teacher–student training on labeled and unlabeled images (Soft Teacher / Unbiased
    Teacher style), a step of the training engine (:func:`fdet.train.semi.semi_step`).

    **Data.** ``labeled_fraction``: that fraction of the experiment's training images (a choice
    seeded by ``split_seed``, at least one image) is the labeled set; the others are the
    unlabeled set, their labels ignored. Or ``unlabeled``: the labeled set is the experiment's
    training set and the unlabeled images come from :class:`UnlabeledImages`. Exactly one of the
    two. Each step reads ``Experiment.batch_size`` labeled images and ``unlabeled_batch_size``
    unlabeled ones (a process; both split into ``Experiment.accumulate`` micro-batches).

    **Teacher.** The experiment's EMA of the student (``Experiment.ema`` is required: its
    ``decay`` is the teacher's). For ``burn_in`` iterations the student learns from the labeled
    images alone; then, with ``reset_teacher``, the teacher starts from the student's weights.
    The teacher sees the unlabeled image through ``weak`` (a training transform: resize, flip,
    crop, colour), the student through ``strong`` applied to the weak view.

    **Pseudo-labels.** The teacher's detections scoring at least ``score_threshold`` (at most
    ``max_pseudo_labels`` an image, the highest first) become padded ground truth of the strong
    view. Classification terms learn from all of them; box terms (the detector's
    ``box_terms``) only from the reliable ones: ``reliability="score"``: a score of at least
    ``box_score_threshold``; ``"jitter"`` (detectors that can refine boxes: the R-CNN family):
    Soft Teacher's box jitter, the box is jittered ``jitter_times`` times by up to
    ``jitter_scale`` of its size, refined by the teacher, and kept when the standard deviation
    of the refined boxes, relative to the box's size, is at most ``jitter_max_std``.

    **Weight.** The unlabeled terms are weighted ``unsup_weight``, ramped up linearly over
    ``unsup_warmup`` iterations after the burn-in.
    """

    labeled_fraction: float | None = None
    split_seed: int = attrs.field(default=0, validator=non_negative)
    unlabeled: UnlabeledImages | None = None
    unlabeled_batch_size: int = attrs.field(default=8, validator=positive)
    burn_in: int = attrs.field(default=500, validator=non_negative)
    reset_teacher: bool = True
    weak: Transforms = Transforms(hflip_prob=0.5)
    strong: StrongAugment = StrongAugment()
    score_threshold: float = attrs.field(default=0.5, validator=probability)
    max_pseudo_labels: int = attrs.field(default=32, validator=positive)
    reliability: Literal["score", "jitter"] = "score"
    box_score_threshold: float = attrs.field(default=0.7, validator=probability)
    jitter_times: int = attrs.field(default=10, validator=positive)
    jitter_scale: float = attrs.field(default=0.06, validator=non_negative)
    jitter_max_std: float = attrs.field(default=0.02, validator=non_negative)
    unsup_weight: float = attrs.field(default=1.0, validator=non_negative)
    unsup_warmup: int = attrs.field(default=0, validator=non_negative)

    def __attrs_post_init__(self) -> None:
        if (self.labeled_fraction is None) == (self.unlabeled is None):
            raise SpecError(
                "give exactly one of labeled_fraction (split the training set) and unlabeled "
                "(extra images)",
                "labeled_fraction",
            )
        if self.labeled_fraction is not None and not 0 < self.labeled_fraction < 1:
            raise SpecError(f"must be in (0, 1), got {self.labeled_fraction}", "labeled_fraction")
        if self.reliability not in ("score", "jitter"):
            raise SpecError(f"must be 'score' or 'jitter', got {self.reliability!r}", "reliability")
