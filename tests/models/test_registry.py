from __future__ import annotations

import subprocess
import sys

import attrs
import pytest
import torch

import fdet
from fdet import specs
from fdet.models import FPN, ResNet
from fdet.models.backbones.resnet import build_resnet
from fdet.registry import RegistryError, builder_for, register, registered


@attrs.frozen(kw_only=True)
class UnregisteredToyBackbone(fdet.specs.Spec):
    channels: int = 8


def test_build_resnet_from_spec() -> None:
    spec = specs.ResNet(depth=18, out_levels=(3, 4), frozen_stages=2)
    model = fdet.build(spec)
    assert isinstance(model, ResNet)
    assert model.out_levels == (3, 4) and model.out_channels == spec.out_channels
    assert not hasattr(model, "layer4")
    assert not any(p.requires_grad for p in model.get_submodule("layer2").parameters())
    assert all(p.requires_grad for p in model.get_submodule("layer3").parameters())


def test_build_fpn_from_spec() -> None:
    spec = specs.FPN(channels=32, extra_from="c5", out_levels=(3, 4, 5, 6))
    neck = fdet.build(spec, in_channels=(128, 256, 512))
    assert isinstance(neck, FPN)
    assert neck.out_levels == (3, 4, 5, 6) and neck.out_channels == (32,) * 4
    assert neck.extra_blocks["p6"].in_channels == 512
    feats = [torch.randn(1, c, s, s) for c, s in zip((128, 256, 512), (8, 4, 2))]
    with torch.no_grad():
        assert [tuple(p.shape) for p in neck(feats)] == [
            (1, 32, 8, 8),
            (1, 32, 4, 4),
            (1, 32, 2, 2),
            (1, 32, 1, 1),
        ]


def test_backbone_spec_feeds_neck_spec() -> None:
    backbone_spec = specs.ResNet(depth=18, width=16, norm=specs.GroupNorm(groups=8))
    backbone = fdet.build(backbone_spec)
    neck = fdet.build(
        specs.FPN(channels=32, norm=specs.GroupNorm()),
        in_channels=backbone_spec.out_channels,
        input_levels=backbone_spec.out_levels,
    )
    with torch.no_grad():
        pyramid = neck(backbone(torch.randn(1, 3, 61, 83)))
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(8, 11), (4, 6), (2, 3), (1, 2), (1, 1)]


def test_missing_shape_kwargs_say_what_is_needed() -> None:
    with pytest.raises(TypeError, match=r"in_channels.*\(3, 4, 5\)"):
        fdet.build(specs.FPN())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_channels": (256, 512)}, r"one in_channels entry per input level \(3, 4, 5\)"),
        ({"in_channels": 256}, r"one in_channels entry per input level \(3, 4, 5\)"),
        (
            {"in_channels": (64, 128, 256, 512), "input_levels": (2, 3, 4)},
            r"input level \(2, 3, 4\)",
        ),
    ],
)
def test_wrong_shape_kwargs_say_what_was_expected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fdet.build(specs.FPN(), **kwargs)


def test_unexpected_shape_kwargs_are_rejected() -> None:
    with pytest.raises(TypeError, match="in_channels"):
        fdet.build(specs.ResNet(), in_channels=3)


def test_unregistered_spec_says_what_to_import() -> None:
    with pytest.raises(RegistryError, match=r"import the module.*UnregisteredToyBackbone"):
        fdet.build(UnregisteredToyBackbone())


def test_second_builder_for_a_spec_type_is_an_error() -> None:
    def build_other_resnet(spec: specs.ResNet) -> ResNet:
        return ResNet()

    with pytest.raises(RegistryError, match="already has a builder"):
        register(specs.ResNet)(build_other_resnet)
    assert builder_for(specs.ResNet) is build_resnet
    register(specs.ResNet)(build_resnet)  # the same builder again is harmless
    assert builder_for(specs.ResNet) is build_resnet


def test_builtin_builders_are_registered() -> None:
    builders = registered()
    assert specs.ResNet in builders and specs.FPN in builders
    # every concrete fdet spec class under an extension point builds through the registry
    for base in (specs.Norm, specs.Warmup, specs.Decay, specs.Optimizer):
        for cls in specs.concrete_subclasses(base).values():
            if cls.__module__.startswith("fdet."):
                assert cls in builders, cls


def test_builtin_builders_need_no_import_of_their_modules() -> None:
    """``build`` imports fdet's builder modules itself (a fresh interpreter imports only
    ``fdet``)."""
    code = (
        "import sys\n"
        "from fdet import build, specs\n"
        "assert 'fdet.train.schedule' not in sys.modules\n"
        "assert build(specs.CosineDecay())(50, 100) == 0.5\n"
        "assert build(specs.LinearWarmup(iters=10, factor=0.0))(5) == 0.5\n"
        "print(type(build(specs.GroupNorm(groups=2), channels=4)).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "GroupNorm"


def test_norm_specs_build_layers() -> None:
    assert isinstance(fdet.build(specs.BatchNorm(), channels=4), torch.nn.BatchNorm2d)
    frozen = fdet.build(specs.FrozenBatchNorm(), channels=4)
    assert type(frozen).__name__ == "FrozenBatchNorm2d" and not list(frozen.parameters())
    gn = fdet.build(specs.GroupNorm(groups=2), channels=6)
    assert isinstance(gn, torch.nn.GroupNorm) and gn.num_groups == 2
    with pytest.raises(ValueError, match="4 groups do not divide 6 channels"):
        fdet.build(specs.GroupNorm(groups=4), channels=6)
