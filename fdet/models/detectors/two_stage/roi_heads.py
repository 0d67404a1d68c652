"""The RoI heads of a two-stage detector (Fast R-CNN, Girshick 2015, on FPN features): pool
each proposal's features, classify it into ``K + 1`` classes (0 = background) and refine its
box; the targets, losses and postprocess of that stage as pure functions of a padded batch.

    outputs = heads(features, proposals)               # RoIOutputs [B, R, K + 1], [B, R, C, 4]
    sampled = roi_targets(proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, gt_crowd,
                          spec=spec)                   # SampledRoIs [B, S], training only
    outputs = heads(features, sampled.boxes)           # the head on the sampled RoIs
    terms = roi_loss(outputs, sampled, spec=spec)      # {"roi_cls", "roi_box"}
    detections = roi_postprocess(outputs, proposals, proposal_valid, image_sizes, spec=spec)

``C`` is ``K + 1`` (class-specific deltas, background column included, as torchvision lays
them out) or 1 (class-agnostic, Cascade R-CNN). A cascade calls the same functions once per
stage with that stage's :class:`fdet.specs.RoIHead`. docs/two_stage.md ("RoI heads") puts each
equation next to the function that computes it.

Parameter names: ``box_head.convs.{i}.0`` / ``.1`` (conv, norm; ``"4conv1fc"``),
``box_head.fcs.{j}`` (fully connected layers), ``box_predictor.cls_score`` and
``box_predictor.bbox_pred``. :func:`rename_torchvision_keys` maps torchvision's ``RoIHeads``
names (``TwoMLPHead``'s ``fc6`` / ``fc7``, ``FastRCNNConvFCHead``'s numbered layers) onto
them; its ``box_predictor`` loads unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import Term
from fdet.models.detectors.dense import box_coder, box_loss_per_anchor
from fdet.models.layers import NormLayer, norm_factory
from fdet.ops.boxes import ImageSize
from fdet.ops.losses import masked_sum, softmax_cross_entropy
from fdet.ops.postprocess import Detections
from fdet.ops.roi import (
    SampledRoIs,
    multiscale_roi_align,
    roi_detections,
    sample_rois,
    select_class_deltas,
)
from fdet.registry import register
from fdet.specs.roi import BOX_HEAD_KINDS, BoxHeadKind

__all__ = [
    "BoxHead",
    "BoxPredictor",
    "RoIHeads",
    "RoIOutputs",
    "build_roi_heads",
    "pool_pyramid",
    "rename_torchvision_keys",
    "roi_loss",
    "roi_postprocess",
    "roi_targets",
]

_SPEC = specs.RoIHead()


class RoIOutputs(NamedTuple):
    """The box head's predictions for ``R`` RoIs an image."""

    class_logits: Float[Tensor, "B R K+1"]  # column 0: background
    box_deltas: Float[Tensor, "B R C 4"]  # C = K + 1 (class-specific) or 1 (class-agnostic)


