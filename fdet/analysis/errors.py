"""COCO error breakdown: what AP each kind of mistake costs, in the manner of TIDE (Bolya et al.,
"TIDE: A General Toolbox for Identifying Object Detection Errors", ECCV 2020).

Every detection that COCO evaluation counts as a false positive at the foreground IoU
``fg_iou`` (0.5) is given exactly one error type, from its IoU with the (non-crowd) ground truth
of its image; ground truth that no detection finds is *missed*. The types, checked in this order
(the first that applies wins):

``loc``  (localization) right class, best IoU with a gt of its class in ``[bg_iou, fg_iou)``.
``cls``  (classification) IoU ``≥ fg_iou`` with a gt of another class.
``dupe`` (duplicate) right class, IoU ``≥ fg_iou`` with a gt of its class that a higher-scoring
         detection already matched.
``both`` (classification and localization) IoU in ``[bg_iou, fg_iou)`` with a gt of another class.
``bkg``  (background) IoU ``< bg_iou`` with every gt of the image, whatever its class.
``miss`` a non-crowd gt matched by no detection and not the target of a ``loc``, ``cls`` or
         ``both`` error (fixing that error recovers it).

These cover every false positive: a detection whose best IoU with every gt is below ``bg_iou`` is
``bkg``; otherwise one of the first four applies. The *target* of a ``loc`` / ``cls`` / ``both``
error is the gt with the highest IoU among those of the same / another class.

Each type has an *oracle fix*, applied alone to the results (or, for ``miss``, the ground truth);
COCO evaluation (``pycocotools.cocoeval.COCOeval``) is then run again on the corrected data and
its AP is the *fixed AP* of that type; ``dAP = fixed − base``:

``cls``  the detection takes its target's class; ``loc`` its box (or mask) becomes its target's;
``both`` both. Detections are fixed in descending score; one whose target is already matched
(by a true positive, or by a higher-scoring fixed detection) would be a duplicate and is removed
instead.
``dupe``, ``bkg``  the detections are removed.
``miss`` (``miss_fix="drop_gt"``, TIDE's) the missed gts are removed from the ground truth; with
``miss_fix="add_detection"`` each becomes a detection of its own class and box, scored below every
other detection instead (so recall reaches 1 but the precision of the tail is kept).

Fixing every type at once (``"all"``) turns every false positive into a true positive or removes
it and recovers or removes every missed gt, so its AP50 is 1 (and ``"all"`` is reported too).

Two APs are reported: ``ap50``, COCO AP at IoU 0.5 (what the errors are defined at, as TIDE
reports), and ``ap``, COCO AP at IoU 0.5:0.95 (where ``loc`` fixes weigh more: a snapped box is
exact at every threshold). Per-class APs are AP50 by category name (``"name (id)"`` when two
categories share a name). COCO's conventions hold throughout: maximum 100 detections per image and
category (those beyond are not evaluated and count as ``ignored``, as are detections matched to a
crowd region), and an AP of a set without ground truth is undefined (``nan`` here).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO

from fdet.analysis.metrics import load_ground_truth, load_results

__all__ = [
    "ERROR_TYPES",
    "ErrorBreakdown",
    "error_breakdown",
    "plot_error_breakdown",
]

ErrorType = Literal["cls", "loc", "both", "dupe", "bkg", "miss"]
ERROR_TYPES: tuple[ErrorType, ...] = ("cls", "loc", "both", "dupe", "bkg", "miss")
"""The error types, in the order they are reported."""

ERROR_NAMES: dict[str, str] = {
    "cls": "classification",
    "loc": "localization",
    "both": "classification + localization",
    "dupe": "duplicate",
    "bkg": "background",
    "miss": "missed ground truth",
    "all": "all errors",
}

DetectionLabel = Literal["tp", "cls", "loc", "both", "dupe", "bkg", "ignored"]
MissFix = Literal["drop_gt", "add_detection"]
IouType = Literal["bbox", "segm"]


def _nan_if_undefined(x: float) -> float:
    return float("nan") if x < 0 else float(x)


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@attrs.frozen(kw_only=True)
class ErrorBreakdown:
    """The error breakdown of a set of COCO results (see the module docstring).

    ``fixed_ap50`` / ``fixed_ap`` / ``per_class_fixed_ap50`` are keyed by error type and
    ``"all"``; per-class dictionaries by category name. ``detection_labels[i]`` is what
    ``results[i]`` is: ``"tp"``, an error type, or ``"ignored"`` (matched to a crowd region, or
    beyond COCO's 100 detections per image and category). ``missed_gt_ids`` are the annotation
    ids of the missed gts. ``counts`` holds the number of each error type; ``per_class_counts``
    the same by the class of the detection (``miss``: of the gt).
    """

    iou_type: str
    fg_iou: float
    bg_iou: float
    miss_fix: str
    ap50: float
    ap: float
    per_class_ap50: dict[str, float]
    fixed_ap50: dict[str, float]
    fixed_ap: dict[str, float]
    per_class_fixed_ap50: dict[str, dict[str, float]]
    counts: dict[str, int]
    per_class_counts: dict[str, dict[str, int]]
    num_detections: int
    num_true_positives: int
    num_ignored: int
    num_gt: int
    detection_labels: tuple[str, ...]
    missed_gt_ids: tuple[int, ...]

    @property
    def delta_ap50(self) -> dict[str, float]:
        """AP50 gained by fixing each error type alone (and ``"all"``): fixed − base."""
        return {k: v - self.ap50 for k, v in self.fixed_ap50.items()}

    @property
    def delta_ap(self) -> dict[str, float]:
        """AP@[.5:.95] gained by fixing each error type alone (and ``"all"``)."""
        return {k: v - self.ap for k, v in self.fixed_ap.items()}

    @property
    def per_class_delta_ap50(self) -> dict[str, dict[str, float]]:
        """``{error type: {class: fixed AP50 − base AP50}}``, for the classes with ground truth
        both before and after the fix."""
        out: dict[str, dict[str, float]] = {}
        for kind, fixed in self.per_class_fixed_ap50.items():
            out[kind] = {
                name: fixed[name] - base
                for name, base in self.per_class_ap50.items()
                if name in fixed and not math.isnan(base) and not math.isnan(fixed[name])
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON values (``nan`` as ``null``), deltas included."""

        def floats(d: Mapping[str, float]) -> dict[str, float | None]:
            return {k: _json_float(v) for k, v in d.items()}

        return {
            "iou_type": self.iou_type,
            "fg_iou": self.fg_iou,
            "bg_iou": self.bg_iou,
            "miss_fix": self.miss_fix,
            "ap50": _json_float(self.ap50),
            "ap": _json_float(self.ap),
            "per_class_ap50": floats(self.per_class_ap50),
            "fixed_ap50": floats(self.fixed_ap50),
            "fixed_ap": floats(self.fixed_ap),
            "delta_ap50": floats(self.delta_ap50),
            "delta_ap": floats(self.delta_ap),
            "per_class_fixed_ap50": {k: floats(v) for k, v in self.per_class_fixed_ap50.items()},
            "per_class_delta_ap50": {k: floats(v) for k, v in self.per_class_delta_ap50.items()},
            "counts": dict(self.counts),
            "per_class_counts": {k: dict(v) for k, v in self.per_class_counts.items()},
            "num_detections": self.num_detections,
            "num_true_positives": self.num_true_positives,
            "num_ignored": self.num_ignored,
            "num_gt": self.num_gt,
            "detection_labels": list(self.detection_labels),
            "missed_gt_ids": list(self.missed_gt_ids),
        }


# ------------------------------------------------------------------------------------------------
# Loading and checking
# ------------------------------------------------------------------------------------------------


def _index(dataset: dict[str, Any]) -> COCO:
    api = COCO()
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def _load_gt(coco_gt: Any) -> COCO:
    """A fresh index of a copy of the ground truth: COCOeval writes into the annotations (masks
    as RLE, ignore flags), and the fixes remove missed gts."""
    gt = load_ground_truth(coco_gt)
    return _index(copy.deepcopy(gt.dataset))


def _class_names(gt: COCO) -> dict[int, str]:
    cat_ids = sorted(gt.cats)
    names = [str(gt.cats[c].get("name", c)) for c in cat_ids]
    return {
        c: (n if names.count(n) == 1 else f"{n} ({c})") for c, n in zip(cat_ids, names, strict=True)
    }


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


class _Evaluation:
    """One COCOeval run: AP50, AP, per-class AP50, and the matching at IoU 0.5."""

    def __init__(self, gt: COCO, results: list[dict[str, Any]], iou_type: IouType) -> None:
        from pycocotools.cocoeval import COCOeval

        records = copy.deepcopy(results)
        with contextlib.redirect_stdout(io.StringIO()):
            # ids 1..n in order: loadRes numbers them so when none is given.
            for r in records:
                r.pop("id", None)
            dt = gt.loadRes(records) if records else _index(_empty_results(gt))
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.params.imgIds = sorted(gt.imgs)
            evaluator.params.catIds = sorted(gt.cats)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        self.evaluator = evaluator
        self.ap = _nan_if_undefined(float(evaluator.stats[0]))
        self.ap50 = _nan_if_undefined(float(evaluator.stats[1]))
        precision = np.asarray(evaluator.eval["precision"])  # [T, R, K, A, M]
        names = _class_names(gt)
        self.per_class_ap50: dict[str, float] = {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[0, :, k, 0, -1]  # IoU 0.5, area all, 100 detections
            p = p[p > -1]
            self.per_class_ap50[names[cat_id]] = float(np.mean(p)) if p.size else float("nan")

    def matching(self) -> tuple[dict[int, int], set[int]]:
        """``{detection id: matched gt id (0: false positive)}`` at IoU 0.5, area "all", for the
        evaluated, non-ignored detections; and the ids of the ignored ones."""
        e = self.evaluator
        num_areas = len(e.params.areaRng)
        num_images = len(e.params.imgIds)
        matched: dict[int, int] = {}
        ignored: set[int] = set()
        for k in range(len(e.params.catIds)):
            for i in range(num_images):
                entry = e.evalImgs[k * num_areas * num_images + i]  # area index 0: "all"
                if entry is None:
                    continue
                for d, dt_id in enumerate(entry["dtIds"]):
                    if entry["dtIgnore"][0, d]:
                        ignored.add(int(dt_id))
                    else:
                        matched[int(dt_id)] = int(entry["dtMatches"][0, d])
        return matched, ignored


def _empty_results(gt: COCO) -> dict[str, Any]:
    return {
        "images": list(gt.dataset.get("images", [])),
        "categories": copy.deepcopy(gt.dataset.get("categories", [])),
        "annotations": [],
    }


# ------------------------------------------------------------------------------------------------
# Classification of the errors
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class _Error:
    index: int  # into results
    kind: str
    target: int  # gt annotation id (0: none)


def _geometry(record: Mapping[str, Any], iou_type: IouType) -> Any:
    if iou_type == "bbox":
        return [float(v) for v in record["bbox"]]
    rle = dict(record["segmentation"])
    if isinstance(rle.get("counts"), str):
        rle["counts"] = rle["counts"].encode("ascii")
    return rle


def _classify(
    gt: COCO,
    results: list[dict[str, Any]],
    matched: dict[int, int],
    *,
    iou_type: IouType,
    fg_iou: float,
    bg_iou: float,
) -> list[_Error]:
    """The error of every false positive of ``results`` (``matched[index + 1] == 0``)."""
    by_image: dict[int, list[int]] = {}
    for index, r in enumerate(results):
        if matched.get(index + 1) == 0:
            by_image.setdefault(int(r["image_id"]), []).append(index)
    errors: list[_Error] = []
    for image_id, indices in by_image.items():
        anns = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not anns:
            errors.extend(_Error(i, "bkg", 0) for i in indices)
            continue
        if iou_type == "bbox":
            gts = [[float(v) for v in a["bbox"]] for a in anns]
        else:
            gts = [gt.annToRLE(a) for a in anns]
        dts = [_geometry(results[i], iou_type) for i in indices]
        iou = np.asarray(mask_utils.iou(dts, gts, [0] * len(anns))).reshape(len(dts), len(anns))
        gt_cats = np.asarray([a["category_id"] for a in anns])  # [G]
        gt_ids = [int(a["id"]) for a in anns]
        for row, index in enumerate(indices):
            same = gt_cats == results[index]["category_id"]  # [G]
            iou_same = np.where(same, iou[row], -1.0)
            iou_other = np.where(same, -1.0, iou[row])
            best_same, best_other = int(iou_same.argmax()), int(iou_other.argmax())
            if bg_iou <= iou_same[best_same] < fg_iou:
                errors.append(_Error(index, "loc", gt_ids[best_same]))
            elif iou_other[best_other] >= fg_iou:
                errors.append(_Error(index, "cls", gt_ids[best_other]))
            elif iou_same[best_same] >= fg_iou:
                errors.append(_Error(index, "dupe", gt_ids[best_same]))
            elif iou_other[best_other] >= bg_iou:
                errors.append(_Error(index, "both", gt_ids[best_other]))
            else:
                errors.append(_Error(index, "bkg", 0))
    return errors


# ------------------------------------------------------------------------------------------------
# Oracle fixes
# ------------------------------------------------------------------------------------------------


def _snap(record: dict[str, Any], ann: Mapping[str, Any], gt: COCO, iou_type: IouType) -> None:
    """Give ``record`` the geometry of ``ann``: its box, or its mask (and no box, which would
    make pycocotools read the record as a box)."""
    if iou_type == "bbox":
        record["bbox"] = [float(v) for v in ann["bbox"]]
    else:
        rle = gt.annToRLE(ann)
        counts = rle["counts"]
        record["segmentation"] = {
            "size": list(rle["size"]),
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
        }


def _fixed_results(
    gt: COCO,
    results: list[dict[str, Any]],
    errors: list[_Error],
    matched: dict[int, int],
    kinds: set[str],
    iou_type: IouType,
) -> list[dict[str, Any]]:
    """``results`` with the errors of ``kinds`` fixed by their oracle (``miss`` aside)."""
    claimed = {g for g in matched.values() if g}
    by_index = {e.index: e for e in errors if e.kind in kinds}
    order = sorted(by_index, key=lambda i: -float(results[i]["score"]))
    drop: set[int] = set()
    replaced: dict[int, dict[str, Any]] = {}
    for index in order:
        error = by_index[index]
        if error.kind in ("dupe", "bkg") or error.target in claimed:
            drop.add(index)
            continue
        claimed.add(error.target)
        ann = gt.anns[error.target]
        record = copy.deepcopy(results[index])
        if error.kind in ("cls", "both"):
            record["category_id"] = ann["category_id"]
        if error.kind in ("loc", "both"):
            _snap(record, ann, gt, iou_type)
        replaced[index] = record
    return [replaced.get(i, r) for i, r in enumerate(results) if i not in drop]


def _missed_as_detections(
    gt: COCO, results: list[dict[str, Any]], missed: Sequence[int], iou_type: IouType
) -> list[dict[str, Any]]:
    low = min((float(r["score"]) for r in results), default=1.0)
    added = []
    for rank, ann_id in enumerate(missed):
        ann = gt.anns[ann_id]
        record: dict[str, Any] = {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "score": low * 0.5 ** (1 + rank / max(1, len(missed))),
        }
        _snap(record, ann, gt, iou_type)
        added.append(record)
    return list(results) + added


def _without_gts(gt: COCO, missed: Sequence[int]) -> COCO:
    gone = set(missed)
    dataset = dict(gt.dataset)
    dataset["annotations"] = [a for a in gt.dataset["annotations"] if a["id"] not in gone]
    return _index(dataset)


# ------------------------------------------------------------------------------------------------
# The breakdown
# ------------------------------------------------------------------------------------------------


def error_breakdown(
    coco_gt: COCO | str | Path,
    results: Sequence[Mapping[str, Any]] | str | Path,
    *,
    iou_type: IouType = "bbox",
    fg_iou: float = 0.5,
    bg_iou: float = 0.1,
    miss_fix: MissFix = "drop_gt",
) -> ErrorBreakdown:
    """The error breakdown of ``results`` against ``coco_gt`` (see the module docstring).

    ``coco_gt``: a pycocotools ``COCO`` or the path of an annotation file; ``results``: COCO
    result records (``image_id``, ``category_id``, ``score``, and ``bbox`` or, for
    ``iou_type="segm"``, a compressed-RLE ``segmentation``) or the path of a results JSON file.
    Neither is modified. A record naming an image or category absent from the ground truth, or
    lacking a field, raises ``ValueError`` with its index. Empty results are valid: base AP 0,
    every gt missed.

    ``fg_iou`` must be 0.5, COCO's lowest IoU threshold, whose matching defines the true
    positives; ``bg_iou`` is the background threshold. COCO evaluation runs once for the base
    results and once for each error type and for all of them (8 runs in all).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"error_breakdown: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if fg_iou != 0.5:
        raise ValueError(
            f"error_breakdown: fg_iou must be 0.5 (COCO's AP50 matching), got {fg_iou}"
        )
    if not 0.0 <= bg_iou < fg_iou:
        raise ValueError(f"error_breakdown: bg_iou must be in [0, {fg_iou}), got {bg_iou}")
    if miss_fix not in ("drop_gt", "add_detection"):
        raise ValueError(
            f"error_breakdown: miss_fix must be 'drop_gt' or 'add_detection', got {miss_fix!r}"
        )
    gt = _load_gt(coco_gt)
    records = load_results(results, gt, iou_type=iou_type)  # checked new dicts
    if iou_type == "segm":
        for r in records:  # areas and boxes from the masks, as pycocotools derives them
            r.pop("bbox", None)

    base = _Evaluation(gt, records, iou_type)
    matched, _ = base.matching()
    errors = _classify(gt, records, matched, iou_type=iou_type, fg_iou=fg_iou, bg_iou=bg_iou)

    found = {g for g in matched.values() if g} | {e.target for e in errors if e.target}
    missed = sorted(
        int(a["id"])
        for a in gt.dataset.get("annotations", [])
        if not a.get("iscrowd", 0) and int(a["id"]) not in found
    )

    fixed_ap50: dict[str, float] = {}
    fixed_ap: dict[str, float] = {}
    per_class_fixed: dict[str, dict[str, float]] = {}
    for kind in (*ERROR_TYPES, "all"):
        kinds = set(ERROR_TYPES) if kind == "all" else {kind}
        fixed = _fixed_results(gt, records, errors, matched, kinds, iou_type)
        fixed_gt = gt
        if "miss" in kinds and missed:
            if miss_fix == "drop_gt":
                fixed_gt = _without_gts(gt, missed)
            else:
                fixed = _missed_as_detections(gt, fixed, missed, iou_type)
        run = _Evaluation(fixed_gt, fixed, iou_type)
        fixed_ap50[kind], fixed_ap[kind] = run.ap50, run.ap
        per_class_fixed[kind] = run.per_class_ap50

    names = _class_names(gt)
    labels: list[str] = ["ignored"] * len(records)
    for dt_id, g in matched.items():
        if g:
            labels[dt_id - 1] = "tp"
    counts = {kind: 0 for kind in ERROR_TYPES}
    per_class_counts: dict[str, dict[str, int]] = {
        kind: dict.fromkeys(names.values(), 0) for kind in ERROR_TYPES
    }
    for e in errors:
        labels[e.index] = e.kind
        counts[e.kind] += 1
        per_class_counts[e.kind][names[records[e.index]["category_id"]]] += 1
    counts["miss"] = len(missed)
    for ann_id in missed:
        per_class_counts["miss"][names[gt.anns[ann_id]["category_id"]]] += 1

    return ErrorBreakdown(
        iou_type=iou_type,
        fg_iou=fg_iou,
        bg_iou=bg_iou,
        miss_fix=miss_fix,
        ap50=base.ap50,
        ap=base.ap,
        per_class_ap50=base.per_class_ap50,
        fixed_ap50=fixed_ap50,
        fixed_ap=fixed_ap,
        per_class_fixed_ap50=per_class_fixed,
        counts=counts,
        per_class_counts=per_class_counts,
        num_detections=len(records),
        num_true_positives=sum(1 for g in matched.values() if g),
        num_ignored=len(records) - len(matched),
        num_gt=sum(1 for a in gt.dataset.get("annotations", []) if not a.get("iscrowd", 0)),
        detection_labels=tuple(labels),
        missed_gt_ids=tuple(missed),
    )


def plot_error_breakdown(
    breakdown: ErrorBreakdown, path: str | Path, *, metric: Literal["ap50", "ap"] = "ap50"
) -> Path:
    """A horizontal bar chart (PNG) of the AP gained by fixing each error type alone, with the
    count of each type beside its bar; the title gives the base AP. Undefined gains are drawn as
    0 and marked ``n/a``. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    deltas = breakdown.delta_ap50 if metric == "ap50" else breakdown.delta_ap
    base = breakdown.ap50 if metric == "ap50" else breakdown.ap
    kinds = list(ERROR_TYPES)
    values = [0.0 if math.isnan(deltas[k]) else 100.0 * deltas[k] for k in kinds]
    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(kinds))[::-1]
    axes.barh(positions, values, color="#4c72b0")
    axes.set_yticks(positions, [ERROR_NAMES[k] for k in kinds])
    for y, k, v in zip(positions, kinds, values, strict=True):
        text = "n/a" if math.isnan(deltas[k]) else f"{v:+.1f} ({breakdown.counts[k]})"
        axes.text(v, y, f" {text}", va="center", fontsize=8)
    label = "AP50" if metric == "ap50" else "AP"
    axes.set_xlabel(f"d{label} (points) when fixed alone; count in brackets")
    base_text = "n/a" if math.isnan(base) else f"{100.0 * base:.1f}"
    axes.set_title(f"{breakdown.iou_type} errors: base {label} {base_text}")
    axes.set_xlim(left=min(0.0, *values), right=max(1.0, *values) * 1.25)
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, format="png")
    return out
