"""fdet's FCOS against torchvision's: train step, inference, objective and postprocess.

Both run in one process, on the same architecture, weights and inputs and the same number of
threads, interleaved (the contenders take turns, in an order rotated every repeat), warm-up calls
excluded; each time reported is the median of the repeats. Rows (``--rows`` picks some, by name
or prefix, e.g. ``--rows train,objective``):

- ``train``: forward + loss + backward + SGD step of torchvision's ``fcos_resnet50_fpn`` (80
  classes, converted to fdet with ``load_torchvision``), 2 × 512², random ground truth, 8 to 12
  boxes an image.
- ``infer``: ``detector.predict`` against torchvision's eval forward, same model and images; the
  predictors are rescaled so that class logits spread around -4 with std 1 (a random head
  scores everything near 0.01, below the 0.2 threshold, and would leave the postprocess idle).
- ``objective``: ``fcos_points`` + ``fcos_loss`` (eager, and compiled with
  ``torch.compile(fullgraph=True)``) against torchvision's ``FCOS.compute_loss`` on the same
  random head outputs and anchors, 16 images × 50 objects, the 5 456 points of R50 at 512²,
  K = 80.
- ``postprocess``: ``fcos_postprocess`` (eager and compiled) against torchvision's
  ``FCOS.postprocess_detections``, 8 images, K = 80, R50 512² points, random logits with more
  than 1000 combined scores above the threshold on the large levels.

The end-to-end rows also give a FLOP floor: the FLOPs of one call (``FlopCounterMode``) over the
machine's dense float32 rate, measured in the same run. Compile times are cold (inductor's caches
off). A matmul rate is measured around every row; if it sags, other work shared the CPU and the
run says so.

    python benchmarks/bench_fcos.py [--quick] [--rows a,b] [--repeats N] [--threads N]
                                    [--no-compile]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch._inductor.config as inductor_config
import torchvision
from _common import (
    count_flops,
    cpu_model,
    dense_gflops,
    format_seconds,
    interleaved,
    matmul_gflops,
    median,
    table,
    timed,
)
from torch import Tensor
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection import fcos_resnet50_fpn
from torchvision.models.detection.image_list import ImageList

from fdet.compat.torchvision import load_torchvision
from fdet.data.sample import Batch
from fdet.models.detectors.base import total_loss
from fdet.models.detectors.fcos import FCOS, fcos_loss, fcos_points, fcos_postprocess
from fdet.models.heads.fcos import FCOSHeadOutputs

ROW_NAMES = ("train", "infer", "objective", "postprocess")
BUSY = 0.8  # a row whose matmul rate falls below this share of the run's best was contended


@dataclass(frozen=True)
class Settings:
    repeats: int
    r50: tuple[int, int]  # (images, size) of the end-to-end rows
    objective: tuple[int, int, int]  # (images, objects an image, size whose points are used)
    postprocess: tuple[int, int]  # (images, size whose points are used)
    compile: bool = True


FULL = Settings(repeats=5, r50=(2, 512), objective=(16, 50, 512), postprocess=(8, 512))
QUICK = Settings(repeats=1, r50=(1, 256), objective=(2, 50, 256), postprocess=(2, 256))


@dataclass
class Result:
    """One row: the seconds of every timed call of each contender, FLOPs of one call of each
    side (end-to-end rows), compile times, the matmul rate around the row, and notes."""

    name: str
    what: str
    times: dict[str, list[float]]
    flops: dict[str, int] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    def median(self, contender: str) -> float:
        return median(self.times[contender])


# ---------------------------------------------------------------------------------------------
# Inputs and models
# ---------------------------------------------------------------------------------------------


def random_boxes(batch: int, slots: int, size: int, generator: torch.Generator) -> Tensor:
    """``[B, slots, 4]`` xyxy boxes inside a ``size²`` image, sides log-uniform in
    ``[size / 32, size / 2]``."""
    low, high = math.log(size / 32), math.log(size / 2)
    wh = torch.exp(low + (high - low) * torch.rand(batch, slots, 2, generator=generator))
    xy = torch.rand(batch, slots, 2, generator=generator) * (size - wh)
    return torch.cat((xy, xy + wh), dim=-1)


def random_batch(images: Tensor, num_classes: int, generator: torch.Generator) -> Batch:
    """A padded :class:`Batch` of ``images`` with 8 to 12 random boxes an image."""
    batch, _, height, width = images.shape
    counts = torch.randint(8, 13, (batch,), generator=generator)
    valid = torch.arange(12)[None, :] < counts[:, None]  # [B, M]
    return Batch(
        images=images,
        image_sizes=torch.tensor([[height, width]] * batch),
        gt_boxes=random_boxes(batch, 12, height, generator),
        gt_labels=torch.randint(0, num_classes, (batch, 12), generator=generator),
        gt_valid=valid,
        gt_crowd=torch.zeros_like(valid),
        image_ids=torch.arange(batch),
        scales=torch.ones(batch, 2),
    )


def tv_targets(batch: Batch) -> list[dict[str, Tensor]]:
    """torchvision's per-image targets: the valid slots of each image."""
    return [
        {"boxes": boxes[valid], "labels": labels[valid]}
        for boxes, labels, valid in zip(batch.gt_boxes, batch.gt_labels, batch.gt_valid)
    ]


