"""Helpers shared by the benchmark scripts: interleaved timing, FLOP counting, the machine's
matmul rate, and plain-text tables."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (``platform.processor()`` if it cannot)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def interleaved(
    contenders: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``repeats`` calls each after ``warmup`` untimed ones.

    The contenders take turns: repeat ``i`` runs them in an order rotated by ``i`` (ABAB… for
    two becomes AB, BA, AB, …), so slow drifts of the machine (other jobs, clocks) fall on all of
    them alike.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls,
    convolutions and their backward passes; elementwise work counts zero)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_gflops(n: int = 2048, repeats: int = 5) -> list[float]:
    """GFLOP/s of ``repeats`` float32 ``torch.mm`` calls of two ``n × n`` matrices (after one
    untimed call)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    return _rates(lambda: torch.mm(a, b), 2 * n**3, repeats)


def dense_gflops(repeats: int = 5) -> dict[str, list[float]]:
    """GFLOP/s of three float32 dense kernels: ``torch.mm`` of two 2048² matrices (the BLAS
    torch was built with), the same product as a 1×1 convolution (oneDNN), and a 3×3
    convolution shaped like a RetinaNet head conv on P3 at 512² (2 × 256 × 64 × 64, 256 filters).

    On some CPUs these differ by 2× (a BLAS may not use every vector unit of a CPU it does not
    recognise); the fastest is the machine's attainable dense rate.
    """
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 2048, 32, 64, generator=generator)
    w1 = torch.randn(2048, 2048, 1, 1, generator=generator)
    x3 = torch.randn(2, 256, 64, 64, generator=generator)
    w3 = torch.randn(256, 256, 3, 3, generator=generator)
    return {
        "mm 2048²": matmul_gflops(2048, repeats),
        "conv 1×1 (same product)": _rates(lambda: F.conv2d(x1, w1), 2 * 2048**3, repeats),
        "conv 3×3 (head conv)": _rates(
            lambda: F.conv2d(x3, w3, padding=1), 2 * 2 * 64 * 64 * 256 * 256 * 9, repeats
        ),
    }


def _rates(fn: Callable[[], Any], flops: int, repeats: int) -> list[float]:
    fn()
    rates = []
    for _ in range(repeats):
        seconds, _ = timed(fn)
        rates.append(flops / seconds / 1e9)
    return rates


def format_seconds(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.0f} ms" if seconds >= 0.01 else f"{seconds * 1e3:.1f} ms"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded to line up in a terminal too."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# ---------------------------------------------------------------------------------------------
# Rows of an fdet-against-a-reference benchmark: results, compiling, printing
# ---------------------------------------------------------------------------------------------

BUSY = 0.8  # a row whose matmul rate falls below this share of the run's best was contended


@dataclass
class Result:
    """One row: the seconds of every timed call of each contender (one of them named
    ``reference``, e.g. "torchvision"), FLOPs of one call of each side (end-to-end rows), cold
    compile times, the matmul rate around the row, and notes."""

    name: str
    what: str
    times: dict[str, list[float]]
    flops: dict[str, int] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    def median(self, contender: str) -> float:
        return median(self.times[contender])


def compile_cold(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Callable[[], Any], float]:
    """``torch.compile(fn, fullgraph=True)`` bound to ``args``, and the seconds of its first
    call, with inductor's caches off (a cold compile)."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fn, fullgraph=True)
    with inductor_config.patch(force_disable_caches=True):
        seconds, _ = timed(lambda: compiled(*args))
    return lambda: compiled(*args), seconds


def select_rows(arg: str | None, names: Sequence[str]) -> list[str]:
    """The rows a ``--rows`` argument names (comma-separated names or prefixes), in the
    script's order; all of them for an empty argument."""
    if not arg:
        return list(names)
    chosen: list[str] = []
    for token in (t.strip() for t in arg.split(",") if t.strip()):
        hits = [r for r in names if r == token or r.startswith(token)]
        if not hits:
            raise SystemExit(f"--rows: unknown row {token!r}; rows are {', '.join(names)}")
        chosen += [h for h in hits if h not in chosen]
    return [r for r in names if r in chosen]


def print_result(result: Result) -> None:
    """A row's runs, FLOPs, notes and matmul rates, as the scripts print them."""
    print(f"\n## {result.name}: {result.what}")
    for contender, runs in result.times.items():
        cells = " ".join(format_seconds(t) for t in runs)
        extra = ""
        if contender in result.compile_s:
            extra = f"  (cold compile, first call: {format_seconds(result.compile_s[contender])})"
        print(f"  {contender:<14} {format_seconds(median(runs)):>8}   runs: {cells}{extra}")
    for side, flops in result.flops.items():
        print(f"  {side:<14} {flops / 1e9:.1f} GFLOP a call")
    for note in result.notes:
        print(f"  {note}")
    if len(result.rates) == 2:
        before, after = result.rates
        print(f"  matmul GFLOP/s before / after the row: {before:.0f} / {after:.0f}")


def summary(results: Sequence[Result], rate: float, best_mm: float, reference: str) -> str:
    """The table of every row: each fdet contender's median against ``reference``'s, their
    ratio, and for rows with FLOPs the floor (fdet's FLOPs at ``rate`` FLOP/s). A row whose
    matmul rate fell below ``BUSY`` of ``best_mm`` is marked busy."""
    rows = []
    for r in results:
        ref = r.median(reference)
        busy = "" if min(r.rates, default=best_mm) >= BUSY * best_mm else " (busy)"
        for contender in r.times:
            if contender == reference:
                continue
            t = r.median(contender)
            cells = [r.name + busy, contender, format_seconds(t), format_seconds(ref)]
            cells.append(f"{ref / t:.2f}")
            if r.flops:
                floor = r.flops["fdet"] / rate
                cells += [f"{r.flops['fdet'] / 1e9:.0f}", format_seconds(floor), f"{t / floor:.2f}"]
            else:
                cells += ["–"] * 3
            rows.append(cells)
    short = "tv" if reference == "torchvision" else reference
    header = ["row", "", "fdet", reference, f"{short}/fdet", "GFLOP", "floor", "fdet/floor"]
    return table(header, rows)
