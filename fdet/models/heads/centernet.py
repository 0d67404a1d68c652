"""CenterNet head: three small branches on one stride-4 map — class heatmap, box size, centre
offset ("Objects as Points", Zhou et al. 2019, section 4)."""

from __future__ import annotations

import math
from typing import NamedTuple

from jaxtyping import Float
from torch import Tensor, nn

from fdet import specs
from fdet.registry import register

__all__ = ["CenterNetHead", "CenterNetOutputs", "build_centernet_head"]


class CenterNetOutputs(NamedTuple):
    """Dense predictions on the output grid (stride 4 by default), channels first.

    ``heatmap``: class logits ``Ŷ`` (sigmoid gives the scores). ``size``: ``(w, h)`` of the
    box centred there, in output cells (input pixels / stride), as the paper's code regresses
    it. ``offset``: ``(dx, dy)`` from the cell's corner to the exact centre, in cells (``[0,
    1)`` for the ground truth): the object centre in pixels is ``(x + dx, y + dy) · stride``.
    """

    heatmap: Float[Tensor, "B K H W"]
    size: Float[Tensor, "B 2 H W"]
    offset: Float[Tensor, "B 2 H W"]


def _branch(in_channels: int, channels: int, out_channels: int) -> nn.Sequential:
    """conv 3×3 (with bias) → ReLU → conv 1×1."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, out_channels, 1),
    )


class CenterNetHead(nn.Module):
    """``forward(x)`` returns :class:`CenterNetOutputs` for a map ``x[B, C, H, W]``.

    Three branches, each a 3×3 conv of ``channels`` + ReLU + a 1×1 conv: ``heatmap``
    (``num_classes`` outputs), ``size`` (2) and ``offset`` (2).

    Initialization as in the paper's code: the size and offset convs normal with std 0.001 and
    bias 0 (both start near 0); the heatmap convs keep PyTorch's default initialization except
    the last bias, ``-log((1 - prior_prob) / prior_prob)`` (-2.19 for the default prior 0.1),
    so that every location starts predicting "object" with probability about ``prior_prob``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        channels: int = 64,
        prior_prob: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0 < prior_prob < 1:
            raise ValueError(f"CenterNetHead prior_prob must be in (0, 1), got {prior_prob}")
        self.num_classes = num_classes
        self.heatmap = _branch(in_channels, channels, num_classes)
        self.size = _branch(in_channels, channels, 2)
        self.offset = _branch(in_channels, channels, 2)
        for module in (*self.size, *self.offset):
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.001)
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - prior_prob) / prior_prob))  # type: ignore[arg-type]

    def forward(self, x: Float[Tensor, "B C H W"]) -> CenterNetOutputs:
        return CenterNetOutputs(self.heatmap(x), self.size(x), self.offset(x))


@register(specs.CenterNetHead)
def build_centernet_head(spec: specs.CenterNetHead, *, in_channels: int) -> CenterNetHead:
    """``in_channels``: the neck's output channels."""
    return CenterNetHead(
        in_channels=in_channels,
        num_classes=spec.num_classes,
        channels=spec.channels,
        prior_prob=spec.prior_prob,
    )
