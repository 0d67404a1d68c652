"""The mask head of Mask R-CNN (He et al. 2017): a small fully convolutional network on each
RoI's pooled features predicting one ``m × m`` mask logit map per class; its training RoIs,
loss term and postprocess as pure functions of a padded batch, and as methods of the module::

    head = build(spec.mask_head, in_channels=C, num_classes=K, feature_levels=levels)
    logits = head.mask_logits(features, boxes)                   # [B, R, K, m, m]
    term = head.loss(features, sampled, batch.gt_masks)          # the "mask" Term
    detections = head.postprocess(features, detections, image_sizes, padded_size=(H, W))

which are, in the pure functions::

    rois = mask_training_rois(sampled.boxes, sampled.labels - 1, sampled.gt_index,
                              sampled.valid & (sampled.labels > 0), max_rois=spec.max_rois)
    logits = head(head.pool(features, rois.boxes))               # [B, P, K, m, m]
    term = mask_loss_term(logits, batch.gt_masks, rois, weight=spec.loss_weight)
    logits = head(head.pool(features, detections.boxes))         # [B, N, K, m, m]
    detections = mask_postprocess(logits, detections, image_sizes, ...)  # .masks

The module pools with its spec's RoI Align (:func:`fdet.ops.roi.multiscale_roi_align` on
``roi_align.levels``) from the pyramid's maps (all of ``feature_levels``, finest first);
``forward`` takes pooled features ``[..., C, p, p]`` and returns logits ``[..., K, 2p, 2p]``.

**Classes.** Channel ``k`` of the logits is fdet's label ``k`` (``0..K-1``), the label of the
detections and of the data. torchvision's predictor has ``K + 1`` channels, channel 0 for the
background (never trained: only positive RoIs reach the loss, with classes ``1..K``); its
channel ``k + 1`` is fdet's ``k``, and :func:`rename_torchvision_keys` drops its channel 0. The
RoI sampler's classifier targets (``SampledRoIs.labels``, ``1 + gt label`` for positives) are
turned into mask channels by subtracting 1.

Parameter names: ``convs.{i}.0`` / ``convs.{i}.1`` (conv, norm), ``upsample`` (the transposed
conv) and ``logits``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import Term
from fdet.models.detectors.two_stage.roi_heads import pool_pyramid
from fdet.models.layers import NormLayer, norm_factory
from fdet.ops.masks import (
    mask_loss,
    mask_targets,
    pack_positive_rois,
    paste_masks,
    select_mask_channel,
)
from fdet.ops.masks import take_positive_rois as _take_positive_rois
from fdet.ops.postprocess import Detections
from fdet.ops.roi import SampledRoIs
from fdet.registry import register

__all__ = [
    "MaskHead",
    "MaskRoIs",
    "build_mask_head",
    "mask_loss_term",
    "mask_postprocess",
    "mask_training_rois",
    "pack_mask_rois",
    "rename_torchvision_keys",
]

_SPEC = specs.MaskHead()


class MaskHead(nn.Module):
    """``num_convs`` 3×3 convs of ``channels`` (dilation ``dilation``; ``norm`` after each,
    the conv without bias when there is one) with ReLU, a 2×2 stride-2 transposed conv with
    ReLU, and a 1×1 conv to ``num_classes`` mask logits: torchvision's ``MaskRCNNHeads`` and
    ``MaskRCNNPredictor`` less the background channel.

    ``forward(pooled [..., C, p, p]) -> [..., K, 2p, 2p]`` over any leading dims (``[B, R]``
    or ``[B·R]``). Weights start as torchvision's: Kaiming normal (fan out, ReLU), zero
    biases.

    The pooling and the rest of the branch's settings (a :class:`fdet.specs.MaskHead`'s) are
    kept as plain attributes for :meth:`pool`, :meth:`mask_logits`, :meth:`loss` and
    :meth:`postprocess`: the RoIs are pooled from the maps of ``levels`` among the
    ``feature_levels`` given (default: ``levels``) with RoI Align of ``output_size`` bins,
    ``sampling_ratio``, the ``canonical_scale`` / ``canonical_level`` level rule and
    ``aligned``; ``max_rois``, ``slot_multiple`` and ``loss_weight`` shape the loss,
    ``threshold`` and ``paste_padding`` the pasted masks.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_convs: int = 4,
        channels: int = 256,
        dilation: int = 1,
        norm: NormLayer | None = None,
        levels: Sequence[int] = _SPEC.roi_align.levels,
        feature_levels: Sequence[int] | None = None,
        output_size: int = _SPEC.roi_align.output_size,
        sampling_ratio: int = _SPEC.roi_align.sampling_ratio,
        canonical_scale: float = _SPEC.roi_align.canonical_scale,
        canonical_level: int = _SPEC.roi_align.canonical_level,
        aligned: bool = _SPEC.roi_align.aligned,
        max_rois: int | None = _SPEC.max_rois,
        slot_multiple: int | None = _SPEC.slot_multiple,
        loss_weight: float = _SPEC.loss_weight,
        threshold: float = _SPEC.threshold,
        paste_padding: int = _SPEC.paste_padding,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.levels = tuple(int(level) for level in levels)
        self.feature_levels = (
            self.levels if feature_levels is None else tuple(int(lv) for lv in feature_levels)
        )
        missing = [level for level in self.levels if level not in self.feature_levels]
        if missing:
            raise ValueError(
                f"mask RoI levels {self.levels} are not all among the feature levels "
                f"{self.feature_levels} (missing {missing})"
            )
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.canonical_scale = float(canonical_scale)
        self.canonical_level = int(canonical_level)
        self.aligned = bool(aligned)
        self.max_rois = None if max_rois is None else int(max_rois)
        self.slot_multiple = None if slot_multiple is None else int(slot_multiple)
        self.loss_weight = float(loss_weight)
        self.threshold = float(threshold)
        self.paste_padding = int(paste_padding)
        make_norm = None if norm is None else norm_factory(norm)
        layers: list[nn.Module] = []
        width = in_channels
        for _ in range(num_convs):
            block: list[nn.Module] = [
                nn.Conv2d(
                    width,
                    channels,
                    3,
                    padding=dilation,
                    dilation=dilation,
                    bias=make_norm is None,
                )
            ]
            if make_norm is not None:
                block.append(make_norm(channels))
            block.append(nn.ReLU(inplace=True))
            layers.append(nn.Sequential(*block))
            width = channels
        self.convs = nn.Sequential(*layers)
        self.upsample = nn.ConvTranspose2d(width, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, pooled: Float[Tensor, "*R C p p"]) -> Float[Tensor, "*R K 2p 2p"]:
        leading = pooled.shape[:-3]
        x = pooled.reshape(-1, *pooled.shape[-3:])  # [R, C, p, p]
        x = self.convs(x)
        x = torch.relu_(self.upsample(x))  # [R, C', 2p, 2p]
        x = self.logits(x)  # [R, K, 2p, 2p]
        return x.reshape(*leading, *x.shape[-3:])

    def pool(
        self,
        features: Sequence[Float[Tensor, "B C H W"]],
        boxes: Float[Tensor, "B R 4"],
        image: Int[Tensor, "B R"] | None = None,
    ) -> Float[Tensor, "B R C p p"]:
        """Each RoI's features from its pyramid level; ``features`` are the maps of
        ``feature_levels`` (:func:`~fdet.models.detectors.two_stage.roi_heads.pool_pyramid`);
        ``image``: each RoI's image when RoIs of several images are packed in a row."""
        return pool_pyramid(self, features, boxes, image)

    def mask_logits(
        self,
        features: Sequence[Float[Tensor, "B C H W"]],
        boxes: Float[Tensor, "B R 4"],
        image: Int[Tensor, "B R"] | None = None,
    ) -> Float[Tensor, "B R K m m"]:
        """The mask logits of the RoIs ``boxes``: :meth:`pool`, then :meth:`forward`. Padded
        rows get logits too (static shapes); the caller masks them."""
        return self(self.pool(features, boxes, image))

    def loss(
        self,
        features: Sequence[Float[Tensor, "B C H W"]],
        sampled: SampledRoIs,
        gt_masks: Shaped[Tensor, "B M H W"] | None,
    ) -> Term:
        """The ``"mask"`` term of the RoIs a box stage sampled (:class:`fdet.ops.roi.SampledRoIs`,
        positives ``valid & labels > 0`` with mask channel ``labels - 1``; at most
        ``max_rois`` an image, :func:`mask_training_rois`; with ``slot_multiple``, outside
        ``torch.compile``, those of all images packed into one row, :func:`pack_mask_rois`)
        against the batch's padded instance masks ``gt_masks`` in the input's pixels
        (:func:`mask_loss_term`, weight ``loss_weight``).

        Raises:
            ValueError: when ``gt_masks`` is None (the data was loaded without masks).
        """
        if gt_masks is None:
            raise ValueError(
                "the mask loss needs the batch's instance masks, but batch.gt_masks is None: "
                "load the data with masks (fdet.data.coco.CocoDataset(..., with_masks=True), "
                "which fdet train does for a model with a mask head)"
            )
        positive = sampled.valid & (sampled.labels > 0)
        rois = mask_training_rois(
            sampled.boxes, sampled.labels - 1, sampled.gt_index, positive, max_rois=self.max_rois
        )
        if self.slot_multiple is not None and not torch.compiler.is_compiling():
            rois = pack_mask_rois(rois, multiple=self.slot_multiple)  # [1, T]
        logits = self.mask_logits(features, rois.boxes, rois.image)  # [B, P, K, m, m]
        return mask_loss_term(logits, gt_masks, rois, weight=self.loss_weight, aligned=self.aligned)

    def postprocess(
        self,
        features: Sequence[Float[Tensor, "B C H W"]],
        detections: Detections,
        image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
        *,
        padded_size: tuple[int, int],
        paste: bool = False,
    ) -> Detections:
        """``detections`` with their ``masks`` (:func:`mask_postprocess` of the logits at
        the detections' boxes, with ``threshold`` and ``paste_padding``): box-frame float
        probabilities ``[B, N, m, m]`` by default, boolean masks ``[B, N, H, W]`` over the
        ``padded_size`` input with ``paste``."""
        logits = self.mask_logits(features, detections.boxes)  # [B, N, K, m, m]
        return mask_postprocess(
            logits,
            detections,
            image_sizes,
            padded_size=padded_size,
            threshold=self.threshold,
            padding=self.paste_padding,
            paste=paste,
        )