def r50_pair(size: int) -> tuple[TVFCOS, FCOS]:
    """torchvision's ``fcos_resnet50_fpn`` (80 classes, no resizing at ``size``) and the fdet
    detector converted from it, with the same weights."""
    torch.manual_seed(0)
    tv = fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=80, min_size=size, max_size=size
    )
    return tv, load_torchvision(tv)


@torch.no_grad()
def calibrate_scores(tv: TVFCOS, images: Tensor) -> None:
    """Class logits around -4 with std 1, centerness logits around 1 with std 1, distances
    around 2 strides: some hundreds of (point, class) pairs above the threshold an image."""
    tv.eval()
    x = tv.transform(list(images.float() / 255))[0].tensors
    out = tv.head(list(tv.backbone(x).values()))
    cls, reg = tv.head.classification_head, tv.head.regression_head
    for conv, key, mean, std in (
        (cls.cls_logits, "cls_logits", -4.0, 1.0),
        (reg.bbox_ctrness, "bbox_ctrness", 1.0, 1.0),
        (reg.bbox_reg, "bbox_regression", 2.0, 1.0),
    ):
        conv.weight.mul_(std / out[key].std().item())
        conv.bias.fill_(mean)


def level_sizes(size: int) -> tuple[tuple[int, int], ...]:
    return tuple((math.ceil(size / 2**lvl),) * 2 for lvl in range(3, 8))


def tv_anchors(tv: TVFCOS, sizes: Sequence[tuple[int, int]], batch: int, size: int) -> list:
    images = ImageList(torch.zeros(batch, 3, size, size), [(size, size)] * batch)
    return tv.anchor_generator(images, [torch.zeros(batch, 1, h, w) for h, w in sizes])


