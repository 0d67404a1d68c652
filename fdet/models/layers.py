"""Small building blocks shared by models: the norm-layer factory."""

from __future__ import annotations

from typing import Literal

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["NormKind", "init_norm", "make_norm"]

NormKind = Literal["frozen_bn", "bn", "gn"]


def make_norm(kind: NormKind, channels: int, *, gn_groups: int = 32) -> nn.Module:
    """A 2-d norm layer over ``channels`` channels.

    ``frozen_bn``: :class:`torchvision.ops.FrozenBatchNorm2d` (affine and statistics are buffers,
    never trained); ``bn``: :class:`torch.nn.BatchNorm2d`; ``gn``:
    ``nn.GroupNorm(gn_groups, channels)``. Every kind starts as the identity map (weight 1,
    bias 0, and for batch norms mean 0, variance 1).
    """
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        if channels % gn_groups:
            raise ValueError(
                f"group norm: {gn_groups} groups do not divide {channels} channels "
                f"(pick gn_groups dividing every channel count)"
            )
        return nn.GroupNorm(gn_groups, channels)
    raise ValueError(f"norm must be 'frozen_bn', 'bn' or 'gn', got {kind!r}")


def init_norm(norm: nn.Module, *, weight: float) -> None:
    """Set a norm layer's scale to ``weight`` and its shift to 0 (parameters or buffers)."""
    scale = getattr(norm, "weight", None)
    shift = getattr(norm, "bias", None)
    if scale is not None:
        nn.init.constant_(scale, weight)
    if shift is not None:
        nn.init.zeros_(shift)
