"""ResNet backbone returning the feature maps ``C2``–``C5``.

The layout is torchvision's ``resnet18`` … ``resnet152`` ("v1.5": the stride of a downsampling
bottleneck sits on its 3×3 conv), and the parameter and buffer names are the same (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, …), so the state dict of a torchvision
ResNet, less its ``fc.*`` entries, loads with ``load_state_dict``. There is no classifier.

Level ``l`` has stride ``2**l``: ``C2`` is the output of ``layer1`` (stride 4), ``C3`` of
``layer2``, ``C4`` of ``layer3``, ``C5`` of ``layer4`` (stride 32). Stages above the highest
requested level are not built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from typing_extensions import Self

from fdet import specs
from fdet.models.layers import NormLayer, init_norm, norm_factory
from fdet.registry import register

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "build_resnet"]

# depth -> (block kind, blocks per stage)
_ARCH: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_STAGES = ("layer1", "layer2", "layer3", "layer4")
_FROZEN_BN = specs.FrozenBatchNorm()


def _downsample(
    in_channels: int, out_channels: int, stride: int, norm: Callable[[int], nn.Module]
) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
    )


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual (ResNet-18/34). ``stride`` is on the first conv."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int, norm: NormLayer) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        make_norm = norm_factory(norm)
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = make_norm(planes)
        self.downsample = _downsample(in_channels, out_channels, stride, make_norm)

    @property
    def last_norm(self) -> nn.Module:
        """The norm closing the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn2

    def forward(self, x: Float[Tensor, "B C H W"]) -> Float[Tensor, "B C2 H2 W2"]:
        # in place where autograd allows it (a norm's output is a fresh tensor that no backward
        # reads before the ReLU): no new buffer for every activation of the block
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying ``stride``), 1×1 expand ×4, with a residual (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int, norm: NormLayer) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        make_norm = norm_factory(norm)
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = make_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = make_norm(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = make_norm(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride, make_norm)

    @property
    def last_norm(self) -> nn.Module:
        """The norm closing the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn3

    def forward(self, x: Float[Tensor, "B C H W"]) -> Float[Tensor, "B C2 H2 W2"]:
        # in place as in BasicBlock.forward
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


class ResNet(nn.Module):
    """ResNet feature extractor: ``forward(images)`` returns ``(C_l for l in out_levels)``.

    Args:
        depth: 18, 34 (basic blocks), 50, 101 or 152 (bottlenecks).
        norm: the norm after every conv: a :class:`fdet.specs.Norm` spec
            (``specs.FrozenBatchNorm()``: :class:`torchvision.ops.FrozenBatchNorm2d`, nothing in
            it trains; ``specs.BatchNorm()``; ``specs.GroupNorm(groups=g)``, ``g`` dividing
            ``width``) or a callable ``channels -> nn.Module`` (``nn.BatchNorm2d``).
        frozen_stages: ``-1`` trains everything; ``0`` freezes the stem (``conv1``, ``bn1``);
            ``k`` freezes the stem and ``layer1`` … ``layer{k}``. Frozen parameters get
            ``requires_grad=False``; the norms of frozen parts (batch norms, for one) also stay
            in eval mode (running statistics used, never updated) when the module is put in
            train mode.
        out_levels: increasing levels within 2..5 to return; stages above the highest one are
            not built (their weights are absent from the state dict).
        width: channels of the stem and of ``layer1``'s 3×3 convs; each stage doubles it, and
            bottlenecks expand their output ×4. ``64`` is the standard ResNet.
        zero_init_residual: start the last norm of every residual branch at scale 0, so each
            block starts as the identity.

    Attributes:
        out_levels: the levels returned, in order.
        out_channels: channels of each returned map, in ``out_levels`` order.
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        norm: NormLayer = _FROZEN_BN,
        frozen_stages: int = 1,
        out_levels: Sequence[int] = (2, 3, 4, 5),
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCH)}, got {depth!r}")
        levels = tuple(int(lvl) for lvl in out_levels)
        if not levels or list(levels) != sorted(set(levels)) or not set(levels) <= {2, 3, 4, 5}:
            raise ValueError(
                f"ResNet out_levels must be increasing levels within 2..5, got {out_levels!r}"
            )
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"ResNet frozen_stages must be in [-1, 4], got {frozen_stages!r}")
        if width <= 0:
            raise ValueError(f"ResNet width must be > 0, got {width!r}")
        make_norm = norm_factory(norm)
        kind, blocks_per_stage = _ARCH[depth]
        block: type[BasicBlock | Bottleneck] = BasicBlock if kind == "basic" else Bottleneck

        self.out_levels = levels
        self.out_channels = tuple(width * 2 ** (lvl - 2) * block.expansion for lvl in levels)
        self.frozen_stages = frozen_stages
        self._num_stages = levels[-1] - 1  # C5 needs layer1..layer4

        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(width)
        in_channels = width
        for i in range(self._num_stages):
            planes = width * 2**i
            blocks = []
            for j in range(blocks_per_stage[i]):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_channels, planes, stride=stride, norm=make_norm))
                in_channels = planes * block.expansion
            self.add_module(_STAGES[i], nn.Sequential(*blocks))

        self._init_weights(zero_init_residual)
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                init_norm(m, weight=1.0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    init_norm(m.last_norm, weight=0.0)

    def _frozen_modules(self) -> list[nn.Module]:
        """The stem and the first ``frozen_stages`` stages (those that exist)."""
        if self.frozen_stages < 0:
            return []
        stages = _STAGES[: min(self.frozen_stages, self._num_stages)]
        return [self.conv1, self.bn1, *(getattr(self, name) for name in stages)]

    def train(self, mode: bool = True) -> Self:
        """Set train/eval mode; frozen parts always stay in eval mode (see ``frozen_stages``)."""
        super().train(mode)
        for module in self._frozen_modules():
            module.train(False)
        return self

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> tuple[Float[Tensor, "B C h w"], ...]:
        """Feature maps ``C_l`` for ``l`` in ``out_levels``, in that order.

        ``C_l`` has ``out_channels[i]`` channels and size ``ceil(H / 2**l) × ceil(W / 2**l)`` (every
        stride-2 step maps ``n`` to ``ceil(n / 2)``); any ``H, W`` work.
        """
        x = F.relu(self.bn1(self.conv1(images)), inplace=True)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        features = []
        for i in range(self._num_stages):
            x = getattr(self, _STAGES[i])(x)
            if i + 2 in self.out_levels:
                features.append(x)
        return tuple(features)


@register(specs.ResNet)
def build_resnet(spec: specs.ResNet) -> ResNet:
    """Build a :class:`ResNet` from its spec (no shape arguments: the input is RGB images)."""
    return ResNet(
        depth=spec.depth,
        norm=spec.norm,
        frozen_stages=spec.frozen_stages,
        out_levels=spec.out_levels,
        width=spec.width,
        zero_init_residual=spec.zero_init_residual,
    )
