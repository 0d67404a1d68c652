"""torchvision's RetinaNet, FCOS, Faster R-CNN and Mask R-CNN as fdet specs, state dicts and
detectors.

    >>> tv = torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=...)
    >>> detector = load_torchvision(tv)          # fdet RetinaNet with the same weights
    >>> detections = detector.predict(images)    # images: float [B, 3, H, W] in [0, 1]
    >>> fcos = load_torchvision(torchvision.models.detection.fcos_resnet50_fpn(weights=...))
    >>> tv_mask = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=...)
    >>> mask_rcnn = load_torchvision(tv_mask)    # its detections carry masks

:func:`spec_from_torchvision` reads every setting of a ``torchvision.models.detection.RetinaNet``
instance (ResNet + FPN backbone, head, anchors, matcher, box coder, box loss, postprocess,
normalization) into a :class:`fdet.specs.RetinaNet`, and of an ``FCOS`` instance (backbone, head,
points, regression ranges, center sampling, box coder, postprocess, normalization) into a
:class:`fdet.specs.FCOS`; it raises :class:`UnsupportedModelError`, naming the part, for anything
fdet cannot express. :func:`state_dict_from_torchvision` renames the weights, and
:func:`load_torchvision` does both.

torchvision lays a level's anchors (and FCOS's points, the centres of its anchors)
``padded size // feature size`` apart on each axis, which is ``2**level`` only when the padded
size is a multiple of the coarsest stride (128 for P7); converted specs say so with
``placement="image_ratio"`` (``specs.Anchors``, ``specs.Points``), so a converted model gives
torchvision's detections at any input size. fdet's own specs keep the nominal ``2**level``.

What the spec does not carry: torchvision's ``GeneralizedRCNNTransform`` resizes images
(``min_size``/``max_size``) and pads them to a multiple of 32; an fdet detector takes the batch as
it comes, resized and padded by the data pipeline. Outputs agree when both see the same padded
batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection import faster_rcnn as tv_faster_rcnn
from torchvision.models.detection import fcos as tv_fcos
from torchvision.models.detection import mask_rcnn as tv_mask_rcnn
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import (
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)
from torchvision.ops.poolers import MultiScaleRoIAlign

from fdet import specs
from fdet.models.detectors.fcos import FCOS
from fdet.models.detectors.retinanet import RetinaNet
from fdet.models.detectors.two_stage.faster_rcnn import FasterRCNN
from fdet.models.detectors.two_stage.mask_head import (
    rename_torchvision_keys as rename_mask_keys,
)
from fdet.models.detectors.two_stage.mask_rcnn import MaskRCNN
from fdet.models.detectors.two_stage.roi_heads import rename_torchvision_keys
from fdet.ops.anchors import level_sizes
from fdet.ops.coding import stds_from_weights
from fdet.registry import build
from fdet.specs.fcos import RegressRange
from fdet.specs.losses import BoxLoss

__all__ = [
    "UnsupportedModelError",
    "load_torchvision",
    "spec_from_torchvision",
    "state_dict_from_torchvision",
]

BatchNormSpec = specs.BatchNorm | specs.FrozenBatchNorm

_FDET_NORM_EPS = 1e-5  # eps of fdet's batch norms and group norms (the torch defaults)

_DEPTHS: dict[tuple[str, tuple[int, ...]], int] = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}

_RENAMES = (
    ("backbone.body.", "backbone."),
    ("backbone.fpn.", "neck."),
    ("head.classification_head.conv.", "head.cls_tower."),
    ("head.classification_head.cls_logits.", "head.cls_logits."),
    ("head.regression_head.conv.", "head.box_tower."),
    ("head.regression_head.bbox_reg.", "head.box_deltas."),
)
# torchvision < 0.13 kept each tower as one flat Sequential(conv, relu, conv, relu, ...)
_FLAT_TOWER = re.compile(r"^(head\.(?:cls|box)_tower\.)(\d+)\.(weight|bias)$")

_FCOS_RENAMES = (
    ("backbone.body.", "backbone."),
    ("backbone.fpn.", "neck."),
    ("head.classification_head.conv.", "head.cls_tower."),
    ("head.classification_head.cls_logits.", "head.cls_logits."),
    ("head.regression_head.conv.", "head.box_tower."),
    ("head.regression_head.bbox_reg.", "head.box_ltrb."),
    ("head.regression_head.bbox_ctrness.", "head.centerness."),
)
# torchvision's FCOS towers are flat Sequential(conv, norm, relu, conv, norm, relu, ...)
_FCOS_TOWER = re.compile(r"^(head\.(?:cls|box)_tower\.)(\d+)\.(.+)$")
_FCOS_MARKER = "head.regression_head.bbox_ctrness."
_FASTER_RCNN_MARKER = "roi_heads.box_predictor."
_NO_TENSOR: Any = None  # a placeholder value: renaming reads only the keys
_ROI = "roi_heads."
_MASK = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
_MASK_PLACEHOLDER = torch.empty(2)  # mask renaming slices the logits' tensor; only keys are read


class UnsupportedModelError(ValueError):
    """A torchvision model has a part or a setting that fdet cannot express."""


def _unsupported(where: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"torchvision detector: {where}: {what}")


# ---------------------------------------------------------------------------------------------
# Spec
# ---------------------------------------------------------------------------------------------


def _batch_norm_spec(module: nn.Module, where: str) -> BatchNormSpec:
    if isinstance(module, FrozenBatchNorm2d):
        return specs.FrozenBatchNorm()
    if isinstance(module, nn.BatchNorm2d):
        if not (module.affine and module.track_running_stats):
            raise _unsupported(where, "batch norm without affine terms or running statistics")
        return specs.BatchNorm()
    raise _unsupported(
        where, f"{type(module).__name__} (fdet converts BatchNorm2d and FrozenBatchNorm2d)"
    )


def _resnet_spec(body: Any, norm: BatchNormSpec | None) -> tuple[specs.ResNet, tuple[int, ...]]:
    """The ResNet spec of a torchvision ``IntermediateLayerGetter`` over a ResNet, and the levels
    it returns."""
    return_layers = getattr(body, "return_layers", None)
    if not isinstance(return_layers, Mapping):
        raise _unsupported("backbone.body", f"{type(body).__name__} is not a ResNet feature getter")
    stage_names = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(body, name)]
    if not stage_names or not all(name in stage_names for name in return_layers):
        raise _unsupported("backbone.body", f"returns {sorted(return_layers)}, not ResNet stages")
    levels = tuple(sorted(int(name[len("layer") :]) + 1 for name in return_layers))

    stem = body.conv1
    width = stem.out_channels
    if not (
        isinstance(stem, nn.Conv2d)
        and stem.kernel_size == (7, 7)
        and stem.stride == (2, 2)
        and stem.bias is None
    ):
        raise _unsupported("backbone.body.conv1", "not a ResNet stem (7×7, stride 2, no bias)")

    norms: set[BatchNormSpec] = {
        _batch_norm_spec(m, f"backbone.body.{name}")
        for name, m in body.named_modules()
        if name.endswith(("bn1", "bn2", "bn3", "downsample.1"))
    }
    if len(norms) != 1:
        raise _unsupported("backbone.body", "mixes BatchNorm2d and FrozenBatchNorm2d")
    norm_spec = norm if norm is not None else norms.pop()
    kind = "basic" if isinstance(body.layer1[0], tv_resnet.BasicBlock) else "bottleneck"
    counts = []
    for name in stage_names:
        stage = body.get_submodule(name)
        for i, block in enumerate(stage):
            where = f"backbone.body.{name}.{i}"
            if not isinstance(block, tv_resnet.BasicBlock | tv_resnet.Bottleneck):
                raise _unsupported(where, f"{type(block).__name__} is not a ResNet block")
            if (kind == "basic") != isinstance(block, tv_resnet.BasicBlock):
                raise _unsupported(where, "mixes basic blocks and bottlenecks")
            if block.conv2.groups != 1 or block.conv2.dilation != (1, 1):
                raise _unsupported(where, "grouped (ResNeXt) or dilated convs")
        counts.append(len(stage))
    planes = body.layer1[0].conv1.out_channels
    if planes != width:
        raise _unsupported(
            "backbone.body.layer1.0", f"{planes} channels for a {width}-channel stem (wide ResNet)"
        )
    depths = [d for (k, n), d in _DEPTHS.items() if k == kind and n[: len(counts)] == tuple(counts)]
    if not depths:
        raise _unsupported("backbone.body", f"{kind} blocks {counts} match no ResNet depth")

    return (
        specs.ResNet(
            depth=depths[0],  # type: ignore[arg-type]
            norm=norm_spec,
            frozen_stages=_frozen_stages(body, stage_names),
            out_levels=levels,
            width=width,
        ),
        levels,
    )


def _frozen_stages(body: Any, stage_names: Sequence[str]) -> int:
    """fdet's ``frozen_stages`` from which parameters of the ResNet have ``requires_grad``."""

    def frozen(module: nn.Module) -> bool:
        params = [p for p in module.parameters()]
        return bool(params) and not any(p.requires_grad for p in params)

    if not frozen(body.conv1):
        return -1
    flags = [frozen(body.get_submodule(name)) for name in stage_names]
    count = flags.index(False) if False in flags else len(flags)
    if any(flags[count:]):
        raise _unsupported(
            "backbone.body", f"frozen stages {flags} do not form a prefix of the network"
        )
    return count


