"""Every spec file under specs/ loads, round-trips JSON and builds (found by itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fdet import build, specs

ZOO = Path(__file__).resolve().parents[2] / "specs"
FILES = sorted(p for p in ZOO.rglob("*.py") if not p.name.startswith("_"))


def test_zoo_is_found() -> None:
    assert len(FILES) >= 3, FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ZOO)))
def test_spec_file_loads_round_trips_and_builds(path: Path) -> None:
    spec = specs.load(path)
    assert specs.from_json(specs.to_json(spec)) == spec
    if isinstance(spec, specs.TTA):  # test-time augmentation: nothing to build
        assert path.parent.name == "tta" and spec.num_views >= 1
        return
    model_spec = spec.model if isinstance(spec, specs.Experiment) else spec
    with torch.device("meta"):  # no memory or init cost for the big COCO models
        module = build(model_spec)
    assert isinstance(module, torch.nn.Module)
    assert sum(p.numel() for p in module.parameters()) > 0
