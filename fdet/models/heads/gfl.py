"""GFL head: towers shared over the levels predicting the joint class–quality score and, for
each box side, a distribution over distances."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from fdet import specs
from fdet.models.heads.retina import _tower
from fdet.models.layers import NormLayer, norm_factory
from fdet.registry import register


class GFLHeadOutputs(NamedTuple):
    """Per-level predictions, flattened in anchor order (row-major locations, then the anchors of
    each location: the order of :func:`fdet.ops.anchors.grid_anchors`)."""

    cls_logits: tuple[Float[Tensor, "B A_l K"], ...]  # the joint class–IoU score's logits
    # logits of the distances (l, t, r, b) over the bins 0 … reg_max, in stride units
    box_dists: tuple[Float[Tensor, "B A_l 4 N"], ...]
    feature_sizes: tuple[tuple[int, int], ...]  # (H_l, W_l) of each level
    # (H, W) of the padded input, set by the detector (the head sees only features); needed by
    # anchors placed with ``Anchors(placement="image_ratio")``, None where not known
    image_size: tuple[int, int] | None = None


class GFLHead(nn.Module):
    """Two towers of ``num_convs`` 3×3 convs (``norm`` and ReLU after each), then 3×3
    predictors: ``num_anchors × num_classes`` logits on the classification tower and
    ``num_anchors × 4 × (reg_max + 1)`` distribution logits on the box tower, the latter
    multiplied on level ``l`` by a learned scalar ``s_l`` (starting at 1).

    ``norm``: a :class:`fdet.specs.Norm` spec or a callable ``channels -> nn.Module``; None for
    plain convs (a conv followed by a norm has no bias). Weights start from N(0, 0.01²), biases
    from 0 but the classification bias, ``-log((1 - prior_prob) / prior_prob)``.

    Parameters: ``cls_tower.{i}.0`` / ``box_tower.{i}.0`` (the convs), ``….1`` (their norms),
    ``cls_logits``, ``box_dists`` (the predictors) and ``scales`` (``[num_levels]``).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_levels: int,
        num_convs: int = 4,
        channels: int = 256,
        prior_prob: float = 0.01,
        norm: NormLayer | None = None,
        reg_max: int = 16,
    ) -> None:
        super().__init__()
        if reg_max < 1:
            raise ValueError(f"reg_max must be >= 1, got {reg_max}")
        make_norm = None if norm is None else norm_factory(norm)
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.reg_max = reg_max
        tower_out = channels if num_convs > 0 else in_channels
        self.cls_tower = _tower(in_channels, channels, num_convs, make_norm)
        self.box_tower = _tower(in_channels, channels, num_convs, make_norm)
        self.cls_logits = nn.Conv2d(tower_out, num_anchors * num_classes, 3, padding=1)
        self.box_dists = nn.Conv2d(tower_out, num_anchors * 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))  # type: ignore[arg-type]

    def _flatten(self, x: Tensor, *per_anchor: int) -> Tensor:
        b, _, h, w = x.shape
        # [B, a*C, H, W] -> [B, H, W, a, C] -> [B, H*W*a, *per_anchor]
        return (
            x.view(b, self.num_anchors, -1, h, w)
            .permute(0, 3, 4, 1, 2)
            .reshape(b, h * w * self.num_anchors, *per_anchor)
        )

    def forward(self, features: Sequence[Float[Tensor, "B C H W"]]) -> GFLHeadOutputs:
        if len(features) != self.num_levels:
            raise ValueError(f"the head has {self.num_levels} levels, got {len(features)} maps")
        cls, dists, sizes = [], [], []
        for level, x in enumerate(features):  # a loop over pyramid levels
            logits = self.box_dists(self.box_tower(x)) * self.scales[level]  # [B, a*4*N, H, W]
            cls.append(self._flatten(self.cls_logits(self.cls_tower(x)), self.num_classes))
            dists.append(self._flatten(logits, 4, self.reg_max + 1))  # [B, H*W*a, 4, N]
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
        return GFLHeadOutputs(tuple(cls), tuple(dists), tuple(sizes))


@register(specs.GFLHead)
def build_gfl_head(
    spec: specs.GFLHead, *, in_channels: int, num_anchors: int, num_levels: int
) -> GFLHead:
    """``in_channels``: the neck's channels; ``num_anchors``: anchors a location;
    ``num_levels``: the neck's output levels."""
    return GFLHead(
        in_channels=in_channels,
        num_anchors=num_anchors,
        num_classes=spec.num_classes,
        num_levels=num_levels,
        num_convs=spec.num_convs,
        channels=spec.channels,
        prior_prob=spec.prior_prob,
        norm=spec.norm,
        reg_max=spec.reg_max,
    )


__all__ = ["GFLHead", "GFLHeadOutputs", "build_gfl_head"]