def _fpn_channels(fpn: Any, in_channels: tuple[int, ...], *, norm: bool = False) -> int:
    """The output channels of a torchvision FPN fdet can express (plain convs unless ``norm``,
    the backbone's input channels)."""
    if not isinstance(fpn, FeaturePyramidNetwork):
        raise _unsupported("backbone.fpn", f"{type(fpn).__name__} is not a FeaturePyramidNetwork")
    inner = fpn.inner_blocks[0]
    if len(inner) != 1 and not norm:
        raise _unsupported("backbone.fpn", "FPN convs with a norm layer")
    got = tuple(block[0].in_channels for block in fpn.inner_blocks)
    if got != in_channels:
        raise _unsupported(
            "backbone.fpn", f"input channels {got}, the backbone gives {in_channels}"
        )
    return int(inner[0].out_channels)


def _fpn_spec(fpn: Any, in_levels: tuple[int, ...], in_channels: tuple[int, ...]) -> specs.FPN:
    channels = _fpn_channels(fpn, in_channels)
    extra = fpn.extra_blocks
    if extra is None:
        return specs.FPN(
            in_levels=in_levels, out_levels=in_levels, channels=channels, extra_from="p5"
        )
    if type(extra) is not LastLevelP6P7:
        raise _unsupported(
            "backbone.fpn.extra_blocks",
            f"{type(extra).__name__}; fdet's FPN makes extra levels with stride-2 convs only "
            "(LastLevelP6P7)",
        )
    top = in_levels[-1]
    return specs.FPN(
        in_levels=in_levels,
        out_levels=(*in_levels, top + 1, top + 2),
        channels=channels,
        extra_from="p5" if extra.use_P5 else "c5",
        extra_relu=True,
    )


def _tower_spec(tower: Any, where: str) -> tuple[int, specs.GroupNorm | None]:
    """(num_convs, norm) of a torchvision head tower."""
    norms: set[specs.GroupNorm | None] = set()
    for i, block in enumerate(tower):
        conv = block[0]
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)):
            raise _unsupported(f"{where}.{i}", "not a 3×3 conv block")
        layers = list(block)[1:-1]
        norm: specs.GroupNorm | None
        if not layers:
            norm = None
        elif len(layers) == 1 and isinstance(layers[0], nn.GroupNorm):
            gn = layers[0]
            if gn.eps != _FDET_NORM_EPS or not gn.affine:
                raise _unsupported(f"{where}.{i}.1", f"group norm with eps {gn.eps} or no affine")
            norm = specs.GroupNorm(groups=gn.num_groups)
        else:
            raise _unsupported(f"{where}.{i}", f"{[type(m).__name__ for m in layers]} norm layers")
        if (conv.bias is None) != (norm is not None):
            raise _unsupported(f"{where}.{i}.0", "conv bias differs from fdet's (bias iff no norm)")
        norms.add(norm)
    if len(norms) > 1:
        raise _unsupported(where, f"mixes blocks with different norms: {norms}")
    return len(tower), norms.pop() if norms else None


def _head_spec(head: Any, in_channels: int) -> tuple[specs.RetinaHead, int]:
    if not isinstance(head, tv_retinanet.RetinaNetHead):
        raise _unsupported("head", f"{type(head).__name__} is not a RetinaNetHead")
    cls_head, reg_head = head.classification_head, head.regression_head
    cls_tower = _tower_spec(cls_head.conv, "head.classification_head.conv")
    box_tower = _tower_spec(reg_head.conv, "head.regression_head.conv")
    if cls_tower != box_tower:
        raise _unsupported("head", f"towers differ: {cls_tower} and {box_tower}")
    num_convs, norm = cls_tower
    channels = cls_head.conv[0][0].out_channels if num_convs else in_channels
    if num_convs and cls_head.conv[0][0].in_channels != in_channels:
        raise _unsupported("head", f"input channels differ from the FPN's {in_channels}")
    if reg_head.bbox_reg.out_channels != 4 * cls_head.num_anchors:
        raise _unsupported("head.regression_head.bbox_reg", "anchor count differs from cls head")
    spec = specs.RetinaHead(
        num_classes=cls_head.num_classes,
        num_convs=num_convs,
        channels=channels,
        norm=norm,
    )
    return spec, cls_head.num_anchors