@register(specs.MaskHead)
def build_mask_head(
    spec: specs.MaskHead,
    *,
    in_channels: int,
    num_classes: int,
    feature_levels: Sequence[int] | None = None,
) -> MaskHead:
    """``in_channels``: the neck's channels; ``num_classes``: the detector's ``K``;
    ``feature_levels``: the levels of the feature maps it is given (default: the spec's RoI
    Align levels)."""
    align = spec.roi_align
    return MaskHead(
        in_channels=in_channels,
        num_classes=num_classes,
        num_convs=spec.num_convs,
        channels=spec.channels,
        dilation=spec.dilation,
        norm=spec.norm,
        levels=align.levels,
        feature_levels=feature_levels,
        output_size=align.output_size,
        sampling_ratio=align.sampling_ratio,
        canonical_scale=align.canonical_scale,
        canonical_level=align.canonical_level,
        aligned=align.aligned,
        max_rois=spec.max_rois,
        slot_multiple=spec.slot_multiple,
        loss_weight=spec.loss_weight,
        threshold=spec.threshold,
        paste_padding=spec.paste_padding,
    )


class MaskRoIs(NamedTuple):
    """The RoIs the mask branch trains on: ``P`` slots an image, positives first; or, packed
    (:func:`pack_mask_rois`), the positives of all images in one row ``[1, T]`` with the image
    of each in ``image``."""

    boxes: Float[Tensor, "B P 4"]
    labels: Int[Tensor, "B P"]  # mask channels 0..K-1
    gt_index: Int[Tensor, "B P"]  # the matched gt slot
    positive: Bool[Tensor, "B P"]  # False: padding (or a negative RoI when max_rois is None)
    image: Int[Tensor, "B P"] | None = None  # each RoI's image; None: row b is image b


