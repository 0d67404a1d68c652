"""Inference latency and throughput of exported detectors: eager PyTorch, ``torch.compile`` and
onnxruntime, at batch sizes 1 and 8.

Every contender runs the same graph, :class:`fdet.export.DetectionGraph` (normalization,
network, decoding, NMS: float32 images 0–255 in, padded detections out), on the same random
weights and images, with the same number of threads, interleaved (the contenders take turns, in
an order rotated every repeat), warm-up calls excluded; each time is the median of the repeats.

- ``eager``: the module under ``torch.inference_mode``.
- ``compiled``: ``torch.compile(graph)`` (default mode, one compile a batch size; the compile
  time is printed, not counted).
- ``onnxruntime``: the file of ``fdet.export.export_onnx(..., dynamic_batch=True)`` in an
  ``InferenceSession`` on the CPU provider with ``intra_op_num_threads`` = torch's threads
  (the export time is printed).

Models (random weights; the class predictor of dense heads is rescaled so that its logits
spread with std 1.5 around -3 on the benchmark's images: many candidates above the 0.05
threshold and real NMS work; Faster R-CNN's random RoI classifier scores every class near
1/7, above its threshold, so each image fills its 100 detections):

- the shapes specs at their real widths (RetinaNet, FCOS, Faster R-CNN R18-FPN), 128² inputs
  as in the shapes set;
- RetinaNet R50-FPN (``specs/retinanet/r50_fpn_1x_coco.py``, 80 classes) at 512², with fewer
  repeats.

A matmul rate is measured around every model; if it sags, other work shared the CPU and the
run says so.

    python benchmarks/bench_inference.py [--quick] [--models shapes,r50] [--repeats N]
                                         [--threads N] [--no-compile]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import BUSY, cpu_model, format_seconds, interleaved, matmul_gflops, median, table
from torch import Tensor, nn

from fdet import build, specs
from fdet.export import DetectionGraph, export_onnx

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bench:
    """One model of the benchmark."""

    name: str
    spec_file: str
    size: int
    repeats: int  # timed calls a contender at batch 1; batch 8 gets half as many (at least 2)


SHAPES = [
    Bench("RetinaNet R18-FPN (shapes)", "specs/shapes/retinanet_r18_fpn.py", 128, 10),
    Bench("FCOS R18-FPN (shapes)", "specs/shapes/fcos_r18_fpn.py", 128, 10),
    Bench("Faster R-CNN R18-FPN (shapes)", "specs/shapes/faster_rcnn_r18_fpn.py", 128, 10),
]
R50 = [Bench("RetinaNet R50-FPN (COCO)", "specs/retinanet/r50_fpn_1x_coco.py", 512, 3)]
BATCHES = (1, 8)


def random_images(batch: int, size: int, seed: int = 0) -> Tensor:
    """``[B, 3, size, size]`` float32 pixel values 0–255 (whole numbers, as decoded images)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float()


@torch.no_grad()
def calibrate_dense(model: nn.Module, images: Tensor) -> None:
    """Rescale a dense head's class predictor (``head.cls_logits``) so that its logits on
    ``images`` have std 1.5, and set its bias to -3."""
    cls = getattr(getattr(model, "head", None), "cls_logits", None)
    if not isinstance(cls, nn.Conv2d):
        return
    outputs: list[Tensor] = []
    handle = cls.register_forward_hook(lambda m, i, o: outputs.append(o))
    model(images)
    handle.remove()
    bias = cls.bias[None, :, None, None]
    spread = torch.cat([(o - bias).flatten() for o in outputs]).std()  # of the weights' part
    cls.weight.mul_(1.5 / spread)
    cls.bias.fill_(-3.0)


def build_model(bench: Bench) -> nn.Module:
    torch.manual_seed(0)
    spec = specs.load(ROOT / bench.spec_file, specs.Experiment).model
    model = build(spec).eval()
    calibrate_dense(model, random_images(2, bench.size, seed=1))
    return model


def onnx_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Row:
    model: str
    size: int
    batch: int
    seconds: dict[str, float]  # median seconds a call, by contender
    detections: float  # valid detections an image (eager)
    agree: bool  # every contender gave eager's number of valid detections an image


