"""RetinaNet head: classification and box towers shared over every pyramid level."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from jaxtyping import Float
from torch import Tensor, nn

from fdet import specs
from fdet.models.layers import NormLayer, norm_factory
from fdet.registry import register


class RetinaHeadOutputs(NamedTuple):
    """Per-level predictions, flattened in anchor order (row-major locations, then the anchors of
    each location), which is the order of :func:`fdet.ops.anchors.grid_anchors`."""

    cls_logits: tuple[Float[Tensor, "B A_l K"], ...]
    box_deltas: tuple[Float[Tensor, "B A_l 4"], ...]
    feature_sizes: tuple[tuple[int, int], ...]  # (H_l, W_l) of each level
    # (H, W) of the padded input, set by the detector (the head sees only features); needed by
    # anchors placed with ``Anchors(placement="image_ratio")``, None where not known
    image_size: tuple[int, int] | None = None


def _tower(
    in_channels: int,
    channels: int,
    num_convs: int,
    norm: Callable[[int], nn.Module] | None,
    *,
    bias: bool | None = None,
) -> nn.Sequential:
    """``num_convs`` blocks ``conv 3×3 [→ norm] → ReLU``. By default (``bias=None``) a conv
    followed by a norm has no bias (the norm's shift takes its place), as in torchvision's v2
    head; ``bias=True`` keeps it anyway (FCOS's towers), ``bias=False`` drops it always."""
    with_bias = norm is None if bias is None else bias
    layers: list[nn.Module] = []
    for i in range(num_convs):
        block: list[nn.Module] = [
            nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=with_bias)
        ]
        if norm is not None:
            block.append(norm(channels))
        block.append(nn.ReLU(inplace=True))
        layers.append(nn.Sequential(*block))
    return nn.Sequential(*layers)


class RetinaHead(nn.Module):
    """Two towers of ``num_convs`` 3×3 convs, then a 3×3 predictor each:
    ``num_anchors × num_classes`` logits and ``num_anchors × 4`` box deltas a location.

    ``norm``: None (the default: convs with bias), or a norm after every tower conv (which then
    has no bias): a :class:`fdet.specs.Norm` spec (``specs.GroupNorm(groups=32)``, torchvision's
    v2 head) or a callable ``channels -> nn.Module``.

    Parameters: ``cls_tower.{i}.0`` / ``box_tower.{i}.0`` (the convs, bias-free with a norm),
    ``cls_tower.{i}.1`` / ``box_tower.{i}.1`` (their norms), ``cls_logits`` and ``box_deltas``
    (the predictors). ``fdet.compat.torchvision`` maps torchvision's ``RetinaNetHead`` names onto
    these.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_anchors: int,
        num_classes: int,
        num_convs: int = 4,
        channels: int = 256,
        prior_prob: float = 0.01,
        norm: NormLayer | None = None,
    ) -> None:
        super().__init__()
        make_norm = None if norm is None else norm_factory(norm)
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        tower_out = channels if num_convs > 0 else in_channels
        self.cls_tower = _tower(in_channels, channels, num_convs, make_norm)
        self.box_tower = _tower(in_channels, channels, num_convs, make_norm)
        self.cls_logits = nn.Conv2d(tower_out, num_anchors * num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(tower_out, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))  # type: ignore[arg-type]

    def _flatten(self, x: Tensor, per_anchor: int) -> Tensor:
        b, _, h, w = x.shape
        # [B, A*C, H, W] -> [B, H, W, A, C] -> [B, H*W*A, C]
        return (
            x.view(b, self.num_anchors, per_anchor, h, w)
            .permute(0, 3, 4, 1, 2)
            .reshape(b, h * w * self.num_anchors, per_anchor)
        )

    def forward(self, features: Sequence[Float[Tensor, "B C H W"]]) -> RetinaHeadOutputs:
        cls, box, sizes = [], [], []
        for x in features:  # a loop over pyramid levels
            cls.append(self._flatten(self.cls_logits(self.cls_tower(x)), self.num_classes))
            box.append(self._flatten(self.box_deltas(self.box_tower(x)), 4))
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
        return RetinaHeadOutputs(tuple(cls), tuple(box), tuple(sizes))


@register(specs.RetinaHead)
def build_retina_head(spec: specs.RetinaHead, *, in_channels: int, num_anchors: int) -> RetinaHead:
    """``in_channels``: the neck's channels; ``num_anchors``: anchors a location."""
    return RetinaHead(
        in_channels=in_channels,
        num_anchors=num_anchors,
        num_classes=spec.num_classes,
        num_convs=spec.num_convs,
        channels=spec.channels,
        prior_prob=spec.prior_prob,
        norm=spec.norm,
    )


__all__ = ["RetinaHead", "RetinaHeadOutputs", "build_retina_head"]
