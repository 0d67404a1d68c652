"""fdet's Faster R-CNN and Mask R-CNN against torchvision's: train step, inference, objective
and postprocess.

Both run in one process, on the same architecture, weights and inputs and the same number of
threads, interleaved (the contenders take turns, in an order rotated every repeat), warm-up calls
excluded; each time reported is the median of the repeats. ``--model`` picks the detector:
``faster`` (torchvision's ``fasterrcnn_resnet50_fpn``), ``mask`` (``maskrcnn_resnet50_fpn``) or
``all`` (both, the default); each is built with 81 classes (80 and the background), no
pretrained weights (the backbone's norms are ``BatchNorm2d``), and converted to fdet with
``load_torchvision``. Rows (``--rows`` picks some, by name or prefix, e.g.
``--rows train,objective``):

- ``train``: forward + loss + backward + SGD step, 2 × 512², random ground truth, 8 to 12
  boxes an image (Mask R-CNN: an ellipse in each box as its mask), training mode.
- ``infer``: ``detector.predict`` against torchvision's eval forward, same model and images.
  The predictors are rescaled (RPN logits spread with std 2, each RoI class logit with std 1.5
  over the proposals) so that each image keeps its 100 detections and the NMS has work; a
  random head would score every class near 1/81, below the 0.05 threshold. Mask R-CNN: fdet
  pastes its masks (``paste_masks``) as torchvision's transform does.
- ``objective``: the RPN and RoI objective from the same backbone features (computed once):
  fdet's ``rpn`` + ``loss`` (RPN loss, proposals, sampling, RoI head, RoI loss; Mask R-CNN:
  the mask loss too), eager and compiled with ``torch.compile(fullgraph=True)``, against
  torchvision's ``rpn(…)`` and ``roi_heads(…)`` losses in training mode; 8 images × 30
  objects at 512². The forward only: no backward. The predictors are rescaled as for
  ``infer``, so that enough proposals survive NMS to fill each image's 512 RoI slots, as with a
  trained RPN.
- ``postprocess``: proposals + RoI head + detections (Mask R-CNN: the mask head on the
  detections, box-frame probabilities on both sides) from the same features, fdet's ``rpn`` +
  ``postprocess`` (eager and compiled) against torchvision's ``rpn`` + ``roi_heads`` in eval
  mode, 4 images at 512², predictors rescaled as for ``infer``.

The end-to-end rows also give a FLOP floor: the FLOPs of one call (``FlopCounterMode``) over the
machine's dense float32 rate, measured in the same run. Compile times are cold (inductor's caches
off). A matmul rate is measured around every row; if it sags, other work shared the CPU and the
run says so.

    python benchmarks/bench_two_stage.py [--quick] [--model faster|mask|all] [--rows a,b]
                                         [--repeats N] [--threads N] [--no-compile]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NamedTuple

import torch
import torchvision
from _common import (
    BUSY,
    Result,
    compile_cold,
    count_flops,
    cpu_model,
    dense_gflops,
    interleaved,
    matmul_gflops,
    median,
    print_result,
    select_rows,
    summary,
)
from torch import Tensor, nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from torchvision.models.detection.image_list import ImageList

from fdet.compat.torchvision import UnsupportedModelError, load_torchvision, spec_from_torchvision
from fdet.models.detectors.base import total_loss
from fdet.models.detectors.two_stage.faster_rcnn import FasterRCNN, FasterRCNNOutputs

ROW_NAMES = ("train", "infer", "objective", "postprocess")
MODEL_NAMES = {"faster": "Faster R-CNN", "mask": "Mask R-CNN"}
NUM_CLASSES = 80
LEVELS = ("0", "1", "2", "3", "pool")  # torchvision's names of P2–P6


@dataclass(frozen=True)
class Settings:
    repeats: int
    r50: tuple[int, int]  # (images, size) of the end-to-end rows
    objective: tuple[int, int, int]  # (images, objects an image, size)
    postprocess: tuple[int, int]  # (images, size)
    compile: bool = True
    model: str = "faster"


FULL = Settings(repeats=5, r50=(2, 512), objective=(8, 30, 512), postprocess=(4, 512))
QUICK = Settings(repeats=1, r50=(1, 256), objective=(2, 30, 256), postprocess=(2, 256))


class Truth(NamedTuple):
    """What fdet's ``loss`` reads of a batch."""

    gt_boxes: Tensor  # [B, M, 4]
    gt_labels: Tensor  # [B, M]
    gt_valid: Tensor  # [B, M]
    image_sizes: Tensor  # [B, 2]
    gt_masks: Tensor | None = None  # [B, M, H, W] uint8


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