def bench_model(bench: Bench, *, compile: bool, repeats: int | None, folder: Path) -> list[Row]:
    threads = torch.get_num_threads()
    model = build_model(bench)
    graph = DetectionGraph(model).eval()
    seconds, path = _timed(
        lambda: export_onnx(
            model, folder / "model.onnx", image_size=(bench.size, bench.size), dynamic_batch=True
        )
    )
    print(f"  ONNX export: {format_seconds(seconds)} ({path.stat().st_size / 2**20:.1f} MiB)")
    session = onnx_session(path, threads)
    compiled = torch.compile(graph) if compile else None
    rows = []
    for batch in BATCHES:
        images = random_images(batch, bench.size)
        array = images.numpy()
        contenders: dict[str, Callable[[], Any]] = {}

        def eager(images: Tensor = images) -> Any:
            with torch.inference_mode():
                return graph(images)

        contenders["eager"] = eager
        if compiled is not None:

            def run_compiled(images: Tensor = images) -> Any:
                with torch.inference_mode():
                    return compiled(images)

            seconds, _ = _timed(run_compiled)
            print(f"  batch {batch}: compile and first call {format_seconds(seconds)}")
            contenders["compiled"] = run_compiled
        contenders["onnxruntime"] = lambda array=array: session.run(None, {"images": array})
        counts = {}
        for name, fn in contenders.items():
            out = fn()
            valid = out[3]
            counts[name] = [int(v.sum()) for v in valid]
        n = repeats or (bench.repeats if batch == 1 else max(2, bench.repeats // 2))
        times = interleaved(contenders, repeats=n, warmup=0)
        rows.append(
            Row(
                model=bench.name,
                size=bench.size,
                batch=batch,
                seconds={name: median(t) for name, t in times.items()},
                detections=sum(counts["eager"]) / batch,
                agree=all(c == counts["eager"] for c in counts.values()),
            )
        )
        cells = ", ".join(f"{k} {format_seconds(v)}" for k, v in rows[-1].seconds.items())
        print(f"  batch {batch}: {cells} a call ({n} timed calls each)")
        sys.stdout.flush()
    return rows


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the shapes models, 2 repeats")
    parser.add_argument("--models", default="shapes,r50", help="shapes, r50 or both")
    parser.add_argument("--repeats", type=int, help="timed calls a contender (default: per model)")
    parser.add_argument("--threads", type=int, help="torch and onnxruntime threads")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = {m.strip() for m in args.models.split(",") if m.strip()}
    benches = (SHAPES if "shapes" in chosen else []) + (R50 if "r50" in chosen else [])
    repeats = 2 if args.quick and not args.repeats else args.repeats
    if args.quick:
        benches = SHAPES
    import onnxruntime

    print(
        f"{cpu_model()}, {torch.get_num_threads()} threads; python {platform.python_version()}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; medians of interleaved calls after a warm-up"
    )
    start = time.perf_counter()
    rows: list[Row] = []
    rates = []
    with tempfile.TemporaryDirectory() as folder:
        for bench in benches:
            print(f"\n# {bench.name}, {bench.size}²")
            before = median(matmul_gflops(repeats=3))
            rows += bench_model(
                bench, compile=not args.no_compile, repeats=repeats, folder=Path(folder)
            )
            after = median(matmul_gflops(repeats=3))
            rates.append((bench.name, before, after))
            print(f"  matmul GFLOP/s before / after: {before:.0f} / {after:.0f}")
    best = max(max(b, a) for _, b, a in rates)
    busy = [name for name, b, a in rates if min(b, a) < BUSY * best]
    contenders = [
        c for c in ("eager", "compiled", "onnxruntime") if any(c in r.seconds for r in rows)
    ]
    header = ["model", "input", "batch", "detections an image"]
    header += [f"{c} ms an image" for c in contenders] + [f"{c} images/s" for c in contenders]
    lines = []
    for r in rows:
        per_image = [r.seconds[c] / r.batch if c in r.seconds else float("nan") for c in contenders]
        cells = [r.model, f"{r.size}²", str(r.batch), f"{r.detections:.0f}"]
        cells += [f"{1e3 * t:.1f}" for t in per_image] + [f"{1 / t:.1f}" for t in per_image]
        lines.append(cells)
    print()
    print(table(header, lines))
    if not all(r.agree for r in rows):
        print("WARNING: the contenders gave different numbers of detections on some rows")
    if busy:
        print(
            f"WARNING: the matmul rate fell below {BUSY:.0%} of its best around "
            f"{', '.join(busy)}: other work shared the CPU; those times are not clean."
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
