"""FCOS head: classification and regression towers shared over every pyramid level, with a
centerness branch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from fdet import specs
from fdet.models.heads.retina import _tower
from fdet.models.layers import NormLayer, norm_factory
from fdet.registry import register


class FCOSHeadOutputs(NamedTuple):
    """Per-level predictions, one row a point, row-major over each level's locations (the order
    of :func:`fdet.ops.anchors.grid_points`)."""

    cls_logits: tuple[Float[Tensor, "B A_l K"], ...]
    box_ltrb: tuple[Float[Tensor, "B A_l 4"], ...]  # distances (l, t, r, b) >= 0, coder units
    centerness: tuple[Float[Tensor, "B A_l"], ...]  # logits
    feature_sizes: tuple[tuple[int, int], ...]  # (H_l, W_l) of each level
    # (H, W) of the padded input, set by the detector (the head sees only features); needed by
    # points placed with ``Points(placement="image_ratio")``, None where not known
    image_size: tuple[int, int] | None = None


class FCOSHead(nn.Module):
    """Two towers of ``num_convs`` 3×3 convs (``norm`` and ReLU after each), then 3×3
    predictors: ``num_classes`` logits on the classification tower, 4 distances and one
    centerness logit on the regression tower (or centerness on the classification tower with
    ``centerness_on="cls"``).

    The distances are ``relu(s_l · x)`` or ``exp(s_l · x)`` (``distance_activation``) of the
    predictor's output ``x``, with ``s_l`` a learned scalar per level (``learned_scales``,
    starting at 1) or 1.

    ``norm``: a :class:`fdet.specs.Norm` spec or a callable ``channels -> nn.Module``; None for
    plain convs. ``tower_bias``: the tower convs keep their bias before the norm (FCOS's code
    and torchvision's ``FCOSHead`` do).

    Parameters: ``cls_tower.{i}.0`` / ``box_tower.{i}.0`` (the convs), ``….1`` (their norms),
    ``cls_logits``, ``box_ltrb``, ``centerness`` (the predictors) and ``scales`` (``[L]``, with
    ``learned_scales``). ``fdet.compat.torchvision`` maps torchvision's ``FCOSHead`` names onto
    these.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_levels: int,
        num_convs: int = 4,
        channels: int = 256,
        prior_prob: float = 0.01,
        norm: NormLayer | None = None,
        tower_bias: bool = True,
        centerness_on: Literal["box", "cls"] = "box",
        distance_activation: Literal["relu", "exp"] = "relu",
        learned_scales: bool = False,
    ) -> None:
        super().__init__()
        if centerness_on not in ("box", "cls"):
            raise ValueError(f"centerness_on must be 'box' or 'cls', got {centerness_on!r}")
        if distance_activation not in ("relu", "exp"):
            raise ValueError(
                f"distance_activation must be 'relu' or 'exp', got {distance_activation!r}"
            )
        make_norm = None if norm is None else norm_factory(norm)
        bias = True if tower_bias else None
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.centerness_on = centerness_on
        self.distance_activation = distance_activation
        tower_out = channels if num_convs > 0 else in_channels
        self.cls_tower = _tower(in_channels, channels, num_convs, make_norm, bias=bias)
        self.box_tower = _tower(in_channels, channels, num_convs, make_norm, bias=bias)
        self.cls_logits = nn.Conv2d(tower_out, num_classes, 3, padding=1)
        self.box_ltrb = nn.Conv2d(tower_out, 4, 3, padding=1)
        self.centerness = nn.Conv2d(tower_out, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels)) if learned_scales else None
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))  # type: ignore[arg-type]

    @staticmethod
    def _flatten(x: Tensor) -> Tensor:
        # [B, C, H, W] -> [B, H*W, C]
        return x.flatten(2).transpose(1, 2)

    def forward(self, features: Sequence[Float[Tensor, "B C H W"]]) -> FCOSHeadOutputs:
        if len(features) != self.num_levels:
            raise ValueError(f"the head has {self.num_levels} levels, got {len(features)} maps")
        cls, ltrb, ctr, sizes = [], [], [], []
        for level, x in enumerate(features):  # a loop over pyramid levels
            cls_features = self.cls_tower(x)
            box_features = self.box_tower(x)
            distances = self.box_ltrb(box_features)  # [B, 4, H, W]
            if self.scales is not None:
                distances = distances * self.scales[level]
            if self.distance_activation == "relu":
                distances = torch.relu(distances)
            else:
                distances = torch.exp(distances)
            ctr_features = box_features if self.centerness_on == "box" else cls_features
            cls.append(self._flatten(self.cls_logits(cls_features)))  # [B, H*W, K]
            ltrb.append(self._flatten(distances))  # [B, H*W, 4]
            ctr.append(self.centerness(ctr_features).flatten(1))  # [B, H*W]
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
        return FCOSHeadOutputs(tuple(cls), tuple(ltrb), tuple(ctr), tuple(sizes))


@register(specs.FCOSHead)
def build_fcos_head(spec: specs.FCOSHead, *, in_channels: int, num_levels: int) -> FCOSHead:
    """``in_channels``: the neck's channels; ``num_levels``: its output levels."""
    return FCOSHead(
        in_channels=in_channels,
        num_classes=spec.num_classes,
        num_levels=num_levels,
        num_convs=spec.num_convs,
        channels=spec.channels,
        prior_prob=spec.prior_prob,
        norm=spec.norm,
        tower_bias=spec.tower_bias,
        centerness_on=spec.centerness_on,
        distance_activation=spec.distance_activation,
        learned_scales=spec.learned_scales,
    )


__all__ = ["FCOSHead", "FCOSHeadOutputs", "build_fcos_head"]
