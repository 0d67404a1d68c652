"""What compiling costs and gains in a training step: eager, compiled objective, compiled model.

The shapes R18-FPN spec's model (the embedded default) at its training batch (16 × 128²) and
at 8 × 256², against torchvision's closest RetinaNet on the same weights. For each mode: the
cold first step (compilation included, inductor caches off) and the median step after warm-up,
interleaved with torchvision's step in one process.

Run: python benchmarks/bench_train_modes.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import cpu_model, interleaved, median
from bench_retinanet import random_batch, random_images, shapes_pair, tv_targets
from torch._inductor import config as inductor_config

from fdet.models.detectors.base import total_loss


def step_fns(detector: Any, tv: Any, batch: Any, mode: str) -> tuple[Any, Any]:
    images = batch.images if detector.input_range == 255.0 else batch.images.float() / 255
    forward = torch.compile(detector) if mode == "model" else detector
    loss_fn = torch.compile(detector.loss, fullgraph=True) if mode != "eager" else detector.loss
    opt = torch.optim.SGD(detector.parameters(), lr=1e-4, momentum=0.9)
    tv_opt = torch.optim.SGD(tv.parameters(), lr=1e-4, momentum=0.9)
    tv_images = list(batch.images.float() / 255)
    targets = tv_targets(batch)

    def fdet_step() -> None:
        opt.zero_grad(set_to_none=True)
        total_loss(loss_fn(forward(images), batch)).backward()
        opt.step()

    def tv_step() -> None:
        tv_opt.zero_grad(set_to_none=True)
        sum(tv(tv_images, targets).values()).backward()
        tv_opt.step()

    return fdet_step, tv_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one config, 2 repeats")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    configs = [(16, 128)] if args.quick else [(16, 128), (8, 256)]
    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(
        f"{'config':<12} {'mode':<10} {'first step':>11} {'step':>9} "
        f"{'torchvision':>12} {'tv/fdet':>8}"
    )
    for batch_size, size in configs:
        g = torch.Generator().manual_seed(0)
        images = random_images(batch_size, size, g)
        for mode in ("eager", "objective", "model"):
            tv, detector, _ = shapes_pair(size)
            tv.train()
            detector.train()
            batch = random_batch(images, detector.head.num_classes, g)
            fdet_step, tv_step = step_fns(detector, tv, batch, mode)
            torch._dynamo.reset()
            with inductor_config.patch(force_disable_caches=True):
                start = time.perf_counter()
                fdet_step()
                first = time.perf_counter() - start
            times = interleaved({"fdet": fdet_step, "tv": tv_step}, repeats=repeats)
            f, t = median(times["fdet"]), median(times["tv"])
            print(
                f"{batch_size}x{size}²{'':<4} {mode:<10} {first:>10.2f}s {f * 1e3:>7.0f}ms "
                f"{t * 1e3:>10.0f}ms {t / f:>8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
