"""A user's own spec classes, defined outside fdet, work wherever fdet's own do: spec files, JSON,
``--set`` overrides, the registry, the learning-rate schedule and the modules."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fdet import build, specs
from fdet.models import ResNet
from fdet.specs import SpecError, apply_overrides
from fdet.train.schedule import lr_factor

USER_MODULE = '''
"""Components of a project that uses fdet."""

import math

import attrs
from torch import nn

from fdet import register, specs


@attrs.frozen(kw_only=True)
class UserExpDecay(specs.Decay):
    """The factor falls from 1 to 1 / rate, exponentially in the progress."""

    rate: float = attrs.field(default=10.0)

    @rate.validator
    def _check(self, attribute: attrs.Attribute, value: float) -> None:
        if not value >= 1:
            raise specs.SpecError(f"must be >= 1, got {value}", attribute.name)


@register(UserExpDecay)
def build_user_exp_decay(spec: UserExpDecay):
    return lambda iteration, total: math.exp(-math.log(spec.rate) * iteration / total)


@attrs.frozen(kw_only=True)
class UserInstanceNorm(specs.Norm):
    """Instance norm with affine terms."""

    eps: float = 1e-5


@register(UserInstanceNorm)
def build_user_instance_norm(spec: UserInstanceNorm, *, channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels, eps=spec.eps, affine=True)
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The user's module, imported from a folder outside fdet."""
    folder = tmp_path_factory.mktemp("user_project")
    (folder / "fdet_user_components.py").write_text(textwrap.dedent(USER_MODULE))
    sys.path.insert(0, str(folder))
    try:
        module = sys.modules.get("fdet_user_components")
        return module or importlib.import_module("fdet_user_components")
    finally:
        sys.path.remove(str(folder))


def _experiment(**kw: object) -> specs.Experiment:
    model = specs.RetinaNet(
        backbone=specs.ResNet(depth=18, width=16, out_levels=(3, 4, 5)),
        neck=specs.FPN(channels=32),
        head=specs.RetinaHead(num_classes=2, num_convs=1, channels=32),
    )
    return specs.Experiment(model=model, iterations=1000, **kw)  # type: ignore[arg-type]


def test_spec_file_json_and_overrides(user: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "exp.py").write_text(
        "import attrs\n"
        "from fdet import specs\n"
        "from fdet_user_components import UserExpDecay, UserInstanceNorm\n"
        "MODEL = specs.RetinaNet(\n"
        "    backbone=specs.ResNet(depth=18, width=16, norm=UserInstanceNorm()),\n"
        "    head=specs.RetinaHead(num_classes=2),\n"
        ")\n"
        "EXPERIMENT = specs.Experiment(\n"
        "    model=MODEL, iterations=1000, schedule=specs.Schedule(decay=UserExpDecay(rate=4.0))\n"
        ")\n"
    )
    exp = specs.load(tmp_path / "exp.py", specs.Experiment)  # it imports the user's module
    assert exp.schedule.decay == user.UserExpDecay(rate=4.0)

    text = specs.to_json(exp)
    assert '"type": "UserExpDecay"' in text and '"type": "UserInstanceNorm"' in text
    assert specs.from_json(text) == exp
    (tmp_path / "exp.json").write_text(text)
    assert specs.load(tmp_path / "exp.json") == exp

    got = apply_overrides(exp, ["schedule.decay.rate=8"])
    assert got.schedule.decay == user.UserExpDecay(rate=8.0)
    got = apply_overrides(_experiment(), ['schedule.decay={"type": "UserExpDecay", "rate": 2}'])
    assert got.schedule == specs.Schedule(decay=user.UserExpDecay(rate=2.0))
    got = apply_overrides(
        _experiment(), ['model.backbone.norm={"type": "UserInstanceNorm", "eps": 0.001}']
    )
    assert got.model.backbone.norm == user.UserInstanceNorm(eps=0.001)  # type: ignore[attr-defined]

    with pytest.raises(SpecError) as info:
        apply_overrides(exp, ["schedule.decay.rate=0.5"])
    assert info.value.path == "schedule.decay.rate" and "must be >= 1" in info.value.message
    with pytest.raises(SpecError) as info:
        apply_overrides(exp, ["schedule.decay.gamma=0.5"])
    assert "unknown key 'gamma' in UserExpDecay" in info.value.message
    with pytest.raises(SpecError) as info:
        specs.from_json(text.replace('"UserExpDecay"', '"UserExpDecayy"'))
    assert info.value.path == "schedule.decay.type"
    assert "CosineDecay" in info.value.message and "UserExpDecay" in info.value.message


def test_lr_factor_and_build_use_the_users_classes(user: ModuleType) -> None:
    schedule = specs.Schedule(
        warmup=specs.LinearWarmup(iters=10, factor=0.5), decay=user.UserExpDecay(rate=100.0)
    )
    assert lr_factor(schedule, 0, 100) == 0.5
    assert lr_factor(schedule, 50, 100) == pytest.approx(0.1)
    assert lr_factor(schedule, 100, 100) == pytest.approx(0.01)

    model = build(specs.ResNet(depth=18, width=8, norm=user.UserInstanceNorm()))
    assert isinstance(model, ResNet)
    assert isinstance(model.bn1, torch.nn.InstanceNorm2d)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))[-1].shape == (1, 64, 2, 2)