def mask_training_rois(
    boxes: Float[Tensor, "B S 4"],
    labels: Int[Tensor, "B S"],
    gt_index: Int[Tensor, "B S"],
    positive: Bool[Tensor, "B S"],
    *,
    max_rois: int | None = _SPEC.max_rois,
) -> MaskRoIs:
    """The sampled RoIs that the mask branch learns from.

    ``labels`` are mask channels ``0..K-1`` (``SampledRoIs.labels - 1``), ``positive`` the
    positive RoIs (``SampledRoIs.labels > 0``). With ``max_rois`` the first ``min(max_rois,
    S)`` positives of each image are gathered into as many slots
    (:func:`fdet.ops.masks.take_positive_rois`), so the head runs on those only; with None
    every slot is kept as it is.
    """
    if max_rois is None:
        return MaskRoIs(boxes, labels, gt_index, positive)
    taken = _take_positive_rois(positive, max_rois=max_rois)
    index = taken.roi_index  # [B, P]
    return MaskRoIs(
        boxes=boxes.gather(1, index[..., None].expand(-1, -1, 4)),
        labels=labels.gather(1, index),
        gt_index=gt_index.gather(1, index),
        positive=taken.valid,
    )


def pack_mask_rois(rois: MaskRoIs, *, multiple: int) -> MaskRoIs:
    """``rois`` (``[B, P]``, one row an image) with the positives of all images packed into
    one row ``[1, T]``, ``T`` the smallest multiple of ``multiple`` that holds them
    (:func:`fdet.ops.masks.pack_positive_rois`), ``image`` saying whose each is. The mask head
    then runs on about as many RoIs as the batch has positives rather than ``B · P``, with the
    same loss (padding never counts). ``T`` is read on the host: eager code only."""
    packed = pack_positive_rois(rois.positive, multiple=multiple)

    def take(values: Tensor) -> Tensor:
        return values.reshape(-1, *values.shape[2:])[packed.index][None]

    return MaskRoIs(
        boxes=take(rois.boxes),
        labels=take(rois.labels),
        gt_index=take(rois.gt_index),
        positive=packed.valid[None],
        image=packed.image[None],
    )