def compile_cold(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Callable[[], Any], float]:
    """``torch.compile(fn, fullgraph=True)`` bound to ``args``, and the seconds of its first
    call, with inductor's caches off (a cold compile)."""
    compiled = torch.compile(fn, fullgraph=True)
    with inductor_config.patch(force_disable_caches=True):
        seconds, _ = timed(lambda: compiled(*args))
    return lambda: compiled(*args), seconds


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def train_row(settings: Settings) -> Result:
    batch_size, size = settings.r50
    tv, detector = r50_pair(size)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g)
    batch = random_batch(images, 80, g)
    tv.train()
    detector.train()
    fdet_images = images.float() / 255  # converted models take [0, 1] floats
    tv_images = list(fdet_images)
    targets = tv_targets(batch)
    sgd = partial(torch.optim.SGD, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    fdet_opt, tv_opt = sgd(detector.parameters()), sgd(tv.parameters())
    first: dict[str, float] = {}

    def fdet_step() -> None:
        fdet_opt.zero_grad(set_to_none=True)
        loss = total_loss(detector.loss(detector(fdet_images), batch))
        loss.backward()
        fdet_opt.step()
        first.setdefault("fdet", float(loss.detach()))

    def tv_step() -> None:
        tv_opt.zero_grad(set_to_none=True)
        loss = sum(tv(tv_images, targets).values())
        loss.backward()
        tv_opt.step()
        first.setdefault("torchvision", float(loss.detach()))

    flops = {"fdet": count_flops(fdet_step), "torchvision": count_flops(tv_step)}
    times = interleaved({"fdet": fdet_step, "torchvision": tv_step}, repeats=settings.repeats)
    notes = [f"first-step loss: fdet {first['fdet']:.4f}, torchvision {first['torchvision']:.4f}"]
    return Result("train", f"R50-FPN, {batch_size} × {size}²", times, flops=flops, notes=notes)


def infer_row(settings: Settings) -> Result:
    batch_size, size = settings.r50
    tv, _ = r50_pair(size)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g)
    calibrate_scores(tv, images)
    detector = load_torchvision(tv).eval()
    fdet_images = images.float() / 255
    tv_images = list(fdet_images)
    sizes = torch.tensor([[size, size]] * batch_size)

    def fdet_predict() -> Any:
        return detector.predict(fdet_images, sizes)

    @torch.no_grad()
    def tv_predict() -> Any:
        return tv(tv_images)

    found = (int(fdet_predict().valid.sum()), sum(len(d["scores"]) for d in tv_predict()))
    flops = {"fdet": count_flops(fdet_predict), "torchvision": count_flops(tv_predict)}
    times = interleaved({"fdet": fdet_predict, "torchvision": tv_predict}, repeats=settings.repeats)
    notes = [f"detections in the batch: fdet {found[0]}, torchvision {found[1]}"]
    return Result("infer", f"R50-FPN, {batch_size} × {size}²", times, flops=flops, notes=notes)


def random_head_outputs(
    batch: int, sizes: Sequence[tuple[int, int]], num_classes: int, g: torch.Generator, cls: float
) -> tuple[Tensor, Tensor, Tensor]:
    num = sum(h * w for h, w in sizes)
    logits = torch.randn(batch, num, num_classes, generator=g) + cls
    ltrb = torch.rand(batch, num, 4, generator=g) * 4
    ctr = torch.randn(batch, num, generator=g)
    return logits, ltrb, ctr