def _anchors_spec(generator: Any, levels: tuple[int, ...]) -> specs.Anchors:
    if not isinstance(generator, AnchorGenerator):
        raise _unsupported("anchor_generator", f"{type(generator).__name__}")
    sizes = [tuple(float(s) for s in level) for level in generator.sizes]
    ratios = [tuple(float(r) for r in level) for level in generator.aspect_ratios]
    if len(sizes) != len(levels):
        raise _unsupported(
            "anchor_generator", f"{len(sizes)} levels of sizes for {len(levels)} FPN levels"
        )
    if any(r != ratios[0] for r in ratios):
        raise _unsupported("anchor_generator.aspect_ratios", f"differ between levels: {ratios}")
    n = len(sizes[0])
    if any(len(level) != n for level in sizes):
        raise _unsupported("anchor_generator.sizes", f"differ in count between levels: {sizes}")
    base_sizes = tuple(level[0] for level in sizes)
    candidates = (
        tuple(2 ** (j / n) for j in range(n)),  # octaves: 2^(j/n)
        tuple(s / sizes[0][0] for s in sizes[0]),  # the first level's own ratios
    )
    for scales in candidates:
        for truncate in (True, False):
            made = [level_sizes(base, scales, truncate=truncate) for base in base_sizes]
            if made == sizes:
                return specs.Anchors(
                    strides=tuple(2**lvl for lvl in levels),
                    base_sizes=base_sizes,
                    octave_scales=scales,
                    ratios=ratios[0],
                    truncate_sizes=truncate,
                    round_offsets=True,
                    placement="image_ratio",
                )
    raise _unsupported(
        "anchor_generator.sizes",
        f"{sizes} are not base_size × the same scales on every level",
    )


def _coder_spec(model: Any) -> specs.DeltaXYWHCoder:
    """The box coder of the postprocess (``box_coder``) and of the loss (the regression head's),
    which must agree."""
    coders = (model.box_coder, getattr(model.head.regression_head, "box_coder", model.box_coder))
    settings = {(tuple(float(w) for w in c.weights), float(c.bbox_xform_clip)) for c in coders}
    if len(settings) != 1:
        raise _unsupported(
            "box_coder", f"the loss and the postprocess code boxes differently: {settings}"
        )
    weights, clip = settings.pop()
    return specs.DeltaXYWHCoder(stds=stds_from_weights(weights), clip=clip)


def _box_loss_spec(loss_type: str) -> BoxLoss:
    if loss_type == "l1":
        return specs.L1Loss()
    if loss_type == "smooth_l1":
        return specs.SmoothL1Loss(beta=1.0)  # torchvision's default beta
    if loss_type == "giou":
        return specs.GIoULoss(eps=1e-7)
    raise _unsupported(
        "head.regression_head._loss_type", f"{loss_type!r} (fdet has l1, smooth_l1 and giou)"
    )


def _fcos_tower_spec(tower: Any, where: str) -> tuple[int, specs.GroupNorm, bool]:
    """(num_convs, norm, conv bias) of a torchvision FCOS tower: a flat ``Sequential`` of
    ``(conv 3×3, norm, ReLU)`` blocks."""
    layers = list(tower)
    if len(layers) % 3:
        raise _unsupported(where, "not a sequence of (conv, norm, ReLU) blocks")
    settings: set[tuple[specs.GroupNorm, bool]] = set()
    for i in range(0, len(layers), 3):
        conv, norm, relu = layers[i : i + 3]
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)):
            raise _unsupported(f"{where}.{i}", "not a 3×3 conv")
        if conv.in_channels != conv.out_channels:
            raise _unsupported(f"{where}.{i}", "a tower conv that changes the channel count")
        if not isinstance(norm, nn.GroupNorm):
            raise _unsupported(
                f"{where}.{i + 1}", f"{type(norm).__name__} (fdet converts group norm here)"
            )
        if norm.eps != _FDET_NORM_EPS or not norm.affine:
            raise _unsupported(f"{where}.{i + 1}", f"group norm with eps {norm.eps} or no affine")
        if not isinstance(relu, nn.ReLU):
            raise _unsupported(f"{where}.{i + 2}", f"{type(relu).__name__}, not a ReLU")
        settings.add((specs.GroupNorm(groups=norm.num_groups), conv.bias is not None))
    if len(settings) > 1:
        raise _unsupported(where, f"mixes blocks with different norms or biases: {settings}")
    if not settings:
        return 0, specs.GroupNorm(), True
    norm_spec, bias = settings.pop()
    return len(layers) // 3, norm_spec, bias


def _fcos_head_spec(head: Any, in_channels: int) -> specs.FCOSHead:
    if not isinstance(head, tv_fcos.FCOSHead):
        raise _unsupported("head", f"{type(head).__name__} is not an FCOSHead")
    cls_head, reg_head = head.classification_head, head.regression_head
    cls_tower = _fcos_tower_spec(cls_head.conv, "head.classification_head.conv")
    box_tower = _fcos_tower_spec(reg_head.conv, "head.regression_head.conv")
    if cls_tower != box_tower:
        raise _unsupported("head", f"towers differ: {cls_tower} and {box_tower}")
    num_convs, norm, bias = cls_tower
    if cls_head.num_anchors != 1:
        raise _unsupported("head.classification_head", f"{cls_head.num_anchors} anchors a point")
    if num_convs and cls_head.conv[0].in_channels != in_channels:
        raise _unsupported("head", f"input channels differ from the FPN's {in_channels}")
    for name, conv, outputs in (
        ("regression_head.bbox_reg", reg_head.bbox_reg, 4),
        ("regression_head.bbox_ctrness", reg_head.bbox_ctrness, 1),
        ("classification_head.cls_logits", cls_head.cls_logits, cls_head.num_classes),
    ):
        if not (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3)
            and conv.out_channels == outputs
            and conv.bias is not None
        ):
            raise _unsupported(f"head.{name}", f"not a 3×3 conv with bias to {outputs} channels")
    return specs.FCOSHead(
        num_classes=cls_head.num_classes,
        num_convs=num_convs,
        channels=in_channels,
        norm=norm,
        tower_bias=bias,
        centerness_on="box",
        distance_activation="relu",
        learned_scales=False,
    )


