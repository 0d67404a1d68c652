"""Statistics of a COCO annotation set, and how well a detector's priors cover its boxes.

:func:`data_statistics` counts what a detector will be asked to learn: instances a class, objects
an image, box widths, heights, areas and aspect ratios; :func:`plot_data_statistics` draws them.
:func:`prior_coverage` asks, for an anchor-based detector, whether every ground-truth box has an
anchor that its assigner would label positive: a box whose best IoU with any anchor stays below
the assigner's positive threshold is learned only through a low-quality match, or not at all.
For FCOS it counts the points the assigner makes positive for each box; a box without any is
never learned. For ATSS and GFL it runs their assigner on the boxes and counts each box's
positive anchors; for CenterNet it finds each box's centre cell and the boxes that lose their
size and offset targets to another box centred in the same cell.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "AREA_RANGES",
    "ASPECT_EDGES",
    "SIZE_EDGES",
    "AdaptiveCoverage",
    "CentreCoverage",
    "DataStats",
    "Histogram",
    "PointCoverage",
    "PriorCoverage",
    "centre_map_size",
    "data_statistics",
    "feature_sizes",
    "plot_data_statistics",
    "prior_coverage",
]

SIZE_EDGES: tuple[float, ...] = (0.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, math.inf)
"""Bin edges (pixels) of the width, height and √area histograms: ``[lo, hi)``."""

ASPECT_EDGES: tuple[float, ...] = (0.0, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0, math.inf)
"""Bin edges of the aspect-ratio (height / width) histogram: ``[lo, hi)``."""

AREA_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, math.inf),
}
"""COCO's area ranges, on the annotation's ``area`` field as COCO evaluation reads it."""


class Histogram(NamedTuple):
    """``counts[i]`` values fell in ``[edges[i], edges[i + 1])``."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]


def _histogram(values: np.ndarray, edges: Sequence[float]) -> Histogram:
    bins = len(edges) - 1
    index = np.searchsorted(np.asarray(edges), values, side="right") - 1  # bin of each value
    counts = np.bincount(np.clip(index, 0, bins - 1), minlength=bins)
    return Histogram(tuple(float(e) for e in edges), tuple(int(c) for c in counts))


@attrs.frozen(kw_only=True)
class DataStats:
    """What :func:`data_statistics` measured. Crowd annotations (``iscrowd=1``) are counted in
    ``num_crowd`` and nowhere else; every other field is about the ordinary instances.

    - ``class_counts`` / ``class_images``: instances of each category, and images holding one,
      for every category of the set (zero where it has none), keyed by category id.
    - ``objects_per_image``: per image (in the file's order), its number of instances;
      ``objects_histogram[k]``: how many images hold exactly ``k``.
    - ``widths``, ``heights`` (pixels, from ``bbox``), ``areas`` (the ``area`` field, as COCO
      evaluation uses it): one value an instance, in annotation order.
    - ``num_degenerate``: instances with a zero width or height; they have no aspect ratio and
      are left out of ``aspect_histogram``.
    - ``area_counts``: instances in COCO's small / medium / large ranges (:data:`AREA_RANGES`).
    """

    num_images: int
    num_annotations: int
    num_crowd: int
    num_degenerate: int
    category_names: dict[int, str]
    class_counts: dict[int, int]
    class_images: dict[int, int]
    objects_per_image: tuple[int, ...]
    objects_histogram: tuple[int, ...]
    widths: np.ndarray = attrs.field(eq=False)
    heights: np.ndarray = attrs.field(eq=False)
    areas: np.ndarray = attrs.field(eq=False)
    width_histogram: Histogram
    height_histogram: Histogram
    sqrt_area_histogram: Histogram
    aspect_histogram: Histogram
    area_counts: dict[str, int]

    @property
    def num_instances(self) -> int:
        """Ordinary (non-crowd) annotations."""
        return self.num_annotations - self.num_crowd


def _dataset(coco_gt: Any) -> Mapping[str, Any]:
    if hasattr(coco_gt, "dataset"):  # pycocotools or faster_coco_eval COCO
        return coco_gt.dataset
    if isinstance(coco_gt, Mapping):
        return coco_gt
    path = Path(coco_gt)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON annotation file ({e})") from None