def objective_row(settings: Settings) -> Result:
    batch, objects, size = settings.objective
    tv, detector = r50_pair(size)
    sizes = level_sizes(size)
    counts = [h * w for h, w in sizes]
    g = torch.Generator().manual_seed(1)
    logits, ltrb, ctr = random_head_outputs(batch, sizes, 80, g, cls=-4.0)
    gt_boxes = random_boxes(batch, objects, size, g)
    gt_labels = torch.randint(0, 80, (batch, objects), generator=g)
    gt_valid = torch.ones(batch, objects, dtype=torch.bool)
    levels = tuple(tuple(x.split(counts, 1)) for x in (logits, ltrb, ctr))
    image_size = (size, size)

    def objective(
        cls_logits: Sequence[Tensor],
        box_ltrb: Sequence[Tensor],
        centerness: Sequence[Tensor],
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
    ) -> Tensor:
        outputs = FCOSHeadOutputs(
            tuple(cls_logits), tuple(box_ltrb), tuple(centerness), sizes, image_size
        )
        grid = fcos_points(
            sizes, spec=detector.points_spec, image_size=image_size, device=gt_boxes.device
        )
        terms = fcos_loss(
            outputs,
            grid,
            gt_boxes,
            gt_labels,
            gt_valid,
            None,
            assigner=detector.assigner_spec,
            coder=detector.coder_spec,
            cls_loss=detector.cls_loss_spec,
            box_loss=detector.box_loss_spec,
        )
        return total_loss(terms)

    args = (*levels, gt_boxes, gt_labels, gt_valid)
    anchors = tv_anchors(tv, sizes, batch, size)
    head_outputs = {"cls_logits": logits, "bbox_regression": ltrb, "bbox_ctrness": ctr[..., None]}
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(gt_boxes, gt_labels)]

    def tv_objective() -> Tensor:
        return sum(tv.compute_loss(targets, head_outputs, anchors, counts).values())

    contenders: dict[str, Callable[[], Any]] = {
        "fdet eager": lambda: objective(*args),
        "torchvision": tv_objective,
    }
    compile_s = {}
    if settings.compile:
        contenders["fdet compiled"], compile_s["fdet compiled"] = compile_cold(objective, args)
    values = {name: float(fn()) for name, fn in contenders.items()}
    times = interleaved(contenders, repeats=settings.repeats)
    notes = [
        "loss: " + ", ".join(f"{name} {value:.4f}" for name, value in values.items()),
        "fdet's time includes making the points (torchvision is handed its anchors)",
    ]
    what = f"{batch} images × {objects} objects, {sum(counts)} points, K=80"
    return Result("objective", what, times, compile_s=compile_s, notes=notes)


def postprocess_row(settings: Settings) -> Result:
    batch, size = settings.postprocess
    tv, detector = r50_pair(size)
    post = detector.postprocess_spec
    sizes = level_sizes(size)
    counts = [h * w for h, w in sizes]
    g = torch.Generator().manual_seed(2)
    logits, ltrb, ctr = random_head_outputs(batch, sizes, 80, g, cls=-2.0)
    levels = tuple(tuple(x.split(counts, 1)) for x in (logits, ltrb, ctr))
    image_sizes = torch.tensor([[size, size]] * batch)
    grid = fcos_points(sizes, spec=detector.points_spec, image_size=(size, size))
    combined = torch.sqrt(torch.sigmoid(logits[0]) * torch.sigmoid(ctr[0])[:, None])
    above = [int((x > post.score_threshold).sum()) for x in combined.split(counts)]

    def fdet_postprocess(
        cls_logits: Sequence[Tensor],
        box_ltrb: Sequence[Tensor],
        centerness: Sequence[Tensor],
        image_sizes: Tensor,
    ) -> Any:
        outputs = FCOSHeadOutputs(tuple(cls_logits), tuple(box_ltrb), tuple(centerness), sizes)
        return fcos_postprocess(
            outputs, grid, image_sizes, coder=detector.coder_spec, postprocess=post
        )

    anchors = [list(a.split(counts)) for a in tv_anchors(tv, sizes, batch, size)]
    tv_outputs = {
        "cls_logits": list(levels[0]),
        "bbox_regression": list(levels[1]),
        "bbox_ctrness": [x[..., None] for x in levels[2]],
    }

    def tv_postprocess() -> Any:
        return tv.postprocess_detections(tv_outputs, anchors, [(size, size)] * batch)

    args = (*levels, image_sizes)
    contenders: dict[str, Callable[[], Any]] = {
        "fdet eager": lambda: fdet_postprocess(*args),
        "torchvision": tv_postprocess,
    }
    compile_s = {}
    if settings.compile:
        contenders["fdet compiled"], compile_s["fdet compiled"] = compile_cold(
            fdet_postprocess, args
        )
    found = (
        int(fdet_postprocess(*args).valid.sum()),
        sum(len(d["scores"]) for d in tv_postprocess()),
    )
    times = interleaved(contenders, repeats=settings.repeats)
    notes = [
        f"combined scores above the threshold per level (image 0): {above}",
        f"detections: fdet {found[0]}, torchvision {found[1]}",
    ]
    what = f"{batch} images, {sum(counts)} points, K=80"
    return Result("postprocess", what, times, compile_s=compile_s, notes=notes)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