def _fcos_points_and_ranges(
    generator: Any, levels: tuple[int, ...]
) -> tuple[specs.Points, tuple[RegressRange, ...]]:
    """torchvision's FCOS points are the centres of one square anchor a location whose size
    must be the level's stride; its regression ranges are ``(4·size, 8·size)``, compared
    strictly, from 0 on the first level and unbounded on the last."""
    if not isinstance(generator, AnchorGenerator):
        raise _unsupported("anchor_generator", f"{type(generator).__name__}")
    strides = tuple(2**lvl for lvl in levels)
    sizes = tuple(tuple(float(s) for s in level) for level in generator.sizes)
    ratios = tuple(tuple(float(r) for r in level) for level in generator.aspect_ratios)
    if sizes != tuple((float(s),) for s in strides) or any(r != (1.0,) for r in ratios):
        raise _unsupported(
            "anchor_generator",
            f"sizes {sizes} and ratios {ratios}; FCOS converts one square anchor a location "
            f"of the level's stride, sizes {tuple((s,) for s in strides)} and ratio 1.0",
        )
    ranges: list[RegressRange] = []
    for i, size in enumerate(strides):
        lower = 0.0 if i == 0 else 4.0 * size
        upper = None if i == len(strides) - 1 else 8.0 * size
        ranges.append((lower, upper))
    points = specs.Points(strides=strides, offset=0.0, placement="image_ratio")
    return points, tuple(ranges)


def _distance_coder_spec(model: Any) -> specs.DistanceCoder:
    coders = (model.box_coder, getattr(model.head, "box_coder", model.box_coder))
    if not all(isinstance(c, tv_det_utils.BoxLinearCoder) for c in coders):
        raise _unsupported("box_coder", f"{[type(c).__name__ for c in coders]}")
    settings = {bool(c.normalize_by_size) for c in coders}
    if len(settings) != 1:
        raise _unsupported("box_coder", "the loss and the postprocess code boxes differently")
    return specs.DistanceCoder(normalize_by_stride=settings.pop())


def _backbone_and_neck(
    model: Any, batch_norm: BatchNormSpec | None
) -> tuple[specs.ResNet, specs.FPN]:
    body = getattr(model.backbone, "body", None)
    fpn = getattr(model.backbone, "fpn", None)
    if body is None or fpn is None:
        raise _unsupported("backbone", f"{type(model.backbone).__name__} is not a BackboneWithFPN")
    backbone, levels = _resnet_spec(body, batch_norm)
    return backbone, _fpn_spec(fpn, levels, backbone.out_channels)


def _normalize_spec(model: Any) -> specs.Normalize:
    transform = model.transform
    if not isinstance(transform, GeneralizedRCNNTransform):
        raise _unsupported("transform", f"{type(transform).__name__}")
    return specs.Normalize(
        mean=tuple(transform.image_mean), std=tuple(transform.image_std), input_range=1.0
    )


def _fcos_spec(model: Any, batch_norm: BatchNormSpec | None) -> specs.FCOS:
    backbone, neck = _backbone_and_neck(model, batch_norm)
    head = _fcos_head_spec(model.head, neck.channels)
    points, ranges = _fcos_points_and_ranges(model.anchor_generator, neck.out_levels)
    radius = float(model.center_sampling_radius)
    if not radius > 0:
        raise _unsupported("center_sampling_radius", f"{radius} (no point would be positive)")
    return specs.FCOS(
        backbone=backbone,
        neck=neck,
        head=head,
        points=points,
        assigner=specs.FCOSAssigner(
            regress_ranges=ranges, closed_ranges=False, center_radius=radius
        ),
        coder=_distance_coder_spec(model),
        cls_loss=specs.SigmoidFocalLoss(alpha=0.25, gamma=2.0),
        box_loss=specs.GIoULoss(eps=1e-7),
        centerness_weight=1.0,
        box_weight_by_centerness=False,
        postprocess=specs.DensePostprocess(
            score_threshold=float(model.score_thresh),
            topk_per_level=int(model.topk_candidates),
            nms_iou=float(model.nms_thresh),
            max_detections=int(model.detections_per_img),
        ),
        normalize=_normalize_spec(model),
    )


def _fpn_norm(fpn: Any) -> BatchNormSpec | None:
    """The norm after every lateral and output conv of a torchvision FPN (its v2 detectors':
    ``BatchNorm2d``, the convs then without bias), or None."""
    norms: set[BatchNormSpec | None] = set()
    blocks = [("inner_blocks", i, b) for i, b in enumerate(fpn.inner_blocks)]
    blocks += [("layer_blocks", i, b) for i, b in enumerate(fpn.layer_blocks)]
    for name, i, block in blocks:
        where = f"backbone.fpn.{name}.{i}"
        layers = list(block)
        if len(layers) == 1:
            norms.add(None)
        elif len(layers) == 2 and layers[0].bias is None:
            norms.add(_batch_norm_spec(layers[1], f"{where}.1"))
        else:
            raise _unsupported(where, f"{[type(m).__name__ for m in layers]}")
    if len(norms) != 1:
        raise _unsupported("backbone.fpn", f"mixes convs with different norms: {norms}")
    return norms.pop()


def _pooled_fpn_spec(
    fpn: Any, in_levels: tuple[int, ...], in_channels: tuple[int, ...]
) -> tuple[specs.FPN, int, tuple[str, ...]]:
    """Faster R-CNN's FPN: fdet's FPN, the number of max-pooled levels above it
    (``LastLevelMaxPool``: 1) and the names of the extra levels torchvision gives them."""
    extra = fpn.extra_blocks
    if type(extra) is LastLevelMaxPool:
        channels = _fpn_channels(fpn, in_channels, norm=True)
        norm = _fpn_norm(fpn)
        spec = specs.FPN(in_levels=in_levels, out_levels=in_levels, channels=channels, norm=norm)
        return spec, 1, ("pool",)
    spec = _fpn_spec(fpn, in_levels, in_channels)
    return spec, 0, ("p6", "p7")[: len(spec.extra_levels)]


def _matcher_spec(matcher: Any, where: str) -> specs.MaxIoUAssigner:
    if type(matcher) is not tv_det_utils.Matcher:
        raise _unsupported(where, f"{type(matcher).__name__} is not a Matcher")
    return specs.MaxIoUAssigner(
        pos_iou=float(matcher.high_threshold),
        neg_iou=float(matcher.low_threshold),
        low_quality_matches=bool(matcher.allow_low_quality_matches),
    )


def _sampler_spec(sampler: Any, where: str) -> specs.Sampler:
    if not isinstance(sampler, tv_det_utils.BalancedPositiveNegativeSampler):
        raise _unsupported(where, f"{type(sampler).__name__}")
    return specs.Sampler(
        num_samples=int(sampler.batch_size_per_image),
        positive_fraction=float(sampler.positive_fraction),
    )


