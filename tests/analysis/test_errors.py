from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fdet.analysis.errors import ERROR_TYPES, ErrorBreakdown, error_breakdown, plot_error_breakdown

# ------------------------------------------------------------------------------------------------
# Hand-made sets. Image 1 holds A (cat); image 2 holds B (dog) and C (cat); image 3 holds D (cat).
# Boxes [x, y, w, h]; a 50-wide box shifted by 27 px has IoU 23/77 = 0.30 with itself, by 5 px
# 45/55 = 0.82.
# ------------------------------------------------------------------------------------------------

CAT, DOG = 1, 2
A = [10.0, 10.0, 50.0, 50.0]
B = [20.0, 20.0, 60.0, 60.0]
C = [100.0, 100.0, 50.0, 50.0]
D = [40.0, 40.0, 50.0, 50.0]
A_IOU_30 = [37.0, 10.0, 50.0, 50.0]
A_IOU_82 = [15.0, 10.0, 50.0, 50.0]
FAR = [150.0, 150.0, 30.0, 30.0]


def make_gt(*, with_d: bool = False, crowd: bool = False) -> dict[str, Any]:
    anns = [(1, 1, CAT, A), (2, 2, DOG, B), (3, 2, CAT, C)]
    if with_d:
        anns.append((4, 3, CAT, D))
    annotations = [
        {"id": i, "image_id": img, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i, img, c, b in anns
    ]
    if crowd:  # a crowd region of cats on image 3
        box = [100.0, 100.0, 80.0, 80.0]
        annotations.append(
            {"id": 9, "image_id": 3, "category_id": CAT, "bbox": box, "area": 6400.0, "iscrowd": 1}
        )
    return {
        "images": [
            {"id": i, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in (1, 2, 3)
        ],
        "annotations": annotations,
        "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}],
    }


def det(image_id: int, category_id: int, box: list[float], score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": category_id, "bbox": list(box), "score": score}


def perfect() -> list[dict[str, Any]]:
    return [det(1, CAT, A, 0.9), det(2, DOG, B, 0.8), det(2, CAT, C, 0.6)]


def coco(gt: dict[str, Any]) -> COCO:
    api = COCO()
    api.dataset = copy.deepcopy(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def reference_ap50(gt: dict[str, Any], results: list[dict[str, Any]]) -> float:
    """AP50 from pycocotools' COCOeval, run directly."""
    with contextlib.redirect_stdout(io.StringIO()):
        ground = coco(gt)
        evaluator = COCOeval(ground, ground.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


def unmatched_gts(gt: dict[str, Any], results: list[dict[str, Any]]) -> set[int]:
    """Ids of the gts that COCOeval matches to no detection at IoU 0.5."""
    with contextlib.redirect_stdout(io.StringIO()):
        ground = coco(gt)
        evaluator = COCOeval(ground, ground.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.params.areaRng = [evaluator.params.areaRng[0]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
    out: set[int] = set()
    for entry in evaluator.evalImgs:
        if entry is not None:
            out |= {int(g) for g, m in zip(entry["gtIds"], entry["gtMatches"][0]) if m == 0}
    return out


# 101-point interpolated AP of a class whose detections are, by score: (1 TP, 1 FP, 1 TP) of
# 2 gts, (1 FP, 2 TP) of 2 gts, (1 FP, 1 TP) of 1 gt, (1 TP) of 2 gts.
TP_FP_TP = (51 * 1.0 + 50 * 2 / 3) / 101
FP_TP_TP = 2 / 3
FP_TP = 0.5
HALF_RECALL = 51 / 101

# kind -> (extra or replaced results, gt with D, per-class base AP50 by hand)
CASES: dict[str, tuple[list[dict[str, Any]], bool, dict[str, float]]] = {
    # a dog detection on A, above A's own detection: classification, target already matched
    "cls": ([*perfect(), det(1, DOG, A, 0.95)], False, {"cat": 1.0, "dog": FP_TP}),
    "loc": ([*perfect(), det(1, CAT, A_IOU_30, 0.95)], False, {"cat": FP_TP_TP, "dog": 1.0}),
    "both": ([*perfect(), det(1, DOG, A_IOU_30, 0.95)], False, {"cat": 1.0, "dog": FP_TP}),
    "dupe": ([*perfect(), det(1, CAT, A_IOU_82, 0.85)], False, {"cat": TP_FP_TP, "dog": 1.0}),
    "bkg": ([*perfect(), det(1, CAT, FAR, 0.95)], False, {"cat": FP_TP_TP, "dog": 1.0}),
    # D has no detection: the cat detections (A, C) are true positives of 3 gts, precision 1 up
    # to recall 2/3, i.e. the 67 recall points 0, 0.01, ..., 0.66.
    "miss": (perfect(), True, {"cat": 67 / 101, "dog": 1.0}),
}


@pytest.mark.parametrize("kind", ERROR_TYPES)
def test_single_error_type(kind: str) -> None:
    results, with_d, per_class = CASES[kind]
    gt = make_gt(with_d=with_d)
    out = error_breakdown(coco(gt), results)

    expected_counts = {k: int(k == kind) for k in ERROR_TYPES}
    assert out.counts == expected_counts
    for name, ap in per_class.items():
        assert out.per_class_ap50[name] == pytest.approx(ap, abs=1e-9), name
    base = float(np.mean(list(per_class.values())))
    assert out.ap50 == pytest.approx(base, abs=1e-9)
    assert out.ap50 == pytest.approx(reference_ap50(gt, results), abs=1e-12)
    assert out.ap50 < 1.0

    # Fixing this type gives a perfect AP50; fixing any other changes nothing.
    assert out.fixed_ap50[kind] == pytest.approx(1.0, abs=1e-12)
    assert out.delta_ap50[kind] == pytest.approx(1.0 - base, abs=1e-9)
    for other in ERROR_TYPES:
        if other != kind:
            assert out.fixed_ap50[other] == pytest.approx(out.ap50, abs=1e-12), other
            assert out.delta_ap50[other] == pytest.approx(0.0, abs=1e-12), other
    assert out.fixed_ap50["all"] == pytest.approx(1.0, abs=1e-12)

    # Per class: only the class that held the error gains.
    for name, ap in per_class.items():
        assert out.per_class_delta_ap50[kind][name] == pytest.approx(1.0 - ap, abs=1e-9), name

    # Every detection labelled: the added one (last) is the error, the others true positives.
    assert out.num_detections == len(results)
    if kind != "miss":
        assert out.detection_labels == ("tp", "tp", "tp", kind)
        assert out.num_true_positives == 3
        assert out.missed_gt_ids == ()
    else:
        assert out.detection_labels == ("tp", "tp", "tp")
        assert out.missed_gt_ids == (4,)


def test_classification_fix_recovers_its_target() -> None:
    """A's only detection has the wrong class: A is not missed, and relabelling it recovers A
    (here the fix is a relabel, not a removal)."""
    gt = make_gt()
    results = [det(1, DOG, A, 0.9), det(2, DOG, B, 0.8), det(2, CAT, C, 0.6)]
    out = error_breakdown(coco(gt), results)
    assert out.counts == {"cls": 1, "loc": 0, "both": 0, "dupe": 0, "bkg": 0, "miss": 0}
    assert out.per_class_ap50 == pytest.approx({"cat": HALF_RECALL, "dog": FP_TP})
    assert out.ap50 == pytest.approx(reference_ap50(gt, results), abs=1e-12)
    assert out.fixed_ap50["cls"] == pytest.approx(1.0)
    # Dropping the detection instead would leave cat at half recall: the relabel is what fixes it.
    dropped = reference_ap50(gt, results[1:])
    assert dropped < 1.0
    assert out.per_class_counts["cls"] == {"cat": 0, "dog": 1}


def test_localization_fix_snaps_to_its_target() -> None:
    """A's only detection is badly placed: snapping it to A gives AP 1 at every IoU threshold."""
    gt = make_gt()
    results = [det(1, CAT, A_IOU_30, 0.9), det(2, DOG, B, 0.8), det(2, CAT, C, 0.6)]
    out = error_breakdown(coco(gt), results)
    assert out.counts["loc"] == 1 and out.counts["miss"] == 0
    assert out.fixed_ap50["loc"] == pytest.approx(1.0)
    assert out.fixed_ap["loc"] == pytest.approx(1.0)
    # cat: FP then TP of 2 gts: precision 1/2 over the recall points 0 .. 0.5.
    assert out.per_class_ap50["cat"] == pytest.approx(0.5 * 51 / 101, abs=1e-9)
    assert out.ap50 == pytest.approx(reference_ap50(gt, results), abs=1e-12)


def test_every_error_at_once() -> None:
    gt = make_gt(with_d=True)
    results = [
        *perfect(),
        det(1, DOG, A, 0.95),  # cls
        det(1, CAT, A_IOU_30, 0.93),  # loc
        det(1, DOG, A_IOU_30, 0.92),  # both
        det(1, CAT, A_IOU_82, 0.85),  # dupe
        det(1, CAT, FAR, 0.97),  # bkg
    ]  # and D missed
    out = error_breakdown(coco(gt), results)
    assert out.counts == {k: 1 for k in ERROR_TYPES}
    assert out.detection_labels == ("tp", "tp", "tp", "cls", "loc", "both", "dupe", "bkg")
    assert out.per_class_counts["miss"] == {"cat": 1, "dog": 0}
    assert out.per_class_counts["dupe"] == {"cat": 1, "dog": 0}
    assert out.per_class_counts["both"] == {"cat": 0, "dog": 1}
    assert out.ap50 == pytest.approx(reference_ap50(gt, results), abs=1e-12)
    assert out.fixed_ap50["all"] == pytest.approx(1.0, abs=1e-12)
    assert out.fixed_ap["all"] == pytest.approx(1.0, abs=1e-12)
    for kind in ERROR_TYPES:  # each fix alone helps, and less than all of them
        assert out.ap50 < out.fixed_ap50[kind] < 1.0, kind
    # The fixed APs are COCOeval's on the corrected results: removing the background detection
    # by hand gives the same number.
    no_bkg = [r for r, label in zip(results, out.detection_labels) if label != "bkg"]
    assert out.fixed_ap50["bkg"] == pytest.approx(reference_ap50(gt, no_bkg), abs=1e-12)
    assert out.num_gt == 4 and out.num_true_positives == 3 and out.num_ignored == 0


def test_missed_as_detections() -> None:
    """With ``miss_fix="add_detection"`` the missed gt becomes the lowest detection: below a
    background false positive it cannot reach full precision, unlike dropping it."""
    gt = make_gt(with_d=True)
    results = [*perfect(), det(3, CAT, FAR, 0.5)]  # bkg below every true positive
    dropped = error_breakdown(coco(gt), results)
    added = error_breakdown(coco(gt), results, miss_fix="add_detection")
    assert dropped.counts["miss"] == added.counts["miss"] == 1
    assert dropped.fixed_ap50["miss"] == pytest.approx(1.0)
    # cat: TP, TP, FP, TP of 3 gts: precision 1 to recall 2/3, then 3/4.
    cat = (67 * 1.0 + 34 * 0.75) / 101
    assert added.per_class_fixed_ap50["miss"]["cat"] == pytest.approx(cat, abs=1e-9)
    assert added.fixed_ap50["miss"] == pytest.approx((cat + 1.0) / 2, abs=1e-9)
    assert added.fixed_ap50["all"] == pytest.approx(1.0)


def test_crowd_regions_are_ignored() -> None:
    gt = make_gt(crowd=True)
    inside = det(3, CAT, [110.0, 110.0, 40.0, 40.0], 0.95)  # matched to the crowd region: ignored
    results = [*perfect(), inside, det(3, DOG, [105.0, 105.0, 60.0, 60.0], 0.7)]
    out = error_breakdown(coco(gt), results)
    assert out.detection_labels == ("tp", "tp", "tp", "ignored", "bkg")
    assert out.num_ignored == 1
    assert out.counts == {"cls": 0, "loc": 0, "both": 0, "dupe": 0, "bkg": 1, "miss": 0}
    assert out.num_gt == 3  # the crowd region is no gt to miss
    assert 9 not in out.missed_gt_ids
    assert out.ap50 == pytest.approx(reference_ap50(gt, results), abs=1e-12)


def test_empty_results() -> None:
    gt = make_gt()
    out = error_breakdown(coco(gt), [])
    assert out.ap50 == 0.0 and out.ap == 0.0
    assert out.counts == {"cls": 0, "loc": 0, "both": 0, "dupe": 0, "bkg": 0, "miss": 3}
    assert out.missed_gt_ids == (1, 2, 3)
    for kind in ("cls", "loc", "both", "dupe", "bkg"):
        assert out.fixed_ap50[kind] == 0.0
    # Dropping every gt leaves nothing to evaluate: undefined, as COCO has it.
    assert math.isnan(out.fixed_ap50["miss"])
    added = error_breakdown(coco(gt), [], miss_fix="add_detection")
    assert added.fixed_ap50["miss"] == pytest.approx(1.0)
    json.dumps(out.to_dict(), allow_nan=False)


def test_paths_and_objects_agree(tmp_path: Path) -> None:
    gt = make_gt(with_d=True)
    results, _, _ = CASES["dupe"]
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    before = copy.deepcopy(results)
    from_objects = error_breakdown(coco(gt), results)
    from_paths = error_breakdown(gt_path, res_path)
    assert results == before  # not modified
    assert from_objects.to_dict() == from_paths.to_dict()


def test_bad_input() -> None:
    gt = coco(make_gt())
    with pytest.raises(ValueError, match=r"results\[1\]: image_id 77 is not an image"):
        error_breakdown(gt, [det(1, CAT, A, 0.9), det(77, CAT, A, 0.8)])
    with pytest.raises(ValueError, match=r"results\[0\]: category_id 5 is not a category"):
        error_breakdown(gt, [det(1, 5, A, 0.9)])
    with pytest.raises(ValueError, match=r"results\[0\]: lacks \['score'\]"):
        error_breakdown(gt, [{"image_id": 1, "category_id": CAT, "bbox": A}])
    with pytest.raises(ValueError, match="bg_iou"):
        error_breakdown(gt, [], bg_iou=0.6)
    with pytest.raises(ValueError, match="miss_fix"):
        error_breakdown(gt, [], miss_fix="ignore")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Random sets: every label obeys its definition, checked with an IoU computed here.
# ------------------------------------------------------------------------------------------------


def iou_xywh(a: list[float], b: list[float]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def random_set(seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    images = [{"id": i, "width": 300, "height": 300} for i in range(1, 7)]
    annotations, results = [], []
    for image in images:
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(20, 120, size=2)
            x, y = rng.uniform(0, 300 - w), rng.uniform(0, 300 - h)
            box = [float(x), float(y), float(w), float(h)]
            c = int(rng.integers(1, 4))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": c,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0.0, 0.15, size=4) * [w, h, w, h]
                b = [
                    box[0] + jitter[0],
                    box[1] + jitter[1],
                    max(4.0, w + jitter[2]),
                    max(4.0, h + jitter[3]),
                ]
                cat = c if rng.random() < 0.7 else int(rng.integers(1, 4))
                results.append(det(image["id"], cat, [float(v) for v in b], 0.0))
        for _ in range(int(rng.integers(0, 3))):
            w, h = rng.uniform(10, 60, size=2)
            b = [float(rng.uniform(0, 240)), float(rng.uniform(0, 240)), float(w), float(h)]
            results.append(det(image["id"], int(rng.integers(1, 4)), b, 0.0))
    for r, s in zip(results, rng.permutation(len(results)) / len(results) + 0.01):
        r["score"] = float(s)
    categories = [{"id": c, "name": n} for c, n in ((1, "a"), (2, "b"), (3, "c"))]
    return {"images": images, "annotations": annotations, "categories": categories}, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_obey_their_definitions(seed: int) -> None:
    gt, results = random_set(seed)
    out = error_breakdown(coco(gt), results)
    assert isinstance(out, ErrorBreakdown)
    assert out.ap50 == pytest.approx(reference_ap50(gt, results), abs=1e-12)
    for r, label in zip(results, out.detection_labels):
        anns = [a for a in gt["annotations"] if a["image_id"] == r["image_id"]]
        same = [
            iou_xywh(r["bbox"], a["bbox"]) for a in anns if a["category_id"] == r["category_id"]
        ]
        other = [
            iou_xywh(r["bbox"], a["bbox"]) for a in anns if a["category_id"] != r["category_id"]
        ]
        best_same, best_other = max(same, default=0.0), max(other, default=0.0)
        if label == "tp":
            assert best_same >= 0.5
        elif label == "loc":
            assert 0.1 <= best_same < 0.5
        elif label == "cls":
            assert best_other >= 0.5 and not 0.1 <= best_same < 0.5
        elif label == "dupe":
            assert best_same >= 0.5 and best_other < 0.5
        elif label == "both":
            assert 0.1 <= best_other < 0.5 and best_same < 0.1
        else:
            assert label == "bkg", label
            assert max(best_same, best_other) < 0.1
    counted = {k: out.detection_labels.count(k) for k in ERROR_TYPES if k != "miss"}
    assert counted == {k: v for k, v in out.counts.items() if k != "miss"}
    assert sum(counted.values()) + out.num_true_positives == len(results)
    # Missed: exactly the gts that COCOeval leaves unmatched and that no loc / cls / both
    # detection targets (its best-IoU gt of the same / another class).
    unmatched = unmatched_gts(gt, results)
    targeted: set[int] = set()
    for r, label in zip(results, out.detection_labels):
        if label in ("loc", "cls", "both"):
            anns = [
                a
                for a in gt["annotations"]
                if a["image_id"] == r["image_id"]
                and (a["category_id"] == r["category_id"]) == (label == "loc")
            ]
            targeted.add(max(anns, key=lambda a: iou_xywh(r["bbox"], a["bbox"]))["id"])
    assert set(out.missed_gt_ids) == unmatched - targeted
    assert out.fixed_ap50["all"] >= max(out.fixed_ap50[k] for k in ERROR_TYPES) - 1e-12
    for kind in ERROR_TYPES:
        assert out.fixed_ap50[kind] >= out.ap50 - 1e-12, kind


def test_plot_and_dict(tmp_path: Path) -> None:
    gt = make_gt(with_d=True)
    results = [*perfect(), det(1, CAT, FAR, 0.97)]
    out = error_breakdown(coco(gt), results)
    path = plot_error_breakdown(out, tmp_path / "errors.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    d = json.loads(json.dumps(out.to_dict(), allow_nan=False))
    assert d["counts"] == out.counts
    assert d["delta_ap50"]["bkg"] == pytest.approx(out.fixed_ap50["bkg"] - out.ap50)
    assert set(d["fixed_ap50"]) == {*ERROR_TYPES, "all"}


def square_rle(box: list[float]) -> dict[str, Any]:
    mask = np.zeros((200, 200), dtype=np.uint8)
    x, y, w, h = (int(v) for v in box)
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def test_masks() -> None:
    """``iou_type="segm"``: the same errors on masks, with polygon ground truth."""
    gt = make_gt(with_d=True)
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    boxes = [
        (1, CAT, A, 0.9),
        (2, DOG, B, 0.8),
        (2, CAT, C, 0.6),
        (1, DOG, A, 0.95),  # cls
        (3, CAT, [40.0, 67.0, 50.0, 50.0], 0.7),  # loc on D (IoU 0.30)
        (1, CAT, FAR, 0.97),  # bkg
    ]
    results = [
        {"image_id": i, "category_id": c, "segmentation": square_rle(b), "score": s}
        for i, c, b, s in boxes
    ]
    ground_truth = coco(gt)
    out = error_breakdown(ground_truth, results, iou_type="segm")
    assert ground_truth.dataset == gt  # not modified
    assert out.detection_labels == ("tp", "tp", "tp", "cls", "loc", "bkg")
    assert out.counts["miss"] == 0
    with contextlib.redirect_stdout(io.StringIO()):
        ground = coco(gt)
        evaluator = COCOeval(ground, ground.loadRes(copy.deepcopy(results)), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert out.ap50 == pytest.approx(float(evaluator.stats[1]), abs=1e-12)
    assert out.ap == pytest.approx(float(evaluator.stats[0]), abs=1e-12)
    assert out.fixed_ap50["all"] == pytest.approx(1.0, abs=1e-12)
    for kind in ("cls", "loc", "bkg"):
        assert out.ap50 < out.fixed_ap50[kind] < 1.0, kind
