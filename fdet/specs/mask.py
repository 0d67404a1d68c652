"""The mask head of Mask R-CNN: its RoI Align, its layers, its loss weight and how its
predictions become image masks.

The defaults are torchvision's ``maskrcnn_resnet50_fpn``: 14×14 RoI Align with sampling ratio
2 on P2–P5, four 3×3 convs of 256 channels with ReLU (dilation 1, no norm), a 2×2 stride-2
transposed conv to 28×28, a 1×1 conv to one mask logit map per class; soft RoI-aligned targets
and per-class BCE over the positive RoIs; at inference the detection's class channel, sigmoid,
pasted with one pixel of padding, binarized at ``> 0.5``. torchvision's v2 recipe
(``maskrcnn_resnet50_fpn_v2``) has batch norm after each conv: ``norm=BatchNorm()``.
"""

import attrs

from fdet.specs._core import Spec, SpecError, non_negative, positive, probability, spec_of
from fdet.specs.norms import Norm
from fdet.specs.roi import RoIAlign

__all__ = ["MaskHead"]

DEFAULT_MASK_ROI_ALIGN = RoIAlign(output_size=14, sampling_ratio=2)
"""torchvision's mask RoI pooler: 14×14 bins, two samples a bin side, P2–P5."""


@attrs.frozen(kw_only=True)
class MaskHead(Spec):
    """Mask R-CNN's mask branch (:class:`fdet.models.detectors.two_stage.mask_head.MaskHead`).

    - ``roi_align``: how RoI features are pooled for it; ``output_size`` ``p`` gives masks of
      ``2p × 2p`` (:attr:`mask_size`). Its ``aligned`` also says how the gt masks are cut into
      targets (:func:`fdet.ops.masks.mask_targets`): False as torchvision, True (Detectron2's)
      at pixel centres, where the predicted masks are pasted back.
    - ``num_convs`` 3×3 convs of ``channels`` with ``dilation``, ``norm`` (None: plain convs
      with a bias; a norm: convs without bias, then the norm) and ReLU; then a 2×2 stride-2
      transposed conv of ``channels`` with ReLU and a 1×1 conv to one logit map per class.
    - ``loss_weight``: the weight of the ``"mask"`` loss term.
    - ``max_rois``: the positive RoIs an image the branch learns from, gathered first into
      that many slots (:func:`fdet.ops.masks.take_positive_rois`); None: every sampled RoI's
      slot (the positives are still the only ones that count). Set it to at least the
      sampler's most positives an image to leave none out.
    - ``slot_multiple``: in eager training the positives of all images are packed into one
      row of the smallest multiple of ``slot_multiple`` slots that holds them
      (:func:`fdet.ops.masks.pack_positive_rois`), so the head runs on about as many RoIs as
      the batch has positives, at the price of one host sync a step and a shape that changes
      from step to step. None, and always under ``torch.compile``: ``max_rois`` slots an
      image, a static shape. The loss is the same either way (padded slots never count).
    - ``threshold``: a pasted mask probability above it is foreground.
    - ``paste_padding``: zeros around each ``m × m`` mask before it is pasted
      (:func:`fdet.ops.masks.paste_masks`).
    """

    roi_align: RoIAlign = attrs.field(default=DEFAULT_MASK_ROI_ALIGN, validator=spec_of(RoIAlign))
    num_convs: int = attrs.field(default=4, validator=non_negative)
    channels: int = attrs.field(default=256, validator=positive)
    dilation: int = attrs.field(default=1, validator=positive)
    norm: Norm | None = attrs.field(default=None, validator=spec_of(Norm, optional=True))
    loss_weight: float = attrs.field(default=1.0, validator=non_negative)
    max_rois: int | None = attrs.field(default=128)
    slot_multiple: int | None = attrs.field(default=16)
    threshold: float = attrs.field(default=0.5, validator=probability)
    paste_padding: int = attrs.field(default=1, validator=non_negative)

    @max_rois.validator
    @slot_multiple.validator
    def _positive_or_none(self, attribute: attrs.Attribute, value: int | None) -> None:
        if value is not None:
            positive(self, attribute, value)

    def __attrs_post_init__(self) -> None:
        if self.norm is not None and self.num_convs > 0:
            try:
                self.norm.check_channels(self.channels, "the conv channels")
            except SpecError as e:
                raise e.under("norm") from None

    @property
    def mask_size(self) -> int:
        """The side of the predicted masks: twice the RoI Align output."""
        return 2 * self.roi_align.output_size
