"""The eager fast paths of the RetinaNet objective against plain formulations, eager and compiled.

Two steps of the objective have an eager-only fast path in ``fdet.ops``:

- **Focal loss from labels.** ``sigmoid_focal_loss_labels`` runs, in eager mode, an
  ``autograd.Function`` with a hand-written gradient that never builds the one-hot targets
  (``losses._SigmoidFocalLossLabels``); under ``torch.compile`` it builds them and calls the
  float-target ``autograd.Function`` (``losses._SigmoidFocalLoss``), also with a hand-written
  gradient. Both are measured against the composite formulation that autograd differentiates
  (one-hot targets, ``losses._focal_loss_composite``, masked), forward + backward of the summed
  loss over ``[B, A, K]`` logits.
- **IoU without autograd.** ``box_iou`` without autograd, in eager mode, writes its result in
  three buffers in place (``boxes._iou_no_grad``); under ``torch.compile`` it is the plain
  composition (``boxes._iou``). Measured alone (``[B, M, A]``) and inside ``assign_max_iou``
  (which calls it on detached boxes; never differentiated, so forward only).

Every formulation runs eager and compiled (``torch.compile(fullgraph=True, dynamic=False)``;
the fast paths are forced in the compiled runs by calling them directly, or by handing
``assign_max_iou`` the fast IoU), on the same inputs, interleaved (the contenders take turns, in
an order rotated every repeat); one warm-up call each (compilation included), then the median of
the timed calls. Two cases, random boxes and logits (mean -4, std 1):

- ``shapes``: 16 images of 128², RetinaNet anchors on strides 8–128 (9 a location, sizes 2 ×
  stride), K = 3, 8 to 12 gts an image;
- ``coco``: 2 images of 800 × 1216, the same anchors with sizes 4 × stride (torchvision's
  RetinaNet), K = 80, 12 to 18 gts an image;

gt slots padded to the batch's slot bucket (``slot_buckets``). ``--classes 6,16,80`` adds
the focal loss alone on the shapes case with those numbers of classes.

    python benchmarks/bench_fast_paths.py [--quick] [--repeats N] [--threads N] [--no-compile]
                                          [--classes K,K,...]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from _common import (
    cpu_model,
    format_seconds,
    interleaved,
    matmul_gflops,
    median,
    table,
    timed,
)
from torch import Tensor

from fdet.data.collate import slot_buckets
from fdet.ops import assign as assign_module
from fdet.ops import boxes as boxes_module
from fdet.ops import losses
from fdet.ops.anchors import anchor_offsets, grid_anchors, level_sizes
from fdet.ops.assign import POSITIVE, assign_max_iou

ALPHA, GAMMA = 0.25, 2.0
POS_IOU, NEG_IOU = 0.5, 0.4
STRIDES = (8, 16, 32, 64, 128)
OCTAVE_SCALES = (2 ** (0 / 3), 2 ** (1 / 3), 2 ** (2 / 3))
RATIOS = (0.5, 1.0, 2.0)
BUSY = 0.8  # a case whose matmul rate falls below this share of the run's best was contended


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    height: int
    width: int
    num_classes: int
    objects: tuple[int, int]  # gts an image, fewest and most
    object_sides: tuple[float, float]  # box sides in pixels, log-uniform
    anchor_scale: float  # anchor base size = anchor_scale × stride


SHAPES = Case("shapes", 16, 128, 128, 3, (8, 12), (8.0, 64.0), 2.0)
COCO = Case("coco", 2, 800, 1216, 80, (12, 18), (8.0, 600.0), 4.0)
COCO_QUICK = Case("coco", 2, 400, 608, 80, (12, 18), (8.0, 300.0), 4.0)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def anchors_of(case: Case) -> Tensor:
    """``[A, 4]`` RetinaNet anchors of P3–P7 for the case's image size."""
    sizes, offsets = [], []
    for stride in STRIDES:
        sizes.append((math.ceil(case.height / stride), math.ceil(case.width / stride)))
        base = level_sizes(case.anchor_scale * stride, OCTAVE_SCALES, truncate=True)
        offsets.append(anchor_offsets(base, RATIOS))
    return grid_anchors(offsets, sizes, STRIDES)


@dataclass
class Inputs:
    anchors: Tensor  # [A, 4]
    gt_boxes: Tensor  # [B, M, 4]
    gt_labels: Tensor  # [B, M]
    gt_valid: Tensor  # [B, M]
    logits: Tensor  # [B, A, K], a leaf that requires grad
    labels: Tensor  # [B, A], the positives' classes, 0 elsewhere
    positive: Tensor  # [B, A]
    counted: Tensor  # [B, A], not IGNORE


