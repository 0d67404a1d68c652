"""nn.Modules and the builders registered for their spec types."""

from fdet.models import backbones, detectors, heads, necks
from fdet.models.backbones import ResNet
from fdet.models.detectors import (
    ATSS,
    FCOS,
    GFL,
    CenterNet,
    DenseDetector,
    Detector,
    RetinaNet,
    Term,
)
from fdet.models.heads import (
    ATSSHead,
    ATSSHeadOutputs,
    CenterNetHead,
    CenterNetOutputs,
    FCOSHead,
    FCOSHeadOutputs,
    GFLHead,
    GFLHeadOutputs,
    RetinaHead,
    RetinaHeadOutputs,
)
from fdet.models.necks import FPN, CenterNetNeck

__all__ = [
    "ATSS",
    "FCOS",
    "FPN",
    "GFL",
    "ATSSHead",
    "ATSSHeadOutputs",
    "CenterNet",
    "CenterNetHead",
    "CenterNetNeck",
    "CenterNetOutputs",
    "DenseDetector",
    "Detector",
    "FCOSHead",
    "FCOSHeadOutputs",
    "GFLHead",
    "GFLHeadOutputs",
    "ResNet",
    "RetinaHead",
    "RetinaHeadOutputs",
    "RetinaNet",
    "Term",
    "backbones",
    "detectors",
    "heads",
    "necks",
]
