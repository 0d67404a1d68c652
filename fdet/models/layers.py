"""Small building blocks shared by models: norm layers from their specs.

A module's ``norm`` argument is a :class:`fdet.specs.Norm` spec (``specs.GroupNorm(groups=16)``)
or any callable ``channels -> nn.Module`` (``nn.BatchNorm2d``, ``partial(nn.GroupNorm, 8)``), so
modules stay usable without specs. Specs build through the registry: ``build(spec,
channels=C)``, which is where a norm class of your own plugs in.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fdet import specs
from fdet.registry import build, register

__all__ = [
    "NormLayer",
    "build_batch_norm",
    "build_frozen_batch_norm",
    "build_group_norm",
    "init_norm",
    "make_norm",
    "norm_factory",
]

NormLayer = specs.Norm | Callable[[int], nn.Module]
"""A norm layer's description: a norm spec, or a callable ``channels -> nn.Module``."""


@register(specs.FrozenBatchNorm)
def build_frozen_batch_norm(spec: specs.FrozenBatchNorm, *, channels: int) -> FrozenBatchNorm2d:
    """:class:`torchvision.ops.FrozenBatchNorm2d`: affine and statistics are buffers, never
    trained; it starts as the identity (weight 1, bias 0, mean 0, variance 1)."""
    return FrozenBatchNorm2d(channels)


@register(specs.BatchNorm)
def build_batch_norm(spec: specs.BatchNorm, *, channels: int) -> nn.BatchNorm2d:
    """``nn.BatchNorm2d(channels)``, starting as the identity."""
    return nn.BatchNorm2d(channels)


@register(specs.GroupNorm)
def build_group_norm(spec: specs.GroupNorm, *, channels: int) -> nn.GroupNorm:
    """``nn.GroupNorm(spec.groups, channels)``, starting as the identity; the group count must
    divide ``channels``."""
    if channels % spec.groups:
        raise ValueError(
            f"group norm: {spec.groups} groups do not divide {channels} channels "
            f"(pick a group count dividing every channel count)"
        )
    return nn.GroupNorm(spec.groups, channels)


def norm_factory(norm: NormLayer) -> Callable[[int], nn.Module]:
    """``channels -> nn.Module`` for ``norm``: a spec builds through the registry, a callable is
    returned as it is."""
    if isinstance(norm, specs.Spec):
        if not isinstance(norm, specs.Norm):
            raise TypeError(f"norm must be a specs.Norm spec, got a {type(norm).__name__}")
        return lambda channels: build(norm, channels=channels)
    if not callable(norm):
        raise TypeError(
            f"norm must be a specs.Norm spec or a callable channels -> nn.Module, got {norm!r}"
        )
    return norm


def make_norm(norm: NormLayer, channels: int) -> nn.Module:
    """A 2-d norm layer over ``channels`` channels, from a norm spec or a factory."""
    return norm_factory(norm)(channels)


def init_norm(norm: nn.Module, *, weight: float) -> None:
    """Set a norm layer's scale to ``weight`` and its shift to 0 (parameters or buffers)."""
    scale = getattr(norm, "weight", None)
    shift = getattr(norm, "bias", None)
    if scale is not None:
        nn.init.constant_(scale, weight)
    if shift is not None:
        nn.init.zeros_(shift)