def data_statistics(coco_gt: Any) -> DataStats:
    """Statistics of a COCO annotation set (:class:`DataStats`).

    ``coco_gt``: a ``pycocotools`` / ``faster_coco_eval`` ``COCO``, the annotation dict, or the
    path of an annotation file. An annotation naming an image or category the set does not
    list, or with a negative width or height, is a ``ValueError`` naming its id.
    """
    data = _dataset(coco_gt)
    images = data.get("images")
    categories = data.get("categories")
    annotations = data.get("annotations", [])
    if images is None or categories is None:
        raise ValueError("the annotation set has no 'images' or no 'categories' list")
    image_ids = [int(img["id"]) for img in images]
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    per_image = dict.fromkeys(image_ids, 0)
    class_counts = dict.fromkeys(sorted(names), 0)
    class_image_sets: dict[int, set[int]] = {c: set() for c in class_counts}
    widths, heights, areas = [], [], []
    num_crowd = 0
    for i, ann in enumerate(annotations):
        where = f"annotation {ann.get('id', f'#{i}')}"
        image_id, cat = int(ann["image_id"]), int(ann["category_id"])
        if image_id not in per_image:
            raise ValueError(f"{where}: image_id {image_id} is not in the set's images")
        if cat not in names:
            raise ValueError(f"{where}: category_id {cat} is not in the set's categories")
        if ann.get("iscrowd", 0):
            num_crowd += 1
            continue
        _, _, w, h = (float(v) for v in ann["bbox"])
        if w < 0 or h < 0:
            raise ValueError(f"{where}: bbox has a negative width or height ({ann['bbox']})")
        per_image[image_id] += 1
        class_counts[cat] += 1
        class_image_sets[cat].add(image_id)
        widths.append(w)
        heights.append(h)
        areas.append(float(ann["area"]) if "area" in ann else w * h)
    ws, hs, ar = (np.asarray(v, dtype=np.float64) for v in (widths, heights, areas))
    objects = tuple(per_image[i] for i in image_ids)
    nonzero = (ws > 0) & (hs > 0)
    area_counts = {
        name: int(((ar >= lo) & (ar < hi)).sum()) for name, (lo, hi) in AREA_RANGES.items()
    }
    return DataStats(
        num_images=len(image_ids),
        num_annotations=len(annotations),
        num_crowd=num_crowd,
        num_degenerate=int((~nonzero).sum()),
        category_names=names,
        class_counts=class_counts,
        class_images={c: len(s) for c, s in class_image_sets.items()},
        objects_per_image=objects,
        objects_histogram=tuple(int(c) for c in np.bincount(np.asarray(objects, dtype=np.int64)))
        if objects
        else (),
        widths=ws,
        heights=hs,
        areas=ar,
        width_histogram=_histogram(ws, SIZE_EDGES),
        height_histogram=_histogram(hs, SIZE_EDGES),
        sqrt_area_histogram=_histogram(np.sqrt(ws * hs), SIZE_EDGES),
        aspect_histogram=_histogram(hs[nonzero] / ws[nonzero], ASPECT_EDGES),
        area_counts=area_counts,
    )


# --- plots ----------------------------------------------------------------------------------------


def _edge_label(lo: float, hi: float) -> str:
    def fmt(v: float) -> str:
        if math.isinf(v):
            return "∞"
        return f"1/{round(1 / v)}" if 0 < v < 1 else f"{v:g}"

    return f"{fmt(lo)}–{fmt(hi)}"


