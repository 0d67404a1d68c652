"""Specs of CenterNet ("Objects as Points", Zhou et al. 2019): the up-sampling neck, the
three-branch head, the heatmap radius and loss, the peak postprocess, and the detector.

The defaults are the paper's ResNet-18 model: C5 up-sampled to stride 4 through (256, 128, 64)
channels, 64-channel head branches, a heatmap prior of 0.1, loss weights 1 / 0.1 / 1, the top
100 peaks. The one deliberate change is the Gaussian radius: exact roots with
``min_overlap=0.3`` (see :class:`GaussianRadius`).
"""

from typing import Literal

import attrs

from fdet.specs._core import (
    Spec,
    SpecError,
    each,
    int_tuple,
    non_empty,
    non_negative,
    one_of,
    open_unit,
    positive,
    probability,
    spec_of,
)
from fdet.specs.backbones import ResNet
from fdet.specs.dense import Normalize
from fdet.specs.detectors import Detector, check_pyramid
from fdet.specs.norms import BatchNorm, Norm


@attrs.frozen(kw_only=True)
class CenterNetNeck(Spec):
    """The backbone map ``C{in_level}`` up-sampled by one 2× stage per entry of ``channels``.

    Each stage is a 3×3 conv to ``channels[i]`` + norm + ReLU, then a 4×4 stride-2 transposed
    conv + norm + ReLU (the transposed conv starts as bilinear up-sampling). Three stages from
    C5 (stride 32) end at stride 4: the output level is ``in_level - len(channels)``.
    """

    in_level: int = attrs.field(default=5, validator=one_of(2, 3, 4, 5))
    channels: tuple[int, ...] = attrs.field(
        default=(256, 128, 64), converter=int_tuple, validator=[non_empty, each(positive)]
    )
    norm: Norm = attrs.field(default=BatchNorm(), validator=spec_of(Norm))

    def __attrs_post_init__(self) -> None:
        if self.in_level - len(self.channels) < 0:
            raise SpecError(
                f"has {len(self.channels)} 2× stages, more than level {self.in_level} allows "
                f"(the output stride would be below 1)",
                "channels",
            )
        for i, c in enumerate(self.channels):
            try:
                self.norm.check_channels(c, f"channels[{i}]")
            except SpecError as e:
                raise e.under("norm") from None

    @property
    def in_levels(self) -> tuple[int, ...]:
        """The backbone level read (one)."""
        return (self.in_level,)

    @property
    def out_levels(self) -> tuple[int, ...]:
        """The level of the output map: ``in_level - len(channels)`` (2, stride 4, by default)."""
        return (self.in_level - len(self.channels),)

    @property
    def out_channels(self) -> int:
        """Channels of the output map."""
        return self.channels[-1]


@attrs.frozen(kw_only=True)
class CenterNetHead(Spec):
    """Three branches on the neck's map, each a 3×3 conv of ``channels`` + ReLU + 1×1 conv:
    the class heatmap (``num_classes`` logits, bias from ``prior_prob``), the box size
    ``(w, h)`` and the centre offset ``(dx, dy)``, both in output cells."""

    num_classes: int = attrs.field(validator=positive)
    channels: int = attrs.field(default=64, validator=positive)
    prior_prob: float = attrs.field(default=0.1, validator=open_unit)


@attrs.frozen(kw_only=True)
class GaussianRadius(Spec):
    """The radius of each object's Gaussian on the heatmap: CornerNet's rule
    (:func:`fdet.ops.heatmap.gaussian_radius`) on the box size in output cells, floored.

    ``variant="exact"`` solves the rule's three quadratics exactly, so that a box with its
    corners within the radius of the ground truth's keeps IoU >= ``min_overlap``.
    ``"cornernet"`` is the arithmetic of the code released with CornerNet and CenterNet, which
    makes radii larger than that (used there with ``min_overlap=0.7``). The default,
    ``exact`` at 0.3, gives radii of 0.7 to 0.83 times the released code's at 0.7 while keeping
    the rule's guarantee.
    """

    min_overlap: float = attrs.field(default=0.3, validator=open_unit)
    variant: Literal["exact", "cornernet"] = attrs.field(
        default="exact", validator=one_of("exact", "cornernet")
    )


@attrs.frozen(kw_only=True)
class HeatmapFocalLoss(Spec):
    """The penalty-reduced focal loss on the heatmap (:func:`fdet.ops.heatmap.heatmap_focal_loss`)
    with exponents ``alpha`` (focusing) and ``beta`` (penalty reduction near peaks), weighted
    by ``weight`` in the objective."""

    alpha: float = attrs.field(default=2.0, validator=non_negative)
    beta: float = attrs.field(default=4.0, validator=non_negative)
    weight: float = attrs.field(default=1.0, validator=non_negative)


@attrs.frozen(kw_only=True)
class CenterNetPostprocess(Spec):
    """Peaks to detections: local maxima over ``kernel × kernel`` (no NMS), the ``topk`` best
    (class, location) pairs of each image, valid where the score is above
    ``score_threshold``."""

    topk: int = attrs.field(default=100, validator=positive)
    score_threshold: float = attrs.field(default=0.01, validator=probability)
    kernel: int = attrs.field(default=3, validator=positive)

    def __attrs_post_init__(self) -> None:
        if self.kernel % 2 == 0:
            raise SpecError(f"must be odd, got {self.kernel}", "kernel")


@attrs.frozen(kw_only=True)
class CenterNet(Detector):
    """CenterNet: ResNet → up-sampling neck → heatmap, size and offset branches at stride 4.

    Objects are heatmap peaks at their centres; the box is the peak plus its offset, ± half the
    predicted size. Losses: ``heatmap_loss`` on the heatmap, L1 on the size (``size_weight``,
    0.1) and on the offset (``offset_weight``, 1) at the objects' centres, all normalized by
    the number of objects. ``head`` (which holds ``num_classes``) has no default.
    """

    backbone: ResNet = ResNet(depth=18, norm=BatchNorm(), frozen_stages=-1, out_levels=(5,))
    neck: CenterNetNeck = CenterNetNeck()
    head: CenterNetHead
    radius: GaussianRadius = GaussianRadius()
    heatmap_loss: HeatmapFocalLoss = HeatmapFocalLoss()
    size_weight: float = attrs.field(default=0.1, validator=non_negative)
    offset_weight: float = attrs.field(default=1.0, validator=non_negative)
    postprocess: CenterNetPostprocess = CenterNetPostprocess()
    normalize: Normalize = Normalize()

    def __attrs_post_init__(self) -> None:
        check_pyramid(self.backbone, self.neck)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def stride(self) -> int:
        """The output stride in input pixels: ``2 ** neck.out_levels[0]`` (4 by default)."""
        return 2 ** self.neck.out_levels[0]


__all__ = [
    "CenterNet",
    "CenterNetHead",
    "CenterNetNeck",
    "CenterNetPostprocess",
    "GaussianRadius",
    "HeatmapFocalLoss",
]
