"""Feature pyramid network: ``P_l`` maps of one width from backbone maps ``C_l``.

For the input levels, top to bottom: ``M_top = lateral(C_top)`` and
``M_l = lateral(C_l) + nearest_upsample(M_{l+1}, to the size of lateral(C_l))``, then
``P_l = output_conv(M_l)``. Levels above the top input come from stride-2 3×3 convs: the first
reads ``P_top`` (``extra_from="p5"``) or ``C_top`` (``extra_from="c5"``), each later one reads the
previous extra level, through a ReLU when ``extra_relu``. With the defaults this is torchvision's
``FeaturePyramidNetwork`` with ``LastLevelP6P7``.

Parameter names are torchvision's (``inner_blocks.{i}.0`` lateral convs, ``layer_blocks.{i}.0``
output convs, ``.1`` their norms, ``extra_blocks.p6`` …), so the ``fpn.*`` weights of a torchvision
RetinaNet load with ``load_state_dict``. Index ``i`` counts input levels from ``out_levels[0]`` up;
convs that could not change any returned level are not built (lateral convs below
``out_levels[0]``, output convs of input levels above ``out_levels[-1]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from fdet import specs
from fdet.models.layers import NormLayer, norm_factory
from fdet.registry import register

__all__ = ["FPN", "build_fpn"]


def _conv_norm(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    norm: Callable[[int], nn.Module] | None,
) -> nn.Sequential:
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm is None
    )
    if norm is None:
        return nn.Sequential(conv)
    return nn.Sequential(conv, norm(out_channels))


def _levels(name: str, levels: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(lvl) for lvl in levels)
    if not out or out != tuple(range(out[0], out[0] + len(out))):
        raise ValueError(f"FPN {name} must be consecutive increasing levels, got {levels!r}")
    return out


class FPN(nn.Module):
    """Feature pyramid: ``forward(features)`` returns ``(P_l for l in out_levels)``.

    Args:
        in_channels: channels of each map ``forward`` receives, one per level of
            ``input_levels``.
        in_levels: consecutive backbone levels the pyramid is built on (``C3``–``C5``).
        out_levels: consecutive levels returned; they start within ``in_levels`` and may go
            above it (extra levels). Input levels below ``out_levels[0]`` cannot affect any
            output, so they get no convs and their maps are ignored.
        channels: channels of every output map.
        extra_from: ``"p5"`` or ``"c5"``: the first extra level reads the pyramid's top output
            or the top input map (of level ``in_levels[-1]``, whatever it is).
        extra_relu: a ReLU before every extra conv but the first (torchvision's
            ``LastLevelP6P7`` computes ``P7 = conv(relu(P6))``).
        norm: None (convs with bias), or a norm after the lateral and output convs (which then
            have no bias): a :class:`fdet.specs.Norm` spec (``specs.GroupNorm(groups=32)``) or a
            callable ``channels -> nn.Module`` (``nn.BatchNorm2d``). Extra convs have a bias and
            no norm in every case, as in torchvision.
        input_levels: levels of the maps ``forward`` receives, increasing and containing
            ``in_levels``; defaults to ``in_levels``. Pass the backbone's ``out_levels`` (with its
            ``out_channels`` as ``in_channels``) to feed the backbone's output straight in:
            ``fpn(backbone(images))``.

    Convs start Kaiming-uniform (``a=1``) with zero bias, as in torchvision.

    Attributes:
        out_levels: the levels returned, in order.
        out_channels: channels of each returned map (all ``channels``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        *,
        in_levels: Sequence[int] = (3, 4, 5),
        out_levels: Sequence[int] = (3, 4, 5, 6, 7),
        channels: int = 256,
        extra_from: Literal["p5", "c5"] = "p5",
        extra_relu: bool = True,
        norm: NormLayer | None = None,
        input_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        in_lv = _levels("in_levels", in_levels)
        out_lv = _levels("out_levels", out_levels)
        given = in_lv if input_levels is None else tuple(int(lvl) for lvl in input_levels)
        if not in_lv[0] <= out_lv[0] <= in_lv[-1]:
            raise ValueError(f"FPN out_levels {out_lv} must start within in_levels {in_lv}")
        if list(given) != sorted(set(given)) or not set(in_lv) <= set(given):
            raise ValueError(
                f"FPN input_levels must be increasing and contain in_levels {in_lv}, got {given}"
            )
        in_ch = tuple(int(c) for c in in_channels)
        if len(in_ch) != len(given):
            what = "in_levels" if input_levels is None else "input_levels"
            raise ValueError(
                f"FPN needs one in_channels entry per input level {given} ({what}), got "
                f"{len(in_ch)}: {in_ch}"
            )
        if any(c <= 0 for c in in_ch) or channels <= 0:
            raise ValueError(f"FPN channels must be > 0, got in_channels={in_ch}, {channels=}")
        if extra_from not in ("p5", "c5"):
            raise ValueError(f"FPN extra_from must be 'p5' or 'c5', got {extra_from!r}")
        make_norm = None if norm is None else norm_factory(norm)

        built = tuple(range(out_lv[0], in_lv[-1] + 1))  # input levels that reach an output
        returned = tuple(lvl for lvl in built if lvl in out_lv)  # those that are outputs
        self.out_levels = out_lv
        self.out_channels = (channels,) * len(out_lv)
        self.extra_from = extra_from
        self.extra_relu = extra_relu
        self._num_inputs = len(given)
        self._take = tuple(given.index(lvl) for lvl in built)  # indices into forward's input

        self.inner_blocks = nn.ModuleList(
            _conv_norm(in_ch[i], channels, 1, make_norm) for i in self._take
        )
        self.layer_blocks = nn.ModuleList(
            _conv_norm(channels, channels, 3, make_norm) for _ in returned
        )
        extra: dict[str, nn.Module] = {}
        prev = channels if extra_from == "p5" else in_ch[self._take[-1]]
        for lvl in out_lv:
            if lvl > in_lv[-1]:
                extra[f"p{lvl}"] = nn.Conv2d(prev, channels, 3, stride=2, padding=1)
                prev = channels
        self.extra_blocks = nn.ModuleDict(extra)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self, features: Sequence[Float[Tensor, "B C h w"]]
    ) -> tuple[Float[Tensor, "B D h w"], ...]:
        """``P_l`` for ``l`` in ``out_levels``, in that order, each with ``channels`` channels.

        ``features`` are the maps of ``input_levels`` in order (the backbone's output). An input
        level's output has its input's size; an extra level halves the one below, rounding up.
        """
        if len(features) != self._num_inputs:
            raise ValueError(
                f"FPN expects {self._num_inputs} feature maps (one per input level), "
                f"got {len(features)}"
            )
        inputs = [features[i] for i in self._take]
        laterals = [block(x) for block, x in zip(self.inner_blocks, inputs)]
        merged = [laterals[-1]]  # M_l, top level first
        for lateral in reversed(laterals[:-1]):
            top_down = F.interpolate(merged[-1], size=lateral.shape[-2:], mode="nearest")
            merged.append(lateral + top_down)
        merged.reverse()
        outputs = [block(m) for block, m in zip(self.layer_blocks, merged)]
        x = outputs[-1] if self.extra_from == "p5" else inputs[-1]
        for j, conv in enumerate(self.extra_blocks.values()):
            x = conv(F.relu(x) if j > 0 and self.extra_relu else x)
            outputs.append(x)
        return tuple(outputs)