def _bars(ax: Any, hist: Histogram, title: str) -> None:
    labels = [_edge_label(lo, hi) for lo, hi in zip(hist.edges[:-1], hist.edges[1:])]
    ax.bar(range(len(hist.counts)), hist.counts, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel("instances")


def plot_data_statistics(stats: DataStats, out_dir: str | Path) -> list[Path]:
    """Write PNGs of ``stats`` to ``out_dir`` (created if missing) and return their paths:
    ``class_counts.png`` (instances a class), ``objects_per_image.png``, ``box_sizes.png``
    (width, height, √area histograms) and ``aspect_ratios.png``."""
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=100)
        paths.append(path)

    ids = list(stats.class_counts)
    fig = Figure(figsize=(max(4.0, 0.4 * len(ids) + 2), 3.5))
    ax = fig.subplots()
    ax.bar(range(len(ids)), [stats.class_counts[c] for c in ids], color="tab:blue")
    ax.set_xticks(range(len(ids)), [stats.category_names[c] for c in ids], rotation=45, ha="right")
    ax.set_ylabel("instances")
    ax.set_title(f"instances a class ({stats.num_instances}, {stats.num_crowd} crowd)")
    save(fig, "class_counts.png")

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.bar(range(len(stats.objects_histogram)), stats.objects_histogram, color="tab:blue")
    ax.set_xlabel("objects in the image")
    ax.set_ylabel("images")
    ax.set_title(f"objects an image ({stats.num_images} images)")
    save(fig, "objects_per_image.png")

    fig = Figure(figsize=(12, 3.5))
    axes = fig.subplots(1, 3)
    _bars(axes[0], stats.width_histogram, "box width (px)")
    _bars(axes[1], stats.height_histogram, "box height (px)")
    _bars(axes[2], stats.sqrt_area_histogram, "√(width · height) (px)")
    save(fig, "box_sizes.png")

    fig = Figure(figsize=(5, 3.5))
    _bars(fig.subplots(), stats.aspect_histogram, "aspect ratio (height / width)")
    save(fig, "aspect_ratios.png")
    return paths


# --- anchor coverage ------------------------------------------------------------------------------


class PriorCoverage(NamedTuple):
    """How the anchors of a detector meet a set of boxes (:func:`prior_coverage`).

    - ``best_iou[N]``: each box's largest IoU with any anchor; ``best_anchor[N]``: that anchor's
      index in the flattened grid, ``best_level[N]``: its pyramid level (0 = the first).
    - ``reached[N]``: ``best_iou >= pos_iou``, the box has an anchor the assigner labels
      positive by IoU alone.
    - ``low_quality_only[N]``: not reached, but the assigner's low-quality matching still
      gives it its best anchor (``low_quality_matches`` and ``best_iou > min_low_quality_iou``).
    - ``pos_iou``: the assigner's positive threshold; ``num_anchors``: anchors in the grid.
    """

    best_iou: Float[Tensor, " N"]
    best_anchor: Int[Tensor, " N"]
    best_level: Int[Tensor, " N"]
    reached: Bool[Tensor, " N"]
    low_quality_only: Bool[Tensor, " N"]
    pos_iou: float
    num_anchors: int

    @property
    def num_missed(self) -> int:
        """Boxes no anchor reaches at ``pos_iou``."""
        return int((~self.reached).sum())

    @property
    def missed(self) -> Int[Tensor, " K"]:
        """Indices of the boxes no anchor reaches at ``pos_iou``."""
        return torch.nonzero(~self.reached).flatten()


class PointCoverage(NamedTuple):
    """How the points of an FCOS detector meet a set of boxes (:func:`prior_coverage`), each
    box taken alone (no other box competes for its points).

    - ``num_positive[N]``: points the assigner makes positive for the box: inside it, within
      the center-sampling radius of its centre, on a level whose regression range holds it;
    - ``best_level[N]``: the level with most of them (0 = the first; 0 where there are none);
    - ``reached[N]``: ``num_positive > 0``; a box no point reaches is never learned;
    - ``num_points``: points in the grid.
    """

    num_positive: Int[Tensor, " N"]
    best_level: Int[Tensor, " N"]
    reached: Bool[Tensor, " N"]
    num_points: int

    @property
    def num_missed(self) -> int:
        """Boxes without a positive point."""
        return int((~self.reached).sum())

    @property
    def missed(self) -> Int[Tensor, " K"]:
        """Indices of the boxes without a positive point."""
        return torch.nonzero(~self.reached).flatten()


