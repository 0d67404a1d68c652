"""fdet's RetinaNet against torchvision's: train step, inference, objective and postprocess.

Both run in one process, on the same architecture, weights and inputs and the same number of
threads, interleaved (the contenders take turns, in an order rotated every repeat), warm-up calls
excluded; each time reported is the median of the repeats. Rows (``--rows`` picks some, by name
or prefix, e.g. ``--rows train,objective``):

- ``train-r50`` / ``train-r18``: forward + loss + backward + SGD step. R50-FPN (torchvision's
  ``retinanet_resnet50_fpn``, 80 classes, converted to fdet with ``load_torchvision``), 2 × 512²;
  the R18-FPN of ``specs/shapes/retinanet_r18_fpn.py`` and the closest torchvision RetinaNet,
  8 × 256². Random ground truth, 8 to 12 boxes an image.
- ``infer-r50`` / ``infer-r18``: ``detector.predict`` against torchvision's eval forward, same
  models and images; the classification predictor is rescaled so that logits spread around -5
  with std 1 (a random head scores everything near 0.01, below the threshold, and would leave
  the postprocess idle).
- ``objective``: ``retinanet_anchors`` + ``retinanet_loss`` (eager, and compiled with
  ``torch.compile(fullgraph=True)``) against torchvision's ``RetinaNet.compute_loss`` on the
  same random head outputs and anchors, 16 images × 50 objects, the 49 104 anchors of R50 at
  512², K = 80.
- ``postprocess``: ``postprocess_dense`` (eager and compiled) against torchvision's
  ``RetinaNet.postprocess_detections``, 8 images, K = 80, R50 512² anchors, random logits with
  far more than 1000 scores above the threshold on every level.

The end-to-end rows also give a FLOP floor: the FLOPs of one call (``FlopCounterMode``) over the
machine's dense float32 rate, measured in the same run (the best rate seen from a BLAS matmul
and two oneDNN convolutions). Compile times are cold (inductor's caches off). A dense-kernel rate is
measured around every row; if it sags, other work shared the CPU and the run says so.

    python benchmarks/bench_retinanet.py [--quick] [--rows a,b] [--repeats N] [--threads N]
                                         [--no-compile] [--breakdown]
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
from pathlib import Path
from typing import Any

import attrs
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
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead

from fdet import build, specs
from fdet.compat.torchvision import (
    load_torchvision,
    spec_from_torchvision,
    state_dict_from_torchvision,
)
from fdet.data.sample import Batch
from fdet.models.detectors.base import total_loss
from fdet.models.detectors.retinanet import (
    RetinaNet,
    retinanet_anchors,
    retinanet_assign,
    retinanet_loss,
)
from fdet.models.heads.retina import RetinaHeadOutputs
from fdet.ops.anchors import level_sizes
from fdet.ops.assign import IGNORE, POSITIVE
from fdet.ops.boxes import clip_boxes
from fdet.ops.coding import decode_deltas
from fdet.ops.losses import sigmoid_focal_loss_labels
from fdet.ops.postprocess import (
    nms_keep_mask,
    postprocess_dense,
    select_topk_per_level,
    top_detections,
)

ROOT = Path(__file__).resolve().parents[1]
R50_SPEC = ROOT / "specs/retinanet/r50_fpn_1x_coco.py"
SHAPES_SPEC = ROOT / "specs/shapes/retinanet_r18_fpn.py"
ROW_NAMES = ("train-r50", "train-r18", "infer-r50", "infer-r18", "objective", "postprocess")
BUSY = 0.8  # a row whose matmul rate falls below this share of the run's best was contended


@dataclass(frozen=True)
class Settings:
    repeats: int
    r50: tuple[int, int]  # (images, size) of the R50 rows
    r18: tuple[int, int]  # (images, size) of the shapes R18 rows
    objective: tuple[int, int, int]  # (images, objects an image, size whose anchors are used)
    postprocess: tuple[int, int]  # (images, size whose anchors are used)
    compile: bool = True
    breakdown: bool = False


FULL = Settings(
    repeats=5, r50=(2, 512), r18=(8, 256), objective=(16, 50, 512), postprocess=(8, 512)
)
QUICK = Settings(
    repeats=1, r50=(1, 256), r18=(2, 128), objective=(2, 50, 256), postprocess=(2, 256)
)


@dataclass
class Result:
    """One row: the seconds of every timed call of each contender (``fdet …`` and
    ``torchvision``), FLOPs of one call of each side (end-to-end rows), compile times, the
    matmul rate around the row, and notes."""

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


def random_images(batch: int, size: int, generator: torch.Generator) -> Tensor:
    """uint8 ``[B, 3, size, size]`` noise."""
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def random_boxes(batch: int, slots: int, size: int, generator: torch.Generator) -> Tensor:
    """``[B, slots, 4]`` xyxy boxes inside a ``size²`` image, sides log-uniform in
    ``[size / 32, size / 2]``."""
    low, high = math.log(size / 32), math.log(size / 2)
    wh = torch.exp(low + (high - low) * torch.rand(batch, slots, 2, generator=generator))
    xy = torch.rand(batch, slots, 2, generator=generator) * (size - wh)
    return torch.cat((xy, xy + wh), dim=-1)


def random_batch(
    images: Tensor, num_classes: int, generator: torch.Generator, low: int = 8, high: int = 12
) -> Batch:
    """A padded :class:`Batch` of ``images`` with ``low`` to ``high`` random boxes an image."""
    batch, _, height, width = images.shape
    counts = torch.randint(low, high + 1, (batch,), generator=generator)
    valid = torch.arange(high)[None, :] < counts[:, None]  # [B, M]
    return Batch(
        images=images,
        image_sizes=torch.tensor([[height, width]] * batch),
        gt_boxes=random_boxes(batch, high, height, generator),
        gt_labels=torch.randint(0, num_classes, (batch, high), generator=generator),
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


def r50_model() -> specs.RetinaNet:
    return specs.load(R50_SPEC, specs.RetinaNet, name="MODEL")


def r50_pair(size: int) -> tuple[TVRetinaNet, RetinaNet]:
    """torchvision's ``retinanet_resnet50_fpn`` (80 classes, no resizing at ``size``) and the
    fdet detector converted from it, with the same weights."""
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=80, min_size=size, max_size=size
    )
    return tv, load_torchvision(tv)


def shapes_tv_model(spec: specs.RetinaNet, size: int) -> TVRetinaNet:
    """The torchvision RetinaNet closest to the shapes spec: ResNet-18 with batch norm, a
    64-channel FPN on C3–C5 without extra levels, a RetinaNetHead with group norm cut to
    ``num_convs`` convs a tower, the spec's anchor sizes and a GIoU box loss."""
    torch.manual_seed(0)
    body = resnet18(norm_layer=nn.BatchNorm2d)
    levels = spec.backbone.out_levels
    channels = {2: 64, 3: 128, 4: 256, 5: 512}
    backbone = BackboneWithFPN(
        body,
        return_layers={f"layer{lvl - 1}": str(i) for i, lvl in enumerate(levels)},
        in_channels_list=[channels[lvl] for lvl in levels],
        out_channels=spec.neck.channels,
    )
    backbone.fpn.extra_blocks = None  # P3–P5 only (BackboneWithFPN adds a max-pool P6)
    anchors = spec.anchors
    generator = AnchorGenerator(
        sizes=tuple(
            level_sizes(base, anchors.octave_scales, truncate=anchors.truncate_sizes)
            for base in anchors.base_sizes
        ),
        aspect_ratios=(tuple(anchors.ratios),) * len(anchors.base_sizes),
    )
    head = RetinaNetHead(
        spec.neck.channels,
        anchors.per_location,
        spec.num_classes,
        norm_layer=partial(nn.GroupNorm, spec.head.norm.groups),
    )
    for sub in (head.classification_head, head.regression_head):
        sub.conv = nn.Sequential(*list(sub.conv)[: spec.head.num_convs])
    head.regression_head._loss_type = "giou"
    post = spec.postprocess
    return TVRetinaNet(
        backbone,
        spec.num_classes,
        min_size=size,
        max_size=size,
        anchor_generator=generator,
        head=head,
        score_thresh=post.score_threshold,
        nms_thresh=post.nms_iou,
        detections_per_img=post.max_detections,
        topk_candidates=post.topk_per_level,
        fg_iou_thresh=spec.assigner.pos_iou,
        bg_iou_thresh=spec.assigner.neg_iou,
    )


