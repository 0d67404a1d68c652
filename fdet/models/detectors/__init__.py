"""Whole detectors composed from backbone, neck and head modules."""

from fdet.models.detectors.retinanet import (
    RetinaNet,
    RetinaNetLoss,
    build_retinanet,
    retinanet_anchors,
    retinanet_assign,
    retinanet_loss,
    retinanet_postprocess,
)
from fdet.models.detectors.single_stage import SingleStageDetector

__all__ = [
    "RetinaNet",
    "RetinaNetLoss",
    "SingleStageDetector",
    "build_retinanet",
    "retinanet_anchors",
    "retinanet_assign",
    "retinanet_loss",
    "retinanet_postprocess",
]