def ellipse_masks(boxes: Tensor, size: int) -> Tensor:
    """``[B, M, size, size]`` uint8: the ellipse inscribed in each box."""
    centers = (torch.arange(size, dtype=torch.float32) + 0.5)[None, None]  # [1, 1, S]
    x1, y1, x2, y2 = boxes.unbind(-1)  # [B, M] each
    dx = (centers - ((x1 + x2) / 2)[..., None]) / ((x2 - x1) / 2).clamp(min=0.5)[..., None]
    dy = (centers - ((y1 + y2) / 2)[..., None]) / ((y2 - y1) / 2).clamp(min=0.5)[..., None]
    return (dy[..., :, None] ** 2 + dx[..., None, :] ** 2 <= 1).to(torch.uint8)


def random_truth(
    batch: int, objects: tuple[int, int], size: int, g: torch.Generator, *, masks: bool
) -> Truth:
    """Padded ground truth: between ``objects[0]`` and ``objects[1]`` boxes an image (and
    with ``masks`` the ellipse in each box as its mask)."""
    low, high = objects
    counts = torch.randint(low, high + 1, (batch,), generator=g)
    boxes = random_boxes(batch, high, size, g)
    return Truth(
        gt_boxes=boxes,
        gt_labels=torch.randint(0, NUM_CLASSES, (batch, high), generator=g),
        gt_valid=torch.arange(high)[None, :] < counts[:, None],
        image_sizes=torch.tensor([[size, size]] * batch),
        gt_masks=ellipse_masks(boxes, size) if masks else None,
    )


def tv_targets(truth: Truth) -> list[dict[str, Tensor]]:
    """torchvision's per-image targets: the valid slots of each image, labels from 1."""
    targets = []
    for b, valid in enumerate(truth.gt_valid):
        target = {"boxes": truth.gt_boxes[b, valid], "labels": truth.gt_labels[b, valid] + 1}
        if truth.gt_masks is not None:
            target["masks"] = truth.gt_masks[b, valid]
        targets.append(target)
    return targets


def tv_model(model: str, size: int) -> nn.Module:
    """torchvision's R50-FPN ``model`` (81 classes, random weights) taking ``size²`` images as
    they are."""
    torch.manual_seed(0)
    make = fasterrcnn_resnet50_fpn if model == "faster" else maskrcnn_resnet50_fpn
    return make(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_CLASSES + 1,
        min_size=size,
        max_size=size,
    )


def r50_pair(model: str, size: int) -> tuple[nn.Module, FasterRCNN]:
    """torchvision's model and the fdet detector converted from it, with the same weights."""
    tv = tv_model(model, size)
    return tv, load_torchvision(tv)


