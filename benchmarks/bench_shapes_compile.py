"""What `compile` costs and saves in the shapes run itself, cold and with inductor's cache warm.

For each `compile` setting ("none", "objective", "model") the shapes spec trains for a few dozen
steps through `fdet.train.train` (its real data, optimizer, precision and allocator), each in a
fresh process: once with an empty inductor cache directory (cold: every graph is compiled) and
once more with the directory the cold run filled (warm: a second run of the same spec). Printed
for each: the time from the start of training to the end of the first step (compilation
included), the median step after the first ten, and the steps after which compiling pays
against eager: ``(first − eager first) / (eager step − step)``, with eager's faster run of the
two (it has no cache to warm); "never" when the compiled step is not faster. The processes
alternate settings so that slow drifts of the machine spread over all of them.

Run: python benchmarks/bench_shapes_compile.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, median, table

SHAPES_SPEC = Path(__file__).resolve().parents[1] / "specs" / "shapes" / "retinanet_r18_fpn.py"
MODES = ("none", "objective", "model")


def child(mode: str, steps: int) -> None:
    """Train ``steps`` steps with ``compile=mode``; print the first step's end and every step's
    end (seconds since training started) as JSON."""
    import attrs

    from fdet import specs
    from fdet.train import train
    from fdet.train.step import supervised_step

    exp = specs.load(SHAPES_SPEC, specs.Experiment)
    exp = attrs.evolve(
        exp,
        compile=mode,
        iterations=steps,
        eval_interval=0,
        checkpoint_interval=steps,
        log_interval=steps,
        schedule=attrs.evolve(exp.schedule, warmup=specs.LinearWarmup(iters=min(10, steps))),
    )
    ends: list[float] = []
    started: list[float] = []

    def factory(ctx: Any) -> Any:
        step = supervised_step(ctx)
        started.append(time.perf_counter())

        def timed() -> Any:
            values = step()
            values["loss"].item()  # the step is done (no-op on a CPU; a sync elsewhere)
            ends.append(time.perf_counter() - started[0])
            return values

        return timed

    with tempfile.TemporaryDirectory() as out, open(os.devnull, "w") as sink:
        train(exp, out, progress=False, final_eval=False, step_factory=factory, stream=sink)
    print(json.dumps({"ends": ends}))


def run(mode: str, steps: int, cache: str) -> dict[str, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"compile={mode} failed:\n{out.stderr[-3000:]}")
    ends = json.loads(out.stdout.splitlines()[-1])["ends"]
    gaps = [b - a for a, b in itertools.pairwise(ends)][10:]
    return {"first": ends[0], "step": median(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="25 steps instead of 60")
    parser.add_argument("--steps", type=int, help="steps a process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (25 if args.quick else 60)
    if args.child:
        child(args.child, steps)
        return
    import torch

    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"shapes spec through fdet.train.train, {steps} steps a process\n")
    results: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        caches = {mode: os.path.join(root, mode) for mode in MODES}
        for state in ("cold", "warm"):
            for mode in MODES:
                results[mode, state] = run(mode, steps, caches[mode])
    # eager has no cache: its two runs measure the same thing, and a disturbed run is only slower
    eager_first = min(results["none", s]["first"] for s in ("cold", "warm"))
    eager_step = min(results["none", s]["step"] for s in ("cold", "warm"))
    rows = []
    for (mode, state), r in results.items():
        saved = eager_step - r["step"]
        pays = (
            "—"
            if mode == "none"
            else (f"{max(r['first'] - eager_first, 0) / saved:.0f} steps" if saved > 0 else "never")
        )
        rows.append([mode, state, f"{r['first']:.1f} s", f"{r['step'] * 1e3:.0f} ms", pays])
    print(table(["compile", "cache", "first step", "step", "pays after"], rows))


if __name__ == "__main__":
    main()
