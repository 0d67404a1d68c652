"""CenterNet's up-sampling neck: one backbone map brought to stride 4 by transposed convs.

For the ResNet models of "Objects as Points" (Zhou et al. 2019, section 4): ``C5`` (stride 32)
goes through three stages, each

    3×3 conv → norm → ReLU → 4×4 stride-2 transposed conv → norm → ReLU,

with (256, 128, 64) channels, to a stride-4 map. (The paper's ResNet models put a deformable
3×3 conv where this has a plain one; fdet has no deformable convs.)

The transposed convs start as bilinear 2× up-sampling, as in the paper's released code: its
4×4 kernel is the outer product of ``(1, 3, 3, 1) / 4`` (``fill_up_weights``). That code writes
the kernel into the slice of output channel 0 of each input channel and leaves the rest of the
weight at its random initialization; here each channel maps to itself alone (zero elsewhere),
so that at initialization every stage up-samples each channel of its conv exactly bilinearly
(the norm that follows then standardizes it). The 3×3 convs are Kaiming-normal (fan out) as
in the released code's backbone, norms start as the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from fdet import specs
from fdet.models.layers import NormLayer, init_norm, norm_factory
from fdet.registry import register

__all__ = ["CenterNetNeck", "bilinear_kernel", "build_centernet_neck"]

_BATCH_NORM = specs.BatchNorm()


def bilinear_kernel(size: int) -> Float[Tensor, "size size"]:
    """The ``size × size`` kernel of bilinear up-sampling by ``ceil(size / 2)`` (the paper's
    ``fill_up_weights``): ``(1 - |i / f - c|)(1 - |j / f - c|)`` with ``f = ceil(size / 2)`` and
    ``c = (2f - 1 - f mod 2) / 2f``. For ``size = 4``: the outer product of
    ``(0.25, 0.75, 0.75, 0.25)`` with itself."""
    factor = math.ceil(size / 2)
    centre = (2 * factor - 1 - factor % 2) / (2 * factor)
    steps = 1 - (torch.arange(size, dtype=torch.float64) / factor - centre).abs()  # [size]
    return (steps[:, None] * steps[None, :]).float()


def _stage(in_channels: int, channels: int, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    """conv 3×3 → norm → ReLU → transposed conv 4×4 / 2 → norm → ReLU (no conv biases: each conv
    is followed by a norm)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
        norm(channels),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False),
        norm(channels),
        nn.ReLU(inplace=True),
    )


class CenterNetNeck(nn.Module):
    """``forward(features)`` returns the map of ``in_level`` up-sampled 2× per stage.

    Args:
        in_channels: channels of each map ``forward`` receives (one per input level).
        channels: output channels of each stage; one 2× stage per entry.
        norm: the norm after every conv: a :class:`fdet.specs.Norm` spec or a callable
            ``channels -> nn.Module`` (default ``BatchNorm``).
        in_level: the level read (5: ``C5``).
        input_levels: levels of the maps ``forward`` receives (the backbone's ``out_levels``);
            defaults to ``(in_level,)``.

    A map of ``h × w`` becomes ``h · 2^n × w · 2^n`` after ``n`` stages (each transposed conv,
    kernel 4, stride 2, padding 1, doubles the size exactly).

    Attributes:
        out_channels: channels of the output map (``channels[-1]``).
        out_level: ``in_level - len(channels)``; the output stride is ``2 ** out_level``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] | int,
        *,
        channels: Sequence[int] = (256, 128, 64),
        norm: NormLayer = _BATCH_NORM,
        in_level: int = 5,
        input_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        widths = tuple(int(c) for c in channels)
        if not widths or any(c <= 0 for c in widths):
            raise ValueError(f"CenterNetNeck channels must be positive, got {channels!r}")
        given = (in_level,) if input_levels is None else tuple(int(lvl) for lvl in input_levels)
        if in_level not in given:
            raise ValueError(
                f"CenterNetNeck reads level {in_level}, which input_levels {given} lacks"
            )
        in_ch = (in_channels,) if isinstance(in_channels, int) else tuple(in_channels)
        if len(in_ch) != len(given):
            raise ValueError(
                f"CenterNetNeck needs one in_channels entry per input level {given}, got {in_ch}"
            )
        if in_level - len(widths) < 0:
            raise ValueError(
                f"CenterNetNeck: {len(widths)} 2× stages from level {in_level} go below stride 1"
            )
        make_norm = norm_factory(norm)
        self._take = given.index(in_level)
        self._num_inputs = len(given)
        self.out_channels = widths[-1]
        self.out_level = in_level - len(widths)
        previous = in_ch[self._take]
        stages = []
        for width in widths:
            stages.append(_stage(previous, width, make_norm))
            previous = width
        self.stages = nn.Sequential(*stages)
        self._init_weights()

    def _init_weights(self) -> None:
        kernel = bilinear_kernel(4)
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                # weight [in, out, 4, 4]: channel c to channel c is bilinear, the rest 0
                with torch.no_grad():
                    eye = torch.eye(m.in_channels, m.out_channels, dtype=m.weight.dtype)
                    m.weight.copy_(eye[:, :, None, None] * kernel.to(m.weight.dtype))
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                init_norm(m, weight=1.0)

    def forward(self, features: Sequence[Float[Tensor, "B C h w"]]) -> Float[Tensor, "B D H W"]:
        """The up-sampled map of level ``in_level`` (``features``: the maps of
        ``input_levels``, in order: the backbone's output)."""
        if len(features) != self._num_inputs:
            raise ValueError(
                f"CenterNetNeck expects {self._num_inputs} feature maps (one per input level), "
                f"got {len(features)}"
            )
        out: Tensor = self.stages(features[self._take])
        return out


@register(specs.CenterNetNeck)
def build_centernet_neck(
    spec: specs.CenterNetNeck,
    *,
    in_channels: Sequence[int] | None = None,
    input_levels: Sequence[int] | None = None,
) -> CenterNetNeck:
    """Build a :class:`CenterNetNeck` from its spec; ``in_channels`` (and ``input_levels``)
    describe the maps it receives: with a ResNet spec ``bb``,
    ``build(neck, in_channels=bb.out_channels, input_levels=bb.out_levels)``."""
    if in_channels is None:
        raise TypeError(
            "build(CenterNetNeck) needs in_channels=: the channels of the maps it receives "
            "(e.g. a backbone spec's out_channels)"
        )
    return CenterNetNeck(
        in_channels,
        channels=spec.channels,
        norm=spec.norm,
        in_level=spec.in_level,
        input_levels=input_levels,
    )