def random_images(batch: int, size: int, seed: int = 0) -> Tensor:
    """``[B, 3, size, size]`` in ``[0, 1]`` (converted models take what torchvision takes)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    return images.float() / 255


@torch.no_grad()
def calibrate_scores(tv: nn.Module, images: Tensor) -> None:
    """RPN logits spread with std 2 and deltas with std 0.3 (proposals of every level
    survive); each RoI class logit standardized to std 1.5 and each delta to std 0.5 over the
    proposals of ``images`` (many classes score above the threshold)."""
    tv.eval()
    image_list = tv.transform(list(images))[0]
    features = tv.backbone(image_list.tensors)
    head = tv.rpn.head
    logits, deltas = head(list(features.values()))
    head.cls_logits.weight.mul_(2.0 / torch.cat([t.flatten() for t in logits]).std())
    head.bbox_pred.weight.mul_(0.3 / torch.cat([t.flatten() for t in deltas]).std())
    proposals, _ = tv.rpn(image_list, features)
    pooled = tv.roi_heads.box_roi_pool(features, proposals, image_list.image_sizes)
    hidden = tv.roi_heads.box_head(pooled)  # [B · 1000, 1024]
    predictor = tv.roi_heads.box_predictor
    for layer, std in ((predictor.cls_score, 1.5), (predictor.bbox_pred, 0.5)):
        out = layer(hidden)
        scale = std / out.std(dim=0).clamp(min=1e-6)
        layer.weight.mul_(scale[:, None])
        layer.bias.copy_((layer.bias - out.mean(dim=0)) * scale)


@torch.no_grad()
def backbone_features(tv: nn.Module, images: Tensor) -> tuple[Tensor, ...]:
    """P2–P6 of ``images`` (eval mode: the norms' running statistics)."""
    was_training = tv.training
    tv.eval()
    features = tv.backbone(tv.transform(list(images))[0].tensors)
    tv.train(was_training)
    return tuple(features[name].contiguous() for name in LEVELS)


def tv_features(features: Sequence[Tensor]) -> OrderedDict[str, Tensor]:
    return OrderedDict(zip(LEVELS, features, strict=True))


def mask_head_note(detector: nn.Module) -> list[str]:
    """How many RoI slots an image fdet's mask head trains on (torchvision's: the positives)."""
    head = getattr(detector, "mask_head", None)
    if head is None:
        return []
    rois = getattr(head, "max_rois", None)
    multiple = getattr(head, "slot_multiple", None)
    if rois is None:
        where = "every sampled RoI slot an image"
    elif multiple is None:
        where = f"{rois} slots an image (positives gathered)"
    else:
        where = (
            f"the batch's positives packed in a multiple of {multiple} slots (eager; "
            f"compiled: {rois} slots an image)"
        )
    return [f"fdet's mask head trains on {where}; torchvision's on the positives of each image"]


def count_detections(tv_out: Any) -> int:
    return sum(len(d["scores"]) for d in tv_out)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def train_row(settings: Settings) -> Result:
    batch_size, size = settings.r50
    masks = settings.model == "mask"
    tv, detector = r50_pair(settings.model, size)
    images = random_images(batch_size, size)
    truth = random_truth(batch_size, (8, 12), size, torch.Generator().manual_seed(0), masks=masks)
    tv.train()
    detector.train()
    tv_images = list(images)
    targets = tv_targets(truth)
    sgd = partial(torch.optim.SGD, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    fdet_opt, tv_opt = sgd(detector.parameters()), sgd(tv.parameters())
    first: dict[str, float] = {}

    def fdet_step() -> None:
        fdet_opt.zero_grad(set_to_none=True)
        loss = total_loss(detector.loss(detector(images), truth))
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
    notes = [
        f"first-step loss: fdet {first['fdet']:.4f}, torchvision {first['torchvision']:.4f} "
        "(each samples its own anchors and RoIs)",
        *mask_head_note(detector),
    ]
    what = f"R50-FPN, {batch_size} × {size}²"
    return Result("train", what, times, flops=flops, notes=notes)


def infer_row(settings: Settings) -> Result:
    batch_size, size = settings.r50
    tv = tv_model(settings.model, size)
    images = random_images(batch_size, size)
    calibrate_scores(tv, images)
    detector = load_torchvision(tv).eval()
    if settings.model == "mask":
        detector.paste_masks = True  # type: ignore[assignment]  # torchvision pastes too
    tv_images = list(images)
    sizes = torch.tensor([[size, size]] * batch_size)

    def fdet_predict() -> Any:
        return detector.predict(images, sizes)

    @torch.no_grad()
    def tv_predict() -> Any:
        return tv(tv_images)

    found = (int(fdet_predict().valid.sum()), count_detections(tv_predict()))
    flops = {"fdet": count_flops(fdet_predict), "torchvision": count_flops(tv_predict)}
    times = interleaved({"fdet": fdet_predict, "torchvision": tv_predict}, repeats=settings.repeats)
    notes = [f"detections in the batch: fdet {found[0]}, torchvision {found[1]}"]
    return Result("infer", f"R50-FPN, {batch_size} × {size}²", times, flops=flops, notes=notes)


def objective_row(settings: Settings) -> Result:
    batch, objects, size = settings.objective
    masks = settings.model == "mask"
    tv = tv_model(settings.model, size)
    images = random_images(batch, size, seed=1)
    # a spread of RPN scores as a trained RPN has: enough proposals survive NMS to fill every
    # image's 512 RoI slots (a random RPN leaves about 400, and fdet's static slots would run
    # the box head on the padding where torchvision samples fewer RoIs)
    calibrate_scores(tv, images)
    detector = load_torchvision(tv)
    features = backbone_features(tv, images)
    truth = random_truth(
        batch, (objects, objects), size, torch.Generator().manual_seed(1), masks=masks
    )
    tv.train()
    detector.train()
    image_size = (size, size)

    def objective(features: Sequence[Tensor], truth: Truth) -> Tensor:
        rpn = detector.rpn(features, image_size=image_size)
        outputs = FasterRCNNOutputs(tuple(features), rpn, image_size)
        return total_loss(detector.loss(outputs, truth))

    image_list = ImageList(torch.zeros(batch, 3, size, size), [image_size] * batch)
    named = tv_features(features)
    targets = tv_targets(truth)

    def tv_objective() -> Tensor:
        proposals, rpn_losses = tv.rpn(image_list, named, targets)
        _, roi_losses = tv.roi_heads(named, proposals, image_list.image_sizes, targets)
        return sum(rpn_losses.values()) + sum(roi_losses.values())

    args = (features, truth)
    contenders: dict[str, Callable[[], Any]] = {
        "fdet eager": lambda: objective(*args),
        "torchvision": tv_objective,
    }
    compile_s = {}
    if settings.compile:
        contenders["fdet compiled"], compile_s["fdet compiled"] = compile_cold(objective, args)
    values = {name: float(fn().detach()) for name, fn in contenders.items()}
    times = interleaved(contenders, repeats=settings.repeats)
    notes = [
        "loss: "
        + ", ".join(f"{name} {value:.4f}" for name, value in values.items())
        + " (each samples its own anchors and RoIs)",
        *mask_head_note(detector),
    ]
    what = f"{batch} images × {objects} objects at {size}², K={NUM_CLASSES}, forward only"
    return Result("objective", what, times, compile_s=compile_s, notes=notes)


def postprocess_row(settings: Settings) -> Result:
    batch, size = settings.postprocess
    tv = tv_model(settings.model, size)
    images = random_images(batch, size, seed=2)
    calibrate_scores(tv, images)
    detector = load_torchvision(tv).eval()
    features = backbone_features(tv, images)
    image_size = (size, size)
    image_sizes = torch.tensor([image_size] * batch)

    def fdet_postprocess(features: Sequence[Tensor], image_sizes: Tensor) -> Any:
        rpn = detector.rpn(features, image_size=image_size)
        outputs = FasterRCNNOutputs(tuple(features), rpn, image_size)
        return detector.postprocess(outputs, image_sizes)

    image_list = ImageList(torch.zeros(batch, 3, size, size), [image_size] * batch)
    named = tv_features(features)

    def tv_postprocess() -> Any:
        proposals, _ = tv.rpn(image_list, named)
        detections, _ = tv.roi_heads(named, proposals, image_list.image_sizes)
        return detections

    args = (features, image_sizes)
    contenders: dict[str, Callable[[], Any]] = {
        "fdet eager": lambda: fdet_postprocess(*args),
        "torchvision": tv_postprocess,
    }
    compile_s = {}
    with torch.no_grad():
        if settings.compile:
            contenders["fdet compiled"], compile_s["fdet compiled"] = compile_cold(
                fdet_postprocess, args
            )
        found = (int(fdet_postprocess(*args).valid.sum()), count_detections(tv_postprocess()))
        times = interleaved(contenders, repeats=settings.repeats)
    notes = [f"detections: fdet {found[0]}, torchvision {found[1]}"]
    what = f"{batch} images at {size}², K={NUM_CLASSES}"
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


def mask_rcnn_missing() -> str | None:
    """Why fdet cannot convert torchvision's Mask R-CNN, or None when it can."""
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    try:
        spec_from_torchvision(tv)
    except (UnsupportedModelError, NotImplementedError, AttributeError, ImportError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, 1 repeat")
    parser.add_argument(
        "--model", choices=("faster", "mask", "all"), default="all", help="the detector(s)"
    )
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
    rows = select_rows(args.rows, ROW_NAMES)
    models = ["faster", "mask"] if args.model == "all" else [args.model]

    print(
        f"{cpu_model()}, {torch.get_num_threads()} torch threads; python "
        f"{platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{'quick' if args.quick else 'full'} run: {settings.repeats} timed calls a contender "
        "after 1 warm-up, medians"
    )
    if "mask" in models and (why := mask_rcnn_missing()) is not None:
        print(f"\nMask R-CNN rows skipped: fdet cannot convert torchvision's Mask R-CNN ({why})")
        models.remove("mask")
    start = time.perf_counter()
    dense = dense_gflops()
    results: dict[str, list[Result]] = {}
    for model in models:
        print(f"\n# {MODEL_NAMES[model]}")
        for name in rows:
            before = median(matmul_gflops(repeats=3))
            result = ROWS[name](replace(settings, model=model))
            result.rates = [before, median(matmul_gflops(repeats=3))]
            results.setdefault(model, []).append(result)
            print_result(result)
            sys.stdout.flush()
    if not results:
        return
    for kernel, rates in dense_gflops().items():
        dense[kernel] += rates
    rate = max(max(v) for v in dense.values()) * 1e9
    everything = [r for model_results in results.values() for r in model_results]
    best_mm = max(max(dense["mm 2048²"]), *(max(r.rates) for r in everything))
    print("\ndense float32 GFLOP/s, runs before and after the rows:")
    for kernel, rates in dense.items():
        print(f"  {kernel:<24} best {max(rates):4.0f}   median {median(rates):4.0f}")
    print(
        f"floor = FLOPs / {rate / 1e9:.0f} GFLOP/s (the best rate seen). tv/fdet > 1: fdet is "
        "faster."
    )
    busy = [
        f"{model} {r.name}"
        for model, model_results in results.items()
        for r in model_results
        if min(r.rates) < BUSY * best_mm
    ]
    if busy:
        print(
            f"WARNING: the matmul rate fell below {BUSY:.0%} of its best ({best_mm:.0f} GFLOP/s) "
            f"around {', '.join(busy)}: other work shared the CPU; those times are not clean."
        )
    for model, model_results in results.items():
        print(f"\n{MODEL_NAMES[model]}\n")
        print(summary(model_results, rate, best_mm, "torchvision"))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
