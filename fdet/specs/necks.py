"""Neck specs."""

from typing import Literal

import attrs

from fdet.specs._core import Spec, SpecError, each, int_tuple, non_empty, one_of, positive, spec_of
from fdet.specs.norms import Norm


@attrs.frozen(kw_only=True)
class FPN(Spec):
    """Feature pyramid: lateral 1×1 + top-down sum + 3×3 output conv on ``in_levels``, then
    stride-2 3×3 convs for the levels of ``out_levels`` above the last input level.

    ``extra_from``: the first extra level is computed from the pyramid's top output (``p5``,
    torchvision's RetinaNet) or from the backbone's top input (``c5``, the RetinaNet paper and
    torchvision's v2). ``extra_relu`` puts a ReLU before every extra conv but the first.
    ``norm``: a norm after the lateral and output convs (which then have no bias), e.g.
    ``GroupNorm(groups=32)``; None (the default) keeps plain convs with bias. Extra convs never
    have a norm.
    """

    in_levels: tuple[int, ...] = attrs.field(
        default=(3, 4, 5), converter=int_tuple, validator=[non_empty, each(positive)]
    )
    out_levels: tuple[int, ...] = attrs.field(
        default=(3, 4, 5, 6, 7), converter=int_tuple, validator=[non_empty, each(positive)]
    )
    channels: int = attrs.field(default=256, validator=positive)
    extra_from: Literal["p5", "c5"] = attrs.field(default="p5", validator=one_of("p5", "c5"))
    extra_relu: bool = True
    norm: Norm | None = attrs.field(default=None, validator=spec_of(Norm, optional=True))

    def __attrs_post_init__(self) -> None:
        for name in ("in_levels", "out_levels"):
            levels = getattr(self, name)
            if list(levels) != list(range(levels[0], levels[0] + len(levels))):
                raise SpecError(f"must be consecutive increasing levels, got {levels}", name)
        if self.out_levels[0] < self.in_levels[0] or self.out_levels[0] > self.in_levels[-1]:
            raise SpecError(
                f"must start within in_levels {self.in_levels}, got {self.out_levels}",
                "out_levels",
            )
        if self.norm is not None:
            try:
                self.norm.check_channels(self.channels, "the pyramid's channels")
            except SpecError as e:
                raise e.under("norm") from None

    @property
    def extra_levels(self) -> tuple[int, ...]:
        """Output levels made by extra stride-2 convs (above the last input level)."""
        return tuple(lvl for lvl in self.out_levels if lvl > self.in_levels[-1])