def _delta_coder_spec(coder: Any, where: str) -> specs.DeltaXYWHCoder:
    if not isinstance(coder, tv_det_utils.BoxCoder):
        raise _unsupported(where, f"{type(coder).__name__} is not a BoxCoder")
    weights = tuple(float(w) for w in coder.weights)
    return specs.DeltaXYWHCoder(stds=stds_from_weights(weights), clip=float(coder.bbox_xform_clip))


def _rpn_spec(rpn: Any, levels: tuple[int, ...]) -> specs.RPN:
    if not isinstance(rpn, tv_rpn.RegionProposalNetwork):
        raise _unsupported("rpn", f"{type(rpn).__name__} is not a RegionProposalNetwork")
    head = rpn.head
    if not isinstance(head, tv_rpn.RPNHead):
        raise _unsupported("rpn.head", f"{type(head).__name__} is not an RPNHead")
    for i, block in enumerate(head.conv):
        layers = list(block)
        conv = layers[0]
        if not (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3)
            and conv.bias is not None
            and len(layers) == 2
            and isinstance(layers[1], nn.ReLU)
        ):
            raise _unsupported(f"rpn.head.conv.{i}", "not a 3×3 conv with bias and a ReLU")
    anchors = _anchors_spec(rpn.anchor_generator, levels)
    if anchors.per_location != head.cls_logits.out_channels:
        raise _unsupported(
            "rpn.anchor_generator",
            f"{anchors.per_location} anchors a location, the head has "
            f"{head.cls_logits.out_channels}",
        )
    return specs.RPN(
        anchors=anchors,
        num_convs=len(head.conv),
        assigner=_matcher_spec(rpn.proposal_matcher, "rpn.proposal_matcher"),
        sampler=_sampler_spec(rpn.fg_bg_sampler, "rpn.fg_bg_sampler"),
        coder=_delta_coder_spec(rpn.box_coder, "rpn.box_coder"),
        box_loss=specs.SmoothL1Loss(beta=1.0 / 9.0),
        pre_nms_topk_train=int(rpn._pre_nms_top_n["training"]),
        post_nms_topk_train=int(rpn._post_nms_top_n["training"]),
        pre_nms_topk_test=int(rpn._pre_nms_top_n["testing"]),
        post_nms_topk_test=int(rpn._post_nms_top_n["testing"]),
        nms_threshold=float(rpn.nms_thresh),
        min_size=float(rpn.min_size),
        score_threshold=float(rpn.score_thresh),
    )


def _box_head_spec(head: Any, in_channels: int, roi_size: int) -> specs.BoxHead:
    where = "roi_heads.box_head"
    if isinstance(head, tv_faster_rcnn.TwoMLPHead):
        if head.fc6.in_features != in_channels * roi_size * roi_size:
            raise _unsupported(where, f"fc6 reads {head.fc6.in_features} features")
        return specs.BoxHead(kind="2fc", fc_channels=int(head.fc7.out_features))
    if not isinstance(head, tv_faster_rcnn.FastRCNNConvFCHead):
        raise _unsupported(
            where, f"{type(head).__name__} (fdet converts TwoMLPHead and FastRCNNConvFCHead)"
        )
    layers = list(head)
    convs = [m for m in layers if isinstance(m, nn.Sequential)]
    rest = layers[len(convs) :]
    shape = [type(m).__name__ for m in rest]
    if shape != ["Flatten", "Linear", "ReLU"] or not convs:
        raise _unsupported(where, f"{len(convs)} conv blocks then {shape}; fdet has 4conv1fc")
    norms: set[specs.BatchNorm | None] = set()
    channels: set[int] = set()
    for i, block in enumerate(convs):
        parts = list(block)
        conv = parts[0]
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)):
            raise _unsupported(f"{where}.{i}", "not a 3×3 conv block")
        middle = parts[1:-1]
        if not middle:
            norm = None
        elif len(middle) == 1 and type(middle[0]) is nn.BatchNorm2d:
            norm = specs.BatchNorm()
        else:
            raise _unsupported(f"{where}.{i}", f"{[type(m).__name__ for m in middle]} norm layers")
        if (conv.bias is None) != (norm is not None):
            raise _unsupported(f"{where}.{i}.0", "conv bias differs from fdet's (bias iff no norm)")
        norms.add(norm)
        channels.add(int(conv.out_channels))
    if len(norms) != 1 or len(channels) != 1:
        raise _unsupported(where, "conv blocks differ in norm or channels")
    return specs.BoxHead(
        kind="4conv1fc",
        fc_channels=int(rest[1].out_features),
        num_convs=len(convs),
        conv_channels=channels.pop(),
        norm=norms.pop(),
    )


def _roi_head_spec(
    roi_heads: Any, feature_names: tuple[str, ...], levels: tuple[int, ...], in_channels: int
) -> tuple[specs.RoIHead, int]:
    """The RoI stage and the number of object classes (without the background)."""
    if not isinstance(roi_heads, tv_roi_heads.RoIHeads):
        raise _unsupported("roi_heads", f"{type(roi_heads).__name__} is not a RoIHeads")
    if roi_heads.has_keypoint():
        raise _unsupported("roi_heads", "keypoint heads (fdet converts boxes and masks)")
    pool = roi_heads.box_roi_pool
    if not isinstance(pool, MultiScaleRoIAlign):
        raise _unsupported("roi_heads.box_roi_pool", f"{type(pool).__name__}")
    missing = [name for name in pool.featmap_names if name not in feature_names]
    if missing:
        raise _unsupported("roi_heads.box_roi_pool", f"feature maps {missing} do not exist")
    roi_levels = tuple(levels[feature_names.index(name)] for name in pool.featmap_names)
    height, width = pool.output_size
    if height != width:
        raise _unsupported("roi_heads.box_roi_pool", f"output size {pool.output_size}")
    box_head = _box_head_spec(roi_heads.box_head, in_channels, int(height))
    predictor = roi_heads.box_predictor
    if not isinstance(predictor, tv_faster_rcnn.FastRCNNPredictor):
        raise _unsupported("roi_heads.box_predictor", f"{type(predictor).__name__}")
    num_outputs = int(predictor.cls_score.out_features)
    if predictor.bbox_pred.out_features != 4 * num_outputs:
        raise _unsupported("roi_heads.box_predictor", "deltas not one set per class")
    spec = specs.RoIHead(
        roi_align=specs.RoIAlign(
            levels=roi_levels,
            output_size=int(height),
            sampling_ratio=int(pool.sampling_ratio),
            canonical_scale=float(pool.canonical_scale),
            canonical_level=int(pool.canonical_level),
            aligned=False,
        ),
        box_head=box_head,
        class_agnostic=False,
        assigner=_matcher_spec(roi_heads.proposal_matcher, "roi_heads.proposal_matcher"),
        add_gt_boxes=True,
        sampler=_sampler_spec(roi_heads.fg_bg_sampler, "roi_heads.fg_bg_sampler"),
        coder=_delta_coder_spec(roi_heads.box_coder, "roi_heads.box_coder"),
        box_loss=specs.SmoothL1Loss(beta=1.0 / 9.0),
        postprocess=specs.RoIPostprocess(
            score_threshold=float(roi_heads.score_thresh),
            nms_iou=float(roi_heads.nms_thresh),
            max_detections=int(roi_heads.detections_per_img),
            min_box_size=1e-2,
        ),
    )
    return spec, num_outputs - 1