def spec_differences(a: Any, b: Any, path: str = "") -> list[str]:
    """``path: a vs b`` for every leaf where two specs differ."""
    if attrs.has(type(a)) and type(a) is type(b):
        out = []
        for f in attrs.fields(type(a)):
            out += spec_differences(getattr(a, f.name), getattr(b, f.name), f"{path}{f.name}.")
        return out
    return [] if a == b else [f"{path.rstrip('.')}: {a!r} vs {b!r}"]


def shapes_pair(size: int) -> tuple[TVRetinaNet, RetinaNet, list[str]]:
    """The torchvision model of :func:`shapes_tv_model` and the fdet detector built from the
    shapes spec, with the torchvision weights; and how the two specs differ."""
    spec = specs.load(SHAPES_SPEC, specs.Experiment, name="EXPERIMENT").model
    tv = shapes_tv_model(spec, size)
    detector = build(spec)
    detector.load_state_dict(state_dict_from_torchvision(tv.state_dict()), strict=True)
    return tv, detector, spec_differences(spec, spec_from_torchvision(tv))


@torch.no_grad()
def calibrate_scores(tv: TVRetinaNet, images: Tensor, mean: float, std: float) -> None:
    """Rescale the classification predictor so that its logits on ``images`` have about this
    ``mean`` and ``std``."""
    tv.eval()
    x = tv.transform(list(images.float() / 255))[0].tensors
    head = tv.head.classification_head
    logits = head(list(tv.backbone(x).values()))  # [B, A, K]
    scale = std / logits.std().item()
    head.cls_logits.weight.mul_(scale)
    head.cls_logits.bias.sub_(logits.mean()).mul_(scale).add_(mean)


