"""fdet.runtime: native bf16 detection, ``precision="auto"``, and the C allocator setting."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest
import torch

from fdet import runtime, specs

ZOO = Path(__file__).resolve().parents[1] / "specs"
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _cpu_features(monkeypatch: pytest.MonkeyPatch, *, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "used", "why"),
    [
        (True, False, "bf16", "AVX512-BF16"),
        (False, True, "bf16", "AMX"),
        (True, True, "bf16", "AVX512-BF16"),
        (False, False, "fp32", "neither AVX512-BF16 nor AMX"),
    ],
)
def test_auto_is_bf16_where_the_cpu_has_it(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, used: str, why: str
) -> None:
    _cpu_features(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    choice = runtime.resolve_precision("auto", "cpu")
    assert choice == ("auto", used, choice.reason) and why in choice.reason
    assert runtime.native_bf16(torch.device("cpu")) == (used == "bf16")


def test_auto_on_this_cpu_follows_torchs_detectors() -> None:
    native = torch.cpu._is_avx512_bf16_supported() or bool(
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    assert runtime.resolve_precision("auto", "cpu").used == ("bf16" if native else "fp32")


def test_a_torch_without_the_detectors_gives_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert runtime.resolve_precision("auto", "cpu").used == "fp32"


def test_explicit_precisions_are_used_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu_features(monkeypatch, avx512_bf16=False, amx=False)
    for precision in ("fp32", "bf16", "fp16"):
        assert runtime.resolve_precision(precision, "cpu").used == precision
    assert runtime.resolve_precision("auto", "meta") == (
        "auto",
        "fp32",
        "no bf16 detection for meta devices",
    )


def test_new_values_round_trip_through_json() -> None:
    shapes = specs.load(ZOO / "shapes" / "retinanet_r18_fpn.py", specs.Experiment)
    # the embedded default trains with both; the Experiment defaults leave them off
    assert (shapes.precision, shapes.allocator) == ("auto", "retain")
    base = attrs.evolve(shapes, precision="fp32", allocator="default")
    fields = attrs.fields(specs.Experiment)
    assert (fields.precision.default, fields.allocator.default) == ("fp32", "default")
    exp = attrs.evolve(base, precision="auto", allocator="retain")
    assert specs.from_json(specs.to_json(exp)) == exp
    assert specs.apply_overrides(base, ["precision=auto", "allocator=retain"]) == exp
    with pytest.raises(specs.SpecError, match="allocator"):
        attrs.evolve(base, allocator="jemalloc")


def _python(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


_TRAIN = """
    import hashlib, sys
    import attrs, torch
    from fdet import build, runtime, specs
    from fdet.models.detectors.base import total_loss
    from fdet.data.sample import Batch
    if sys.argv[1] == "retain":
        setting = runtime.configure_allocator()
        assert setting.configured and runtime.configure_allocator() is setting, setting
    torch.manual_seed(0)
    exp = specs.load(sys.argv[2], specs.Experiment)
    model = build(attrs.evolve(exp.model, backbone=attrs.evolve(exp.model.backbone, width=16)))
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(4, 3, dtype=torch.bool)
    xy = torch.rand(4, 3, 2, generator=g) * 40
    batch = Batch(
        images=torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g),
        image_sizes=torch.tensor([[64, 64]] * 4),
        gt_boxes=torch.cat((xy, xy + 8 + torch.rand(4, 3, 2, generator=g) * 16), -1),
        gt_labels=torch.randint(0, 6, (4, 3), generator=g),
        gt_valid=valid,
        gt_crowd=~valid,
        image_ids=torch.arange(4),
        scales=torch.ones(4, 2),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        total_loss(model.loss(model(batch.images), batch)).backward()
        # a large temporary a step, freed: reused from the heap when the allocator retains
        torch.empty(2**24).fill_(1.0)
        opt.step()
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.numpy().tobytes())
    print(digest.hexdigest())
"""


@pytest.mark.skipif(not GLIBC, reason="configure_allocator acts on glibc only")
def test_retaining_the_heap_changes_no_result() -> None:
    spec = str(ZOO / "shapes" / "retinanet_r18_fpn.py")
    assert _python(_TRAIN, "retain", spec) == _python(_TRAIN, "default", spec)


_FAULTS = """
    import resource, sys, torch
    from fdet import runtime
    if sys.argv[1] == "retain":
        assert runtime.configure_allocator().configured
    n = 64 * 2**20 // 4
    torch.empty(n).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(n).fill_(1.0)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="configure_allocator acts on glibc only")
def test_retaining_the_heap_stops_faulting_in_large_temporaries() -> None:
    default = int(_python(_FAULTS, "default"))
    retained = int(_python(_FAULTS, "retain"))
    # 20 × 64 MiB of 4 KiB pages is 327 680 faults when every block is mapped afresh; retained,
    # the heap grows once (16 384 pages) and is reused
    assert default > 100_000
    assert retained < default / 10


@pytest.mark.skipif(GLIBC, reason="on glibc the allocator is configured")
def test_elsewhere_the_allocator_is_left_alone() -> None:
    setting = runtime.configure_allocator()
    assert not setting.configured and setting.reason


def test_autocast_takes_resolved_precisions_only() -> None:
    from fdet.train.step import autocast

    with pytest.raises(ValueError, match="resolve_precision"):
        autocast("auto", torch.device("cpu"))