def _mask_head_spec(
    roi_heads: Any, feature_names: tuple[str, ...], levels: tuple[int, ...], in_channels: int
) -> tuple[specs.MaskHead, int]:
    """Mask R-CNN's mask branch (``mask_roi_pool``, ``mask_head``, ``mask_predictor``) and the
    number of object classes of its predictor (without the background)."""
    pool = roi_heads.mask_roi_pool
    if not isinstance(pool, MultiScaleRoIAlign):
        raise _unsupported("roi_heads.mask_roi_pool", f"{type(pool).__name__}")
    missing = [name for name in pool.featmap_names if name not in feature_names]
    if missing:
        raise _unsupported("roi_heads.mask_roi_pool", f"feature maps {missing} do not exist")
    height, width = pool.output_size
    if height != width:
        raise _unsupported("roi_heads.mask_roi_pool", f"output size {pool.output_size}")
    where = "roi_heads.mask_head"
    head = roi_heads.mask_head
    if not isinstance(head, nn.Sequential):
        raise _unsupported(where, f"{type(head).__name__} is not a MaskRCNNHeads")
    norms: set[specs.BatchNorm | None] = set()
    channels: set[int] = set()
    dilations: set[int] = set()
    width_in = in_channels
    for i, block in enumerate(head):
        parts = list(block) if isinstance(block, nn.Sequential) else [block]
        conv = parts[0]
        if not (
            isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1)
            and conv.padding == conv.dilation
            and conv.dilation[0] == conv.dilation[1]
            and conv.groups == 1
            and conv.in_channels == width_in
        ):
            raise _unsupported(f"{where}.{i}", "not a 3×3 conv block as fdet's MaskHead has")
        middle, last = parts[1:-1], parts[-1]
        if not isinstance(last, nn.ReLU):
            raise _unsupported(f"{where}.{i}", f"ends with {type(last).__name__}, not a ReLU")
        if not middle:
            norm = None
        elif len(middle) == 1 and type(middle[0]) is nn.BatchNorm2d:
            norm = specs.BatchNorm()
        else:
            raise _unsupported(f"{where}.{i}", f"{[type(m).__name__ for m in middle]} norm layers")
        if (conv.bias is None) != (norm is not None):
            raise _unsupported(f"{where}.{i}.0", "conv bias differs from fdet's (bias iff no norm)")
        norms.add(norm)
        channels.add(int(conv.out_channels))
        dilations.add(int(conv.dilation[0]))
        width_in = int(conv.out_channels)
    if len(norms) > 1 or len(channels) > 1 or len(dilations) > 1:
        raise _unsupported(where, "conv blocks differ in norm, channels or dilation")
    predictor = roi_heads.mask_predictor
    where = "roi_heads.mask_predictor"
    if not isinstance(predictor, tv_mask_rcnn.MaskRCNNPredictor):
        raise _unsupported(where, f"{type(predictor).__name__} is not a MaskRCNNPredictor")
    upsample, logits = predictor.conv5_mask, predictor.mask_fcn_logits
    reduced = int(upsample.out_channels)
    if channels and channels != {reduced}:
        raise _unsupported(where, f"conv5_mask has {reduced} channels, the convs {channels}")
    if int(upsample.in_channels) != width_in:
        raise _unsupported(where, f"conv5_mask reads {upsample.in_channels} channels")
    sampler = roi_heads.fg_bg_sampler
    # the most positives the RoI sampler draws an image: every one of them keeps a slot
    most_positives = int(sampler.batch_size_per_image * sampler.positive_fraction)
    spec = specs.MaskHead(
        roi_align=specs.RoIAlign(
            levels=tuple(levels[feature_names.index(name)] for name in pool.featmap_names),
            output_size=int(height),
            sampling_ratio=int(pool.sampling_ratio),
            canonical_scale=float(pool.canonical_scale),
            canonical_level=int(pool.canonical_level),
            aligned=False,
        ),
        num_convs=len(head),
        channels=reduced,
        dilation=dilations.pop() if dilations else 1,
        norm=norms.pop() if norms else None,
        loss_weight=1.0,
        max_rois=max(1, most_positives),
        threshold=0.5,
        paste_padding=1,
    )
    return spec, int(logits.out_channels) - 1


def _faster_rcnn_spec(model: Any, batch_norm: BatchNormSpec | None) -> specs.FasterRCNN:
    body = getattr(model.backbone, "body", None)
    fpn = getattr(model.backbone, "fpn", None)
    if body is None or fpn is None:
        raise _unsupported("backbone", f"{type(model.backbone).__name__} is not a BackboneWithFPN")
    backbone, levels = _resnet_spec(body, batch_norm)
    neck, pooled, extra_names = _pooled_fpn_spec(fpn, levels, backbone.out_channels)
    top = neck.out_levels[-1]
    pyramid = neck.out_levels + tuple(top + i for i in range(1, pooled + 1))
    stages = sorted(body.return_layers, key=lambda name: int(name[len("layer") :]))
    names = tuple(str(body.return_layers[stage]) for stage in stages) + extra_names
    if len(names) != len(pyramid):
        raise _unsupported("backbone", f"feature maps {names} for pyramid levels {pyramid}")
    roi_head, num_classes = _roi_head_spec(model.roi_heads, names, pyramid, neck.channels)
    spec = specs.FasterRCNN(
        num_classes=num_classes,
        backbone=backbone,
        neck=neck,
        max_pool_levels=pooled,
        rpn=_rpn_spec(model.rpn, pyramid),
        roi_head=roi_head,
        normalize=_normalize_spec(model),
    )
    if not model.roi_heads.has_mask():
        return spec
    mask_head, mask_classes = _mask_head_spec(model.roi_heads, names, pyramid, neck.channels)
    if mask_classes != num_classes:
        raise _unsupported(
            "roi_heads.mask_predictor",
            f"{mask_classes} mask classes for {num_classes} box classes",
        )
    return specs.MaskRCNN(**attrs.asdict(spec, recurse=False), mask_head=mask_head)


