"""Whole detectors. Start with :mod:`fdet.models.detectors.base`: the contract every family
follows (``forward``, ``loss`` → :class:`Term` s, ``postprocess``, ``predict``)."""

from fdet.models.detectors.base import Detector, LossTerms, Term, term_values, total_loss
from fdet.models.detectors.dense import DenseDetector
from fdet.models.detectors.retinanet import (
    RetinaNet,
    build_retinanet,
    retinanet_anchors,
    retinanet_assign,
    retinanet_loss,
    retinanet_postprocess,
)

__all__ = [
    "DenseDetector",
    "Detector",
    "LossTerms",
    "RetinaNet",
    "Term",
    "build_retinanet",
    "retinanet_anchors",
    "retinanet_assign",
    "retinanet_loss",
    "retinanet_postprocess",
    "term_values",
    "total_loss",
]
