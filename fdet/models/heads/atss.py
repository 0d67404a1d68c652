"""ATSS head: RetinaNet's towers with a learned scale a level on the box deltas and a
centerness branch on the box tower."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor, nn

from fdet import specs
from fdet.models.heads.retina import RetinaHead
from fdet.models.layers import NormLayer
from fdet.registry import register


class ATSSHeadOutputs(NamedTuple):
    """Per-level predictions, flattened in anchor order (row-major locations, then the anchors of
    each location: the order of :func:`fdet.ops.anchors.grid_anchors`)."""

    cls_logits: tuple[Float[Tensor, "B A_l K"], ...]
    box_deltas: tuple[Float[Tensor, "B A_l 4"], ...]  # scaled by the level's learned factor
    centerness: tuple[Float[Tensor, "B A_l"], ...] | None  # logits; None without the branch
    feature_sizes: tuple[tuple[int, int], ...]  # (H_l, W_l) of each level
    # (H, W) of the padded input, set by the detector (the head sees only features); needed by
    # anchors placed with ``Anchors(placement="image_ratio")``, None where not known
    image_size: tuple[int, int] | None = None


class ATSSHead(RetinaHead):
    """A :class:`RetinaHead` (two towers of ``num_convs`` 3×3 convs, ``norm`` and ReLU after
    each, 3×3 predictors of ``num_anchors × num_classes`` logits and ``num_anchors × 4``
    deltas) whose deltas on level ``l`` are multiplied by a learned scalar ``s_l`` (starting at
    1), with, if ``centerness``, a 3×3 predictor of ``num_anchors`` centerness logits on the box
    tower.

    Parameters: those of :class:`RetinaHead`, ``scales`` (``[num_levels]``) and ``centerness``
    (the predictor, with ``centerness``).
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
        centerness: bool = True,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            num_anchors=num_anchors,
            num_classes=num_classes,
            num_convs=num_convs,
            channels=channels,
            prior_prob=prior_prob,
            norm=norm,
        )
        self.num_levels = num_levels
        self.scales = nn.Parameter(torch.ones(num_levels))
        self.centerness: nn.Conv2d | None = None
        if centerness:
            tower_out = channels if num_convs > 0 else in_channels
            self.centerness = nn.Conv2d(tower_out, num_anchors, 3, padding=1)
            nn.init.normal_(self.centerness.weight, std=0.01)
            nn.init.zeros_(self.centerness.bias)  # type: ignore[arg-type]

    def forward(self, features: Sequence[Float[Tensor, "B C H W"]]) -> ATSSHeadOutputs:  # type: ignore[override]
        if len(features) != self.num_levels:
            raise ValueError(f"the head has {self.num_levels} levels, got {len(features)} maps")
        cls, box, ctr, sizes = [], [], [], []
        for level, x in enumerate(features):  # a loop over pyramid levels
            box_features = self.box_tower(x)
            deltas = self.box_deltas(box_features) * self.scales[level]  # [B, a*4, H, W]
            cls.append(self._flatten(self.cls_logits(self.cls_tower(x)), self.num_classes))
            box.append(self._flatten(deltas, 4))  # [B, H*W*a, 4]
            if self.centerness is not None:
                ctr.append(self._flatten(self.centerness(box_features), 1)[..., 0])  # [B, H*W*a]
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
        centerness = tuple(ctr) if self.centerness is not None else None
        return ATSSHeadOutputs(tuple(cls), tuple(box), centerness, tuple(sizes))


@register(specs.ATSSHead)
def build_atss_head(
    spec: specs.ATSSHead, *, in_channels: int, num_anchors: int, num_levels: int
) -> ATSSHead:
    """``in_channels``: the neck's channels; ``num_anchors``: anchors a location;
    ``num_levels``: the neck's output levels."""
    return ATSSHead(
        in_channels=in_channels,
        num_anchors=num_anchors,
        num_classes=spec.num_classes,
        num_levels=num_levels,
        num_convs=spec.num_convs,
        channels=spec.channels,
        prior_prob=spec.prior_prob,
        norm=spec.norm,
        centerness=spec.centerness,
    )


__all__ = ["ATSSHead", "ATSSHeadOutputs", "build_atss_head"]