def top_ops(fn: Callable[[], Any], count: int = 5) -> list[str]:
    """The ``count`` operators with the most self CPU time in one call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms ({100 * e.self_cpu_time_total / total:.0f}%"
        f", {e.count} calls)"
        for e in events[:count]
    ]


def stage_times(stages: Sequence[tuple[str, Callable[[], Any]]], repeats: int = 3) -> list[str]:
    """Median seconds of each stage (each stage called once untimed first)."""
    lines = []
    for name, fn in stages:
        fn()
        lines.append(f"{name}: {format_seconds(median([timed(fn)[0] for _ in range(repeats)]))}")
    return lines


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def train_row(tv: TVRetinaNet, detector: RetinaNet, batch: Batch, settings: Settings) -> Result:
    tv.train()
    detector.train()
    fdet_images = batch.images if detector.input_range == 255.0 else batch.images.float() / 255
    tv_images = list(batch.images.float() / 255)
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
    contenders = {"fdet": fdet_step, "torchvision": tv_step}
    times = interleaved(contenders, repeats=settings.repeats)
    notes = [f"first-step loss: fdet {first['fdet']:.4f}, torchvision {first['torchvision']:.4f}"]
    if settings.breakdown:
        notes += [f"top ops, {name}: " + "; ".join(top_ops(fn)) for name, fn in contenders.items()]
    return Result("", "", times, flops=flops, notes=notes)


def infer_row(tv: TVRetinaNet, detector: RetinaNet, images: Tensor, settings: Settings) -> Result:
    tv.eval()
    detector.eval()
    fdet_images = images if detector.input_range == 255.0 else images.float() / 255
    tv_images = list(images.float() / 255)
    sizes = torch.tensor([list(images.shape[-2:])] * images.shape[0])

    def fdet_predict() -> Any:
        return detector.predict(fdet_images, sizes)

    @torch.no_grad()
    def tv_predict() -> Any:
        return tv(tv_images)

    found = (int(fdet_predict().valid.sum()), sum(len(d["scores"]) for d in tv_predict()))
    flops = {"fdet": count_flops(fdet_predict), "torchvision": count_flops(tv_predict)}
    contenders = {"fdet": fdet_predict, "torchvision": tv_predict}
    times = interleaved(contenders, repeats=settings.repeats)
    with torch.no_grad():
        outputs = detector(fdet_images)
        above = [
            int((torch.sigmoid(level) > detector.postprocess_spec.score_threshold).sum())
            // images.shape[0]
            for level in outputs.cls_logits
        ]
        postprocess_s = median(
            [timed(lambda: detector.postprocess(outputs, sizes))[0] for _ in range(3)]
        )
    notes = [
        f"detections in the batch: fdet {found[0]}, torchvision {found[1]}",
        f"scores above the threshold an image, per level: {above}",
        f"of fdet's time, detector.postprocess: {format_seconds(postprocess_s)}",
    ]
    if settings.breakdown:
        notes += [f"top ops, {name}: " + "; ".join(top_ops(fn)) for name, fn in contenders.items()]
    return Result("", "", times, flops=flops, notes=notes)


def r50_level_sizes(size: int) -> tuple[tuple[int, int], ...]:
    return tuple((math.ceil(size / 2**lvl),) * 2 for lvl in range(3, 8))


def compile_cold(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Callable[[], Any], float]:
    """``torch.compile(fn, fullgraph=True)`` bound to ``args``, and the seconds of its first
    call, with inductor's caches off (a cold compile)."""
    compiled = torch.compile(fn, fullgraph=True)
    with inductor_config.patch(force_disable_caches=True):
        seconds, _ = timed(lambda: compiled(*args))
    return lambda: compiled(*args), seconds


