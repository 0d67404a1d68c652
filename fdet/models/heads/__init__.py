"""Detection heads."""

from fdet.models.heads.retina import RetinaHead, RetinaHeadOutputs

__all__ = ["RetinaHead", "RetinaHeadOutputs"]
