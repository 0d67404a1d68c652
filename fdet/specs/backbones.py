"""Backbone specs."""

from typing import Literal

import attrs

from fdet.specs._core import (
    Spec,
    SpecError,
    each,
    int_tuple,
    non_empty,
    one_of,
    positive,
    spec_of,
)
from fdet.specs.norms import FrozenBatchNorm, Norm


@attrs.frozen(kw_only=True)
class ResNet(Spec):
    """A ResNet returning the feature maps ``C{level}`` for ``level`` in ``out_levels``.

    Level ``l`` has stride ``2**l``: C2 (stride 4) to C5 (stride 32).
    ``frozen_stages``: -1 trains everything; 0 freezes the stem; ``k`` freezes the stem and the
    first ``k`` residual stages (torchvision's ``trainable_layers=3`` is ``frozen_stages=1``).
    ``norm``: the norm after every conv: :class:`FrozenBatchNorm` (statistics and affine
    fixed), :class:`BatchNorm`, :class:`GroupNorm` (its groups must divide ``width``) or a
    :class:`Norm` of your own.
    """

    depth: Literal[18, 34, 50, 101, 152] = attrs.field(
        default=50, validator=one_of(18, 34, 50, 101, 152)
    )
    norm: Norm = attrs.field(default=FrozenBatchNorm(), validator=spec_of(Norm))
    frozen_stages: int = 1
    out_levels: tuple[int, ...] = attrs.field(
        default=(2, 3, 4, 5), converter=int_tuple, validator=[non_empty, each(positive)]
    )
    width: int = attrs.field(default=64, validator=positive)
    zero_init_residual: bool = False

    def __attrs_post_init__(self) -> None:
        if not -1 <= self.frozen_stages <= 4:
            raise SpecError(f"must be in [-1, 4], got {self.frozen_stages}", "frozen_stages")
        if any(not 2 <= lvl <= 5 for lvl in self.out_levels) or list(self.out_levels) != sorted(
            set(self.out_levels)
        ):
            raise SpecError(
                f"must be increasing levels within 2..5, got {self.out_levels}", "out_levels"
            )
        # every conv's channel count is the stem width times a power of two
        try:
            self.norm.check_channels(self.width, "the stem width")
        except SpecError as e:
            raise e.under("norm") from None

    @property
    def out_channels(self) -> tuple[int, ...]:
        """Channels of each returned level, in ``out_levels`` order."""
        expansion = 1 if self.depth in (18, 34) else 4
        return tuple(self.width * 2 ** (lvl - 2) * expansion for lvl in self.out_levels)
