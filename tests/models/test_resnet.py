from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

import fdet
from fdet import specs
from fdet.models import ResNet
from fdet.specs import SpecError

TV_RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}
ALL_STAGES = {"layer1": "2", "layer2": "3", "layer3": "4", "layer4": "5"}


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial affine and statistics in every batch norm, so parity tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
                n = m.weight.shape[0]  # type: ignore[union-attr]
                values = {
                    "weight": 0.5 + torch.rand(n, generator=g),
                    "bias": 0.2 * torch.randn(n, generator=g),
                    "running_mean": 0.2 * torch.randn(n, generator=g),
                    "running_var": 0.5 + torch.rand(n, generator=g),
                }
                for name, value in values.items():
                    getattr(m, name).copy_(value)


def tv_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("norm", [specs.FrozenBatchNorm(), specs.BatchNorm()], ids=repr)
def test_matches_torchvision_layer_by_layer(depth: int, norm: specs.Norm) -> None:
    torch.manual_seed(depth)
    norm_layer = FrozenBatchNorm2d if norm == specs.FrozenBatchNorm() else nn.BatchNorm2d
    tv = TV_RESNETS[depth](norm_layer=norm_layer).eval()
    randomize_norms(tv)
    ours = ResNet(depth=depth, norm=norm, frozen_stages=-1).eval()
    ours.load_state_dict(tv_state(tv), strict=True)

    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = IntermediateLayerGetter(tv, ALL_STAGES)(images)
        got = ours(images)
    assert len(got) == 4
    for level, feature in zip((2, 3, 4, 5), got):
        torch.testing.assert_close(feature, expected[str(level)], rtol=1e-5, atol=1e-5)
        assert feature.abs().mean() > 1e-3  # not a degenerate all-zero map


def test_state_dict_names_equal_torchvision_less_fc() -> None:
    tv = torchvision.models.resnet50()
    ours = ResNet(depth=50, norm=specs.BatchNorm())
    assert list(ours.state_dict()) == list(tv_state(tv))


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_every_depth_has_torchvision_parameters(depth: int) -> None:
    tv_model = TV_RESNETS[depth]()
    expected = {k: v.shape for k, v in tv_model.named_parameters() if not k.startswith("fc.")}
    del tv_model
    ours = ResNet(depth=depth, norm=specs.BatchNorm(), frozen_stages=-1)
    got = {k: v.shape for k, v in ours.named_parameters()}
    assert got == expected
    assert sum(p.numel() for p in ours.parameters()) == sum(s.numel() for s in expected.values())


@pytest.mark.parametrize(("height", "width"), [(65, 47), (33, 97), (31, 31)])
def test_odd_sizes_halve_rounding_up(height: int, width: int) -> None:
    model = ResNet(depth=18).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, height, width))
    for level, feature in zip((2, 3, 4, 5), feats):
        h, w = height, width
        for _ in range(level):
            h, w = -(-h // 2), -(-w // 2)
        assert feature.shape[-2:] == (h, w)


@pytest.mark.parametrize("out_levels", [(3,), (2, 4), (3, 4, 5), (5,)])
def test_out_levels_select_and_drop_unused_stages(out_levels: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    full = ResNet(depth=18, norm=specs.BatchNorm()).eval()
    randomize_norms(full)
    part = ResNet(depth=18, norm=specs.BatchNorm(), out_levels=out_levels).eval()
    built = {f"layer{i}" for i in range(1, max(out_levels))}
    assert {name.split(".")[0] for name, _ in part.named_children()} == {"conv1", "bn1"} | built
    part.load_state_dict(
        {k: v for k, v in full.state_dict().items() if k.split(".")[0] in built | {"conv1", "bn1"}}
    )
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        everything = dict(zip((2, 3, 4, 5), full(images)))
        got = part(images)
    assert len(got) == len(out_levels)
    for level, feature in zip(out_levels, got):
        assert torch.equal(feature, everything[level])


@pytest.mark.parametrize(
    ("depth", "width", "out_levels"), [(18, 64, (2, 3, 4, 5)), (50, 16, (3, 5)), (34, 8, (4,))]
)
def test_out_channels_match_spec_and_maps(
    depth: int, width: int, out_levels: tuple[int, ...]
) -> None:
    spec = specs.ResNet(depth=depth, width=width, out_levels=out_levels)  # type: ignore[arg-type]
    model = ResNet(depth=depth, width=width, out_levels=out_levels)
    assert model.out_channels == spec.out_channels
    assert model.out_levels == out_levels
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert tuple(f.shape[1] for f in feats) == spec.out_channels


def _stage_of(name: str) -> int:
    """0 for the stem, k for layer{k}."""
    head = name.split(".")[0]
    return int(head[len("layer") :]) if head.startswith("layer") else 0


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 3, 4])
def test_frozen_stages_do_not_train(frozen_stages: int) -> None:
    torch.manual_seed(0)
    model = ResNet(depth=18, norm=specs.BatchNorm(), frozen_stages=frozen_stages)
    model.eval()
    model.train()  # frozen parts must stay in eval mode across mode switches
    assert model.training

    for name, param in model.named_parameters():
        assert param.requires_grad == (_stage_of(name) > frozen_stages), name
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.training == (_stage_of(name) > frozen_stages), name

    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, weight_decay=1e-4) if trainable else None
    loss = sum(f.square().mean() for f in model(torch.randn(2, 3, 48, 48)))
    if opt is not None:
        loss.backward()  # type: ignore[union-attr]
        opt.step()

    after = model.state_dict()
    for key, old in before.items():
        if key.endswith("num_batches_tracked"):
            continue
        changed = not torch.equal(old, after[key])
        assert changed == (_stage_of(key) > frozen_stages), key


