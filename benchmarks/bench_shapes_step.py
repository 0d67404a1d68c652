"""The shapes training step on a CPU: precision, memory layout and the C allocator.

The shapes R18-FPN spec's model at its training batch (16 × 128², random uint8 images, 8–12
random boxes an image), one full SGD step (forward, loss, backward, update), in four
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
    from bench_retinanet import random_batch, random_images

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = build(specs.load(SHAPES_SPEC, specs.Experiment, name="EXPERIMENT").model).train()
    batch = random_batch(random_images(16, 128, g), model.head.num_classes, g)
    records: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
    steps = {
        name: metered(make_step(model, batch, *CONFIGS[name]), records[name]) for name in names
    }
    times = interleaved(steps, repeats=repeats, warmup=2)
    result = {}
    for name in names:
        timed = records[name][-repeats:]  # the warm-up calls are left out
        result[name] = {
            "ms": median(times[name]) * 1e3,
            "faults": sum(f for f, _ in timed) / len(timed),
            "sys_ms": sum(s for _, s in timed) / len(timed) * 1e3,
        }
    return result


def child(allocator: str, names: list[str], repeats: int) -> None:
    """In a fresh process: configure the allocator, measure, print JSON."""
    setting = None
    if allocator == "configure_allocator()":
        from fdet.runtime import configure_allocator

        setting = configure_allocator()._asdict()
    print(json.dumps({"setting": setting, "results": measure(names, repeats)}))


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
