"""Normalization-layer specs: what follows a conv in backbones, necks and heads.

:class:`Norm` is the extension point: subclass it with an ``@attrs.frozen(kw_only=True)`` class
and register a builder ``fn(spec, *, channels: int) -> nn.Module`` with
:func:`fdet.register`; ``build(norm, channels=C)`` then makes the layer.
"""

import attrs

from fdet.specs._core import Spec, SpecError, positive


class Norm(Spec):
    """Base of 2-d normalization-layer specs (abstract: make a subclass).

    ``build(spec, channels=C)`` makes an ``nn.Module`` mapping ``[B, C, H, W]`` to itself.
    """

    __slots__ = ()

    def check_channels(self, channels: int, what: str) -> None:
        """Raise a :class:`SpecError` if this norm cannot normalise ``channels`` channels (``what``
        names them in the message). Every channel count is fine unless a subclass says
        otherwise."""


@attrs.frozen(kw_only=True)
class FrozenBatchNorm(Norm):
    """Batch norm whose statistics and affine terms are fixed buffers (never trained):
    torchvision's ``FrozenBatchNorm2d``, the usual choice for pretrained backbones."""


@attrs.frozen(kw_only=True)
class BatchNorm(Norm):
    """Trainable batch norm (``nn.BatchNorm2d``): batch statistics in training, running
    statistics in evaluation."""


@attrs.frozen(kw_only=True)
class GroupNorm(Norm):
    """Group norm (``nn.GroupNorm(groups, C)``): statistics over ``groups`` groups of channels
    of each sample, independent of the batch. ``groups`` must divide the channel count."""

    groups: int = attrs.field(default=32, validator=positive)

    def check_channels(self, channels: int, what: str) -> None:
        if channels % self.groups:
            raise SpecError(
                f"{self.groups} groups do not divide {what} ({channels} channels)", "groups"
            )


__all__ = ["BatchNorm", "FrozenBatchNorm", "GroupNorm", "Norm"]
