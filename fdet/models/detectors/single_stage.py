"""A single-stage detector: normalize → backbone → neck → dense head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from fdet import specs
from fdet.registry import build, register


class SingleStageDetector(nn.Module):
    """``forward(images)`` normalizes ``images[B, 3, H, W]`` (values in ``[0, input_range]``),
    runs ``head(neck(backbone(x)))`` and returns the head's outputs unchanged.

    The module holds parameters only; anchors, assignment, losses and postprocessing are pure
    functions applied to its outputs.
    """

    input_scale: Tensor
    input_shift: Tensor

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_range: float = 255.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        # scale and shift folded into one multiply-add: (x / range - mean) / std
        scale = 1.0 / (torch.tensor(std, dtype=torch.float32) * input_range)
        shift = -torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 3 H W"]:
        return images.to(self.input_scale.dtype) * self.input_scale + self.input_shift

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> Any:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        return self.head(self.neck(self.backbone(self.normalize(images))))


@register(specs.RetinaNet)
def build_retinanet(spec: specs.RetinaNet) -> SingleStageDetector:
    backbone = build(spec.backbone)
    neck = build(
        spec.neck, in_channels=spec.backbone.out_channels, input_levels=spec.backbone.out_levels
    )
    head = build(spec.head, in_channels=spec.neck.channels, num_anchors=spec.anchors.per_location)
    return SingleStageDetector(
        backbone=backbone,
        neck=neck,
        head=head,
        mean=spec.normalize.mean,
        std=spec.normalize.std,
        input_range=spec.normalize.input_range,
    )