def spec_from_torchvision(
    model: nn.Module, *, batch_norm: BatchNormSpec | None = None
) -> specs.RetinaNet | specs.FCOS | specs.FasterRCNN:
    """The :class:`fdet.specs.RetinaNet` of a torchvision ``RetinaNet`` instance, the
    :class:`fdet.specs.FCOS` of an ``FCOS`` instance, the :class:`fdet.specs.FasterRCNN` of
    a ``FasterRCNN`` instance, or the :class:`fdet.specs.MaskRCNN` of a ``MaskRCNN`` instance.

    RetinaNet: reads the backbone (ResNet depth, width, returned levels, frozen stages from
    ``requires_grad``, norm), the FPN (channels, extra levels from P5 or C5), the head (classes,
    convs, group norm or none), the anchor sizes and ratios (placed as torchvision places
    them), the matcher's IoU thresholds, the box coder, the box loss (``giou`` for the v2
    recipe), the postprocess thresholds and the normalization (``input_range=1.0``:
    torchvision takes float images in ``[0, 1]``).

    FCOS: the backbone, FPN and normalization likewise; the head (classes, convs, group norm,
    conv biases); points at the anchor centres (``offset=0``) placed as torchvision places
    them; regression ranges ``(4·s, 8·s)`` from the anchor sizes ``s``, which must be the
    strides; the center-sampling radius; the box coder's ``normalize_by_size``; the
    postprocess thresholds; focal and GIoU losses as torchvision computes them.

    Faster R-CNN: the backbone, the FPN with its ``LastLevelMaxPool`` as
    ``max_pool_levels=1``, and the normalization likewise; the RPN (head depth, anchors placed
    as torchvision places them, matcher, sampler, box coder, top-k before and after NMS in
    training and testing, NMS, minimum size, score threshold); the RoI stage (the pooled
    levels, output size, sampling ratio and level rule of ``MultiScaleRoIAlign``, the box head
    ``TwoMLPHead`` (``"2fc"``) or ``FastRCNNConvFCHead`` (``"4conv1fc"``), the classes of the
    predictor, matcher, sampler, box coder and postprocess thresholds). Keypoint heads are not
    converted.

    Mask R-CNN (a ``MaskRCNN``, v1 or v2): Faster R-CNN's fields and the mask branch as a
    :class:`fdet.specs.MaskRCNN`: the mask RoI Align of ``mask_roi_pool`` (levels, output size,
    sampling ratio, level rule), the ``MaskRCNNHeads`` (number of convs, channels, dilation,
    batch norm or none) and the ``MaskRCNNPredictor``'s classes; masks pasted with one pixel
    of padding and binarized at ``> 0.5``, as torchvision's inference and evaluation do.

    ``batch_norm``: the backbone norm of the spec; by default that of the model
    (``BatchNorm2d`` → ``specs.BatchNorm()``, as in torchvision's untrained models;
    ``FrozenBatchNorm2d`` → ``specs.FrozenBatchNorm()``, as in its pretrained ones). Pass
    ``specs.FrozenBatchNorm()`` to fine-tune with frozen statistics.

    Raises:
        UnsupportedModelError: naming the part of the model fdet cannot express (e.g. a
            non-ResNet backbone, a RetinaNet with ``LastLevelMaxPool``, a ``ciou`` loss).
    """
    if not isinstance(model, tv_retinanet.RetinaNet | tv_fcos.FCOS | tv_faster_rcnn.FasterRCNN):
        raise TypeError(
            f"spec_from_torchvision takes a torchvision.models.detection.RetinaNet, FCOS or "
            f"FasterRCNN, got {type(model).__name__}"
        )
    if batch_norm is not None and not isinstance(batch_norm, BatchNormSpec):
        raise TypeError(
            f"batch_norm must be specs.BatchNorm(), specs.FrozenBatchNorm() or None, "
            f"got {batch_norm!r}"
        )
    if isinstance(model, tv_fcos.FCOS):
        return _fcos_spec(model, batch_norm)
    if isinstance(model, tv_faster_rcnn.FasterRCNN):
        return _faster_rcnn_spec(model, batch_norm)
    backbone, neck = _backbone_and_neck(model, batch_norm)
    head, per_location = _head_spec(model.head, neck.channels)
    anchors = _anchors_spec(model.anchor_generator, neck.out_levels)
    if anchors.per_location != per_location:
        raise _unsupported(
            "anchor_generator",
            f"{anchors.per_location} anchors a location, the head has {per_location}",
        )
    matcher = model.proposal_matcher
    if type(matcher) is not tv_det_utils.Matcher:
        raise _unsupported("proposal_matcher", f"{type(matcher).__name__} is not a Matcher")
    return specs.RetinaNet(
        backbone=backbone,
        neck=neck,
        head=head,
        anchors=anchors,
        assigner=specs.MaxIoUAssigner(
            pos_iou=float(matcher.high_threshold),
            neg_iou=float(matcher.low_threshold),
            low_quality_matches=bool(matcher.allow_low_quality_matches),
        ),
        coder=_coder_spec(model),
        cls_loss=specs.SigmoidFocalLoss(alpha=0.25, gamma=2.0),
        box_loss=_box_loss_spec(str(model.head.regression_head._loss_type)),
        postprocess=specs.DensePostprocess(
            score_threshold=float(model.score_thresh),
            topk_per_level=int(model.topk_candidates),
            nms_iou=float(model.nms_thresh),
            max_detections=int(model.detections_per_img),
        ),
        normalize=_normalize_spec(model),
    )


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _rename_fcos(key: str) -> str | None:
    for old, new in _FCOS_RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            tower = _FCOS_TOWER.match(key)
            if tower is not None:
                prefix, index, rest = tower.groups()
                block, layer = divmod(int(index), 3)  # (conv, norm, relu) blocks
                if layer == 2:
                    return None  # a ReLU has no state: not a known key
                key = f"{prefix}{block}.{layer}.{rest}"
            return key
    return None


