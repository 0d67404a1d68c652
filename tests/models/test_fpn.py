from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import fdet
from fdet import specs
from fdet.models import FPN, ResNet

from .test_resnet import randomize_norms


def level_sizes(height: int, width: int, levels: tuple[int, ...]) -> list[tuple[int, int]]:
    """Map sizes of a ResNet at ``levels`` for an ``height × width`` image (halving rounds up)."""
    sizes = []
    for level in levels:
        h, w = height, width
        for _ in range(level):
            h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    return sizes


def random_features(
    channels: tuple[int, ...], sizes: list[tuple[int, int]], batch: int = 2
) -> list[torch.Tensor]:
    return [torch.randn(batch, c, h, w) for c, (h, w) in zip(channels, sizes)]


def run_torchvision(fpn: FeaturePyramidNetwork, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
    return list(out.values())


def randomize_biases(model: nn.Module) -> None:
    """torchvision starts biases at zero; give them values so parity covers them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.1)
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


CHANNELS = (16, 32, 64)


@pytest.mark.parametrize(("height", "width"), [(96, 128), (97, 131), (33, 65), (40, 24)])
@pytest.mark.parametrize("extra_from", ["p5", "c5"])
def test_matches_torchvision_p6p7(extra_from: str, height: int, width: int) -> None:
    torch.manual_seed(0)
    channels = 32
    top = channels if extra_from == "p5" else CHANNELS[-1]
    assert (top == channels) == (extra_from == "p5")  # how torchvision picks P5 or C5
    tv = FeaturePyramidNetwork(list(CHANNELS), channels, extra_blocks=LastLevelP6P7(top, channels))
    randomize_biases(tv)
    ours = FPN(CHANNELS, channels=channels, extra_from=extra_from)  # type: ignore[arg-type]
    ours.load_state_dict(tv.state_dict(), strict=True)

    feats = random_features(CHANNELS, level_sizes(height, width, (3, 4, 5)))
    expected = run_torchvision(tv, feats)
    with torch.no_grad():
        got = ours(feats)
    assert len(got) == len(expected) == 5
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", [specs.BatchNorm(), specs.GroupNorm(groups=8)], ids=repr)
def test_matches_torchvision_with_norm(norm: specs.Norm) -> None:
    torch.manual_seed(1)
    norm_layer = nn.BatchNorm2d if norm == specs.BatchNorm() else (lambda c: nn.GroupNorm(8, c))
    tv = FeaturePyramidNetwork(
        list(CHANNELS), 32, extra_blocks=LastLevelP6P7(32, 32), norm_layer=norm_layer
    ).eval()
    randomize_norms(tv)
    randomize_biases(tv)
    ours = FPN(CHANNELS, channels=32, norm=norm).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert all(block[0].bias is None for block in [*ours.inner_blocks, *ours.layer_blocks])

    feats = random_features(CHANNELS, level_sizes(75, 53, (3, 4, 5)))
    expected = run_torchvision(tv, feats)
    with torch.no_grad():
        got = ours(feats)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_init_is_kaiming_uniform_with_zero_bias() -> None:
    torch.manual_seed(0)
    ours = FPN((64, 128, 256), channels=64)
    tv = FeaturePyramidNetwork([64, 128, 256], 64, extra_blocks=LastLevelP6P7(64, 64))
    names = [name for name, _ in ours.named_parameters()]
    assert names == [name for name, _ in tv.named_parameters()]
    for name, p in ours.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        else:  # kaiming_uniform(a=1): U(-b, b) with b = sqrt(6 / ((1 + a²) fan_in))
            bound = (3.0 / p[0].numel()) ** 0.5
            assert 0.9 * bound < p.abs().max() <= bound, name
            assert abs(p.std() - bound / 3**0.5) < 0.1 * bound, name


@pytest.mark.parametrize("extra_relu", [True, False])
def test_extra_levels_chain(extra_relu: bool) -> None:
    torch.manual_seed(0)
    fpn = FPN(CHANNELS, channels=16, out_levels=(3, 4, 5, 6, 7, 8), extra_relu=extra_relu)
    randomize_biases(fpn)
    assert list(fpn.extra_blocks) == ["p6", "p7", "p8"]
    feats = random_features(CHANNELS, level_sizes(200, 136, (3, 4, 5)))
    with torch.no_grad():
        p3, p4, p5, p6, p7, p8 = fpn(feats)
        act = torch.relu if extra_relu else (lambda t: t)
        assert torch.equal(p6, fpn.extra_blocks["p6"](p5))
        assert torch.equal(p7, fpn.extra_blocks["p7"](act(p6)))
        assert torch.equal(p8, fpn.extra_blocks["p8"](act(p7)))
    sizes = [tuple(p.shape[-2:]) for p in (p3, p4, p5, p6, p7, p8)]
    assert sizes == [(25, 17), (13, 9), (7, 5), (4, 3), (2, 2), (1, 1)]


def test_out_levels_within_inputs_match_full_pyramid() -> None:
    torch.manual_seed(0)
    full = FPN(CHANNELS, channels=16, out_levels=(3, 4, 5, 6))
    randomize_biases(full)
    feats = random_features(CHANNELS, level_sizes(64, 96, (3, 4, 5)))
    with torch.no_grad():
        p3, p4, p5, _ = full(feats)

    upper = FPN(CHANNELS, channels=16, out_levels=(4, 5))
    assert len(upper.inner_blocks) == len(upper.layer_blocks) == 2 and not upper.extra_blocks
    state = full.state_dict()
    upper.load_state_dict(
        {
            "inner_blocks.0.0.weight": state["inner_blocks.1.0.weight"],
            "inner_blocks.0.0.bias": state["inner_blocks.1.0.bias"],
            "inner_blocks.1.0.weight": state["inner_blocks.2.0.weight"],
            "inner_blocks.1.0.bias": state["inner_blocks.2.0.bias"],
            "layer_blocks.0.0.weight": state["layer_blocks.1.0.weight"],
            "layer_blocks.0.0.bias": state["layer_blocks.1.0.bias"],
            "layer_blocks.1.0.weight": state["layer_blocks.2.0.weight"],
            "layer_blocks.1.0.bias": state["layer_blocks.2.0.bias"],
        }
    )
    lower = FPN(CHANNELS, channels=16, out_levels=(3, 4))
    assert len(lower.inner_blocks) == 3 and len(lower.layer_blocks) == 2
    lower.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(("extra", "layer_blocks.2"))}
    )
    with torch.no_grad():
        got_upper = upper(feats)
        got_lower = lower(feats)
    assert len(got_upper) == 2 and torch.equal(got_upper[0], p4) and torch.equal(got_upper[1], p5)
    assert len(got_lower) == 2 and torch.equal(got_lower[0], p3) and torch.equal(got_lower[1], p4)


def test_input_levels_take_the_backbone_output_whole() -> None:
    torch.manual_seed(0)
    picked = FPN(CHANNELS)
    whole = FPN((8, *CHANNELS), input_levels=(2, 3, 4, 5))
    whole.load_state_dict(picked.state_dict())
    feats = random_features((8, *CHANNELS), level_sizes(64, 64, (2, 3, 4, 5)))
    with torch.no_grad():
        for a, b in zip(picked(feats[1:]), whole(feats)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        whole(feats[1:])
    with pytest.raises(ValueError, match=r"input_levels"):
        FPN(CHANNELS, input_levels=(2, 3, 4))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((16, 32), {}, r"one in_channels entry per input level \(3, 4, 5\)"),
        (CHANNELS, {"in_levels": (3, 5)}, "consecutive"),
        (CHANNELS, {"out_levels": (6, 7)}, "start within"),
        (CHANNELS, {"out_levels": (2, 3)}, "start within"),
        (CHANNELS, {"norm": specs.GroupNorm(), "channels": 20}, "32 groups do not divide 20"),
        (CHANNELS, {"extra_from": "p4"}, "extra_from"),
    ],
)
def test_bad_arguments_are_named(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FPN(args, **kwargs)


@pytest.mark.parametrize(
    ("tv_builder", "neck_spec"),
    [
        (torchvision.models.detection.retinanet_resnet50_fpn, specs.FPN()),
        (torchvision.models.detection.retinanet_resnet50_fpn_v2, specs.FPN(extra_from="c5")),
    ],
)
def test_retinanet_backbone_end_to_end(tv_builder, neck_spec: specs.FPN) -> None:  # type: ignore[no-untyped-def]
    """torchvision's RetinaNet ResNet-50-FPN body + FPN against fdet's, weights copied by name."""
    torch.manual_seed(0)
    tv = tv_builder(weights=None, weights_backbone=None).backbone.eval()
    randomize_norms(tv)
    randomize_biases(tv.fpn)

    backbone_spec = specs.ResNet(depth=50, norm=specs.BatchNorm(), frozen_stages=-1)
    backbone = fdet.build(backbone_spec).eval()
    neck = fdet.build(
        neck_spec, in_channels=backbone_spec.out_channels, input_levels=backbone_spec.out_levels
    ).eval()
    assert isinstance(backbone, ResNet) and isinstance(neck, FPN)
    backbone.load_state_dict(tv.body.state_dict(), strict=True)
    neck.load_state_dict(tv.fpn.state_dict(), strict=True)
    # torchvision trains every backbone layer when it has no pretrained weights
    assert {k: p.requires_grad for k, p in tv.body.named_parameters()} == {
        k: p.requires_grad for k, p in backbone.named_parameters()
    }

    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected = list(tv(images).values())
        got = neck(backbone(images))
    assert len(got) == len(expected) == 5
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert g.abs().mean() > 1e-3


def test_backbone_and_neck_capture_as_one_graph() -> None:
    torch.manual_seed(0)
    backbone = ResNet(depth=18, norm=specs.BatchNorm(), frozen_stages=1).eval()
    neck = FPN(backbone.out_channels, input_levels=backbone.out_levels, extra_from="c5")

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return neck(backbone(images))

    compiled = torch.compile(forward, fullgraph=True, backend="eager")
    images = torch.randn(1, 3, 67, 45)
    with torch.no_grad():
        for a, b in zip(compiled(images), forward(images)):
            assert torch.equal(a, b)