ROWS: dict[str, Callable[[Settings], Result]] = {
    "train": train_row,
    "infer": infer_row,
    "objective": objective_row,
    "postprocess": postprocess_row,
}


def select_rows(arg: str | None) -> list[str]:
    if not arg:
        return list(ROW_NAMES)
    chosen = []
    for token in (t.strip() for t in arg.split(",") if t.strip()):
        hits = [r for r in ROW_NAMES if r == token or r.startswith(token)]
        if not hits:
            raise SystemExit(f"--rows: unknown row {token!r}; rows are {', '.join(ROW_NAMES)}")
        chosen += [h for h in hits if h not in chosen]
    return [r for r in ROW_NAMES if r in chosen]


def print_result(result: Result) -> None:
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
    print(f"  matmul GFLOP/s before / after the row: {result.rates[0]:.0f} / {result.rates[1]:.0f}")


def summary(results: Sequence[Result], rate: float, best_mm: float) -> str:
    rows = []
    for r in results:
        tv = r.median("torchvision")
        busy = "" if min(r.rates) >= BUSY * best_mm else " (busy)"
        for contender in r.times:
            if contender == "torchvision":
                continue
            t = r.median(contender)
            cells = [r.name + busy, contender, format_seconds(t), format_seconds(tv)]
            cells.append(f"{tv / t:.2f}")
            if r.flops:
                floor = r.flops["fdet"] / rate
                cells += [f"{r.flops['fdet'] / 1e9:.0f}", format_seconds(floor), f"{t / floor:.2f}"]
            else:
                cells += ["–"] * 3
            rows.append(cells)
    header = ["row", "", "fdet", "torchvision", "tv/fdet", "GFLOP", "floor", "fdet/floor"]
    return table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, 1 repeat")
    parser.add_argument("--rows", help=f"comma-separated names or prefixes: {', '.join(ROW_NAMES)}")
    parser.add_argument("--repeats", type=int, help="timed calls a contender (5; quick: 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    args = parser.parse_args()

    settings = QUICK if args.quick else FULL
    if args.repeats:
        settings = replace(settings, repeats=args.repeats)
    settings = replace(settings, compile=not args.no_compile)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = select_rows(args.rows)

    print(
        f"{cpu_model()}, {torch.get_num_threads()} torch threads; python "
        f"{platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{'quick' if args.quick else 'full'} run: {settings.repeats} timed calls a contender "
        "after 1 warm-up, medians"
    )
    start = time.perf_counter()
    dense = dense_gflops()
    results = []
    for name in rows:
        before = median(matmul_gflops(repeats=3))
        result = ROWS[name](settings)
        result.rates = [before, median(matmul_gflops(repeats=3))]
        results.append(result)
        print_result(result)
        sys.stdout.flush()
    for kernel, rates in dense_gflops().items():
        dense[kernel] += rates
    rate = max(max(v) for v in dense.values()) * 1e9
    best_mm = max(max(dense["mm 2048²"]), *(max(r.rates) for r in results))
    print("\ndense float32 GFLOP/s, runs before and after the rows:")
    for kernel, rates in dense.items():
        print(f"  {kernel:<24} best {max(rates):4.0f}   median {median(rates):4.0f}")
    print(
        f"floor = FLOPs / {rate / 1e9:.0f} GFLOP/s (the best rate seen). tv/fdet > 1: fdet is "
        "faster."
    )
    busy = [r.name for r in results if min(r.rates) < BUSY * best_mm]
    if busy:
        print(
            f"WARNING: the matmul rate fell below {BUSY:.0%} of its best ({best_mm:.0f} GFLOP/s) "
            f"around {', '.join(busy)}: other work shared the CPU; those times are not clean."
        )
    print()
    print(summary(results, rate, best_mm))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
