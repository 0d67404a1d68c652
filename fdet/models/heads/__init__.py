"""Detection heads."""

from fdet.models.heads.atss import ATSSHead, ATSSHeadOutputs
from fdet.models.heads.centernet import CenterNetHead, CenterNetOutputs
from fdet.models.heads.fcos import FCOSHead, FCOSHeadOutputs
from fdet.models.heads.gfl import GFLHead, GFLHeadOutputs
from fdet.models.heads.retina import RetinaHead, RetinaHeadOutputs

__all__ = [
    "ATSSHead",
    "ATSSHeadOutputs",
    "CenterNetHead",
    "CenterNetOutputs",
    "FCOSHead",
    "FCOSHeadOutputs",
    "GFLHead",
    "GFLHeadOutputs",
    "RetinaHead",
    "RetinaHeadOutputs",
]
