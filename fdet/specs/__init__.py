"""Immutable, typed spec trees that describe detectors and experiments.

Every spec class is a frozen, keyword-only attrs class validated at construction; every spec
round-trips through JSON (:func:`to_json`, :func:`from_json`) and loads from spec files
(:func:`load`).
"""

from fdet.specs._core import Spec, SpecError, spec_types
from fdet.specs.backbones import ResNet
from fdet.specs.data import CocoData, ShapesData, Transforms
from fdet.specs.dense import Anchors, DeltaXYWHCoder, DensePostprocess, MaxIoUAssigner, Normalize
from fdet.specs.detectors import RetinaNet
from fdet.specs.heads import RetinaHead
from fdet.specs.loading import load, load_module
from fdet.specs.losses import GIoULoss, L1Loss, SigmoidFocalLoss, SmoothL1Loss
from fdet.specs.necks import FPN
from fdet.specs.serde import SCHEMA_VERSION, format_tree, from_dict, from_json, to_dict, to_json
from fdet.specs.train import EMA, SGD, AdamW, Experiment, ParamGroups, Schedule

__all__ = [
    "EMA",
    "FPN",
    "SCHEMA_VERSION",
    "SGD",
    "AdamW",
    "Anchors",
    "CocoData",
    "DeltaXYWHCoder",
    "DensePostprocess",
    "Experiment",
    "GIoULoss",
    "L1Loss",
    "MaxIoUAssigner",
    "Normalize",
    "ParamGroups",
    "ResNet",
    "RetinaHead",
    "RetinaNet",
    "Schedule",
    "ShapesData",
    "SigmoidFocalLoss",
    "SmoothL1Loss",
    "Spec",
    "SpecError",
    "Transforms",
    "format_tree",
    "from_dict",
    "from_json",
    "load",
    "load_module",
    "spec_types",
    "to_dict",
    "to_json",
]
