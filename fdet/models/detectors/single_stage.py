"""A single-stage detector: normalize → backbone → neck → dense head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

__all__ = ["SingleStageDetector"]


class SingleStageDetector(nn.Module):
    """``forward(images)`` normalizes ``images[B, 3, H, W]`` (values in ``[0, input_range]``),
    runs ``head(neck(backbone(x)))`` and returns the head's outputs unchanged.

    The module holds parameters only; anchors, assignment, losses and postprocessing are pure
    functions applied to its outputs (see :class:`fdet.models.detectors.retinanet.RetinaNet` for
    a detector that wires them up as methods).
    """

    input_mean: Tensor
    input_std: Tensor

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
        self.input_range = float(input_range)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("input_mean", mean_t, persistent=False)
        self.register_buffer("input_std", std_t, persistent=False)

    def normalize(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 3 H W"]:
        """``(images / input_range - mean) / std`` in float32 (the buffers' dtype).

        Written out rather than folded into one multiply-add, so that float images in ``[0, 1]``
        are normalized bit for bit as torchvision's ``GeneralizedRCNNTransform`` does.
        """
        x = images.to(self.input_mean.dtype)
        if self.input_range != 1.0:
            x = x / self.input_range
        return (x - self.input_mean) / self.input_std

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> Any:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        return self.head(self.neck(self.backbone(self.normalize(images))))
