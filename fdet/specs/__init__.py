"""Immutable, typed spec trees that describe detectors and experiments.

Every spec class is a frozen, keyword-only attrs class validated at construction; every spec
round-trips through JSON (:func:`to_json`, :func:`from_json`) and loads from spec files
(:func:`load`). The abstract bases (:class:`Detector`, :class:`Norm`,
:class:`ClassificationLoss`, :class:`BoxLoss`, :class:`Warmup`, :class:`Decay`,
:class:`Optimizer`) are extension points: subclass one and register a builder, and your class
works in spec files, JSON and ``--set`` overrides like fdet's own (docs/specs.md).
"""

from fdet.specs._core import Spec, SpecError, concrete_subclasses, spec_types
from fdet.specs.atss import ATSS, ATSSAssigner, ATSSHead
from fdet.specs.backbones import ResNet
from fdet.specs.cascade import CascadeRCNN
from fdet.specs.centernet import (
    CenterNet,
    CenterNetHead,
    CenterNetNeck,
    CenterNetPostprocess,
    GaussianRadius,
    HeatmapFocalLoss,
)
from fdet.specs.data import CocoData, ShapesData, Transforms
from fdet.specs.dense import Anchors, DeltaXYWHCoder, DensePostprocess, MaxIoUAssigner, Normalize
from fdet.specs.detectors import Detector, RetinaNet, check_pyramid, check_strides
from fdet.specs.fcos import FCOS, DistanceCoder, FCOSAssigner, FCOSHead, Points
from fdet.specs.gfl import GFL, DistributionFocalLoss, GFLHead, QualityFocalLoss
from fdet.specs.heads import RetinaHead
from fdet.specs.loading import load, load_module
from fdet.specs.losses import (
    BoxLoss,
    ClassificationLoss,
    GIoULoss,
    L1Loss,
    SigmoidFocalLoss,
    SmoothL1Loss,
)
from fdet.specs.mask import MaskHead
from fdet.specs.necks import FPN
from fdet.specs.norms import BatchNorm, FrozenBatchNorm, GroupNorm, Norm
from fdet.specs.overrides import apply_overrides, parse_override
from fdet.specs.roi import BoxHead, RoIAlign, RoIHead, RoIPostprocess
from fdet.specs.rpn import RPN, Sampler
from fdet.specs.schedules import (
    ConstantDecay,
    ConstantWarmup,
    CosineDecay,
    Decay,
    LinearWarmup,
    PolyDecay,
    Schedule,
    StepDecay,
    Warmup,
)
from fdet.specs.semi import SemiSupervised, StrongAugment, UnlabeledImages
from fdet.specs.serde import SCHEMA_VERSION, format_tree, from_dict, from_json, to_dict, to_json
from fdet.specs.train import EMA, SGD, AdamW, Experiment, Optimizer, ParamGroups
from fdet.specs.tta import TTA
from fdet.specs.two_stage import FasterRCNN, MaskRCNN

__all__ = [
    "ATSS",
    "EMA",
    "FCOS",
    "FPN",
    "GFL",
    "RPN",
    "SCHEMA_VERSION",
    "SGD",
    "TTA",
    "ATSSAssigner",
    "ATSSHead",
    "AdamW",
    "Anchors",
    "BatchNorm",
    "BoxHead",
    "BoxLoss",
    "CascadeRCNN",
    "CenterNet",
    "CenterNetHead",
    "CenterNetNeck",
    "CenterNetPostprocess",
    "ClassificationLoss",
    "CocoData",
    "ConstantDecay",
    "ConstantWarmup",
    "CosineDecay",
    "Decay",
    "DeltaXYWHCoder",
    "DensePostprocess",
    "Detector",
    "DistanceCoder",
    "DistributionFocalLoss",
    "Experiment",
    "FCOSAssigner",
    "FCOSHead",
    "FasterRCNN",
    "FrozenBatchNorm",
    "GFLHead",
    "GIoULoss",
    "GaussianRadius",
    "GroupNorm",
    "HeatmapFocalLoss",
    "L1Loss",
    "LinearWarmup",
    "MaskHead",
    "MaskRCNN",
    "MaxIoUAssigner",
    "Norm",
    "Normalize",
    "Optimizer",
    "ParamGroups",
    "Points",
    "PolyDecay",
    "QualityFocalLoss",
    "ResNet",
    "RetinaHead",
    "RetinaNet",
    "RoIAlign",
    "RoIHead",
    "RoIPostprocess",
    "Sampler",
    "Schedule",
    "SemiSupervised",
    "ShapesData",
    "SigmoidFocalLoss",
    "SmoothL1Loss",
    "Spec",
    "SpecError",
    "StepDecay",
    "StrongAugment",
    "Transforms",
    "UnlabeledImages",
    "Warmup",
    "apply_overrides",
    "check_pyramid",
    "check_strides",
    "concrete_subclasses",
    "format_tree",
    "from_dict",
    "from_json",
    "load",
    "load_module",
    "parse_override",
    "spec_types",
    "to_dict",
    "to_json",
]