def mask_loss_term(
    mask_logits: Float[Tensor, "B P K m m"],
    gt_masks: Shaped[Tensor, "B M H W"],
    rois: MaskRoIs,
    *,
    weight: float = _SPEC.loss_weight,
    aligned: bool = _SPEC.roi_align.aligned,
) -> Term:
    """The ``"mask"`` term: per-class BCE of each positive RoI's class channel against its
    RoI-aligned gt mask (:func:`fdet.ops.masks.mask_targets` with ``aligned``, the mask head's
    RoI Align setting; :func:`fdet.ops.masks.mask_loss`),

        L_mask = Σ_{r positive} Σ_{i,j} BCE(x_r[k_r, i, j], t_r[i, j]) / (num_pos · m²),

    as a term whose total is the sum and whose count is ``num_pos · m²``: the mean over the
    positives' pixels, torchvision's ``maskrcnn_loss``. ``gt_masks`` are the batch's padded
    masks (``Batch.gt_masks``) in the input's pixels.
    """
    size = mask_logits.shape[-1]
    targets = mask_targets(
        gt_masks, rois.boxes, rois.gt_index, size=size, aligned=aligned, image=rois.image
    )  # [B, P, m, m]
    per_roi = mask_loss(mask_logits, targets, rois.labels, rois.positive)  # [B, P]
    count = rois.positive.sum().to(per_roi.dtype) * (size * size)
    return Term(per_roi.sum(), count, float(weight))


def mask_postprocess(
    mask_logits: Float[Tensor, "B N K m m"],
    detections: Detections,
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    padded_size: tuple[int, int],
    threshold: float = _SPEC.threshold,
    padding: int = _SPEC.paste_padding,
    paste: bool = True,
) -> Detections:
    """``detections`` with their ``masks``: the logit map of each detection's label, its
    sigmoid pasted at its box into the ``padded_size`` (H, W) input
    (:func:`fdet.ops.masks.paste_masks`) and binarized at ``> threshold``.

    A mask is False outside its image's ``image_sizes`` (height, width) and everywhere on
    padded detection slots: ``masks`` is boolean ``[B, N, H, W]`` in the input's pixels,
    aligned with ``detections.boxes``.

    ``paste=False`` stops before pasting: ``masks`` are then the float probabilities
    ``[B, N, m, m]`` in each box's frame (0 on padded slots), ``H · W / m²`` times smaller;
    evaluation pastes them at each original image's size, as torchvision does
    (:func:`fdet.eval.detections_to_coco`), which pasting at the input's size and mapping
    back cannot reproduce exactly (docs/masks.md).
    """
    height, width = padded_size
    probs = torch.sigmoid(select_mask_channel(mask_logits, detections.labels).float())
    if not paste:
        valid = detections.valid[..., None, None]
        return detections._replace(masks=torch.where(valid, probs, torch.zeros_like(probs)))
    masks = paste_masks(
        probs,
        detections.boxes,
        (height, width),
        padding=padding,
        threshold=threshold,
        image_sizes=image_sizes,
        valid=detections.valid,
    )  # [B, N, H, W], False outside each image and on padded slots
    return detections._replace(masks=masks)


_CONV_KEY = re.compile(r"^mask_head\.(\d+)\.(\d+)\.(.+)$")
_OLD_CONV_KEY = re.compile(r"^mask_head\.mask_fcn(\d+)\.(weight|bias)$")


def rename_torchvision_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's mask parameters (the keys under ``roi_heads.``) renamed for
    :class:`MaskHead`: ``mask_head.{i}.{j}.*`` (``MaskRCNNHeads``: conv, norm) and its older
    ``mask_head.mask_fcn{i+1}.*`` → ``convs.{i}.{j}.*``; ``mask_predictor.conv5_mask.*`` →
    ``upsample.*``; ``mask_predictor.mask_fcn_logits.*`` → ``logits.*`` without its first
    (background) channel. Keys of other parts are left out."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if m := _CONV_KEY.match(key):
            out[f"convs.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = value
        elif m := _OLD_CONV_KEY.match(key):
            out[f"convs.{int(m.group(1)) - 1}.0.{m.group(2)}"] = value
        elif key.startswith("mask_predictor.conv5_mask."):
            out["upsample." + key.removeprefix("mask_predictor.conv5_mask.")] = value
        elif key.startswith("mask_predictor.mask_fcn_logits."):
            out["logits." + key.removeprefix("mask_predictor.mask_fcn_logits.")] = value[1:]
    return out
