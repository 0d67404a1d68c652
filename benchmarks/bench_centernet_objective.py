"""The batched CenterNet objective against a Python loop over the images, same functions.

Both contenders compute the same number: ``Σ weight · total / max(count, 1)`` over the terms of
``centernet_loss`` (heatmap focal loss, size and offset L1), forward and backward. The batched
one calls ``centernet_loss`` once on the padded batch; the loop calls it on each image (its own
slots, unpadded) and adds the totals and counts before normalizing. Random head outputs (heatmap
logits around -4) and random boxes; the values of the two are checked to agree first. The
contenders take turns (the order rotated every repeat), after one untimed call each; each time
is the median of the timed calls. Cases:

- ``shapes``: 16 images of 128² (a 32² map), K = 6, 8 to 12 objects an image;
- ``coco``: 16 images of 512² (a 128² map), K = 80, 20 to 40 objects an image
  (``--quick``: 4 images of 256²).

    python benchmarks/bench_centernet_objective.py [--quick] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass

import torch
from _common import cpu_model, format_seconds, interleaved, median, table
from torch import Tensor

from fdet.models.detectors.base import Term, total_loss
from fdet.models.detectors.centernet import centernet_loss
from fdet.models.heads.centernet import CenterNetOutputs

STRIDE = 4


@dataclass(frozen=True)
class Case:
    name: str
    images: int
    size: int
    classes: int
    objects: tuple[int, int]  # fewest, most an image


SHAPES = Case("shapes", 16, 128, 6, (8, 12))
COCO = Case("coco", 16, 512, 80, (20, 40))
COCO_QUICK = Case("coco", 4, 256, 80, (20, 40))


def make_inputs(
    case: Case, g: torch.Generator
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor], list[int]]:
    """Head outputs (leaves that require grad), padded gts and the object count of each image."""
    out = case.size // STRIDE
    heatmap = torch.randn(case.images, case.classes, out, out, generator=g) - 4
    size = torch.rand(case.images, 2, out, out, generator=g) * 20
    offset = torch.rand(case.images, 2, out, out, generator=g)
    low, high = case.objects
    counts = torch.randint(low, high + 1, (case.images,), generator=g).tolist()
    m = max(counts)
    xy = torch.rand(case.images, m, 2, generator=g) * case.size * 0.8
    wh = 4 + torch.rand(case.images, m, 2, generator=g) * case.size * 0.3
    boxes = torch.cat((xy, (xy + wh).clamp(max=case.size)), dim=-1)
    labels = torch.randint(0, case.classes, (case.images, m), generator=g)
    valid = torch.arange(m)[None, :] < torch.tensor(counts)[:, None]
    leaves = tuple(t.requires_grad_() for t in (heatmap, size, offset))
    return leaves, (boxes, labels, valid), counts  # type: ignore[return-value]


def batched(outputs: tuple[Tensor, ...], gts: tuple[Tensor, ...]) -> Tensor:
    terms = centernet_loss(CenterNetOutputs(*outputs), *gts, stride=STRIDE)
    return total_loss(terms)


def per_image(outputs: tuple[Tensor, ...], gts: tuple[Tensor, ...], counts: list[int]) -> Tensor:
    """The same objective, one image at a time: totals and counts added, then normalized."""
    summed: dict[str, list[Tensor]] = {}
    weights: dict[str, float] = {}
    for i, n in enumerate(counts):
        one = CenterNetOutputs(*(x[i : i + 1] for x in outputs))
        boxes, labels, valid = (x[i : i + 1, :n] for x in gts)
        for name, term in centernet_loss(one, boxes, labels, valid, stride=STRIDE).items():
            total, count = summed.get(name, [torch.zeros(()), torch.zeros(())])
            summed[name] = [total + term.total, count + term.count]
            weights[name] = term.weight
    terms = {name: Term(total, count, weights[name]) for name, (total, count) in summed.items()}
    return total_loss(terms)


def run(case: Case, repeats: int) -> list[str]:
    outputs, gts, counts = make_inputs(case, torch.Generator().manual_seed(0))
    one, loop = batched(outputs, gts), per_image(outputs, gts, counts)
    if not torch.allclose(one, loop, rtol=1e-5, atol=1e-6):
        raise SystemExit(f"{case.name}: batched {one.item()} != per-image {loop.item()}")

    def step(fn) -> None:
        for x in outputs:
            x.grad = None
        fn().backward()

    times = interleaved(
        {
            "batched": lambda: step(lambda: batched(outputs, gts)),
            "per-image loop": lambda: step(lambda: per_image(outputs, gts, counts)),
        },
        repeats=repeats,
    )
    fast, slow = median(times["batched"]), median(times["per-image loop"])
    out = case.size // STRIDE
    what = f"{case.images} × {case.size}² ({out}² map), K={case.classes}, {sum(counts)} objects"
    return [case.name, what, format_seconds(fast), format_seconds(slow), f"{slow / fast:.2f}×"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small COCO case, 2 repeats")
    parser.add_argument("--repeats", type=int, help="timed calls a contender (7; quick: 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 7)
    cases = (SHAPES, COCO_QUICK if args.quick else COCO)
    print(
        f"# CenterNet objective, forward + backward: batched vs a per-image loop\n"
        f"torch {torch.__version__}, Python {platform.python_version()}, {cpu_model()}, "
        f"{torch.get_num_threads()} threads, {repeats} timed calls a contender (median)\n"
    )
    rows = [run(case, repeats) for case in cases]
    print(table(["case", "inputs", "batched", "per-image loop", "loop / batched"], rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
