"""torchvision's RetinaNet as an fdet spec, state dict and detector.

    >>> tv = torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=...)
    >>> detector = load_torchvision(tv)          # fdet RetinaNet with the same weights
    >>> detections = detector.predict(images)    # images: float [B, 3, H, W] in [0, 1]

:func:`spec_from_torchvision` reads every setting of a ``torchvision.models.detection.RetinaNet``
instance (ResNet + FPN backbone, head, anchors, matcher, box coder, box loss, postprocess,
normalization) into a :class:`fdet.specs.RetinaNet` and raises :class:`UnsupportedModelError`,
naming the part, for anything fdet cannot express. :func:`state_dict_from_torchvision` renames the
weights, and :func:`load_torchvision` does both.

What the spec does not carry: torchvision's ``GeneralizedRCNNTransform`` resizes images
(``min_size``/``max_size``) and pads them to a multiple of 32; an fdet detector takes the batch as
it comes, resized and padded by the data pipeline. torchvision also takes an anchor stride as
``padded size // feature size``, which is ``2**level`` on every level only when the padded size
is a multiple of 128; fdet always uses ``2**level``. Outputs agree wherever both hold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from fdet import specs
from fdet.models.detectors.retinanet import RetinaNet, build_retinanet
from fdet.ops.anchors import level_sizes
from fdet.ops.coding import stds_from_weights
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


class UnsupportedModelError(ValueError):
    """A torchvision model has a part or a setting that fdet's RetinaNet cannot express."""


def _unsupported(where: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"torchvision RetinaNet: {where}: {what}")


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


def _fpn_spec(fpn: Any, in_levels: tuple[int, ...], in_channels: tuple[int, ...]) -> specs.FPN:
    if not isinstance(fpn, FeaturePyramidNetwork):
        raise _unsupported("backbone.fpn", f"{type(fpn).__name__} is not a FeaturePyramidNetwork")
    inner = fpn.inner_blocks[0]
    if len(inner) != 1:
        raise _unsupported("backbone.fpn", "FPN convs with a norm layer")
    channels = inner[0].out_channels
    got = tuple(block[0].in_channels for block in fpn.inner_blocks)
    if got != in_channels:
        raise _unsupported(
            "backbone.fpn", f"input channels {got}, the backbone gives {in_channels}"
        )
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


def spec_from_torchvision(
    model: nn.Module, *, batch_norm: BatchNormSpec | None = None
) -> specs.RetinaNet:
    """The :class:`fdet.specs.RetinaNet` of a torchvision ``RetinaNet`` instance.

    Reads the backbone (ResNet depth, width, returned levels, frozen stages from
    ``requires_grad``, norm), the FPN (channels, extra levels from P5 or C5), the head (classes,
    convs, group norm or none), the anchor sizes and ratios, the matcher's IoU thresholds, the
    box coder, the box loss (``giou`` for the v2 recipe), the postprocess thresholds and the
    normalization (``input_range=1.0``: torchvision takes float images in ``[0, 1]``).

    ``batch_norm``: the backbone norm of the spec; by default that of the model
    (``BatchNorm2d`` → ``specs.BatchNorm()``, as in torchvision's untrained models;
    ``FrozenBatchNorm2d`` → ``specs.FrozenBatchNorm()``, as in its pretrained ones). Pass
    ``specs.FrozenBatchNorm()`` to fine-tune with frozen statistics.

    Raises:
        UnsupportedModelError: naming the part of the model fdet cannot express (e.g. a
            non-ResNet backbone, ``LastLevelMaxPool``, a ``ciou`` loss).
    """
    if not isinstance(model, tv_retinanet.RetinaNet):
        raise TypeError(
            f"spec_from_torchvision takes a torchvision.models.detection.RetinaNet, "
            f"got {type(model).__name__}"
        )
    if batch_norm is not None and not isinstance(batch_norm, BatchNormSpec):
        raise TypeError(
            f"batch_norm must be specs.BatchNorm(), specs.FrozenBatchNorm() or None, "
            f"got {batch_norm!r}"
        )
    body = getattr(model.backbone, "body", None)
    fpn = getattr(model.backbone, "fpn", None)
    if body is None or fpn is None:
        raise _unsupported("backbone", f"{type(model.backbone).__name__} is not a BackboneWithFPN")
    backbone, levels = _resnet_spec(body, batch_norm)
    in_channels = backbone.out_channels
    neck = _fpn_spec(fpn, levels, in_channels)
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
    transform = model.transform
    if not isinstance(transform, GeneralizedRCNNTransform):
        raise _unsupported("transform", f"{type(transform).__name__}")
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
        normalize=specs.Normalize(
            mean=tuple(transform.image_mean), std=tuple(transform.image_std), input_range=1.0
        ),
    )


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _rename(key: str) -> str | None:
    for old, new in _RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
            flat = _FLAT_TOWER.match(key)
            if flat is not None:
                prefix, index, kind = flat.groups()
                key = f"{prefix}{int(index) // 2}.0.{kind}"
            return key
    return None


def state_dict_from_torchvision(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision RetinaNet state dict with fdet's parameter names.

    ResNet and FPN names are torchvision's already (``backbone.body.*`` → ``backbone.*``,
    ``backbone.fpn.*`` → ``neck.*``); the head's are renamed:
    ``head.classification_head.conv.*`` → ``head.cls_tower.*``, ``….cls_logits`` →
    ``head.cls_logits``, ``head.regression_head.conv.*`` → ``head.box_tower.*``, ``….bbox_reg``
    → ``head.box_deltas``. Towers saved by old torchvision versions (one flat ``Sequential``)
    are mapped too. Tensors are shared, not copied.

    Raises:
        KeyError: for keys that belong to no part fdet knows (nothing is dropped).
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new = _rename(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyError(f"state_dict_from_torchvision: unknown keys {unknown[:10]}")
    return out


def load_torchvision(model: nn.Module, *, batch_norm: BatchNormSpec | None = None) -> RetinaNet:
    """An fdet :class:`~fdet.models.RetinaNet` equal to the torchvision RetinaNet ``model``:
    its spec (:func:`spec_from_torchvision`), its weights, its device, dtype and train/eval mode.

    fdet's batch norms use ``eps=1e-5``. A torchvision norm with another eps (its COCO v1 weights
    set ``eps=0``) has its ``running_var`` shifted by the difference, so that
    ``running_var + eps`` and the output are unchanged.
    """
    spec = spec_from_torchvision(model, batch_norm=batch_norm)
    state = dict(state_dict_from_torchvision(model.state_dict()))
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d | FrozenBatchNorm2d) and module.eps != _FDET_NORM_EPS:
            key = _rename(f"{name}.running_var")
            if key is not None:
                state[key] = state[key] + (module.eps - _FDET_NORM_EPS)
    detector = build_retinanet(spec)
    detector.load_state_dict(state, strict=True)
    reference = next(iter(model.parameters()), None)
    if reference is not None:
        detector.to(device=reference.device, dtype=reference.dtype)
    return detector.train(model.training)