def make_inputs(case: Case) -> Inputs:
    g = torch.Generator().manual_seed(0)
    b, low, high = case.batch, *case.objects
    counts = torch.randint(low, high + 1, (b,), generator=g)
    m = min(s for s in slot_buckets(high) if s >= int(counts.max()))
    small, large = (math.log(s) for s in case.object_sides)
    wh = torch.exp(small + (large - small) * torch.rand(b, m, 2, generator=g))
    wh = torch.minimum(wh, torch.tensor([case.width, case.height]) - 1.0)
    xy = torch.rand(b, m, 2, generator=g) * (torch.tensor([case.width, case.height]) - wh)
    gt_boxes = torch.cat((xy, xy + wh), dim=-1)
    gt_labels = torch.randint(0, case.num_classes, (b, m), generator=g)
    gt_valid = torch.arange(m) < counts[:, None]
    anchors = anchors_of(case)
    assignment = assign_max_iou(anchors, gt_boxes, gt_valid, pos_iou=POS_IOU, neg_iou=NEG_IOU)
    positive = assignment.label == POSITIVE
    labels = torch.where(positive, gt_labels.gather(1, assignment.gt_index), 0)
    logits = torch.randn(b, len(anchors), case.num_classes, generator=g) - 4.0
    return Inputs(
        anchors=anchors,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_valid=gt_valid,
        logits=logits.requires_grad_(),
        labels=labels,
        positive=positive,
        counted=assignment.label != assign_module.IGNORE,
    )


# ---------------------------------------------------------------------------------------------
# Formulations
# ---------------------------------------------------------------------------------------------


