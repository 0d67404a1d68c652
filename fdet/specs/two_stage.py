"""Two-stage detector specs: Faster R-CNN (a region proposal network, then one Fast R-CNN stage
on its proposals) and Mask R-CNN (Faster R-CNN with a mask branch on its RoIs).

The defaults are torchvision's ``fasterrcnn_resnet50_fpn`` recipe: a ResNet-50 with frozen batch
norm and its stem and first stage frozen, an FPN on C2–C5 with 256 channels, P6 as a max-pool of
P5 (torchvision's ``LastLevelMaxPool``, read by the RPN only), the RPN of :class:`fdet.specs.RPN`
and the RoI stage of :class:`fdet.specs.RoIHead` (7×7 RoI Align on P2–P5, two fully connected
layers of 1024). ``num_classes`` has no default. Mask R-CNN adds torchvision's
``maskrcnn_resnet50_fpn`` mask branch (:class:`fdet.specs.MaskHead`: 14×14 RoI Align on P2–P5,
four 3×3 convs of 256, a transposed conv to 28×28 masks).
"""

from collections.abc import Sequence
from typing import NamedTuple

import attrs

from fdet.specs._core import SpecError, non_negative, positive, spec_of
from fdet.specs.backbones import ResNet
from fdet.specs.dense import Normalize
from fdet.specs.detectors import Detector, check_pyramid, check_strides
from fdet.specs.mask import MaskHead
from fdet.specs.necks import FPN
from fdet.specs.roi import RoIAlign, RoIHead
from fdet.specs.rpn import RPN

__all__ = ["FasterRCNN", "MaskRCNN", "check_two_stage"]


class _Levels(NamedTuple):
    out_levels: tuple[int, ...]


def pyramid_levels_of(neck: FPN, max_pool_levels: int) -> tuple[int, ...]:
    """The neck's ``out_levels``, then ``max_pool_levels`` levels above them."""
    top = neck.out_levels[-1]
    return neck.out_levels + tuple(top + i for i in range(1, max_pool_levels + 1))


def check_two_stage(
    backbone: ResNet,
    neck: FPN,
    max_pool_levels: int,
    rpn: RPN,
    pooled: Sequence[tuple[str, RoIAlign]],
) -> None:
    """The checks every region-based spec makes: the neck reads backbone levels, no max-pooled
    levels on top of a neck that makes its own, one RPN anchor stride ``2**level`` a pyramid
    level, and every RoI Align of ``pooled`` (``(field, spec)`` pairs) on pyramid levels.

    Raises:
        SpecError: naming the field.
    """
    check_pyramid(backbone, neck)
    if neck.extra_levels and max_pool_levels:
        raise SpecError(
            f"must be 0 when the neck makes extra levels {neck.extra_levels} itself",
            "max_pool_levels",
        )
    levels = pyramid_levels_of(neck, max_pool_levels)
    check_strides(rpn.anchors.strides, _Levels(levels), field="rpn.anchors.strides")
    for field, align in pooled:
        missing = [lvl for lvl in align.levels if lvl not in levels]
        if missing:
            raise SpecError(
                f"pools from levels {missing} that the pyramid {levels} does not have",
                f"{field}.levels",
            )


@attrs.frozen(kw_only=True)
class FasterRCNN(Detector):
    """Faster R-CNN (Ren et al. 2015) with a feature pyramid (Lin et al. 2017).

    - ``num_classes``: object classes (without the background, which the RoI classifier adds
      as its column 0).
    - ``backbone``: the ResNet; its ``out_levels`` must hold the neck's ``in_levels``.
    - ``neck``: the FPN (P2–P5 from C2–C5 by default, no extra convs).
    - ``max_pool_levels``: pyramid levels added above the neck's top, each a max-pool with
      kernel 1 and stride 2 of the level below (torchvision's ``LastLevelMaxPool``: P6 is every
      other pixel of P5). 0 when the neck makes all the levels itself (e.g. conv extra levels).
    - ``rpn``: the region proposal network; it reads every pyramid level (the neck's and the
      pooled ones), so ``rpn.anchors.strides`` has one stride ``2**level`` for each.
    - ``roi_head``: the Fast R-CNN stage: RoI Align on ``roi_head.roi_align.levels`` (which
      must be pyramid levels; torchvision pools from P2–P5, not P6), the box head, the
      proposal sampling, the losses and the postprocess.
    - ``normalize``: the input normalization.
    """

    num_classes: int = attrs.field(validator=positive)  # type: ignore[misc]
    backbone: ResNet = ResNet()
    neck: FPN = FPN(in_levels=(2, 3, 4, 5), out_levels=(2, 3, 4, 5), channels=256)
    max_pool_levels: int = attrs.field(default=1, validator=non_negative)
    rpn: RPN = RPN()
    roi_head: RoIHead = RoIHead()
    normalize: Normalize = Normalize()

    def __attrs_post_init__(self) -> None:
        check_two_stage(self.backbone, self.neck, self.max_pool_levels, self.rpn, self._pooled())

    def _pooled(self) -> list[tuple[str, RoIAlign]]:
        """The RoI Aligns of the spec with their fields, for :func:`check_two_stage`."""
        return [("roi_head.roi_align", self.roi_head.roi_align)]

    @property
    def pyramid_levels(self) -> tuple[int, ...]:
        """The levels of the feature pyramid: the neck's ``out_levels``, then the
        ``max_pool_levels`` levels above them."""
        return pyramid_levels_of(self.neck, self.max_pool_levels)


@attrs.frozen(kw_only=True)
class MaskRCNN(FasterRCNN):
    """Mask R-CNN (He et al. 2017): a :class:`FasterRCNN` whose detections also get instance
    masks.

    - ``mask_head``: the mask branch (:class:`fdet.specs.MaskHead`): its RoI Align on
      ``mask_head.roi_align.levels`` (which must be pyramid levels, P2–P5 in torchvision), its
      layers, its loss weight, the positive RoIs an image it learns from and how its
      predictions become masks. It trains on the positive RoIs the RoI head sampled and
      predicts a mask for each final detection.

    Every other field is :class:`FasterRCNN`'s. Training needs the data's instance masks
    (``Batch.gt_masks``).
    """

    mask_head: MaskHead = attrs.field(default=MaskHead(), validator=spec_of(MaskHead))

    def _pooled(self) -> list[tuple[str, RoIAlign]]:
        return [*super()._pooled(), ("mask_head.roi_align", self.mask_head.roi_align)]
