"""Schedules (hand-computed cases), optimizer groups and atomic checkpoints."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import attrs
import pytest
import torch

from fdet import register, specs
from fdet.train.checkpoint import CheckpointError, atomic_save, load_checkpoint
from fdet.train.optim import build_optimizer, parameter_groups
from fdet.train.schedule import lr_factor


def test_linear_warmup_then_steps() -> None:
    s = specs.Schedule(
        warmup=specs.LinearWarmup(iters=10, factor=0.1),
        decay=specs.StepDecay(milestones=(0.5, 0.75)),
    )
    assert lr_factor(s, 0, 100) == pytest.approx(0.1)
    assert lr_factor(s, 5, 100) == pytest.approx(0.55)
    assert lr_factor(s, 10, 100) == 1.0
    assert lr_factor(s, 49, 100) == 1.0
    assert lr_factor(s, 50, 100) == pytest.approx(0.1)
    assert lr_factor(s, 75, 100) == pytest.approx(0.01)
    assert lr_factor(s, 99, 100) == pytest.approx(0.01)


def test_cosine_and_constant_warmup() -> None:
    s = specs.Schedule(
        warmup=specs.ConstantWarmup(iters=4, factor=0.5), decay=specs.CosineDecay(min_factor=0.1)
    )
    assert lr_factor(s, 0, 100) == pytest.approx(0.5 * 1.0)
    assert lr_factor(s, 3, 100) == pytest.approx(
        0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0.03 * math.pi)))
    )
    assert lr_factor(s, 50, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(s, 100, 100) == pytest.approx(0.1)
    flat = specs.Schedule(warmup=None, decay=specs.ConstantDecay())
    assert lr_factor(flat, 0, 10) == lr_factor(flat, 9, 10) == 1.0


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(specs.AdamW(lr=0.01, weight_decay=0.1), model)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_poly_decay_and_step_milestones_round_to_iterations() -> None:
    poly = specs.Schedule(warmup=None, decay=specs.PolyDecay(power=2.0, min_factor=0.1))
    assert lr_factor(poly, 0, 10) == 1.0
    assert lr_factor(poly, 5, 10) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_factor(poly, 10, 10) == pytest.approx(0.1)
    # 0.25 × 10 = 2.5 rounds (half to even) to iteration 2
    step = specs.Schedule(warmup=None, decay=specs.StepDecay(milestones=(0.25,), gamma=0.5))
    assert [lr_factor(step, it, 10) for it in (1, 2, 3)] == [1.0, 0.5, 0.5]
    assert lr_factor(step, -5, 10) == 1.0 and lr_factor(step, 50, 10) == 0.5  # clamped
    with pytest.raises(ValueError, match="positive"):
        lr_factor(step, 0, 0)


def test_sgd_and_adamw_builders() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sgd = build_optimizer(specs.SGD(lr=0.1, momentum=0.5, nesterov=True), model)
    assert isinstance(sgd, torch.optim.SGD)
    assert [(g["lr"], g["momentum"], g["nesterov"]) for g in sgd.param_groups] == [
        (0.1, 0.5, True)
    ] * 2
    adamw = build_optimizer(specs.AdamW(betas=(0.8, 0.9), eps=1e-6), model)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9) and adamw.param_groups[0]["eps"] == 1e-6


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_fused_optimizers_by_default_where_torch_has_the_kernel(name: str) -> None:
    """``fused=None`` takes torch's fused kernel on a CPU; ``False`` keeps the foreach path;
    both take the same steps, to float32 rounding."""
    spec_type = getattr(specs, name)
    torch.manual_seed(0)
    # no bias right before a batch norm: its gradient would be rounding noise, which Adam's
    # normalized step turns into a full step of either sign
    conv1 = torch.nn.Conv2d(3, 4, 3, bias=False)
    model = torch.nn.Sequential(
        conv1, torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1)
    )
    models = {fused: copy.deepcopy(model) for fused in (None, False)}
    lr = 0.1
    opts = {f: build_optimizer(spec_type(lr=lr, fused=f), m) for f, m in models.items()}
    assert all(g["fused"] for g in opts[None].param_groups)
    assert not any(g["fused"] for g in opts[False].param_groups)
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 6, 6)
    for fused, m in models.items():
        for _ in range(3):
            (m(x) - target).square().mean().backward()
            opts[fused].step()
            opts[fused].zero_grad()
    for a, b in zip(models[None].parameters(), models[False].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), models[None].parameters())]
    assert all(moved)


@attrs.frozen(kw_only=True)
class PlainSGDForTests(specs.Optimizer):
    """An optimizer spec defined outside fdet."""

    lr: float = 0.5
    weight_decay: float = 0.0


@register(PlainSGDForTests)
def _build_plain_sgd(spec: PlainSGDForTests, *, params: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=spec.lr, momentum=0.0)


def test_build_optimizer_dispatches_through_the_registry() -> None:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(PlainSGDForTests(), model, specs.ParamGroups(bias_decay=True))
    assert type(opt) is torch.optim.SGD
    assert [g["lr"] for g in opt.param_groups] == [0.5]
    assert [g["name"] for g in opt.param_groups] == ["decay"]


def test_atomic_save_round_trip(tmp_path: Path) -> None:
    path = atomic_save({"model": {"w": torch.ones(2)}, "spec": "{}"}, tmp_path / "c" / "last.pt")
    data = load_checkpoint(path)
    assert torch.equal(data["model"]["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_interrupted_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = atomic_save({"model": {"w": torch.zeros(2)}, "spec": "{}"}, tmp_path / "last.pt")

    def broken_save(obj: object, f: object) -> None:
        f.write(b"partial bytes")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"model": {"w": torch.ones(2)}, "spec": "{}"}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_unreadable_checkpoints_say_what(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"bad\.pt: not a PyTorch checkpoint file"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, other)
    with pytest.raises(CheckpointError, match="not an fdet checkpoint"):
        load_checkpoint(other)