class AdaptiveCoverage(NamedTuple):
    """How the anchors of an ATSS or GFL detector meet a set of boxes (:func:`prior_coverage`):
    the detector's own assigner (:func:`fdet.models.detectors.atss.atss_assign`) run on the
    boxes, those of one image together (they compete for anchors, as in training).

    - ``num_positive[N]``: anchors the assigner makes positive for the box;
    - ``best_iou[N]``: the box's largest IoU with any anchor;
    - ``best_level[N]``: the level with most of its positives (0 = the first; 0 where none);
    - ``reached[N]``: ``num_positive > 0``; a box without a positive is never learned (ATSS has
      no fallback: its adaptive threshold, mean + std of the IoUs of its candidates, may stand
      above all of them, its candidates' centres may lie outside it, or a box that overlaps
      them more may take them);
    - ``num_anchors``: anchors in the grid.

    The assigner does not report the adaptive thresholds, so they are not given here.
    """

    num_positive: Int[Tensor, " N"]
    best_iou: Float[Tensor, " N"]
    best_level: Int[Tensor, " N"]
    reached: Bool[Tensor, " N"]
    num_anchors: int

    @property
    def num_missed(self) -> int:
        """Boxes without a positive anchor."""
        return int((~self.reached).sum())

    @property
    def missed(self) -> Int[Tensor, " K"]:
        """Indices of the boxes without a positive anchor."""
        return torch.nonzero(~self.reached).flatten()


class CentreCoverage(NamedTuple):
    """How a CenterNet detector's output grid meets a set of boxes (:func:`prior_coverage`),
    from its own target function (:func:`fdet.models.detectors.centernet.centernet_targets`),
    the boxes of one image together.

    A box is trained at the cell of its centre on the stride-``stride`` output map: a heatmap
    peak on its class's channel, and a size and an offset target at that cell.

    - ``cell[N, 2]``: ``(row, column)`` of the centre cell (of the box clipped to the map);
    - ``is_object[N]``: the box is an object at all: after clipping to the map it has a positive
      width and height (False: no peak, no size, no offset);
    - ``regressed[N]``: its size and offset are trained. One size and one offset fit in a
      cell: of the objects centred in one cell (of any class) the smallest box by area wins it,
      the lowest index between equal areas; the others keep their heatmap peak but get no size
      or offset target, so their box is never learned;
    - ``shares_peak[N]``: another object of the same class is centred in the same cell: their
      class heatmap has one peak there for both, so at most one of them can be detected;
    - ``below_cell[N]``: the box is narrower or shorter than one cell (``stride`` pixels);
    - ``stride``, ``map_size``: the output stride and the ``(H, W)`` of the map.
    """

    cell: Int[Tensor, "N 2"]
    is_object: Bool[Tensor, " N"]
    regressed: Bool[Tensor, " N"]
    shares_peak: Bool[Tensor, " N"]
    below_cell: Bool[Tensor, " N"]
    stride: int
    map_size: tuple[int, int]

    @property
    def reached(self) -> Bool[Tensor, " N"]:
        """Objects with their own peak and their own size and offset targets."""
        return self.is_object & self.regressed & ~self.shares_peak

    @property
    def num_missed(self) -> int:
        """Boxes not :attr:`reached`: no object, or a cell lost to another box."""
        return int((~self.reached).sum())

    @property
    def missed(self) -> Int[Tensor, " K"]:
        """Indices of the boxes not :attr:`reached`."""
        return torch.nonzero(~self.reached).flatten()


