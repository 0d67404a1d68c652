"""Per-class COCO metrics, precision-recall curves and the confusion matrix of detection results.

Every function takes the ground truth (a ``pycocotools`` ``COCO`` or the path of an annotation
file) and the results (a list of COCO result records, ``{"image_id", "category_id", "bbox",
"score"}``, or the path of a ``results.json``), and is pure: neither is modified.

- :func:`per_class_table`: AP, AP50, AP75, APs/m/l, AR100, ground-truth and detection counts of
  every category, from one ``pycocotools`` ``COCOeval`` run;
- :func:`pr_curves` and :func:`plot_pr_curves`: the evaluator's interpolated precision at its 101
  recall points, per category and IoU threshold;
- :func:`confusion_matrix` and :func:`plot_confusion_matrix`: counts of ground-truth class
  against predicted class, with a background row and a missed column.

A value without ground truth to measure it is ``-1`` (:data:`UNDEFINED`, COCO's convention),
never NaN. matplotlib is imported only by the plotting functions.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeAlias

import attrs
import numpy as np
from pycocotools.coco import COCO

from fdet.eval.coco import UNDEFINED

__all__ = [
    "UNDEFINED",
    "ConfusionMatrix",
    "category_names",
    "confusion_matrix",
    "load_ground_truth",
    "load_results",
    "per_class_table",
    "plot_confusion_matrix",
    "plot_pr_curves",
    "pr_curves",
]

IouType = Literal["bbox", "segm"]
GroundTruth: TypeAlias = COCO | str | Path
Results: TypeAlias = Sequence[Mapping[str, Any]] | str | Path

# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def load_ground_truth(coco_gt: GroundTruth) -> COCO:
    """A ``pycocotools`` ``COCO``: ``coco_gt`` itself, or the annotation file at that path
    (indexed silently). Anything else raises ``TypeError``."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    if not isinstance(coco_gt, (str, Path)):
        raise TypeError(
            f"ground truth: expected a pycocotools COCO or the path of an annotation file, "
            f"got {type(coco_gt).__name__}"
        )
    with open(coco_gt) as f:
        dataset = json.load(f)
    if not isinstance(dataset, dict):
        raise ValueError(f"{coco_gt}: a COCO annotation file holds a JSON object")
    api = COCO()
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def load_results(results: Results, gt: COCO, *, iou_type: IouType = "bbox") -> list[dict[str, Any]]:
    """The result records of ``results`` (a list, or the path of a JSON list), as new dicts,
    checked against ``gt``: each needs ``image_id``, ``category_id``, ``score`` and ``bbox``
    (``segmentation`` for ``iou_type="segm"``), and must name an image and a category of the
    ground truth. A violation raises ``ValueError`` naming the record's index (and the file).
    An empty list is valid: nothing was detected."""
    where = "results"
    if isinstance(results, (str, Path)):
        where = str(results)
        with open(results) as f:
            loaded = json.load(f)
        if not isinstance(loaded, list):
            raise ValueError(f"{where}: a COCO results file holds a JSON list of records")
        records: Sequence[Any] = loaded
    else:
        records = results
    field = "bbox" if iou_type == "bbox" else "segmentation"
    needed = ("image_id", "category_id", "score", field)
    out: list[dict[str, Any]] = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise ValueError(f"{where}[{i}]: a result record is a JSON object, got {r!r}")
        missing = [k for k in needed if k not in r]
        if missing:
            raise ValueError(f"{where}[{i}]: lacks {missing}: {dict(r)}")
        if r["image_id"] not in gt.imgs:
            raise ValueError(
                f"{where}[{i}]: image_id {r['image_id']!r} is not an image of the ground truth"
            )
        if r["category_id"] not in gt.cats:
            raise ValueError(
                f"{where}[{i}]: category_id {r['category_id']!r} is not a category of the "
                f"ground truth"
            )
        if field == "bbox" and len(r["bbox"]) != 4:
            raise ValueError(f"{where}[{i}]: bbox is [x, y, w, h], got {r['bbox']!r}")
        out.append(dict(r))
    return out


