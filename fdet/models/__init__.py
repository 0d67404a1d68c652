"""nn.Modules and the builders registered for their spec types."""

from fdet.models import backbones, detectors, heads, necks
from fdet.models.backbones import ResNet
from fdet.models.detectors import DenseDetector, Detector, RetinaNet, Term
from fdet.models.heads import RetinaHead, RetinaHeadOutputs
from fdet.models.necks import FPN

__all__ = [
    "FPN",
    "DenseDetector",
    "Detector",
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
