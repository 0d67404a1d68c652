"""The shapes training step on a CPU: today's recipe against the new default; precision,
memory layout and the C allocator.

First the two recipes of the shapes spec's own step (its model, AdamW and gradient clipping, at
its training batch: 16 × 128², random uint8 images, 8–12 random boxes an image): the recipe
before this benchmark's changes — float32, contiguous tensors, the multi-tensor AdamW, glibc's
default allocator — against the spec's default now: ``precision="auto"`` (bf16 autocast where the
CPU computes it natively), the fused AdamW and ``allocator="retain"``. They take turns in one
process under glibc's defaults (precision and optimizer), then, since allocator settings are
process-wide, each in fresh processes with its own allocator, the processes alternating
(today, new, today, new). For each: the median step, the ratio, and the mean minor page faults
and system CPU time a step (``getrusage``).

Then the parts one by one: one full SGD step (forward, loss, backward, update), in four
configurations interleaved in one process: fp32 with contiguous tensors (the recipe today),
bf16 autocast, channels_last fp32 and channels_last with bf16 autocast. For each: the median
step, its ratio to today's recipe, and the mean minor page faults and system CPU time a step
(``getrusage``). Then, since allocator settings are process-wide, fp32 and bf16 once each in a
fresh process for each allocator: glibc's defaults, :func:`fdet.runtime.configure_allocator`,
and the ``MALLOC_*_`` environment variables.

Run: python benchmarks/bench_shapes_step.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from _common import cpu_model, interleaved, median, table

from fdet import build, specs
from fdet.models.detectors.base import total_loss

SHAPES_SPEC = Path(__file__).resolve().parents[1] / "specs" / "shapes" / "retinanet_r18_fpn.py"
CONFIGS = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "channels_last fp32": ("fp32", True),
    "channels_last bf16": ("bf16", True),
}
ENV_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}


def _usage() -> tuple[int, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


def recipe_step(model: Any, batch: Any, recipe: str) -> Callable[[], None]:
    """One step of the shapes spec's own training (AdamW, gradient clipping) of its own copy of
    ``model``: ``recipe`` "today" (fp32, the foreach AdamW) or "new" (the spec's precision and
    optimizer as they are: ``auto`` precision, the fused AdamW where torch has it)."""
    from fdet.runtime import resolve_precision
    from fdet.train.optim import build_optimizer
    from fdet.train.step import apply_update

    exp = specs.load(SHAPES_SPEC, specs.Experiment, name="EXPERIMENT")
    model = copy.deepcopy(model)
    if recipe == "today":
        precision = "fp32"
        optimizer_spec = attrs.evolve(exp.optimizer, fused=False)
    else:
        precision = resolve_precision(exp.precision, "cpu").used
        optimizer_spec = exp.optimizer
    opt = build_optimizer(optimizer_spec, model, exp.param_groups)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = model(batch.images)
        total_loss(model.loss(outputs, batch)).backward()
        apply_update(opt, params, grad_clip_norm=exp.grad_clip_norm)

    return step


def _model_and_batch() -> tuple[Any, Any]:
    from bench_retinanet import random_batch, random_images

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build(specs.load(SHAPES_SPEC, specs.Experiment, name="EXPERIMENT").model).train()
    batch = random_batch(random_images(16, 128, g), model.head.num_classes, g)
    return model, batch


def _summary(times: list[float], record: list[tuple[int, float]], repeats: int) -> dict:
    timed = record[-repeats:]  # the warm-up calls are left out
    return {
        "ms": median(times) * 1e3,
        "faults": sum(f for f, _ in timed) / len(timed),
        "sys_ms": sum(s for _, s in timed) / len(timed) * 1e3,
    }


def measure_recipes(names: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """Median ms a step of each recipe in ``names``, interleaved, with faults and system ms."""
    model, batch = _model_and_batch()
    records: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    steps = {name: metered(recipe_step(model, batch, name), records[name]) for name in names}
    times = interleaved(steps, repeats=repeats, warmup=2)
    return {name: _summary(times[name], records[name], repeats) for name in names}


def make_step(model: Any, batch: Any, precision: str, channels_last: bool) -> Callable[[], None]:
    """One SGD step of its own copy of ``model`` on ``batch``."""
    model = copy.deepcopy(model)
    images = batch.images
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs = model(images)
        total_loss(model.loss(outputs, batch)).backward()
        opt.step()

    return step


def metered(fn: Callable[[], None], record: list[tuple[int, float]]) -> Callable[[], None]:
    """``fn``, appending (minor faults, system seconds) of each call to ``record``."""

    def call() -> None:
        f0, s0 = _usage()
        fn()
        f1, s1 = _usage()
        record.append((f1 - f0, s1 - s0))

    return call


def measure(names: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """Median ms a step of each configuration, interleaved, and the mean minor faults and
    system ms a step (a step that grows the heap faults where the others do not)."""
    model, batch = _model_and_batch()
    records: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    steps = {
        name: metered(make_step(model, batch, *CONFIGS[name]), records[name]) for name in names
    }
    times = interleaved(steps, repeats=repeats, warmup=2)
    return {name: _summary(times[name], records[name], repeats) for name in names}


def child(allocator: str, names: list[str], repeats: int) -> None:
    """In a fresh process: configure the allocator, measure, print JSON."""
    setting = None
    if allocator == "configure_allocator()":
        from fdet.runtime import configure_allocator

        setting = configure_allocator()._asdict()
    fn = measure_recipes if names[0] in RECIPES else measure
    print(json.dumps({"setting": setting, "results": fn(names, repeats)}))


def in_subprocess(allocator: str, names: list[str], repeats: int) -> dict[str, Any]:
    env = dict(os.environ)
    for key in ENV_SETTINGS:
        env.pop(key, None)
    if allocator == "MALLOC_* variables":
        env.update(ENV_SETTINGS)
    command = [sys.executable, __file__, "--child", allocator, "--names", ",".join(names)]
    out = subprocess.run(
        [*command, "--repeats", str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.splitlines()[-1])


RECIPES = {"today": "glibc defaults", "new": "configure_allocator()"}


def _row(label: str, r: dict[str, float], base: float) -> list[str]:
    ms, faults, sys_ms = r["ms"], r["faults"], r["sys_ms"]
    return [label, f"{ms:.0f} ms", f"{base / ms:.2f}", f"{faults:.0f}", f"{sys_ms:.1f} ms"]


def recipes(repeats: int) -> None:
    """Today's recipe against the new default: in one process, then alternating processes."""
    header = ["recipe", "step", "× today", "minor faults", "system"]
    print(
        "\nshapes step as the spec trains it (AdamW, clipping), 16 × 128²: today (fp32, foreach "
        "AdamW, glibc defaults) against the new default (precision auto, fused AdamW, "
        f"allocator retain); median of {repeats} steps; faults and system time a step\n"
    )
    together = in_subprocess("glibc defaults", list(RECIPES), repeats)["results"]
    base = together["today"]["ms"]
    print("in one process, interleaved, glibc defaults for both:")
    print(table(header, [_row(name, r, base) for name, r in together.items()]))
    found: dict[str, list[dict[str, float]]] = {name: [] for name in RECIPES}
    for _ in range(2):
        for name, allocator in RECIPES.items():
            found[name].append(in_subprocess(allocator, [name], repeats)["results"][name])
    base = median([r["ms"] for r in found["today"]])
    rows = []
    for name, runs in found.items():
        merged = {key: median([r[key] for r in runs]) for key in ("ms", "faults", "sys_ms")}
        rows.append(_row(f"{name} ({RECIPES[name]})", merged, base))
    print("\neach in its own process with its own allocator, alternating, median of 2 processes:")
    print(table(header, rows))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 10")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.names.split(","), args.repeats)
        return
    repeats = 3 if args.quick else 10
    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    recipes(repeats)
    print(
        f"shapes R18-FPN train step, 16 × 128², SGD; median of {repeats} steps, interleaved; "
        "faults and system time: mean a step\n"
    )
    results = in_subprocess("glibc defaults", list(CONFIGS), repeats)["results"]
    base = results["fp32"]["ms"]
    rows = [
        [
            name,
            f"{r['ms']:.0f} ms",
            f"{base / r['ms']:.2f}",
            f"{r['faults']:.0f}",
            f"{r['sys_ms']:.0f} ms",
        ]
        for name, r in results.items()
    ]
    print(table(["configuration", "step", "× fp32", "minor faults", "system"], rows))
    print(f"\nallocators, each in a fresh process (fp32 and bf16 interleaved, {repeats} repeats)\n")
    rows = []
    for allocator in ("glibc defaults", "configure_allocator()", "MALLOC_* variables"):
        found = in_subprocess(allocator, ["fp32", "bf16"], repeats)
        for name, r in found["results"].items():
            rows.append(
                [
                    allocator,
                    name,
                    f"{r['ms']:.0f} ms",
                    f"{base / r['ms']:.2f}",
                    f"{r['faults']:.0f}",
                    f"{r['sys_ms']:.0f} ms",
                ]
            )
        if found["setting"] is not None:
            print(f"configure_allocator(): {found['setting']}")
    print()
    print(table(["allocator", "precision", "step", "× fp32", "minor faults", "system"], rows))


if __name__ == "__main__":
    main()
