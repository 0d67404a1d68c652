"""Necks: backbone maps → pyramid maps ``(P_l for l in out_levels)`` of one width."""

from fdet.models.necks.centernet import CenterNetNeck, build_centernet_neck
from fdet.models.necks.fpn import FPN, build_fpn

__all__ = ["FPN", "CenterNetNeck", "build_centernet_neck", "build_fpn"]
