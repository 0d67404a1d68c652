"""Backbones: image → multi-level feature maps ``(C_l for l in out_levels)``."""

from fdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet, build_resnet

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_resnet"]
