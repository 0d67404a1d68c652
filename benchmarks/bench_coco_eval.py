"""COCO bbox evaluation time: faster-coco-eval against pycocotools, through ``evaluate_coco``.

A synthetic set (default: 500 images, about 5 ground-truth boxes an image, 10 categories, 100
detections an image) is evaluated by both backends in one process, interleaved, several times.
The ground truth is a pycocotools ``COCO``, as ``CocoDataset.coco`` is, so the faster backend's
time includes building its own index of it.

    python benchmarks/bench_coco_eval.py [--images 500] [--dets 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from fdet.eval.coco import Backend, evaluate_coco


def synthetic(
    num_images: int, dets_per_image: int, gts_per_image: float, num_categories: int, seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ground truth (some crowd boxes, every area range) and detections: jittered copies of the
    ground truth (a third of them) and random boxes, with random scores."""
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for i in range(num_images):
        height, width = 480, 640
        images.append({"id": i + 1, "height": height, "width": width, "file_name": f"{i}.jpg"})
        gts = []
        for _ in range(int(rng.poisson(gts_per_image))):
            w, h = np.exp(rng.uniform(np.log(8), np.log(300), size=2))
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            box = [float(x), float(y), float(w), float(h)]
            category = int(rng.integers(1, num_categories + 1))
            crowd = int(rng.random() < 0.03)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": category,
                    "bbox": box,
                    "area": float(w * h),
                    "iscrowd": crowd,
                }
            )
            gts.append((box, category))
        for d in range(dets_per_image):
            if gts and d < dets_per_image // 3:
                (x, y, w, h), category = gts[d % len(gts)]
                jitter = rng.normal(0.0, 0.1, size=4) * [w, h, w, h]
                box = [
                    x + jitter[0],
                    y + jitter[1],
                    max(1.0, w + jitter[2]),
                    max(1.0, h + jitter[3]),
                ]
                if rng.random() < 0.2:
                    category = int(rng.integers(1, num_categories + 1))
            else:
                w, h = np.exp(rng.uniform(np.log(8), np.log(300), size=2))
                box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
                category = int(rng.integers(1, num_categories + 1))
            results.append(
                {
                    "image_id": i + 1,
                    "category_id": category,
                    "bbox": [float(v) for v in box],
                    "score": float(rng.random()),
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--gts", type=float, default=5.0)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100 images, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = min(args.images, 100), 1

    gt, results = synthetic(args.images, args.dets, args.gts, args.categories, args.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    print(
        f"{args.images} images, {len(gt['annotations'])} gts, {len(results)} detections, "
        f"{args.categories} categories"
    )

    backends: tuple[Backend, ...] = ("faster", "pycocotools")
    times: dict[str, list[float]] = {b: [] for b in backends}
    aps: dict[str, float] = {}
    for _ in range(args.repeats):
        for backend in backends:
            start = time.perf_counter()
            metrics = evaluate_coco(coco, results, backend=backend)
            times[backend].append(time.perf_counter() - start)
            aps[backend] = metrics.AP

    runs = " ".join(f"{'run ' + str(i + 1):>7}" for i in range(args.repeats))
    print(f"{'backend':<12} {runs} {'median':>7} {'AP':>8}")
    for backend in backends:
        cells = " ".join(f"{t:7.2f}" for t in times[backend])
        median = statistics.median(times[backend])
        print(f"{backend:<12} {cells} {median:7.2f} {aps[backend]:8.5f}")
    ratio = statistics.median(times["pycocotools"]) / statistics.median(times["faster"])
    print(f"speed-up of faster over pycocotools (median): {ratio:.1f}x")


if __name__ == "__main__":
    main()