def category_names(coco_gt: GroundTruth) -> dict[int, str]:
    """Category id to name, in id order (the id as text where a category has no name)."""
    gt = load_ground_truth(coco_gt)
    return {int(c): str(gt.cats[c].get("name", c)) for c in sorted(gt.cats)}


def _results_api(gt: COCO, records: list[dict[str, Any]], iou_type: IouType) -> COCO:
    """A ``COCO`` of ``records`` over ``gt``'s images and categories. Boxes get the area,
    id and crowd flag ``loadRes`` gives them; an empty list gives an empty index (which
    ``loadRes`` refuses)."""
    if records and iou_type == "segm":
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes([{k: v for k, v in r.items() if k != "bbox"} for r in records])
    annotations = []
    for i, r in enumerate(records, start=1):
        x, y, w, h = (float(v) for v in r["bbox"])
        annotations.append({**r, "bbox": [x, y, w, h], "area": w * h, "id": i, "iscrowd": 0})
    api = COCO()
    api.dataset = {
        "images": list(gt.dataset.get("images", [])),
        "categories": list(gt.dataset.get("categories", [])),
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def _index_copy(gt: COCO) -> COCO:
    """A new index over ``gt``'s dataset with copies of its annotation dicts."""
    api = COCO()
    api.dataset = {
        **gt.dataset,
        "annotations": [dict(a) for a in gt.dataset.get("annotations", [])],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def _evaluate(gt: COCO, records: list[dict[str, Any]], iou_type: IouType) -> Any:
    """An evaluated and accumulated ``COCOeval`` over every image and category of ``gt``."""
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    # COCOeval writes into the ground truth's annotations ("ignore", masks as RLE): a copy
    gt = _index_copy(gt)
    dt = _results_api(gt, records, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.imgIds = sorted(gt.getImgIds())
        evaluator.params.catIds = sorted(gt.getCatIds())
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else UNDEFINED


def _iou_index(evaluator: Any, iou: float) -> int:
    thresholds = np.asarray(evaluator.params.iouThrs)
    hits = np.flatnonzero(np.isclose(thresholds, iou))
    if hits.size == 0:
        raise ValueError(
            f"IoU threshold {iou} is not one the evaluator computes: "
            f"{[round(float(t), 2) for t in thresholds]}"
        )
    return int(hits[0])


# ------------------------------------------------------------------------------------------------
# Per-class table
# ------------------------------------------------------------------------------------------------

TABLE_COLUMNS: tuple[str, ...] = (
    "category_id",
    "name",
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR100",
    "num_gts",
    "num_detections",
)
"""The keys of each row of :func:`per_class_table`, in order."""


def per_class_table(
    coco_gt: GroundTruth, results: Results, *, iou_type: IouType = "bbox"
) -> list[dict[str, Any]]:
    """One row per category of the ground truth, in id order, with the keys of
    :data:`TABLE_COLUMNS`.

    The metrics come from one ``COCOeval`` over every image: ``AP`` is the mean of the
    interpolated precision over the 10 IoU thresholds 0.50:0.95 and 101 recall points (all
    areas, 100 detections an image), ``AP50``/``AP75`` at one threshold, ``APs``/``APm``/``APl``
    over the small (< 32²), medium and large (> 96²) ground truth, ``AR100`` the recall averaged
    over the thresholds. They equal COCO's summary of an evaluation of that category alone.

    A category without (non-crowd) ground truth in a range has ``-1`` (:data:`UNDEFINED`) for
    the metrics of that range; one with ground truth but no detections has 0. ``num_gts``
    counts its non-crowd ground-truth boxes, ``num_detections`` its result records.
    """
    gt = load_ground_truth(coco_gt)
    records = load_results(results, gt, iou_type=iou_type)
    evaluator = _evaluate(gt, records, iou_type)
    params = evaluator.params
    precision = np.asarray(evaluator.eval["precision"])  # [T, R, K, A, M]
    recall = np.asarray(evaluator.eval["recall"])  # [T, K, A, M]
    t50, t75 = _iou_index(evaluator, 0.5), _iou_index(evaluator, 0.75)
    area = {label: i for i, label in enumerate(params.areaRngLbl)}
    m100 = list(params.maxDets).index(100)
    num_gts: dict[int, int] = {}
    for ann in gt.dataset.get("annotations", []):
        if not ann.get("iscrowd", 0):
            num_gts[ann["category_id"]] = num_gts.get(ann["category_id"], 0) + 1
    num_dets: dict[int, int] = {}
    for r in records:
        num_dets[r["category_id"]] = num_dets.get(r["category_id"], 0) + 1
    names = category_names(gt)
    rows: list[dict[str, Any]] = []
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k]  # [T, R, A, M]
        rows.append(
            {
                "category_id": int(cat_id),
                "name": names[int(cat_id)],
                "AP": _mean_defined(p[:, :, area["all"], m100]),
                "AP50": _mean_defined(p[t50, :, area["all"], m100]),
                "AP75": _mean_defined(p[t75, :, area["all"], m100]),
                "APs": _mean_defined(p[:, :, area["small"], m100]),
                "APm": _mean_defined(p[:, :, area["medium"], m100]),
                "APl": _mean_defined(p[:, :, area["large"], m100]),
                "AR100": _mean_defined(recall[:, k, area["all"], m100]),
                "num_gts": num_gts.get(cat_id, 0),
                "num_detections": num_dets.get(cat_id, 0),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------
# Precision-recall curves
# ------------------------------------------------------------------------------------------------


def pr_curves(
    coco_gt: GroundTruth,
    results: Results,
    *,
    iou_thresholds: Sequence[float] = (0.5, 0.75),
    iou_type: IouType = "bbox",
) -> dict[tuple[int, float], tuple[np.ndarray, np.ndarray]]:
    """``(category_id, iou) -> (recall[101], precision[101])`` for every category and each of
    ``iou_thresholds`` (which must be among COCO's 0.50:0.05:0.95), all areas, 100 detections
    an image.

    ``recall`` is COCO's grid 0, 0.01, …, 1; ``precision`` the evaluator's interpolated
    precision there (the best precision at that recall or beyond, non-increasing), 0 past the
    highest recall reached. The mean of ``precision`` is the category's AP at that IoU. A
    category without ground truth has ``-1`` (:data:`UNDEFINED`) everywhere. The keys hold the
    thresholds as given.
    """
    gt = load_ground_truth(coco_gt)
    records = load_results(results, gt, iou_type=iou_type)
    evaluator = _evaluate(gt, records, iou_type)
    params = evaluator.params
    indices = [(float(iou), _iou_index(evaluator, float(iou))) for iou in iou_thresholds]
    precision = np.asarray(evaluator.eval["precision"])  # [T, R, K, A, M]
    area_all = list(params.areaRngLbl).index("all")
    m100 = list(params.maxDets).index(100)
    recall = np.asarray(params.recThrs, dtype=np.float64)
    out: dict[tuple[int, float], tuple[np.ndarray, np.ndarray]] = {}
    for k, cat_id in enumerate(params.catIds):
        for iou, t in indices:
            out[(int(cat_id), iou)] = (recall.copy(), precision[t, :, k, area_all, m100].copy())
    return out


def plot_pr_curves(
    curves: Mapping[tuple[int, float], tuple[np.ndarray, np.ndarray]],
    names: Mapping[int, str] | None,
    path: str | Path,
) -> Path:
    """One PNG at ``path``: a panel per IoU threshold of ``curves`` (:func:`pr_curves`), a line
    per category labelled with its name (``names``, the id where absent) and AP. Categories
    without ground truth (precision ``-1``) are left out of the panels. Returns the path."""
    from matplotlib.figure import Figure

    names = dict(names or {})
    ious = sorted({iou for _, iou in curves})
    if not ious:
        raise ValueError("plot_pr_curves: no curves to plot")
    fig = Figure(figsize=(5.5 * len(ious), 5.0), layout="constrained")
    axes = fig.subplots(1, len(ious), squeeze=False)[0]
    for ax, iou in zip(axes, ious):
        for (cat_id, curve_iou), (recall, precision) in sorted(curves.items()):
            if curve_iou != iou or not np.any(precision > -1):
                continue
            ap = _mean_defined(np.asarray(precision))
            ax.plot(recall, precision, label=f"{names.get(cat_id, str(cat_id))} ({ap:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.set_title(f"IoU {iou:.2f}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", title="category (AP)")
    out = Path(path)
    fig.savefig(out, dpi=100)
    return out


# ------------------------------------------------------------------------------------------------
# Confusion matrix
# ------------------------------------------------------------------------------------------------


def _counts_converter(value: Any) -> np.ndarray:
    counts = np.asarray(value, dtype=np.int64)
    counts.setflags(write=False)
    return counts


def _int_tuple(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(str(v) for v in value)


@attrs.frozen(kw_only=True, eq=False)
class ConfusionMatrix:
    """Counts ``[K + 1, K + 1]`` of matched boxes: row ``i < K`` is ground-truth category
    ``category_ids[i]``, column ``j < K`` predicted category ``category_ids[j]``. Row ``K``
    (background) counts detections that matched no ground truth, by predicted category;
    column ``K`` (missed) counts ground truth that no detection matched. ``counts[K, K]`` is 0.

    Row ``i`` sums to the non-crowd ground truth of category ``i``; column ``j < K`` to the
    kept detections (score ≥ ``score_threshold``) of category ``j``.
    """

    counts: np.ndarray = attrs.field(converter=_counts_converter)
    category_ids: tuple[int, ...] = attrs.field(converter=_int_tuple)
    names: tuple[str, ...] = attrs.field(converter=_str_tuple)
    iou_threshold: float
    score_threshold: float

    def __attrs_post_init__(self) -> None:
        k = len(self.category_ids)
        if self.counts.shape != (k + 1, k + 1) or len(self.names) != k:
            raise ValueError(
                f"ConfusionMatrix: counts {self.counts.shape} for {k} categories and "
                f"{len(self.names)} names; expected ({k + 1}, {k + 1})"
            )

    @property
    def row_labels(self) -> tuple[str, ...]:
        """The category names, then ``"background"``."""
        return (*self.names, "background")

    @property
    def column_labels(self) -> tuple[str, ...]:
        """The category names, then ``"missed"``."""
        return (*self.names, "missed")

    def normalized(self) -> np.ndarray:
        """The counts divided by their row sums (rows without counts stay 0)."""
        sums = self.counts.sum(axis=1, keepdims=True)
        return np.divide(
            self.counts, sums, out=np.zeros(self.counts.shape, dtype=np.float64), where=sums > 0
        )

    def to_csv(self, path: str | Path) -> Path:
        """The counts as CSV: a header ``ground truth \\ predicted, <names>, missed``, then a
        row per category and the background row, each led by its label. Returns the path."""
        out = Path(path)
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ground truth \\ predicted", *self.column_labels])
            for label, row in zip(self.row_labels, self.counts.tolist()):
                writer.writerow([label, *row])
        return out


def _box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``[N, M]`` of boxes ``a[N, 4]`` and ``b[M, 4]`` in COCO's ``[x, y, w, h]``."""
    ax1, ay1 = a[:, 0], a[:, 1]
    ax2, ay2 = ax1 + a[:, 2], ay1 + a[:, 3]
    bx1, by1 = b[:, 0], b[:, 1]
    bx2, by2 = bx1 + b[:, 2], by1 + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2) - np.maximum(ax1[:, None], bx1), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2) - np.maximum(ay1[:, None], by1), 0, None)
    inter = iw * ih  # [N, M]
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def confusion_matrix(
    coco_gt: GroundTruth,
    results: Results,
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> ConfusionMatrix:
    """Ground-truth category against predicted category of the box results.

    Detections with ``score >= score_threshold`` are kept. In each image they are matched
    greedily by descending score (ties in input order): a detection takes the still unmatched
    ground-truth box of highest IoU ≥ ``iou_threshold`` of any category (a different category
    is a confusion), the one of its own category where IoUs tie exactly. A matched pair adds
    one to ``counts[gt category, predicted category]``; an unmatched detection (a false
    positive, or a duplicate of a box already taken) to the background row; an unmatched
    ground-truth box to the missed column. Crowd regions (``iscrowd``) are left out: they
    count nowhere, and a detection that only overlaps one goes to the background row (unlike in
    COCO AP, where such a detection is ignored).

    Empty results give every ground-truth box in the missed column.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"confusion_matrix: iou_threshold must be in (0, 1], got {iou_threshold}")
    gt = load_ground_truth(coco_gt)
    records = load_results(results, gt, iou_type="bbox")
    category_ids = sorted(int(c) for c in gt.getCatIds())
    index = {c: i for i, c in enumerate(category_ids)}
    k = len(category_ids)
    counts = np.zeros((k + 1, k + 1), dtype=np.int64)

    detections: dict[int, list[tuple[int, dict[str, Any]]]] = {}
    for order, r in enumerate(records):
        if float(r["score"]) >= score_threshold:
            detections.setdefault(r["image_id"], []).append((order, r))

    for image_id in gt.getImgIds():
        anns = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        dets = sorted(detections.get(image_id, []), key=lambda d: (-float(d[1]["score"]), d[0]))
        gt_labels = np.array([index[a["category_id"]] for a in anns], dtype=np.int64)
        matched = np.zeros(len(anns), dtype=bool)
        if anns and dets:
            gt_boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            dt_boxes = np.array([d["bbox"] for _, d in dets], dtype=np.float64).reshape(-1, 4)
            ious = _box_iou_xywh(dt_boxes, gt_boxes)  # [D, G]
        else:
            ious = np.zeros((len(dets), len(anns)))
        for d, (_, det) in enumerate(dets):
            label = index[det["category_id"]]
            candidates = np.flatnonzero(~matched & (ious[d] >= iou_threshold))
            if candidates.size == 0:
                counts[k, label] += 1
                continue
            # highest IoU first, then the detection's own category
            best = max(candidates, key=lambda g: (ious[d, g], gt_labels[g] == label))
            matched[best] = True
            counts[gt_labels[best], label] += 1
        for g in np.flatnonzero(~matched):
            counts[gt_labels[g], k] += 1

    names = category_names(gt)
    return ConfusionMatrix(
        counts=counts,
        category_ids=category_ids,
        names=[names[c] for c in category_ids],
        iou_threshold=float(iou_threshold),
        score_threshold=float(score_threshold),
    )


def plot_confusion_matrix(
    cm: ConfusionMatrix,
    names: Sequence[str] | None,
    path: str | Path,
    *,
    normalize: bool = False,
) -> Path:
    """One PNG at ``path``: the matrix as a heat map, every cell annotated with its count
    (and, with ``normalize``, coloured and annotated by its share of the row). ``names`` label
    the categories (``cm.names`` when ``None``). Returns the path."""
    from matplotlib.figure import Figure

    labels = list(cm.names if names is None else names)
    if len(labels) != len(cm.category_ids):
        raise ValueError(
            f"plot_confusion_matrix: {len(labels)} names for {len(cm.category_ids)} categories"
        )
    values = cm.normalized() if normalize else cm.counts.astype(np.float64)
    size = 1.2 + 0.55 * (len(labels) + 1)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=max(float(values.max()), 1e-9))
    fig.colorbar(image, ax=ax, label="share of row" if normalize else "count")
    ticks = range(len(labels) + 1)
    ax.set_xticks(ticks, [*labels, "missed"], rotation=45, ha="right")
    ax.set_yticks(ticks, [*labels, "background"])
    ax.set(xlabel="predicted", ylabel="ground truth")
    ax.set_title(f"IoU ≥ {cm.iou_threshold:g}, score ≥ {cm.score_threshold:g}")
    top = float(values.max())
    for (i, j), count in np.ndenumerate(cm.counts):
        text = f"{values[i, j]:.2f}\n({count})" if normalize else str(count)
        color = "white" if top > 0 and values[i, j] > 0.6 * top else "black"
        ax.text(j, i, text, ha="center", va="center", fontsize="x-small", color=color)
    out = Path(path)
    fig.savefig(out, dpi=100)
    return out
