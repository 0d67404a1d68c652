"""Mask R-CNN on the detector contract: a Faster R-CNN whose RoIs also feed a mask branch.

    outputs = detector(images)            # FasterRCNNOutputs, as Faster R-CNN's
    terms = detector.loss(outputs, batch)
        # Faster R-CNN's four terms; then the mask head on the positive RoIs that the RoI
        # head was trained on, against the batch's instance masks
        # -> {"rpn_cls", "rpn_box", "roi_cls", "roi_box", "mask"}
    detections = detector.postprocess(outputs, image_sizes)
        # Faster R-CNN's detections; then the mask head on their boxes -> detections.masks

**The masks' format.** By default ``detections.masks`` are each detection's mask
probabilities in its box's frame, float ``[B, N, m, m]`` (``m = 2 · roi_align.output_size``,
28), 0 on padded slots: what evaluation wants, since
:func:`fdet.eval.coco.detections_to_coco` pastes them at each original image's size on the
boxes mapped back to it, as torchvision does, which pasting at the network input's size and
resizing cannot reproduce exactly. With ``paste_masks=True`` (a constructor argument and a
plain attribute) they are instead boolean ``[B, N, H, W]`` over the padded input, pasted
on the boxes (:func:`fdet.ops.masks.paste_masks`), binarized at the spec's ``threshold`` and
False outside each image: what drawing wants. Both are static shapes with no host sync.

The mask head runs under the same autocast as the RoI head (the features' dtype when they
come in half precision); its loss is float32.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import LossTerms, Targets, Term
from fdet.models.detectors.two_stage.faster_rcnn import (
    FasterRCNN,
    FasterRCNNOutputs,
    autocast_like,
    build_faster_rcnn,
)
from fdet.models.detectors.two_stage.mask_head import MaskHead
from fdet.models.detectors.two_stage.roi_heads import RoIHeads, roi_loss
from fdet.models.detectors.two_stage.rpn import RPN
from fdet.ops.postprocess import Detections
from fdet.registry import build, register

__all__ = ["MaskRCNN", "build_mask_rcnn"]


class MaskRCNN(FasterRCNN):
    """A Mask R-CNN on the detector contract (the module docstring says how the work is split
    and what ``postprocess`` returns as masks).

    Parameter names are :class:`FasterRCNN`'s and ``mask_head.*`` (torchvision's
    ``roi_heads.mask_head`` and ``roi_heads.mask_predictor``, renamed by
    :func:`~fdet.models.detectors.two_stage.mask_head.rename_torchvision_keys`).

    Args:
        mask_head: the :class:`~fdet.models.detectors.two_stage.mask_head.MaskHead`, built for
            all pyramid levels (``feature_levels``); it pools from its own ``levels``.
        paste_masks: False (default): ``postprocess`` returns box-frame mask probabilities
            ``[B, N, m, m]``; True: boolean masks ``[B, N, H, W]`` in the input's pixels.
        The other arguments are :class:`FasterRCNN`'s.
    """

    box_terms = FasterRCNN.box_terms | {"mask"}
    """Faster R-CNN's box terms and ``"mask"``: the mask targets are cropped by the gt boxes,
    and they need ground-truth masks, which pseudo-labels do not have."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        rpn: RPN,
        roi_heads: RoIHeads,
        roi_spec: specs.RoIHead,
        mask_head: MaskHead,
        num_classes: int,
        pool_levels: int = 1,
        paste_masks: bool = False,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_range: float = 255.0,
    ) -> None:
        super().__init__(
            backbone=backbone,
            neck=neck,
            rpn=rpn,
            roi_heads=roi_heads,
            roi_spec=roi_spec,
            num_classes=num_classes,
            pool_levels=pool_levels,
            mean=mean,
            std=std,
            input_range=input_range,
        )
        if getattr(mask_head, "num_classes", num_classes) != num_classes:
            raise ValueError(
                f"the mask head predicts {mask_head.num_classes} classes, not {num_classes}"
            )
        self.mask_head = mask_head
        self.paste_masks = bool(paste_masks)

    def loss(
        self,
        outputs: FasterRCNNOutputs,
        batch: Targets,
        *,
        rpn_keys: Float[Tensor, "B A"] | None = None,
        roi_keys: Float[Tensor, "B N"] | None = None,
    ) -> LossTerms:
        """Faster R-CNN's terms (:meth:`FasterRCNN.loss`: ``"rpn_cls"``, ``"rpn_box"``,
        ``"roi_cls"``, ``"roi_box"``) and ``"mask"``: the mask head's loss
        (:meth:`~fdet.models.detectors.two_stage.mask_head.MaskHead.loss`) on the positive
        RoIs of :meth:`~FasterRCNN.training_outputs` against ``batch.gt_masks`` (its count:
        the positive RoIs' mask pixels). ``rpn_keys`` and ``roi_keys`` fix the draws as in
        Faster R-CNN.

        Raises:
            ValueError: when the batch has no ``gt_masks``.
        """
        terms: dict[str, Term] = dict(self.rpn.loss(outputs.rpn, batch, keys=rpn_keys))
        second = self.training_outputs(outputs, batch, roi_keys=roi_keys)
        terms.update(roi_loss(second.roi, second.sampled, spec=self.roi_spec))
        with autocast_like(outputs.features):
            terms["mask"] = self.mask_head.loss(
                outputs.features, second.sampled, getattr(batch, "gt_masks", None)
            )
        return terms

    def postprocess(
        self,
        outputs: FasterRCNNOutputs,
        image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    ) -> Detections:
        """Faster R-CNN's detections (:meth:`FasterRCNN.postprocess`) with the mask of each:
        box-frame probabilities ``[B, N, m, m]``, or with ``paste_masks`` boolean
        ``[B, N, H, W]`` masks over the padded input (see the module docstring)."""
        detections = super().postprocess(outputs, image_sizes)
        with autocast_like(outputs.features):
            return self.mask_head.postprocess(
                outputs.features,
                detections,
                image_sizes,
                padded_size=outputs.image_size,
                paste=self.paste_masks,
            )


@register(specs.MaskRCNN)
def build_mask_rcnn(spec: specs.MaskRCNN, *, paste_masks: bool = False) -> MaskRCNN:
    """A :class:`MaskRCNN` with the modules and the hyperparameters of ``spec``
    (``paste_masks``: see :class:`MaskRCNN`)."""
    faster = build_faster_rcnn(spec)
    return MaskRCNN(
        backbone=faster.backbone,
        neck=faster.neck,
        rpn=faster.rpn,
        roi_heads=faster.roi_heads,
        roi_spec=spec.roi_head,
        mask_head=build(
            spec.mask_head,
            in_channels=spec.neck.channels,
            num_classes=spec.num_classes,
            feature_levels=spec.pyramid_levels,
        ),
        num_classes=spec.num_classes,
        pool_levels=spec.max_pool_levels,
        paste_masks=paste_masks,
        mean=spec.normalize.mean,
        std=spec.normalize.std,
        input_range=spec.normalize.input_range,
    )