def one_hot(labels: Tensor, positive: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``[..., K]`` float targets: ``labels``' one-hot rows where ``positive``, zeros elsewhere."""
    classes = torch.arange(num_classes, device=labels.device)
    return ((labels[..., None] == classes) & positive[..., None]).to(dtype)


def focal_labels(logits: Tensor, labels: Tensor, positive: Tensor, counted: Tensor) -> Tensor:
    """The eager fast path: labels in, gradient by hand, no one-hot tensor."""
    loss = losses._SigmoidFocalLossLabels.apply(logits, labels, positive, counted, ALPHA, GAMMA)
    return loss.sum()


def focal_one_hot(logits: Tensor, labels: Tensor, positive: Tensor, counted: Tensor) -> Tensor:
    """What the compiled path runs: one-hot float targets, gradient by hand."""
    targets = one_hot(labels, positive, logits.shape[-1], logits.dtype)
    loss = losses._SigmoidFocalLoss.apply(logits, targets, ALPHA, GAMMA)
    return torch.where(counted[..., None], loss, torch.zeros_like(loss)).sum()


def focal_composite(logits: Tensor, labels: Tensor, positive: Tensor, counted: Tensor) -> Tensor:
    """One-hot float targets, the loss in plain out-of-place steps, differentiated by autograd."""
    targets = one_hot(labels, positive, logits.shape[-1], logits.dtype)
    loss = losses._focal_loss_composite(logits, targets, ALPHA, GAMMA)
    return torch.where(counted[..., None], loss, torch.zeros_like(loss)).sum()


FOCAL = {
    "labels, gradient by hand (eager fast path)": focal_labels,
    "one-hot, gradient by hand (compiled path)": focal_one_hot,
    "one-hot, autograd composite": focal_composite,
}


def iou_fast(boxes1: Tensor, boxes2: Tensor, *, eps: float = 0.0) -> Tensor:
    """``box_iou`` through its in-place path, whatever the mode."""
    return boxes_module._iou_no_grad(*boxes_module._pair(boxes1, boxes2), eps)


def iou_plain(boxes1: Tensor, boxes2: Tensor, *, eps: float = 0.0) -> Tensor:
    """``box_iou`` through its composite path, whatever the mode."""
    return boxes_module._iou(*boxes_module._pair(boxes1, boxes2), eps)


IOU = {"in place (eager fast path)": iou_fast, "composite (compiled path)": iou_plain}


@contextlib.contextmanager
def assignment_iou(iou: Callable[..., Tensor]) -> Iterator[None]:
    """``assign_max_iou`` computes its IoU with ``iou`` while inside."""
    saved = assign_module.box_iou
    assign_module.box_iou = iou
    try:
        yield
    finally:
        assign_module.box_iou = saved


def assign_fast(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> Any:
    """``assign_max_iou``; call it inside ``assignment_iou(iou_fast)``."""
    return assign_max_iou(anchors, gt_boxes, gt_valid, pos_iou=POS_IOU, neg_iou=NEG_IOU)


def assign_plain(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor) -> Any:
    """``assign_max_iou``; call it inside ``assignment_iou(iou_plain)``. (A function of its
    own, so that its compiled code is cached apart from ``assign_fast``'s.)"""
    return assign_max_iou(anchors, gt_boxes, gt_valid, pos_iou=POS_IOU, neg_iou=NEG_IOU)


ASSIGN = {  # formulation: (function, the IoU it runs with)
    "in place (eager fast path)": (assign_fast, iou_fast),
    "composite (compiled path)": (assign_plain, iou_plain),
}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One formulation of one step of one case: median seconds eager and compiled, the first
    compiled call (compilation included), and the result for the agreement check."""

    case: str
    step: str
    formulation: str
    eager: float
    compiled: float | None
    first_compiled: float | None
    results: dict[str, Any]


def bound(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    compile: bool = False,
    iou: Callable[..., Tensor] | None = None,
) -> Callable[[], Any]:
    """``fn(*args)`` as a call without arguments; compiled (``fullgraph``, static shapes) if
    asked, and run inside ``assignment_iou(iou)`` if given (compiled code guards on it, so
    tracing and every call see the same IoU)."""
    run = torch.compile(fn, fullgraph=True, dynamic=False) if compile else fn

    def call() -> Any:
        if iou is None:
            return run(*args)
        with assignment_iou(iou):
            return run(*args)

    return call


def measure(
    formulations: dict[str, Callable[[], Any]],
    compiled: dict[str, Callable[[], Any]],
    *,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """Interleaved medians of every formulation, eager and compiled, and the first compiled
    call of each (cold for this process; the inductor cache may be warm)."""
    contenders: dict[str, Callable[[], Any]] = {}
    first: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name, fn in formulations.items():
        contenders[f"eager|{name}"] = fn
        results[f"eager|{name}"] = fn()
    for name, fn in compiled.items():
        first[name], results[f"compiled|{name}"] = timed(fn)
        contenders[f"compiled|{name}"] = fn
    times = interleaved(contenders, repeats=repeats, warmup=0)
    out: dict[str, dict[str, Any]] = {}
    for name in formulations:
        out[name] = {
            "eager": median(times[f"eager|{name}"]),
            "compiled": median(times[f"compiled|{name}"]) if name in compiled else None,
            "first": first.get(name),
            "results": {k: v for k, v in results.items() if k.endswith("|" + name)},
        }
    return out


def focal_rows(case: Case, x: Inputs, *, repeats: int, compile: bool) -> list[Row]:
    args = (x.logits, x.labels, x.positive, x.counted)

    def backward(fn: Callable[..., Tensor], compiled: bool) -> Callable[[], Any]:
        loss_fn = bound(fn, args, compile=compiled)

        def call() -> Any:
            x.logits.grad = None
            loss = loss_fn()
            loss.backward()
            return loss.detach(), x.logits.grad

        return call

    eager = {name: backward(fn, False) for name, fn in FOCAL.items()}
    compiled = {name: backward(fn, True) for name, fn in FOCAL.items()} if compile else {}
    shape = "×".join(str(n) for n in x.logits.shape)
    step = f"focal loss fwd+bwd [{shape}]"
    return to_rows(case, step, measure(eager, compiled, repeats=repeats))


def iou_rows(case: Case, x: Inputs, *, repeats: int, compile: bool) -> list[Row]:
    iou_args = (x.gt_boxes, x.anchors)
    eager = {name: bound(fn, iou_args) for name, fn in IOU.items()}
    compiled = {}
    if compile:
        compiled = {name: bound(fn, iou_args, compile=True) for name, fn in IOU.items()}
    step = f"IoU [{case.batch}×{x.gt_boxes.shape[1]}×{x.anchors.shape[0]}]"
    rows = to_rows(case, step, measure(eager, compiled, repeats=repeats))

    assign_args = (x.anchors, x.gt_boxes, x.gt_valid)
    eager = {name: bound(fn, assign_args, iou=iou) for name, (fn, iou) in ASSIGN.items()}
    compiled = {}
    if compile:
        compiled = {
            name: bound(fn, assign_args, compile=True, iou=iou)
            for name, (fn, iou) in ASSIGN.items()
        }
    rows += to_rows(case, "assign_max_iou", measure(eager, compiled, repeats=repeats))
    return rows


def to_rows(case: Case, step: str, measured: dict[str, dict[str, Any]]) -> list[Row]:
    return [
        Row(case.name, step, name, m["eager"], m["compiled"], m["first"], m["results"])
        for name, m in measured.items()
    ]


def disagreement(rows: list[Row]) -> str:
    """Largest difference of any result from the first formulation's eager result, per step."""
    notes = []
    for step in dict.fromkeys(r.step for r in rows):
        results = [v for r in rows if r.step == step for v in r.results.values()]
        ref = flat(results[0])
        worst = 0.0
        exact = True
        for other in results[1:]:
            for a, b in zip(ref, flat(other)):
                if a.dtype.is_floating_point:
                    scale = max(float(a.abs().max()), 1e-30) if a.numel() else 1.0
                    worst = max(worst, float((a - b).abs().max()) / scale if a.numel() else 0.0)
                else:
                    exact = exact and torch.equal(a, b)
        what = f"{step}: largest difference / largest value {worst:.1e}"
        notes.append(what + ("" if exact else ", integer results DIFFER"))
    return "; ".join(notes)


def flat(result: Any) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result.detach()]
    return [t.detach() for t in result]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def summary(rows: list[Row]) -> str:
    """One line a formulation; ``× fast``: its time over the fast path's time in the same column,
    eager or compiled (above 1: the fast path is faster)."""
    out = []
    for r in rows:
        fast = next(f for f in rows if f.case == r.case and f.step == r.step)
        cells = [
            r.case,
            r.step,
            r.formulation,
            format_seconds(r.eager),
            f"{r.eager / fast.eager:.2f}",
        ]
        if r.compiled is not None and fast.compiled is not None:
            cells += [format_seconds(r.compiled), f"{r.compiled / fast.compiled:.2f}"]
            cells.append(f"{r.eager / r.compiled:.2f}")
        else:
            cells += ["–", "–", "–"]
        out.append(cells)
    header = ["case", "step", "formulation", "eager", "× fast", "compiled", "× fast", "eager/comp."]
    return table(header, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="COCO case at 400×608, 1 repeat")
    parser.add_argument("--repeats", type=int, help="timed calls a contender (5; quick: 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument(
        "--classes",
        help="also the focal loss alone on the shapes case with these K, e.g. 6,16,80",
    )
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compilation a case and K, all static
    cases = [SHAPES, COCO_QUICK if args.quick else COCO]
    if args.classes:
        cases += [
            replace(SHAPES, name=f"shapes K={k}", num_classes=int(k))
            for k in args.classes.split(",")
        ]
    print(
        f"{cpu_model()}, {torch.get_num_threads()} torch threads; python "
        f"{platform.python_version()}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; {repeats} timed calls a contender, medians"
    )
    start = time.perf_counter()
    rows: list[Row] = []
    rates: dict[str, list[float]] = {}
    for case in cases:
        before = median(matmul_gflops(repeats=3))
        x = make_inputs(case)
        case_rows = focal_rows(case, x, repeats=repeats, compile=not args.no_compile)
        if case in (SHAPES, COCO, COCO_QUICK):
            case_rows += iou_rows(case, x, repeats=repeats, compile=not args.no_compile)
        rows += case_rows
        rates[case.name] = [before, median(matmul_gflops(repeats=3))]
        print(
            f"\n{case.name}: {case.batch} × {case.height}×{case.width}, {len(x.anchors)} anchors, "
            f"K={case.num_classes}, {int(x.gt_valid.sum())} gts in {case.batch} × "
            f"{x.gt_valid.shape[1]} slots, {int(x.positive.sum())} positive anchors"
        )
        for r in case_rows:
            if r.first_compiled is not None:
                print(f"  first compiled call, {r.step}, {r.formulation}: {r.first_compiled:.1f} s")
        print(f"  agreement: {disagreement(case_rows)}")
        print("  matmul GFLOP/s before / after: {:.0f} / {:.0f}".format(*rates[case.name]))
        sys.stdout.flush()
    best = max(max(r) for r in rates.values())
    busy = [name for name, r in rates.items() if min(r) < BUSY * best]
    if busy:
        print(
            f"\nWARNING: the matmul rate fell below {BUSY:.0%} of its best ({best:.0f} GFLOP/s) "
            f"around {', '.join(busy)}: other work shared the CPU; those times are not clean."
        )
    print()
    print(summary(rows))
    print(
        "\n× fast: time over the fast path's time in the same column, eager or compiled (> 1: "
        "the fast path is faster). eager/comp.: the formulation's eager time over its compiled "
        "time."
    )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
