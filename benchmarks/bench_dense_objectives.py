"""The ATSS and GFL objectives on a padded batch against a per-image Python loop.

Older detection libraries compute a dense objective one image at a time: each image's
ground truth is a tensor of its own length, the assignment and the losses run on it, and the
per-image sums are added up. fdet computes it once for the padded batch. Both contenders here
call the same fdet functions (``atss_loss``, ``gfl_loss``) on the same random head outputs,
anchors and ground truth:

- ``batched``: one call on ``[B, A, ·]`` outputs and ``[B, M, 4]`` padded gts;
- ``per-image``: a loop over the images, each called with its own outputs ``[1, A, ·]`` and only
  its valid gts ``[1, M_i, 4]`` (prepared outside the timing, as a data loader of lists gives
  them), the totals and counts added up;
- ``compiled`` (with ``--compile``): the batched call under ``torch.compile(fullgraph=True)``.

Each call is the objective's forward and its backward to the head outputs (a training step's
share), ``Σ weight · total / max(count, 1)``. The two eager contenders give the same loss (checked
before timing). They take turns, in an order rotated every repeat; each time is the median.

Full run: 16 images × up to 50 objects (25 to 50), K = 80, the anchors of R50-FPN P3–P7 at 512²
(one a location: 5 456). ``--quick``: 4 images × up to 10 objects, 3 repeats.

    python benchmarks/bench_dense_objectives.py [--quick] [--repeats N] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _common import cpu_model, format_seconds, interleaved, median, table, timed
from torch import Tensor

from fdet.models.detectors.atss import atss_loss
from fdet.models.detectors.base import Term, total_loss
from fdet.models.detectors.gfl import gfl_loss, gfl_strides
from fdet.models.detectors.retinanet import retinanet_anchors
from fdet.models.heads.atss import ATSSHeadOutputs
from fdet.models.heads.gfl import GFLHeadOutputs
from fdet.specs.atss import SINGLE_ANCHORS


@dataclass(frozen=True)
class Settings:
    images: int
    max_objects: int
    image_size: int
    classes: int
    repeats: int


FULL = Settings(images=16, max_objects=50, image_size=512, classes=80, repeats=5)
QUICK = Settings(images=4, max_objects=10, image_size=512, classes=80, repeats=3)
ANCHORS = SINGLE_ANCHORS
REG_MAX = 16


def _feature_sizes(size: int) -> tuple[tuple[int, int], ...]:
    return tuple((math.ceil(size / s), math.ceil(size / s)) for s in ANCHORS.strides)


def _ground_truth(g: torch.Generator, s: Settings) -> tuple[Tensor, Tensor, Tensor]:
    """Padded gts: ``max_objects / 2`` to ``max_objects`` boxes an image of 16 to 256 pixels."""
    counts = torch.randint(s.max_objects // 2, s.max_objects + 1, (s.images,), generator=g)
    xy = torch.rand(s.images, s.max_objects, 2, generator=g) * (s.image_size - 16)
    wh = 16 + torch.rand(s.images, s.max_objects, 2, generator=g) * 240
    boxes = torch.cat((xy, (xy + wh).clamp(max=s.image_size)), dim=-1)
    labels = torch.randint(0, s.classes, (s.images, s.max_objects), generator=g)
    valid = torch.arange(s.max_objects)[None] < counts[:, None]
    return torch.where(valid[..., None], boxes, math.nan), labels, valid


def _split(flat: Tensor, counts: list[int]) -> tuple[Tensor, ...]:
    return tuple(flat.split(counts, dim=1))


def _objective(terms: dict[str, Term]) -> Tensor:
    return total_loss(terms)


def _per_image(
    loss_one: Callable[[int, Tensor, Tensor, Tensor], dict[str, Term]],
    gts: list[tuple[Tensor, Tensor, Tensor]],
) -> Tensor:
    """The objective of the batch from per-image calls: totals and counts added up."""
    totals: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    weights: dict[str, float] = {}
    for i, (boxes, labels, valid) in enumerate(gts):  # the loop this benchmark is about
        for name, term in loss_one(i, boxes, labels, valid).items():
            totals[name] = totals.get(name, 0) + term.total
            counts[name] = counts.get(name, 0) + term.count
            weights[name] = term.weight
    return total_loss({n: Term(totals[n], counts[n], weights[n]) for n in totals})


def _contenders(
    s: Settings, family: str, compile_too: bool
) -> tuple[dict[str, Callable[[], Any]], float]:
    g = torch.Generator().manual_seed(0)
    sizes = _feature_sizes(s.image_size)
    counts = [h * w for h, w in sizes]
    a = sum(counts)
    anchors = retinanet_anchors(sizes, spec=ANCHORS)
    boxes, labels, valid = _ground_truth(g, s)
    per_image_gts = [
        (boxes[i : i + 1, :n], labels[i : i + 1, :n], valid[i : i + 1, :n])
        for i, n in enumerate(valid.sum(1).tolist())
    ]
    logits = (torch.randn(s.images, a, s.classes, generator=g) - 4).requires_grad_()

    if family == "ATSS":
        deltas = (torch.randn(s.images, a, 4, generator=g) * 0.3).requires_grad_()
        ctr = torch.randn(s.images, a, generator=g).requires_grad_()
        leaves = [logits, deltas, ctr]

        def batched_terms(cls: Tensor, box: Tensor, c: Tensor, *gt: Tensor) -> dict[str, Term]:
            outputs = ATSSHeadOutputs(
                _split(cls, counts), _split(box, counts), _split(c, counts), sizes
            )
            return atss_loss(outputs, anchors, *gt)

        def loss_one(i: int, *gt: Tensor) -> dict[str, Term]:
            return batched_terms(logits[i : i + 1], deltas[i : i + 1], ctr[i : i + 1], *gt)

    else:
        dists = torch.randn(s.images, a, 4, REG_MAX + 1, generator=g).requires_grad_()
        strides = gfl_strides(sizes, spec=ANCHORS)
        leaves = [logits, dists]

        def batched_terms(cls: Tensor, dist: Tensor, *gt: Tensor) -> dict[str, Term]:  # type: ignore[misc]
            outputs = GFLHeadOutputs(_split(cls, counts), _split(dist, counts), sizes)
            return gfl_loss(outputs, anchors, strides, *gt)

        def loss_one(i: int, *gt: Tensor) -> dict[str, Term]:
            return batched_terms(logits[i : i + 1], dists[i : i + 1], *gt)

    def step(value: Callable[[], Tensor]) -> Callable[[], float]:
        def run() -> float:
            loss = value()
            grads = torch.autograd.grad(loss, leaves)
            del grads
            return float(loss.detach())

        return run

    contenders: dict[str, Callable[[], Any]] = {
        "batched": step(lambda: _objective(batched_terms(*leaves, boxes, labels, valid))),
        "per-image": step(lambda: _per_image(loss_one, per_image_gts)),
    }
    if compile_too:
        compiled = torch.compile(batched_terms, fullgraph=True, dynamic=False)
        contenders["compiled"] = step(lambda: _objective(compiled(*leaves, boxes, labels, valid)))
    compile_seconds = 0.0
    if compile_too:
        compile_seconds, _ = timed(contenders["compiled"])
    batched_value = contenders["batched"]()
    looped_value = contenders["per-image"]()
    if not math.isclose(batched_value, looped_value, rel_tol=1e-4):
        raise AssertionError(
            f"{family}: the batched objective {batched_value} differs from the per-image one "
            f"{looped_value}"
        )
    return contenders, compile_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 images, 10 objects, 3 repeats")
    parser.add_argument("--repeats", type=int, help="timed calls a contender (5; quick: 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled objective")
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    if args.repeats:
        s = Settings(s.images, s.max_objects, s.image_size, s.classes, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{s.images} images × up to {s.max_objects} objects, K = {s.classes}, "
        f"{sum(h * w for h, w in _feature_sizes(s.image_size))} anchors; "
        f"{s.repeats} timed calls a contender (forward + backward of the objective)"
    )
    rows = []
    for family in ("ATSS", "GFL"):
        contenders, compile_seconds = _contenders(s, family, args.compile)
        times = interleaved(contenders, repeats=s.repeats)
        batched, looped = median(times["batched"]), median(times["per-image"])
        row = [
            family,
            format_seconds(batched),
            format_seconds(looped),
            f"{looped / batched:.2f}×",
        ]
        if args.compile:
            row += [
                format_seconds(median(times["compiled"])),
                format_seconds(compile_seconds),
            ]
        rows.append(row)
    header = ["objective", "batched", "per-image loop", "loop / batched"]
    if args.compile:
        header += ["compiled", "compile (first call)"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