def objective_row(settings: Settings) -> Result:
    batch, objects, size = settings.objective
    spec = r50_model()
    sizes = r50_level_sizes(size)
    counts = [h * w * spec.anchors.per_location for h, w in sizes]
    num_anchors, num_classes = sum(counts), spec.num_classes
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(batch, num_anchors, num_classes, generator=g) - 4.0
    deltas = 0.3 * torch.randn(batch, num_anchors, 4, generator=g)
    gt_boxes = random_boxes(batch, objects, size, g)
    gt_labels = torch.randint(0, num_classes, (batch, objects), generator=g)
    gt_valid = torch.ones(batch, objects, dtype=torch.bool)
    cls_levels, box_levels = tuple(logits.split(counts, 1)), tuple(deltas.split(counts, 1))

    def objective(
        cls_logits: Sequence[Tensor],
        box_deltas: Sequence[Tensor],
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_valid: Tensor,
    ) -> Tensor:
        outputs = RetinaHeadOutputs(tuple(cls_logits), tuple(box_deltas), sizes)
        anchors = retinanet_anchors(sizes, spec=spec.anchors, device=gt_boxes.device)
        terms = retinanet_loss(
            outputs,
            anchors,
            gt_boxes,
            gt_labels,
            gt_valid,
            None,
            assigner=spec.assigner,
            coder=spec.coder,
            cls_loss=spec.cls_loss,
            box_loss=spec.box_loss,
        )
        return total_loss(terms)

    args = (cls_levels, box_levels, gt_boxes, gt_labels, gt_valid)
    anchors = retinanet_anchors(sizes, spec=spec.anchors)
    tv, _ = r50_pair(size)
    head_outputs = {"cls_logits": logits, "bbox_regression": deltas}
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(gt_boxes, gt_labels)]

    def tv_objective() -> Tensor:
        return sum(tv.compute_loss(targets, head_outputs, [anchors] * batch).values())

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
        "fdet's time includes making the anchors (torchvision is handed them); no crowd boxes",
    ]
    if settings.breakdown:
        notes += objective_breakdown(spec, logits, anchors, gt_boxes, gt_labels, gt_valid)
        notes.append("top ops, torchvision: " + "; ".join(top_ops(tv_objective)))
    what = f"{batch} images × {objects} objects, {num_anchors} anchors, K={num_classes}"
    return Result("objective", what, times, compile_s=compile_s, notes=notes)


def objective_breakdown(
    spec: specs.RetinaNet,
    logits: Tensor,
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
) -> list[str]:
    """Eager seconds of the steps of ``retinanet_loss``'s classification term."""
    assignment = retinanet_assign(anchors, gt_boxes, gt_valid, None, assigner=spec.assigner)
    positive = assignment.label == POSITIVE
    counted = assignment.label != IGNORE
    labels = gt_labels.gather(1, assignment.gt_index)
    stages = [
        (
            "assignment (IoU [B, M, A], max, low-quality)",
            lambda: retinanet_assign(anchors, gt_boxes, gt_valid, None, assigner=spec.assigner),
        ),
        (
            "sigmoid_focal_loss_labels [B, A, K] + sum",
            lambda: sigmoid_focal_loss_labels(
                logits,
                labels,
                positive,
                valid=counted,
                alpha=spec.cls_loss.alpha,
                gamma=spec.cls_loss.gamma,
            ).sum(),
        ),
    ]
    return ["fdet eager stages: " + "; ".join(stage_times(stages))]