def test_frozen_bn_trains_only_convs() -> None:
    model = ResNet(depth=18, norm=specs.FrozenBatchNorm(), frozen_stages=-1)
    owners = {type(m) for m in model.modules() if list(m.parameters(recurse=False))}
    assert owners == {nn.Conv2d}
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 1 + 4 * 4 + 3


@pytest.mark.parametrize("norm", [specs.GroupNorm(groups=8), partial(nn.GroupNorm, 8)], ids=repr)
def test_group_norm(norm: specs.Norm | Callable[[int], nn.Module]) -> None:
    torch.manual_seed(0)
    model = ResNet(depth=50, norm=norm, width=16, frozen_stages=-1)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d) for m in model.modules())
    feats = model(torch.randn(2, 3, 48, 40))
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
    sum(f.mean() for f in feats).backward()  # type: ignore[union-attr]
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="5 groups do not divide 64 channels"):
        ResNet(depth=18, norm=specs.GroupNorm(groups=5))
    with pytest.raises(SpecError) as info:
        specs.ResNet(depth=18, norm=specs.GroupNorm(groups=5))
    assert info.value.path == "norm.groups" and "the stem width (64 channels)" in str(info.value)


def test_spec_and_factory_norms_build_the_same_layers() -> None:
    from_spec = ResNet(depth=18, norm=specs.BatchNorm(), out_levels=(3,))
    from_factory = ResNet(depth=18, norm=nn.BatchNorm2d, out_levels=(3,))
    assert [type(m) for m in from_spec.modules()] == [type(m) for m in from_factory.modules()]
    assert (
        fdet.build(specs.ResNet(depth=18, norm=specs.BatchNorm())).bn1.__class__ is nn.BatchNorm2d
    )


def test_zero_init_residual_makes_blocks_identity_plus_relu() -> None:
    model = ResNet(depth=50, norm=specs.BatchNorm(), zero_init_residual=True).eval()
    tv = torchvision.models.resnet50(zero_init_residual=True)
    zeros = {k for k, v in tv_state(tv).items() if k.endswith("weight") and not v.any()}
    ours = {k for k, v in model.state_dict().items() if k.endswith("weight") and not v.any()}
    assert ours == zeros
    assert len(zeros) == 3 + 4 + 6 + 3
    block = model.get_submodule("layer1.1")
    x = torch.randn(1, 256, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x.relu())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 20}, "depth"),
        ({"out_levels": (1, 2)}, "out_levels"),
        ({"out_levels": (4, 3)}, "out_levels"),
        ({"out_levels": ()}, "out_levels"),
        ({"frozen_stages": 5}, "frozen_stages"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ResNet(**kwargs)


def test_norm_must_be_a_norm_spec_or_a_factory() -> None:
    with pytest.raises(TypeError, match=r"norm must be a specs\.Norm spec or a callable"):
        ResNet(norm="bn")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"norm must be a specs\.Norm spec, got a FPN"):
        ResNet(norm=specs.FPN())  # type: ignore[arg-type]