def feature_sizes(image_size: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """``(⌈H / s⌉, ⌈W / s⌉)`` for each stride: the map sizes stride-2 convs with padding
    (ResNet, FPN's extra levels) give on a ``(H, W)`` input."""
    h, w = image_size
    return [(-(-h // s), -(-w // s)) for s in strides]


def _anchor_parts(model_spec: Any) -> tuple[Any, Any]:
    from fdet import specs

    for owner in (model_spec, getattr(model_spec, "rpn", None)):
        anchors = getattr(owner, "anchors", None)
        assigner = getattr(owner, "assigner", None)
        if isinstance(anchors, specs.Anchors) and isinstance(assigner, specs.MaxIoUAssigner):
            return anchors, assigner
    raise ValueError(
        f"prior coverage does not cover {type(model_spec).__name__}: it measures anchors against "
        "a max-IoU or ATSS assigner, FCOS points and CenterNet centres"
    )


def _boxes(boxes: Any) -> Tensor:
    gt = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    if not torch.isfinite(gt).all():
        raise ValueError("boxes: not all finite")
    flipped = ((gt[:, 2:] - gt[:, :2]) < 0).any(dim=1)
    if flipped.any():
        bad = int(torch.nonzero(flipped)[0])
        raise ValueError(f"boxes[{bad}]: x2 < x1 or y2 < y1 ({gt[bad].tolist()}); expected xyxy")
    return gt


def prior_coverage(
    model_spec: Any,
    boxes: Float[Tensor, "N 4"] | np.ndarray | Sequence[Sequence[float]],
    image_size: tuple[int, int],
    *,
    labels: Int[Tensor, " N"] | np.ndarray | Sequence[int] | None = None,
    image_index: Int[Tensor, " N"] | np.ndarray | Sequence[int] | None = None,
    chunk: int = 256,
) -> PriorCoverage | PointCoverage | AdaptiveCoverage | CentreCoverage:
    """How the priors of ``model_spec`` on a ``(H, W)`` input meet each box.

    - Anchors (:class:`PriorCoverage`): a detector spec with ``anchors`` and a max-IoU
      ``assigner`` (RetinaNet), or with an ``rpn`` that has them (Faster / Mask / Cascade
      R-CNN: the RPN's anchors and its 0.7 threshold). The best IoU of each box with any anchor
      against the assigner's ``pos_iou``. The anchors are the detector's own
      (:func:`fdet.models.detectors.retinanet.retinanet_anchors`).
    - Points (:class:`PointCoverage`): an FCOS spec (``points`` and an FCOS ``assigner``).
      The points the assigner makes positive for each box on its own
      (:func:`fdet.models.detectors.fcos.fcos_assign`).
    - Adaptive anchors (:class:`AdaptiveCoverage`): an ATSS or GFL spec. Its anchors and ATSS
      assigner (:func:`fdet.models.detectors.atss.atss_assign`, as both train) on the boxes,
      the positive anchors of each box counted.
    - Centres (:class:`CentreCoverage`): a CenterNet spec. Its target function
      (:func:`fdet.models.detectors.centernet.centernet_targets`) on the boxes: each box's
      centre cell, and the boxes that lose it to another.

    ``boxes``: ``[N, 4]`` xyxy in the pixels of the network input, i.e. after the resize the
    transforms apply. ``image_size``: the padded input size; map sizes follow
    :func:`feature_sizes`. ``labels``: ``[N]`` classes in ``[0, num_classes)``, used by
    CenterNet (same-class boxes share a heatmap); None: all class 0. ``image_index``: ``[N]``
    the image each box is in; ATSS, GFL and CenterNet assign the boxes of one image together,
    as training does (boxes compete for anchors and cells); None: all boxes are one image. The
    max-IoU and FCOS measures take each box alone and ignore both. ``chunk`` boxes (or images
    of boxes) are compared at a time, to bound memory.
    """
    from fdet import specs

    gt = _boxes(boxes)
    if isinstance(model_spec, specs.FCOS):
        return _point_coverage(model_spec, gt, image_size, chunk)
    if isinstance(model_spec, (specs.ATSS, specs.GFL)):
        groups = _groups(image_index, len(gt))
        return _adaptive_coverage(model_spec, gt, image_size, groups, chunk)
    if isinstance(model_spec, specs.CenterNet):
        groups = _groups(image_index, len(gt))
        return _centre_coverage(
            model_spec, gt, image_size, _labels(labels, model_spec, len(gt)), groups, chunk
        )
    from fdet.models.detectors.retinanet import retinanet_anchors
    from fdet.ops.anchors import level_index
    from fdet.ops.boxes import box_iou

    anchor_spec, assigner = _anchor_parts(model_spec)
    sizes = feature_sizes(image_size, anchor_spec.strides)
    anchors = retinanet_anchors(
        sizes, spec=anchor_spec, image_size=(int(image_size[0]), int(image_size[1]))
    )  # [A, 4]
    levels = level_index(sizes, anchor_spec.per_location)  # [A]
    best_iou = torch.zeros(len(gt))
    best_anchor = torch.zeros(len(gt), dtype=torch.int64)
    for start in range(0, len(gt), chunk):
        iou = box_iou(gt[start : start + chunk], anchors)  # [n, A]
        best_iou[start : start + chunk], best_anchor[start : start + chunk] = iou.max(dim=1)
    reached = best_iou >= assigner.pos_iou
    low_quality = ~reached & (best_iou > assigner.min_low_quality_iou)
    if not assigner.low_quality_matches:
        low_quality = torch.zeros_like(reached)
    return PriorCoverage(
        best_iou=best_iou,
        best_anchor=best_anchor,
        best_level=levels[best_anchor],
        reached=reached,
        low_quality_only=low_quality,
        pos_iou=float(assigner.pos_iou),
        num_anchors=len(anchors),
    )


def _point_coverage(
    model_spec: Any, gt: Tensor, image_size: tuple[int, int], chunk: int
) -> PointCoverage:
    from fdet.models.detectors.fcos import fcos_assign, fcos_points
    from fdet.ops.assign import POSITIVE

    sizes = feature_sizes(image_size, model_spec.points.strides)
    grid = fcos_points(
        sizes, spec=model_spec.points, image_size=(int(image_size[0]), int(image_size[1]))
    )
    num_levels = len(sizes)
    num_positive = torch.zeros(len(gt), dtype=torch.int64)
    best_level = torch.zeros(len(gt), dtype=torch.int64)
    for start in range(0, len(gt), chunk):
        part = gt[start : start + chunk, None, :]  # [n, 1, 4]: each box its own image
        valid = torch.ones(part.shape[:2], dtype=torch.bool)  # [n, 1]
        positive = fcos_assign(grid, part, valid, assigner=model_spec.assigner).label == POSITIVE
        per_level = torch.zeros(len(part), num_levels, dtype=torch.int64)  # [n, L]
        per_level.index_add_(1, grid.levels, positive.long())
        num_positive[start : start + chunk] = per_level.sum(dim=1)
        best_level[start : start + chunk] = per_level.argmax(dim=1)
    return PointCoverage(
        num_positive=num_positive,
        best_level=best_level,
        reached=num_positive > 0,
        num_points=len(grid.points),
    )


def _groups(image_index: Any, n: int) -> tuple[Tensor, Tensor, int, int]:
    """Image ``g[N]`` (0 … G-1) and slot ``m[N]`` within it of each box, ``G`` and the most
    boxes an image ``M``."""
    if image_index is None:
        ids = np.zeros(n, dtype=np.int64)
    else:
        ids = np.asarray(image_index).reshape(-1)
        if len(ids) != n:
            raise ValueError(f"image_index: {len(ids)} entries for {n} boxes")
    _, group = np.unique(ids, return_inverse=True)
    group = group.reshape(-1).astype(np.int64)
    slot = np.zeros(n, dtype=np.int64)
    seen: dict[int, int] = {}
    for i, g in enumerate(group.tolist()):  # a loop over boxes, on the host
        slot[i] = seen.get(g, 0)
        seen[g] = slot[i] + 1
    num_groups = int(group.max()) + 1 if n else 0
    return (
        torch.from_numpy(group),
        torch.from_numpy(slot),
        num_groups,
        max(seen.values(), default=0),
    )


def _padded(values: Tensor, groups: tuple[Tensor, Tensor, int, int], fill: float = 0.0) -> Tensor:
    group, slot, num_groups, most = groups
    out = values.new_full((num_groups, max(most, 1), *values.shape[1:]), fill)
    out[group, slot] = values
    return out


def _labels(labels: Any, model_spec: Any, n: int) -> Tensor:
    if labels is None:
        return torch.zeros(n, dtype=torch.int64)
    out = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)
    if len(out) != n:
        raise ValueError(f"labels: {len(out)} entries for {n} boxes")
    bad = (out < 0) | (out >= model_spec.num_classes)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"labels[{i}]: {int(out[i])} is not a class in [0, {model_spec.num_classes})"
        )
    return out


def _group_chunks(groups: tuple[Tensor, Tensor, int, int], chunk: int) -> list[slice]:
    _, _, num_groups, most = groups
    step = max(1, chunk // max(most, 1))
    return [slice(start, start + step) for start in range(0, num_groups, step)]


def _adaptive_coverage(
    model_spec: Any,
    gt: Tensor,
    image_size: tuple[int, int],
    groups: tuple[Tensor, Tensor, int, int],
    chunk: int,
) -> AdaptiveCoverage:
    from fdet.models.detectors.atss import atss_assign
    from fdet.models.detectors.retinanet import retinanet_anchors
    from fdet.ops.anchors import level_counts, level_index
    from fdet.ops.assign import POSITIVE
    from fdet.ops.boxes import box_iou

    anchor_spec = model_spec.anchors
    sizes = feature_sizes(image_size, anchor_spec.strides)
    anchors = retinanet_anchors(
        sizes, spec=anchor_spec, image_size=(int(image_size[0]), int(image_size[1]))
    )  # [A, 4]
    levels = level_index(sizes, anchor_spec.per_location)  # [A]
    num_per_level = level_counts(sizes, anchor_spec.per_location)
    num_levels = len(sizes)
    group, slot, num_groups, most = groups
    boxes = _padded(gt, groups)  # [G, M, 4]
    valid = _padded(torch.ones(len(gt), dtype=torch.bool), groups, False)  # [G, M]
    per_level = torch.zeros(num_groups, max(most, 1) * num_levels, dtype=torch.int64)  # [G, M·L]
    for part in _group_chunks(groups, chunk):
        assignment = atss_assign(
            anchors, num_per_level, boxes[part], valid[part], assigner=model_spec.assigner
        )
        positive = (assignment.label == POSITIVE).long()  # [g, A]
        key = assignment.gt_index * num_levels + levels  # [g, A]
        per_level[part].scatter_add_(1, key, positive)
    counts = per_level.view(num_groups, max(most, 1), num_levels)[group, slot]  # [N, L]
    best_iou = torch.zeros(len(gt))
    for start in range(0, len(gt), chunk):
        best_iou[start : start + chunk] = box_iou(gt[start : start + chunk], anchors).amax(dim=1)
    num_positive = counts.sum(dim=1)
    return AdaptiveCoverage(
        num_positive=num_positive,
        best_iou=best_iou,
        best_level=counts.argmax(dim=1) if len(gt) else group.clone(),
        reached=num_positive > 0,
        num_anchors=len(anchors),
    )


def centre_map_size(model_spec: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` of a CenterNet's output map on a ``(H, W)`` input: the backbone map
    ``C{in_level}`` (:func:`feature_sizes`) doubled once per up-sampling stage."""
    neck = model_spec.neck
    ((h, w),) = feature_sizes(image_size, [2**neck.in_level])
    up = 2 ** len(neck.channels)
    return h * up, w * up


def _centre_coverage(
    model_spec: Any,
    gt: Tensor,
    image_size: tuple[int, int],
    labels: Tensor,
    groups: tuple[Tensor, Tensor, int, int],
    chunk: int,
) -> CentreCoverage:
    from fdet.models.detectors.centernet import centernet_targets

    stride = int(model_spec.stride)
    height, width = centre_map_size(model_spec, image_size)
    group, slot, num_groups, most = groups
    boxes = _padded(gt, groups)  # [G, M, 4]
    padded_labels = _padded(labels, groups)  # [G, M]
    valid = _padded(torch.ones(len(gt), dtype=torch.bool), groups, False)  # [G, M]
    index = torch.zeros(num_groups, max(most, 1), dtype=torch.int64)
    objects = torch.zeros(num_groups, max(most, 1), dtype=torch.bool)
    regress = torch.zeros_like(objects)
    for part in _group_chunks(groups, chunk):
        targets = centernet_targets(
            boxes[part],
            padded_labels[part],
            valid[part],
            num_classes=model_spec.num_classes,
            size=(height, width),
            stride=stride,
            radius=model_spec.radius,
        )
        index[part], objects[part], regress[part] = (
            targets.centre_index,
            targets.objects,
            targets.regress,
        )
    cell_index = index[group, slot]  # [N]
    is_object = objects[group, slot]  # [N]
    # objects of one image and class centred in one cell: same key, counted over objects
    key = torch.stack((group, labels, cell_index), dim=1)[is_object]  # [n, 3]
    _, inverse, counts = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
    shares_peak = torch.zeros(len(gt), dtype=torch.bool)
    shares_peak[is_object] = counts[inverse] > 1
    wh = gt[:, 2:] - gt[:, :2]  # [N, 2]
    return CentreCoverage(
        cell=torch.stack((cell_index // width, cell_index % width), dim=1),
        is_object=is_object,
        regressed=regress[group, slot],
        shares_peak=shares_peak,
        below_cell=(wh < stride).any(dim=1),
        stride=stride,
        map_size=(height, width),
    )
