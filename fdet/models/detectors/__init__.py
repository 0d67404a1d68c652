"""Whole detectors. Start with :mod:`fdet.models.detectors.base`: the contract every family
follows (``forward``, ``loss`` → :class:`Term` s, ``postprocess``, ``predict``)."""

from fdet.models.detectors import two_stage
from fdet.models.detectors.atss import ATSS, atss_loss, atss_postprocess, build_atss
from fdet.models.detectors.base import Detector, LossTerms, Term, term_values, total_loss
from fdet.models.detectors.centernet import (
    CenterNet,
    build_centernet,
    centernet_loss,
    centernet_postprocess,
    centernet_targets,
)
from fdet.models.detectors.dense import DenseDetector
from fdet.models.detectors.fcos import FCOS, build_fcos, fcos_loss, fcos_points, fcos_postprocess
from fdet.models.detectors.gfl import GFL, build_gfl, gfl_loss, gfl_postprocess
from fdet.models.detectors.retinanet import (
    RetinaNet,
    build_retinanet,
    retinanet_anchors,
    retinanet_assign,
    retinanet_loss,
    retinanet_postprocess,
)

__all__ = [
    "ATSS",
    "FCOS",
    "GFL",
    "CenterNet",
    "DenseDetector",
    "Detector",
    "LossTerms",
    "RetinaNet",
    "Term",
    "atss_loss",
    "atss_postprocess",
    "build_atss",
    "build_centernet",
    "build_fcos",
    "build_gfl",
    "build_retinanet",
    "centernet_loss",
    "centernet_postprocess",
    "centernet_targets",
    "fcos_loss",
    "fcos_points",
    "fcos_postprocess",
    "gfl_loss",
    "gfl_postprocess",
    "retinanet_anchors",
    "retinanet_assign",
    "retinanet_loss",
    "retinanet_postprocess",
    "term_values",
    "total_loss",
    "two_stage",
]
