"""COCO-style evaluation: detections to COCO results, the 12 standard metrics, per-class AP.

Two backends compute the same numbers (see ``docs/evaluation.md``):

- ``"faster"``: ``faster_coco_eval.COCOeval_faster``, matching and accumulation in C++;
- ``"pycocotools"``: the reference ``pycocotools.cocoeval.COCOeval``.

Both print progress to stdout or to a logger; :func:`evaluate_coco` silences them and returns a
:class:`CocoMetrics`; :func:`format_table` formats it for people.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import pycocotools.mask as mask_utils
import torch
from jaxtyping import Bool, Float, Int
from pycocotools.coco import COCO
from torch import Tensor

from fdet.ops.masks import paste_masks
from fdet.ops.postprocess import Detections

__all__ = [
    "IOU_TYPES",
    "STAT_NAMES",
    "Backend",
    "CocoMetrics",
    "detections_to_coco",
    "encode_masks",
    "evaluate_coco",
    "evaluate_coco_types",
    "format_table",
    "has_segmentations",
    "masks_to_original",
]

Backend = Literal["faster", "pycocotools"]
IouType = Literal["bbox", "segm"]
IOU_TYPES: tuple[IouType, ...] = ("bbox", "segm")
"""The kinds of COCO evaluation, in the order they are reported: boxes, then masks."""

STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)

# (IoU, area, max detections) of each stat, in STAT_NAMES order: for tables.
_STAT_SETTINGS: tuple[tuple[str, str, int], ...] = (
    ("0.50:0.95", "all", 100),
    ("0.50", "all", 100),
    ("0.75", "all", 100),
    ("0.50:0.95", "small", 100),
    ("0.50:0.95", "medium", 100),
    ("0.50:0.95", "large", 100),
    ("0.50:0.95", "all", 1),
    ("0.50:0.95", "all", 10),
    ("0.50:0.95", "all", 100),
    ("0.50:0.95", "small", 100),
    ("0.50:0.95", "medium", 100),
    ("0.50:0.95", "large", 100),
)

UNDEFINED = -1.0
"""The value of a stat with no ground truth in its range (COCO's convention)."""


def masks_to_original(
    masks: Bool[Tensor, "D H W"],
    scale: tuple[float, float] | Sequence[float],
    orig_size: tuple[int, int] | Sequence[int],
) -> Bool[Tensor, "D h w"]:
    """Masks over the network input mapped back to the original image of ``orig_size``
    (height, width): original pixel ``(i, j)`` takes the input pixel under its centre,
    ``(⌊(i + ½)·s_y⌋, ⌊(j + ½)·s_x⌋)`` (clamped to the input), with ``scale = (s_y, s_x)``
    the factor from the original image to the input (``Batch.scales``). The padding of the
    input is cut off; at scale 1 this is a crop. The nearest pixel rather than an
    interpolation: the masks are binary already, and a pixel keeps the value it was pasted
    with."""
    sy, sx = float(scale[0]), float(scale[1])
    h, w = int(orig_size[0]), int(orig_size[1])
    height, width = masks.shape[-2:]
    device = masks.device
    rows = ((torch.arange(h, device=device, dtype=torch.float64) + 0.5) * sy).floor().long()
    cols = ((torch.arange(w, device=device, dtype=torch.float64) + 0.5) * sx).floor().long()
    rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
    return masks[:, rows][:, :, cols]  # [D, h, w]


def encode_masks(masks: Bool[Tensor, "D h w"] | np.ndarray) -> list[dict[str, Any]]:
    """COCO compressed RLEs of binary masks ``[D, h, w]``: ``{"size": [h, w], "counts": str}``
    each (the counts as text, so the records are JSON), as pycocotools encodes them."""
    array = masks.cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if array.shape[0] == 0:
        return []
    fortran = np.asfortranarray(array.astype(np.uint8).transpose(1, 2, 0))  # [h, w, D]
    rles = mask_utils.encode(fortran)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def detections_to_coco(
    detections: Detections,
    *,
    image_ids: Int[Tensor, " B"] | Sequence[int],
    scales: Float[Tensor, "B 2"] | Sequence[Sequence[float]],
    label_to_category_id: Sequence[int],
    orig_sizes: Int[Tensor, "B 2"] | Sequence[Sequence[int]] | None = None,
    mask_threshold: float = 0.5,
    mask_padding: int = 1,
) -> list[dict[str, Any]]:
    """COCO result records of the valid detections of a batch, in original image pixels.

    ``scales[b]`` is the (y, x) factor from image ``b``'s original size to the network input
    (``Batch.scales``): boxes are divided by it, so padding and resizing are undone (flips are
    not: evaluation inputs are never flipped). Each record is
    ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``, in the order
    of the slots (image by image, by score descending). Labels index ``label_to_category_id``.

    Detections with ``masks`` add ``"segmentation"``, the compressed RLE
    (:func:`encode_masks`) of each mask in the original image; that needs ``orig_sizes[b]``,
    the (height, width) of image ``b`` on disk (the ground truth's image entry). Boolean image
    masks ``[B, N, H, W]`` are mapped back (:func:`masks_to_original`); float box-frame
    probabilities ``[B, N, m, m]`` are pasted at the original size on the boxes in original
    pixels and binarized at ``> mask_threshold`` (:func:`fdet.ops.masks.paste_masks` with
    ``mask_padding``), exactly as torchvision's Mask R-CNN and its evaluation do.

    The boxes, scores and labels of the whole batch are moved to the host in one transfer and
    converted with numpy; masks are mapped back on their device, then moved image by image.
    """
    boxes, scores, labels, valid = detections[:4]
    masks = getattr(detections, "masks", None)
    packed = torch.cat(
        (
            boxes.double(),
            scores.double()[..., None],
            labels.double()[..., None],
            valid.double()[..., None],
        ),
        dim=-1,
    )  # [B, N, 7]
    packed_np = packed.cpu().numpy()
    ids = np.asarray(torch.as_tensor(image_ids).cpu(), dtype=np.int64).reshape(-1)  # [B]
    scale = np.asarray(torch.as_tensor(scales, dtype=torch.float64).cpu()).reshape(-1, 2)  # [B, 2]
    num_images = packed_np.shape[0]
    if ids.shape[0] != num_images or scale.shape[0] != num_images:
        raise ValueError(
            f"detections_to_coco: {num_images} images in the detections but "
            f"{ids.shape[0]} image_ids and {scale.shape[0]} scales"
        )
    if not np.all(scale > 0):
        raise ValueError(f"detections_to_coco: scales must be positive, got {scale.tolist()}")

    image_index, slot = np.nonzero(packed_np[..., 6] > 0)  # [D], [D]
    rows = packed_np[image_index, slot]  # [D, 7]
    label = rows[:, 5].astype(np.int64)  # [D]
    lut = np.asarray(label_to_category_id, dtype=np.int64)  # [K]
    bad = (label < 0) | (label >= lut.shape[0])
    if bad.any():
        b = int(image_index[bad][0])
        raise ValueError(
            f"detections_to_coco: label {int(label[bad][0])} of image {int(ids[b])} is outside "
            f"label_to_category_id (K = {lut.shape[0]})"
        )
    sy, sx = scale[image_index, 0], scale[image_index, 1]  # [D]
    x1, y1 = rows[:, 0] / sx, rows[:, 1] / sy
    x2, y2 = rows[:, 2] / sx, rows[:, 3] / sy
    xywh = np.stack((x1, y1, x2 - x1, y2 - y1), axis=1)  # [D, 4]
    records = [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(
            ids[image_index].tolist(), lut[label].tolist(), xywh.tolist(), rows[:, 4].tolist()
        )
    ]
    if masks is not None:
        rles = _mask_records(
            masks, boxes, valid, scale, orig_sizes, num_images, mask_threshold, mask_padding
        )
        for record, rle in zip(records, rles, strict=True):
            record["segmentation"] = rle
    return records


def _mask_records(
    masks: Tensor,
    boxes: Tensor,
    valid: Tensor,
    scale: np.ndarray,
    orig_sizes: Int[Tensor, "B 2"] | Sequence[Sequence[int]] | None,
    num_images: int,
    threshold: float,
    padding: int,
) -> list[dict[str, Any]]:
    """The RLE of every valid detection's mask, image by image, slots in order."""
    if orig_sizes is None:
        raise ValueError(
            "detections_to_coco: the detections have masks; orig_sizes (the height and width "
            "of each original image) are needed to map them back"
        )
    sizes = np.asarray(torch.as_tensor(orig_sizes).cpu(), dtype=np.int64).reshape(-1, 2)
    if sizes.shape[0] != num_images or masks.shape[:2] != valid.shape:
        raise ValueError(
            f"detections_to_coco: masks {tuple(masks.shape)} for valid {tuple(valid.shape)} "
            f"and {sizes.shape[0]} orig_sizes"
        )
    pasted = masks.is_floating_point()
    out: list[dict[str, Any]] = []
    for b in range(num_images):  # the host's RLE encoding goes image by image anyway
        keep = valid[b].to(masks.device)
        kept = masks[b][keep]  # [D_b, H, W] or [D_b, m, m]
        if not kept.shape[0]:
            continue
        if pasted:
            sy, sx = float(scale[b, 0]), float(scale[b, 1])
            factor = torch.tensor([sx, sy, sx, sy], dtype=torch.float64, device=masks.device)
            orig_boxes = (
                boxes[b][keep.to(boxes.device)].to(masks.device).double() / factor
            ).float()
            image_masks = paste_masks(
                kept[None],
                orig_boxes[None],
                (int(sizes[b, 0]), int(sizes[b, 1])),
                padding=padding,
                threshold=threshold,
            )[0]
        else:
            image_masks = masks_to_original(kept.bool(), scale[b], sizes[b])
        out.extend(encode_masks(image_masks))
    return out


def _per_class_converter(value: Mapping[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in value.items()}


@attrs.frozen(kw_only=True)
class CocoMetrics:
    """The 12 COCO detection stats, per-class AP and counts.

    AP is averaged over IoU 0.50:0.95 unless named ``AP50``/``AP75``; ``s``/``m``/``l`` are the
    small (< 32²), medium and large (> 96²) area ranges; ``AR1/10/100`` allow 1, 10 or 100
    detections an image. A stat with no ground truth in its range is ``-1`` (COCO's convention,
    :data:`UNDEFINED`), never NaN.

    ``per_class_ap`` maps each category name to its AP@[.5:.95] (all areas, 100 detections);
    a category without (non-crowd) ground truth among the evaluated images is left out. Two
    categories with the same name are told apart as ``"name (id)"``.
    """

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    AR1: float
    AR10: float
    AR100: float
    ARs: float
    ARm: float
    ARl: float
    per_class_ap: dict[str, float] = attrs.field(factory=dict, converter=_per_class_converter)
    num_images: int = 0
    num_detections: int = 0

    @property
    def stats(self) -> tuple[float, ...]:
        """The 12 stats in COCO's order (:data:`STAT_NAMES`)."""
        return tuple(getattr(self, name) for name in STAT_NAMES)

    @classmethod
    def from_stats(
        cls,
        stats: Iterable[float],
        *,
        per_class_ap: Mapping[str, float] | None = None,
        num_images: int = 0,
        num_detections: int = 0,
    ) -> CocoMetrics:
        """Metrics from the 12 stats in COCO's order."""
        values = [float(s) for s in stats]
        if len(values) != len(STAT_NAMES):
            raise ValueError(f"CocoMetrics.from_stats: expected 12 stats, got {len(values)}")
        return cls(
            **dict(zip(STAT_NAMES, values)),
            per_class_ap=per_class_ap or {},
            num_images=num_images,
            num_detections=num_detections,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the 12 stats, ``per_class_ap``, ``num_images``, ``num_detections``."""
        out: dict[str, Any] = dict(zip(STAT_NAMES, self.stats))
        out["per_class_ap"] = dict(self.per_class_ap)
        out["num_images"] = self.num_images
        out["num_detections"] = self.num_detections
        return out


def _silent(*args: object, **kwargs: object) -> None:
    return None


def _faster_module() -> Any:
    try:
        import faster_coco_eval
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "evaluate_coco(backend='faster') needs the faster-coco-eval package "
            "(pip install faster-coco-eval), or pass backend='pycocotools'"
        ) from e
    return faster_coco_eval


def _load_json(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        dataset = json.load(f)
    if not isinstance(dataset, dict):
        raise ValueError(f"{path}: a COCO annotation file holds a JSON object, got {type(dataset)}")
    return dataset


def _index(cls: type, dataset: dict[str, Any], **kwargs: Any) -> Any:
    api = cls(**kwargs)
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def _gt_api(coco_gt: Any, backend: Backend) -> Any:
    """A ground-truth COCO of the backend's own class (sharing annotations when converted)."""
    if backend == "faster":
        fce = _faster_module()
        if isinstance(coco_gt, fce.COCO):
            return coco_gt
        dataset = coco_gt.dataset if hasattr(coco_gt, "dataset") else _load_json(coco_gt)
        return _index(fce.COCO, dict(dataset), print_function=_silent)
    if backend == "pycocotools":
        if isinstance(coco_gt, COCO):
            return coco_gt
        dataset = coco_gt.dataset if hasattr(coco_gt, "dataset") else _load_json(coco_gt)
        return _index(COCO, dict(dataset))
    raise ValueError(f"evaluate_coco: backend must be 'faster' or 'pycocotools', got {backend!r}")


def _check_results(
    results: Sequence[Mapping[str, Any]], gt: Any, iou_type: IouType
) -> tuple[set[int], set[int]]:
    needed = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    image_ids: set[int] = set()
    category_ids: set[int] = set()
    for i, r in enumerate(results):
        missing = [k for k in needed if k not in r]
        if missing:
            raise ValueError(f"evaluate_coco: results[{i}] lacks {missing}: {dict(r)}")
        image_ids.add(r["image_id"])
        category_ids.add(r["category_id"])
    unknown_images = image_ids - set(gt.imgs)
    if unknown_images:
        raise ValueError(
            f"evaluate_coco: results name image ids absent from the ground truth: "
            f"{sorted(unknown_images)[:10]}"
        )
    unknown_categories = category_ids - set(gt.cats)
    if unknown_categories:
        raise ValueError(
            f"evaluate_coco: results name category ids absent from the ground truth: "
            f"{sorted(unknown_categories)[:10]}"
        )
    return image_ids, category_ids


def _bbox_results_api(gt: Any, results: list[dict[str, Any]]) -> Any:
    """A COCO object of the gt's class holding bbox ``results`` (which it takes over): what
    ``gt.loadRes`` gives for them, without the polygon that it derives from each box (unused by
    bbox evaluation and the costliest part of loading)."""
    for i, r in enumerate(results, start=1):
        _, _, w, h = r["bbox"]
        r["area"] = w * h
        r["id"] = i
        r["iscrowd"] = 0
    dataset = {
        "info": copy.deepcopy(gt.dataset.get("info", {})),
        "images": list(gt.dataset.get("images", [])),
        "categories": copy.deepcopy(gt.dataset.get("categories", [])),
        "annotations": results,
    }
    return _index(type(gt), dataset)


def _per_class(precision: np.ndarray, cat_ids: Sequence[int], gt: Any) -> dict[str, float]:
    """AP@[.5:.95] of each category from ``precision[T, R, K, A, M]`` (area all, last max-dets)."""
    names = [str(gt.cats[c].get("name", c)) for c in cat_ids]
    out: dict[str, float] = {}
    for k, (cat_id, name) in enumerate(zip(cat_ids, names)):
        p = precision[:, :, k, 0, -1]  # [T, R]
        p = p[p > -1]
        if p.size == 0:
            continue
        key = name if names.count(name) == 1 else f"{name} ({cat_id})"
        out[key] = float(np.mean(p))
    return out


def evaluate_coco(
    coco_gt: COCO | str | Path,
    results: Sequence[Mapping[str, Any]],
    *,
    backend: Backend = "faster",
    image_ids: Iterable[int] | None = None,
    iou_type: IouType = "bbox",
) -> CocoMetrics:
    """COCO metrics of ``results`` (records as from :func:`detections_to_coco`) against
    ``coco_gt``: a ``pycocotools`` or ``faster_coco_eval`` ``COCO``, or the path of an annotation
    file.

    ``image_ids`` restricts evaluation to those images (in-training validation on a subset): their
    ground truth counts, results on other images are ignored. By default every image of
    ``coco_gt`` is evaluated.

    Empty ``results`` give 0 for every stat with ground truth (``-1`` where a range has none);
    no images to evaluate give ``-1`` everywhere. Results naming an image or category absent from
    the ground truth, or lacking a field, raise ``ValueError``. ``results`` is not modified.
    The backends' progress output is silenced.

    ``iou_type="segm"`` evaluates the results' ``"segmentation"`` (compressed RLEs, as
    :func:`detections_to_coco` writes them) against the ground truth's polygons or RLEs (crowd
    regions included, as COCO treats them); a result's box is not used, its area is its
    mask's. Every ground-truth annotation needs a segmentation (:func:`has_segmentations`).
    """
    gt = _gt_api(coco_gt, backend)
    if image_ids is None:
        eval_ids = sorted(int(i) for i in gt.getImgIds())
    else:
        eval_ids = sorted({int(i) for i in image_ids})
        unknown = set(eval_ids) - set(gt.imgs)
        if unknown:
            raise ValueError(
                f"evaluate_coco: image_ids absent from the ground truth: {sorted(unknown)[:10]}"
            )
    _check_results(results, gt, iou_type)
    if iou_type == "segm" and not has_segmentations(gt):
        raise ValueError(
            "evaluate_coco: iou_type 'segm' needs a segmentation (polygons or RLE) on every "
            "ground-truth annotation"
        )
    wanted = set(eval_ids)
    if iou_type == "segm":  # areas and boxes from the masks, as pycocotools derives them
        kept = [
            {k: v for k, v in r.items() if k != "bbox"} for r in results if r["image_id"] in wanted
        ]
    else:
        kept = [dict(r) for r in results if r["image_id"] in wanted]
    if not eval_ids:
        return CocoMetrics.from_stats([UNDEFINED] * len(STAT_NAMES))

    with contextlib.redirect_stdout(io.StringIO()):
        if kept and (backend == "pycocotools" or iou_type != "bbox"):
            dt = gt.loadRes(kept)
        else:
            dt = _bbox_results_api(gt, kept)
        if backend == "faster":
            evaluator = _faster_module().COCOeval_faster(gt, dt, iou_type, print_function=_silent)
        else:
            from pycocotools.cocoeval import COCOeval

            evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.imgIds = eval_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    stats = [float(s) for s in np.asarray(evaluator.stats)[: len(STAT_NAMES)]]
    per_class = _per_class(
        np.asarray(evaluator.eval["precision"]), list(evaluator.params.catIds), gt
    )
    return CocoMetrics.from_stats(
        stats, per_class_ap=per_class, num_images=len(eval_ids), num_detections=len(kept)
    )


def has_segmentations(coco_gt: Any) -> bool:
    """Whether every annotation of a ground truth (a ``COCO`` or its ``dataset`` dict) has a
    non-empty segmentation, polygons or RLE: what mask evaluation needs. No annotations:
    False."""
    dataset = coco_gt.dataset if hasattr(coco_gt, "dataset") else coco_gt
    annotations = dataset.get("annotations", []) if isinstance(dataset, dict) else []
    return bool(annotations) and all(
        isinstance(a, dict) and bool(a.get("segmentation")) for a in annotations
    )


def evaluate_coco_types(
    coco_gt: COCO | str | Path,
    results: Sequence[Mapping[str, Any]],
    *,
    backend: Backend = "faster",
    image_ids: Iterable[int] | None = None,
    iou_types: Sequence[IouType] | None = None,
) -> dict[str, CocoMetrics]:
    """:func:`evaluate_coco` once for each of ``iou_types``, keyed ``"bbox"`` / ``"segm"``.

    By default: ``"bbox"``, and ``"segm"`` too when some result has a ``"segmentation"`` and
    the ground truth has segmentations (:func:`has_segmentations`). A path is loaded once.
    """
    if isinstance(coco_gt, (str, Path)):
        coco_gt = _gt_api(coco_gt, backend)
    types: Sequence[IouType]
    if iou_types is None:
        with_masks = any("segmentation" in r for r in results)
        types = ("bbox", "segm") if with_masks and has_segmentations(coco_gt) else ("bbox",)
    else:
        types = iou_types
    unknown = [t for t in types if t not in IOU_TYPES]
    if unknown:
        raise ValueError(f"evaluate_coco_types: iou_types must be among {IOU_TYPES}, got {unknown}")
    return {
        t: evaluate_coco(coco_gt, results, backend=backend, image_ids=image_ids, iou_type=t)
        for t in types
    }


def _value(x: float) -> str:
    return "  n/a" if x < 0 or math.isnan(x) else f"{x:.3f}"


def format_table(
    metrics: CocoMetrics, *, per_class: bool = True, columns: int = 3, iou_type: str | None = None
) -> str:
    """The 12 stats, one a line with their IoU, area and max-detections settings, then (with
    ``per_class``) the per-class AP@[.5:.95] in ``columns`` column pairs. ``n/a`` marks a stat
    without ground truth. ``iou_type`` (``"bbox"``, ``"segm"``) names the evaluation in the
    first line."""
    kind = f"COCO {iou_type} evaluation" if iou_type else "COCO evaluation"
    lines = [
        f"{kind}: {metrics.num_images} images, {metrics.num_detections} detections",
        f"{'metric':<7} {'IoU':<10} {'area':<7} {'maxDets':>7}  {'value':>5}",
    ]
    for name, (iou, area, max_dets), value in zip(STAT_NAMES, _STAT_SETTINGS, metrics.stats):
        lines.append(f"{name:<7} {iou:<10} {area:<7} {max_dets:>7}  {_value(value):>5}")
    if per_class and metrics.per_class_ap:
        items = list(metrics.per_class_ap.items())
        width = max(8, *(len(name) for name, _ in items))
        columns = max(1, min(columns, len(items)))
        rows = math.ceil(len(items) / columns)
        cell = f"{{:<{width}}}  {{:>5}}"
        lines.append("")
        lines.append("per-class AP @[IoU=0.50:0.95 | area=all | maxDets=100]")
        lines.append("   ".join(cell.format("category", "AP") for _ in range(columns)).rstrip())
        for r in range(rows):
            cells = [
                cell.format(name, _value(ap)) for name, ap in items[r * columns : (r + 1) * columns]
            ]
            lines.append("   ".join(cells).rstrip())
    return "\n".join(lines)