def postprocess_row(settings: Settings) -> Result:
    batch, size = settings.postprocess
    spec = r50_model()
    post = spec.postprocess
    sizes = r50_level_sizes(size)
    counts = [h * w * spec.anchors.per_location for h, w in sizes]
    num_anchors, num_classes = sum(counts), spec.num_classes
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(batch, num_anchors, num_classes, generator=g)
    deltas = 0.2 * torch.randn(batch, num_anchors, 4, generator=g)
    anchors = retinanet_anchors(sizes, spec=spec.anchors)
    cls_levels, box_levels = tuple(logits.split(counts, 1)), tuple(deltas.split(counts, 1))
    anchor_levels = tuple(anchors.split(counts))
    image_sizes = torch.tensor([[size, size]] * batch)
    above = [int((torch.sigmoid(x[0]) > post.score_threshold).sum()) for x in cls_levels]
    options = {
        "score_threshold": post.score_threshold,
        "topk_per_level": post.topk_per_level,
        "iou_threshold": post.nms_iou,
        "max_detections": post.max_detections,
    }

    def fdet_postprocess(
        cls_logits: Sequence[Tensor],
        box_deltas: Sequence[Tensor],
        anchors: Sequence[Tensor],
        image_sizes: Tensor,
    ) -> Any:
        return postprocess_dense(cls_logits, box_deltas, anchors, image_sizes, **options)

    tv, _ = r50_pair(size)
    tv_outputs = {"cls_logits": list(cls_levels), "bbox_regression": list(box_levels)}

    def tv_postprocess() -> Any:
        return tv.postprocess_detections(
            tv_outputs, [list(anchor_levels)] * batch, [(size, size)] * batch
        )

    args = (cls_levels, box_levels, anchor_levels, image_sizes)
    contenders: dict[str, Callable[[], Any]] = {
        "fdet eager": lambda: fdet_postprocess(*args),
        "torchvision": tv_postprocess,
    }
    compile_s = {}
    if settings.compile:
        contenders["fdet compiled"], compile_s["fdet compiled"] = compile_cold(
            fdet_postprocess, args
        )
    candidates = batch * sum(min(post.topk_per_level, c * num_classes) for c in counts)
    times = interleaved(contenders, repeats=settings.repeats)
    notes = [
        f"scores above the threshold per level (image 0): {above}",
        f"{post.topk_per_level} kept per level: {candidates} candidates into NMS",
    ]
    if settings.breakdown:
        notes += postprocess_breakdown(
            cls_levels, box_levels, anchors, image_sizes, post.topk_per_level, options
        )
        notes.append("top ops, torchvision: " + "; ".join(top_ops(tv_postprocess)))
    what = f"{batch} images, {num_anchors} anchors, K={num_classes}"
    return Result("postprocess", what, times, compile_s=compile_s, notes=notes)


def postprocess_breakdown(
    cls_levels: Sequence[Tensor],
    box_levels: Sequence[Tensor],
    anchors: Tensor,
    image_sizes: Tensor,
    k: int,
    options: dict[str, Any],
) -> list[str]:
    """Eager seconds of the steps of ``postprocess_dense``, and what NMS of the same
    candidates costs one image at a time."""
    threshold, iou = options["score_threshold"], options["iou_threshold"]

    def select() -> Any:
        scores = [torch.sigmoid(level) for level in cls_levels]
        return select_topk_per_level(scores, k=k, score_threshold=threshold)

    candidates = select()
    index = candidates.anchor_index

    def decode() -> Tensor:
        deltas = torch.cat(list(box_levels), 1).gather(1, index[..., None].expand(-1, -1, 4))
        return clip_boxes(decode_deltas(anchors[index], deltas), image_sizes)

    boxes = decode()
    scores, labels, valid = candidates.scores, candidates.labels, candidates.valid
    keep = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=iou)

    def per_image_nms() -> list[Tensor]:
        return [
            torchvision.ops.batched_nms(b[v], s[v], lab[v], iou)
            for b, s, lab, v in zip(boxes, scores, labels, valid)
        ]

    stages = [
        ("sigmoid + select_topk_per_level", select),
        ("gather + decode + clip", decode),
        (
            f"nms_keep_mask ({scores.numel()} candidates, valid ones grouped by image and class)",
            lambda: nms_keep_mask(boxes, scores, labels, valid, iou_threshold=iou),
        ),
        (
            "top_detections",
            lambda: top_detections(
                boxes, scores, labels, keep, max_detections=options["max_detections"]
            ),
        ),
        ("for comparison, torchvision.ops.batched_nms image by image", per_image_nms),
    ]
    return ["fdet eager stages: " + "; ".join(stage_times(stages))]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def select_rows(arg: str | None) -> list[str]:
    if not arg:
        return list(ROW_NAMES)
    chosen = []
    for token in (t.strip() for t in arg.split(",") if t.strip()):
        hits = [r for r in ROW_NAMES if r == token or r.startswith(token + "-")]
        if not hits:
            raise SystemExit(f"--rows: unknown row {token!r}; rows are {', '.join(ROW_NAMES)}")
        chosen += [h for h in hits if h not in chosen]
    return [r for r in ROW_NAMES if r in chosen]