def _rename_faster_rcnn(key: str) -> str | None:
    if key.startswith("rpn.head."):
        return key
    if key.startswith(_MASK):
        renamed = rename_mask_keys({key[len(_ROI) :]: _MASK_PLACEHOLDER})
        return "mask_head." + next(iter(renamed)) if renamed else None
    if key.startswith("roi_heads."):
        renamed = rename_torchvision_keys({key[len("roi_heads.") :]: _NO_TENSOR})
        return "roi_heads." + next(iter(renamed)) if renamed else None
    for old, new in _RENAMES[:2]:  # backbone.body, backbone.fpn
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _rename(key: str, *, fcos: bool = False, faster_rcnn: bool = False) -> str | None:
    if fcos:
        return _rename_fcos(key)
    if faster_rcnn:
        return _rename_faster_rcnn(key)
    for old, new in _RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            flat = _FLAT_TOWER.match(key)
            if flat is not None:
                prefix, index, kind = flat.groups()
                key = f"{prefix}{int(index) // 2}.0.{kind}"
            return key
    return None


def _is_fcos(state_dict: Mapping[str, Tensor]) -> bool:
    return any(key.startswith(_FCOS_MARKER) for key in state_dict)


def _is_faster_rcnn(state_dict: Mapping[str, Tensor]) -> bool:
    return any(key.startswith(_FASTER_RCNN_MARKER) for key in state_dict)


def state_dict_from_torchvision(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision RetinaNet, FCOS, Faster R-CNN or Mask R-CNN state dict with fdet's parameter
    names (FCOS is told apart by its centerness predictor, ``head.regression_head.bbox_ctrness``,
    Faster R-CNN and Mask R-CNN by their ``roi_heads.box_predictor``).

    ResNet and FPN names are torchvision's already (``backbone.body.*`` → ``backbone.*``,
    ``backbone.fpn.*`` → ``neck.*``); the head's are renamed:

    - RetinaNet: ``head.classification_head.conv.*`` → ``head.cls_tower.*``, ``….cls_logits``
      → ``head.cls_logits``, ``head.regression_head.conv.*`` → ``head.box_tower.*``,
      ``….bbox_reg`` → ``head.box_deltas``. Towers saved by old torchvision versions (one flat
      ``Sequential``) are mapped too.
    - FCOS: the flat towers ``….conv.{3i}`` (conv) and ``….conv.{3i+1}`` (group norm) →
      ``head.cls_tower.{i}.0`` / ``.1`` and ``head.box_tower.{i}.0`` / ``.1``, ``….cls_logits``
      → ``head.cls_logits``, ``….bbox_reg`` → ``head.box_ltrb``, ``….bbox_ctrness`` →
      ``head.centerness``.
    - Faster R-CNN: ``rpn.head.*`` unchanged; ``roi_heads.*`` as
      :func:`fdet.models.detectors.two_stage.roi_heads.rename_torchvision_keys` renames them
      (``box_head.fc6`` / ``fc7`` → ``box_head.fcs.0`` / ``.1``, the v2 head's numbered layers
      → ``box_head.convs.{i}`` and ``box_head.fcs.{j}``, ``box_predictor.*`` unchanged).
    - Mask R-CNN: Faster R-CNN's, and ``roi_heads.mask_head.*`` / ``roi_heads.mask_predictor.*``
      → ``mask_head.*`` as
      :func:`fdet.models.detectors.two_stage.mask_head.rename_torchvision_keys` renames them
      (``mask_head.{i}.{j}`` → ``convs.{i}.{j}``, ``conv5_mask`` → ``upsample``,
      ``mask_fcn_logits`` → ``logits`` without its background channel).

    Tensors are shared, not copied.

    Raises:
        KeyError: for keys that belong to no part fdet knows (nothing is dropped).
    """
    fcos = _is_fcos(state_dict)
    faster_rcnn = _is_faster_rcnn(state_dict)
    out: dict[str, Tensor] = {}
    unknown = []
    if faster_rcnn:  # the RoI heads' keys are renamed together (the v2 head counts its layers)
        roi = {
            k[len(_ROI) :]: v
            for k, v in state_dict.items()
            if k.startswith(_ROI) and not k.startswith(_MASK)
        }
        renamed = rename_torchvision_keys(roi)
        out.update({_ROI + k: v for k, v in renamed.items()})
        if len(renamed) != len(roi):
            unknown += [_ROI + k for k in roi if not k.startswith(("box_head.", "box_predictor."))]
        mask = {k[len(_ROI) :]: v for k, v in state_dict.items() if k.startswith(_MASK)}
        out.update({"mask_head." + k: v for k, v in rename_mask_keys(mask).items()})
        unknown += [_ROI + k for k in mask if not rename_mask_keys({k: _MASK_PLACEHOLDER})]
    for key, value in state_dict.items():
        if faster_rcnn and key.startswith(_ROI):
            continue
        new = _rename(key, fcos=fcos, faster_rcnn=faster_rcnn)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyError(f"state_dict_from_torchvision: unknown keys {unknown[:10]}")
    return out


def load_torchvision(
    model: nn.Module, *, batch_norm: BatchNormSpec | None = None
) -> RetinaNet | FCOS | FasterRCNN | MaskRCNN:
    """An fdet :class:`~fdet.models.RetinaNet`, :class:`~fdet.models.FCOS`,
    :class:`~fdet.models.detectors.two_stage.faster_rcnn.FasterRCNN` or
    :class:`~fdet.models.detectors.two_stage.mask_rcnn.MaskRCNN` equal to the torchvision
    RetinaNet, FCOS, FasterRCNN or MaskRCNN ``model``: its spec (:func:`spec_from_torchvision`),
    its weights, its device, dtype and train/eval mode. A Mask R-CNN's ``postprocess`` gives
    box-frame mask probabilities (``paste_masks=False``); set its ``paste_masks`` for masks
    pasted in the input's pixels, torchvision's ``masks`` before they are resized to the
    original image.

    fdet's batch norms use ``eps=1e-5``. A torchvision norm with another eps (its COCO v1 weights
    set ``eps=0``) has its ``running_var`` shifted by the difference, so that
    ``running_var + eps`` and the output are unchanged.
    """
    spec = spec_from_torchvision(model, batch_norm=batch_norm)
    state = dict(state_dict_from_torchvision(model.state_dict()))
    fcos = isinstance(spec, specs.FCOS)
    faster_rcnn = isinstance(spec, specs.FasterRCNN)
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d | FrozenBatchNorm2d) and module.eps != _FDET_NORM_EPS:
            key = _rename(f"{name}.running_var", fcos=fcos, faster_rcnn=faster_rcnn)
            if key is not None:
                state[key] = state[key] + (module.eps - _FDET_NORM_EPS)
    detector = build(spec)
    if not isinstance(detector, RetinaNet | FCOS | FasterRCNN):
        raise TypeError(f"{type(spec).__name__} built a {type(detector).__name__}")
    detector.load_state_dict(state, strict=True)
    reference = next(iter(model.parameters()), None)
    if reference is not None:
        detector.to(device=reference.device, dtype=reference.dtype)
    return detector.train(model.training)
