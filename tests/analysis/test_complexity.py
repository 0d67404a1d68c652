from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
from torch import Tensor, nn

from fdet import specs
from fdet.analysis.complexity import ROOT, model_complexity
from fdet.registry import build

ROOT_DIR = Path(__file__).resolve().parents[2]


class Tiny(nn.Module):
    """Two convs and a projection computed in the model's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.down = nn.Sequential(nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU())
        self.act = nn.ReLU()  # no parameters, no counted FLOPs
        self.proj = nn.Parameter(torch.randn(6, 5))

    def forward(self, images: Tensor) -> Tensor:
        x = self.down(self.act(self.stem(images)))  # [B, 6, H/2, W/2]
        return x.flatten(2).transpose(1, 2) @ self.proj  # [B, HW/4, 5]


def test_hand_counted_convs() -> None:
    batch, h, w = 2, 16, 12
    c = model_complexity(Tiny(), (h, w), batch=batch, repeats=2, warmup=0)
    conv = lambda cin, cout, k, ho, wo: 2 * cin * cout * k * k * ho * wo * batch  # noqa: E731
    assert c.flops["stem"] == conv(3, 8, 3, h, w)
    assert c.flops["down"] == conv(8, 6, 3, h // 2, w // 2)
    assert c.flops["act"] == 0
    assert c.flops[ROOT] == 2 * batch * (h // 2) * (w // 2) * 6 * 5  # the matmul in forward
    assert c.total_flops == sum(c.flops.values())
    assert c.params == {"stem": 3 * 8 * 9, "down": 8 * 6 * 9 + 6, "act": 0, ROOT: 30}
    assert c.total_params == sum(p.numel() for p in Tiny().parameters()) == sum(c.params.values())
    assert c.trainable_params == c.total_params
    assert c.latency_ms > 0 and c.batch == batch and c.image_size == (h, w)
    rows = {line.split()[0]: line.split() for line in c.to_table().splitlines()}
    assert rows["stem"][1:4] == ["216", "31.6%", f"{conv(3, 8, 3, h, w) / 1e3:.4g}"]


def test_mode_restored_and_frozen_counted() -> None:
    model = Tiny().train()
    model.stem.weight.requires_grad_(False)
    c = model_complexity(model, (8, 8), repeats=1)
    assert model.training
    assert c.trainable_params == c.total_params - 3 * 8 * 9


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        model_complexity(Tiny(), (0, 8))
    with pytest.raises(ValueError, match="repeats"):
        model_complexity(Tiny(), (8, 8), repeats=0)


def test_tiny_detector() -> None:
    base = specs.load(ROOT_DIR / "specs" / "shapes" / "retinanet_r18_fpn.py", specs.Experiment)
    spec = attrs.evolve(base.model, backbone=attrs.evolve(base.model.backbone, width=16))
    torch.manual_seed(0)
    model = build(spec)
    c = model_complexity(model, (64, 64), repeats=2)
    names = [n for n, _ in model.named_children()]
    assert {"backbone", "neck", "head"} <= set(names)
    assert list(c.params)[: len(names)] == names
    assert sum(c.params.values()) == c.total_params == sum(p.numel() for p in model.parameters())
    assert sum(c.flops.values()) == c.total_flops
    assert all(c.flops[n] > 0 for n in ("backbone", "neck", "head"))
    # the backbone's share equals counting it alone, on the normalized input
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.backbone(model.normalize(torch.rand(1, 3, 64, 64)))
    assert c.flops["backbone"] == counter.get_total_flops()
    # a batch of two costs twice the FLOPs, the same parameters
    c2 = model_complexity(model, (64, 64), batch=2, repeats=1)
    assert c2.total_flops == 2 * c.total_flops and c2.params == c.params
    table = c.to_table()
    for name in ("backbone", "neck", "head", "total", "latency"):
        assert name in table
    assert f"{c.total_params:,}" in table