def run_row(name: str, settings: Settings) -> Result:
    g = torch.Generator().manual_seed(0)
    if name in ("train-r50", "infer-r50"):
        batch, size = settings.r50
        tv, detector = r50_pair(size)
        images = random_images(batch, size, g)
        if name == "train-r50":
            result = train_row(tv, detector, random_batch(images, 80, g), settings)
        else:
            calibrate_scores(tv, images, mean=-5.0, std=1.0)
            result = infer_row(tv, load_torchvision(tv), images, settings)
        result.what = f"R50-FPN, {batch} × {size}²"
    elif name in ("train-r18", "infer-r18"):
        batch, size = settings.r18
        tv, detector, differences = shapes_pair(size)
        images = random_images(batch, size, g)
        if name == "train-r18":
            result = train_row(tv, detector, random_batch(images, 6, g), settings)
        else:
            calibrate_scores(tv, images, mean=-5.0, std=1.0)
            detector.load_state_dict(state_dict_from_torchvision(tv.state_dict()))
            result = infer_row(tv, detector, images, settings)
        result.what = f"shapes R18-FPN, {batch} × {size}²"
        result.notes += [f"spec, fdet's vs torchvision's: {d}" for d in differences]
    elif name == "objective":
        result = objective_row(settings)
    elif name == "postprocess":
        result = postprocess_row(settings)
    else:
        raise ValueError(name)
    result.name = name
    return result


def print_result(result: Result) -> None:
    print(f"\n## {result.name}: {result.what}")
    for contender, runs in result.times.items():
        cells = " ".join(format_seconds(t) for t in runs)
        extra = ""
        if contender in result.compile_s:
            extra = f"  (cold compile, first call: {format_seconds(result.compile_s[contender])})"
        print(f"  {contender:<14} {format_seconds(median(runs)):>8}   runs: {cells}{extra}")
    for side, flops in result.flops.items():
        print(f"  {side:<14} {flops / 1e9:.1f} GFLOP a call (floors: see the summary)")
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
                cells += [
                    f"{r.flops['fdet'] / 1e9:.0f}",
                    format_seconds(floor),
                    f"{t / floor:.2f}",
                    f"{tv / (r.flops['torchvision'] / rate):.2f}",
                ]
            else:
                cells += ["–"] * 4
            rows.append(cells)
    header = ["row", "", "fdet", "torchvision", "tv/fdet", "GFLOP", "floor", "fdet/floor"]
    return table([*header, "tv/floor"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, 1 repeat")
    parser.add_argument("--rows", help=f"comma-separated names or prefixes: {', '.join(ROW_NAMES)}")
    parser.add_argument("--repeats", type=int, help="timed calls a contender (5; quick: 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time the steps and print the top ops"
    )
    args = parser.parse_args()

    settings = QUICK if args.quick else FULL
    if args.repeats:
        settings = replace(settings, repeats=args.repeats)
    settings = replace(settings, compile=not args.no_compile, breakdown=args.breakdown)
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
        result = run_row(name, settings)
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
        f"floor = FLOPs / {rate / 1e9:.0f} GFLOP/s (the best rate seen: the machine's attainable "
        "rate; sharing the CPU only lowers it). tv/fdet > 1: fdet is faster."
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