@register(specs.FPN)
def build_fpn(
    spec: specs.FPN,
    *,
    in_channels: Sequence[int] | None = None,
    input_levels: Sequence[int] | None = None,
) -> FPN:
    """Build an :class:`FPN` from its spec.

    ``in_channels``: channels of the maps the FPN receives: of the spec's ``in_levels``, or of
    ``input_levels`` when given. With a ResNet spec ``bb``, either
    ``build(fpn, in_channels=bb.out_channels, input_levels=bb.out_levels)`` (then
    ``fpn(backbone(images))`` works) or the ``out_channels`` of ``in_levels`` alone.
    """
    levels = spec.in_levels if input_levels is None else tuple(input_levels)
    if in_channels is None:
        raise TypeError(
            f"build(FPN) needs in_channels=: the channels of the input levels {levels} "
            f"(e.g. a backbone spec's out_channels)"
        )
    if isinstance(in_channels, int) or len(in_channels) != len(levels):
        raise ValueError(
            f"build(FPN) needs one in_channels entry per input level {levels}, got "
            f"{in_channels!r}"
            + ("" if input_levels is not None else "; pass input_levels= for other levels")
        )
    return FPN(
        in_channels,
        in_levels=spec.in_levels,
        out_levels=spec.out_levels,
        channels=spec.channels,
        extra_from=spec.extra_from,
        extra_relu=spec.extra_relu,
        norm=spec.norm,
        input_levels=input_levels,
    )