class BoxHead(nn.Module):
    """From pooled RoI features ``[N, C, h, w]`` to a vector ``[N, fc_channels]`` an RoI.

    ``kind="2fc"``: flatten, two fully connected layers with ReLU (torchvision's
    ``TwoMLPHead``). ``kind="4conv1fc"``: ``num_convs`` 3×3 convs (``norm``, ReLU; a bias only
    without norm), flatten, one fully connected layer with ReLU (torchvision's v2
    ``FastRCNNConvFCHead``). Initialisation: convs He-normal (fan out), fully connected layers
    Xavier-uniform, biases 0.

    A batch norm in training computes its statistics over every row it is given, the padded
    slots of a sample included (all slots are filled when every image has ``S`` candidates
    to sample from, as with 2000 training proposals); a group norm has no such coupling.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        roi_size: int | tuple[int, int] = 7,
        kind: BoxHeadKind = "2fc",
        fc_channels: int = 1024,
        num_convs: int = 4,
        conv_channels: int = 256,
        norm: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if kind not in BOX_HEAD_KINDS:
            raise ValueError(f"kind must be one of {BOX_HEAD_KINDS}, got {kind!r}")
        height, width = (roi_size, roi_size) if isinstance(roi_size, int) else roi_size
        self.out_channels = fc_channels
        self.convs = nn.ModuleList()
        channels = in_channels
        if kind == "4conv1fc":
            make_norm = None if norm is None else norm_factory(norm)
            for _ in range(num_convs):
                conv = nn.Conv2d(channels, conv_channels, 3, padding=1, bias=make_norm is None)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
                layers = [conv] if make_norm is None else [conv, make_norm(conv_channels)]
                self.convs.append(nn.Sequential(*layers))
                channels = conv_channels
        num_fcs = 2 if kind == "2fc" else 1
        features = channels * height * width
        self.fcs = nn.ModuleList()
        for _ in range(num_fcs):
            fc = nn.Linear(features, fc_channels)
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
            self.fcs.append(fc)
            features = fc_channels

    def forward(self, x: Float[Tensor, "N C h w"]) -> Float[Tensor, "N D"]:
        for conv in self.convs:
            x = torch.relu(conv(x))
        x = x.flatten(1)
        for fc in self.fcs:
            x = torch.relu(fc(x))
        return x


class BoxPredictor(nn.Module):
    """``cls_score``: ``K + 1`` logits (0 = background); ``bbox_pred``: ``4 (K + 1)`` deltas
    (torchvision's ``FastRCNNPredictor`` layout, class-major) or 4 with ``class_agnostic``.
    Initialised as Fast R-CNN: normal weights of std 0.01 (scores) and 0.001 (deltas), zero
    biases."""

    def __init__(self, *, in_channels: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.num_columns = 1 if class_agnostic else num_classes + 1
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, 4 * self.num_columns)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Float[Tensor, "N D"]) -> tuple[Tensor, Tensor]:
        """``([N, K + 1], [N, C, 4])``."""
        return self.cls_score(x), self.bbox_pred(x).unflatten(-1, (self.num_columns, 4))


class RoIHeads(nn.Module):
    """Multi-scale RoI Align, a :class:`BoxHead` and a :class:`BoxPredictor`.

    ``forward(features, boxes[B, R, 4]) -> RoIOutputs``: ``features`` are the neck's maps of
    ``feature_levels`` (default: ``levels``); the RoIs are pooled from those of ``levels``
    (:func:`fdet.ops.roi.multiscale_roi_align`). Padded rows of ``boxes`` get outputs too
    (static shapes); the caller masks them.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        levels: Sequence[int] = (2, 3, 4, 5),
        feature_levels: Sequence[int] | None = None,
        output_size: int = 7,
        sampling_ratio: int = 2,
        canonical_scale: float = 224.0,
        canonical_level: int = 4,
        aligned: bool = False,
        head_kind: BoxHeadKind = "2fc",
        fc_channels: int = 1024,
        num_convs: int = 4,
        conv_channels: int = 256,
        norm: NormLayer | None = None,
        class_agnostic: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.levels = tuple(int(level) for level in levels)
        self.feature_levels = self.levels if feature_levels is None else tuple(feature_levels)
        missing = [level for level in self.levels if level not in self.feature_levels]
        if missing:
            raise ValueError(
                f"RoI levels {self.levels} are not all among the feature levels "
                f"{self.feature_levels} (missing {missing})"
            )
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned
        self.box_head = BoxHead(
            in_channels=in_channels,
            roi_size=output_size,
            kind=head_kind,
            fc_channels=fc_channels,
            num_convs=num_convs,
            conv_channels=conv_channels,
            norm=norm,
        )
        self.box_predictor = BoxPredictor(
            in_channels=fc_channels, num_classes=num_classes, class_agnostic=class_agnostic
        )

    def pool(
        self, features: Sequence[Float[Tensor, "B C H W"]], boxes: Float[Tensor, "B R 4"]
    ) -> Float[Tensor, "B R C h w"]:
        """Each RoI's features from its pyramid level (:func:`pool_pyramid`)."""
        return pool_pyramid(self, features, boxes)

    def forward(
        self, features: Sequence[Float[Tensor, "B C H W"]], boxes: Float[Tensor, "B R 4"]
    ) -> RoIOutputs:
        batch, num_rois = boxes.shape[:2]
        pooled = self.pool(features, boxes).flatten(0, 1)  # [B*R, C, h, w]
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        return RoIOutputs(
            class_logits=class_logits.unflatten(0, (batch, num_rois)),  # [B, R, K + 1]
            box_deltas=box_deltas.unflatten(0, (batch, num_rois)),  # [B, R, C, 4]
        )


def pool_pyramid(
    pooler: RoIHeads | nn.Module,
    features: Sequence[Float[Tensor, "B C H W"]],
    boxes: Float[Tensor, "B R 4"],
    image: Int[Tensor, "B R"] | None = None,
) -> Float[Tensor, "B R C h w"]:
    """RoI Align of ``boxes`` with the settings a pooling module keeps (``feature_levels``,
    ``levels``, ``output_size``, ``sampling_ratio``, ``canonical_scale``, ``canonical_level``,
    ``aligned``; the RoI heads and the mask head): ``features`` are the maps of its
    ``feature_levels``, the RoIs are pooled from those of its ``levels``
    (:func:`fdet.ops.roi.multiscale_roi_align`; ``image``: each RoI's image, for RoIs of
    several images packed in a row)."""
    feature_levels, levels = pooler.feature_levels, pooler.levels
    if len(features) != len(feature_levels):
        raise ValueError(
            f"expected {len(feature_levels)} feature maps (levels {feature_levels}), "
            f"got {len(features)}"
        )
    first = feature_levels.index(levels[0])
    return multiscale_roi_align(
        features[first : first + len(levels)],
        boxes,
        levels=levels,
        output_size=pooler.output_size,
        sampling_ratio=pooler.sampling_ratio,
        canonical_scale=pooler.canonical_scale,
        canonical_level=pooler.canonical_level,
        aligned=pooler.aligned,
        image=image,
    )


@register(specs.RoIHead)
def build_roi_heads(
    spec: specs.RoIHead,
    *,
    in_channels: int,
    num_classes: int,
    feature_levels: Sequence[int] | None = None,
) -> RoIHeads:
    """``in_channels``: the neck's channels; ``num_classes``: the detector's ``K`` (without
    background); ``feature_levels``: the neck's output levels (default: the spec's RoI levels)."""
    align, head = spec.roi_align, spec.box_head
    return RoIHeads(
        in_channels=in_channels,
        num_classes=num_classes,
        levels=align.levels,
        feature_levels=feature_levels,
        output_size=align.output_size,
        sampling_ratio=align.sampling_ratio,
        canonical_scale=align.canonical_scale,
        canonical_level=align.canonical_level,
        aligned=align.aligned,
        head_kind=head.kind,
        fc_channels=head.fc_channels,
        num_convs=head.num_convs,
        conv_channels=head.conv_channels,
        norm=head.norm,
        class_agnostic=spec.class_agnostic,
    )


# ---------------------------------------------------------------------------------------------
# Pure functions of a stage
# ---------------------------------------------------------------------------------------------


def roi_targets(
    boxes: Float[Tensor, "B R 4"],
    valid: Bool[Tensor, "B R"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    spec: specs.RoIHead = _SPEC,
    keys: Float[Tensor, "B N"] | None = None,
    generator: torch.Generator | None = None,
) -> SampledRoIs:
    """The RoIs the stage trains on and their targets (:func:`fdet.ops.roi.sample_rois` with
    the stage's assigner, sampler, gt appending and coder): ``S = spec.sampler.num_samples``
    slots an image, labels ``1 + class`` (0 = background), regression targets."""
    return sample_rois(
        boxes,
        valid,
        gt_boxes,
        gt_labels,
        gt_valid,
        gt_crowd,
        pos_iou=spec.assigner.pos_iou,
        neg_iou=spec.assigner.neg_iou,
        low_quality_matches=spec.assigner.low_quality_matches,
        min_low_quality_iou=spec.assigner.min_low_quality_iou,
        crowd_ioa=spec.assigner.crowd_ioa,
        num_samples=spec.sampler.num_samples,
        positive_fraction=spec.sampler.positive_fraction,
        add_gt_boxes=spec.add_gt_boxes,
        means=spec.coder.means,
        stds=spec.coder.stds,
        keys=keys,
        generator=generator,
    )


def roi_loss(
    outputs: RoIOutputs,
    sampled: SampledRoIs,
    *,
    spec: specs.RoIHead = _SPEC,
    prefix: str = "roi",
) -> dict[str, Term]:
    """The Fast R-CNN objective of the sampled RoIs, as the terms ``{prefix}_cls`` and
    ``{prefix}_box``::

        L = cls_weight / N Σ_{r sampled} CE(softmax(s_r), y_r)
            + box_weight / N Σ_{r positive} L_box(t_r[y_r], t*_r)

    ``N`` is the number of sampled RoIs (positives and background, the same count tensor for
    both terms, as torchvision normalises both), ``y_r`` the RoI's label (0 = background),
    ``t_r[y_r]`` its deltas for that class (the single column when class-agnostic). ``L_box`` is
    the stage's ``box_loss`` spec (smooth L1 with ``beta = 1/9``, L1, or GIoU on the decoded
    boxes), summed over the four coordinates.

    Args:
        outputs: the head's outputs on ``sampled.boxes`` (``[B, S, ...]``).
        sampled: :func:`roi_targets`.

    Returns:
        Float32 :class:`Term` s, also under autocast; a batch without sampled RoIs gives totals
        and counts of 0.
    """
    class_logits = outputs.class_logits.float()  # [B, S, K + 1]
    deltas = select_class_deltas(outputs.box_deltas.float(), sampled.labels)  # [B, S, 4]
    positive = sampled.positive & sampled.valid  # [B, S]
    count = sampled.valid.sum(dtype=torch.float32)
    cls_total = softmax_cross_entropy(class_logits, sampled.labels, valid=sampled.valid).sum()
    safe_deltas = torch.where(positive[..., None], deltas, 0.0)
    per_roi = box_loss_per_anchor(
        spec.box_loss, box_coder(spec.coder), safe_deltas, sampled.boxes, sampled.target_boxes
    )  # [B, S]
    box_total = masked_sum(per_roi, positive)
    return {
        f"{prefix}_cls": Term(cls_total, count, spec.cls_weight),
        f"{prefix}_box": Term(box_total, count, spec.box_loss.weight),
    }


def roi_postprocess(
    outputs: RoIOutputs,
    boxes: Float[Tensor, "B R 4"],
    valid: Bool[Tensor, "B R"],
    image_sizes: ImageSize | Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    spec: specs.RoIHead = _SPEC,
) -> Detections:
    """Detections (labels ``0 .. K-1``) of the head's outputs on the RoIs ``boxes``
    (:func:`fdet.ops.roi.roi_detections` with the stage's coder and postprocess)."""
    post = spec.postprocess
    return roi_detections(
        outputs.class_logits,
        outputs.box_deltas,
        boxes,
        valid,
        image_sizes,
        score_threshold=post.score_threshold,
        nms_iou=post.nms_iou,
        max_detections=post.max_detections,
        min_box_size=post.min_box_size,
        means=spec.coder.means,
        stds=spec.coder.stds,
        clip=spec.coder.clip,
    )


def rename_torchvision_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's ``RoIHeads`` box parameters (the keys under ``roi_heads.``) renamed for
    :class:`RoIHeads`: ``box_head.fc6`` / ``fc7`` → ``box_head.fcs.0`` / ``.1``;
    ``FastRCNNConvFCHead``'s ``box_head.{i}.{0,1}`` (conv, norm) → ``box_head.convs.{i}.{0,1}``
    and its linear layers (``box_head.{n}``, after the convs and a flatten) → ``box_head.fcs.{j}``
    in order; ``box_predictor.*`` unchanged. Keys of other parts (masks, keypoints) are left
    out."""
    conv_key = re.compile(r"^box_head\.(\d+)\.(\d+)\.(.+)$")
    linear_key = re.compile(r"^box_head\.(\d+)\.(weight|bias)$")
    linears = sorted({int(m.group(1)) for k in state_dict if (m := linear_key.match(k))})
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("box_predictor."):
            out[key] = value
        elif key.startswith("box_head.fc6."):
            out["box_head.fcs.0." + key.removeprefix("box_head.fc6.")] = value
        elif key.startswith("box_head.fc7."):
            out["box_head.fcs.1." + key.removeprefix("box_head.fc7.")] = value
        elif m := conv_key.match(key):
            out[f"box_head.convs.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = value
        elif m := linear_key.match(key):
            out[f"box_head.fcs.{linears.index(int(m.group(1)))}.{m.group(2)}"] = value
    return out
