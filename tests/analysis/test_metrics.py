from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fdet.analysis.metrics import (
    UNDEFINED,
    confusion_matrix,
    per_class_table,
    plot_confusion_matrix,
    plot_pr_curves,
    pr_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ------------------------------------------------------------------------------------------------
# A hand-made set: 4 images, categories 1 (cat), 2 (dog), 5 (bird: ground truth, no detections),
# 9 (kite: detections, no ground truth)
# ------------------------------------------------------------------------------------------------


def _ann(ann_id: int, image_id: int, cat: int, box: list[float], crowd: int = 0) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": box,
        "area": box[2] * box[3],
        "iscrowd": crowd,
    }


def _gt_dataset() -> dict[str, Any]:
    images = [{"id": i, "width": 400, "height": 400, "file_name": f"{i}.jpg"} for i in (1, 2, 3, 4)]
    annotations = [
        _ann(1, 1, 1, [10, 10, 20, 20]),  # small cat
        _ann(2, 1, 2, [100, 100, 60, 60]),  # medium dog
        _ann(3, 1, 1, [200, 200, 120, 120]),  # large cat
        _ann(4, 2, 2, [0, 0, 50, 40]),  # medium dog
        _ann(5, 2, 5, [300, 300, 25, 25]),  # small bird, never detected
        _ann(6, 2, 1, [150, 20, 100, 110]),  # large cat, missed
        _ann(7, 3, 2, [50, 50, 200, 150]),  # large dog
        _ann(8, 3, 2, [300, 10, 30, 30]),  # medium dog
        _ann(9, 3, 1, [0, 250, 80, 80], crowd=1),  # a crowd of cats
        # image 4 has no ground truth
    ]
    categories = [
        {"id": 1, "name": "cat"},
        {"id": 2, "name": "dog"},
        {"id": 5, "name": "bird"},
        {"id": 9, "name": "kite"},
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def _results() -> list[dict[str, Any]]:
    def r(image_id: int, cat: int, box: list[float], score: float) -> dict[str, Any]:
        return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}

    return [
        r(1, 1, [11, 9, 20, 21], 0.95),  # cat, IoU ≈ 0.86
        r(1, 1, [205, 210, 120, 110], 0.40),  # large cat, IoU ≈ 0.85
        r(1, 1, [12, 10, 20, 20], 0.30),  # duplicate of the small cat
        r(1, 2, [100, 100, 60, 60], 0.90),  # dog, exact
        r(1, 2, [104, 100, 60, 60], 0.20),  # duplicate dog
        r(2, 2, [2, 3, 50, 40], 0.85),  # dog, IoU ≈ 0.80
        r(2, 1, [165, 30, 100, 100], 0.50),  # the cat, IoU 0.68: a hit at 0.5 only
        r(2, 2, [300, 300, 25, 25], 0.60),  # on the bird: a dog false positive
        r(3, 2, [60, 60, 200, 150], 0.70),  # dog, IoU ≈ 0.80
        r(3, 1, [0, 250, 80, 80], 0.80),  # on the cat crowd: ignored by COCO
        r(3, 2, [300, 200, 40, 40], 0.65),  # false positive dog
        r(4, 1, [10, 10, 50, 50], 0.55),  # false positive cat on an empty image
        r(4, 9, [100, 100, 30, 30], 0.75),  # a kite, no kite ground truth anywhere
    ]


def _coco(dataset: dict[str, Any]) -> COCO:
    api = COCO()
    api.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def _reference_stats(dataset: dict[str, Any], results: list[dict], cat_id: int) -> np.ndarray:
    """COCO's 12 summary stats of one category evaluated alone."""
    gt = _coco(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "bbox")
        ev.params.catIds = [cat_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


@pytest.fixture
def gt_path(tmp_path: Path) -> Path:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_gt_dataset()))
    return path


# ------------------------------------------------------------------------------------------------
# per_class_table
# ------------------------------------------------------------------------------------------------

_STAT_INDEX = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


def test_per_class_equals_single_category_evaluation() -> None:
    dataset, results = _gt_dataset(), _results()
    rows = per_class_table(_coco(dataset), results)
    assert [r["category_id"] for r in rows] == [1, 2, 5, 9]
    assert [r["name"] for r in rows] == ["cat", "dog", "bird", "kite"]
    for row in rows:
        reference = _reference_stats(dataset, results, row["category_id"])
        for key, i in _STAT_INDEX.items():
            assert row[key] == pytest.approx(reference[i], abs=1e-12), (row["name"], key)
    by_name = {r["name"]: r for r in rows}
    # the set exercises every case: partial AP, a class never detected, one without ground truth
    assert 0 < by_name["cat"]["AP"] < 1 and 0 < by_name["dog"]["AP"] < 1
    assert by_name["bird"]["AP"] == 0.0 and by_name["bird"]["AR100"] == 0.0
    assert by_name["bird"]["APl"] == UNDEFINED  # no large bird
    assert all(by_name["kite"][k] == UNDEFINED for k in _STAT_INDEX)
    assert by_name["cat"]["AP75"] < by_name["cat"]["AP50"]


def test_per_class_counts() -> None:
    rows = {r["name"]: r for r in per_class_table(_coco(_gt_dataset()), _results())}
    assert {n: r["num_gts"] for n, r in rows.items()} == {"cat": 3, "dog": 4, "bird": 1, "kite": 0}
    assert {n: r["num_detections"] for n, r in rows.items()} == {
        "cat": 6,
        "dog": 6,
        "bird": 0,
        "kite": 1,
    }


def test_per_class_hand_computed_ap() -> None:
    """Two cats; the top detection hits one, the next is a false positive: precision 1 up to
    recall 0.5 and 0 beyond, so AP is 51/101 at every threshold, AR 0.5."""
    dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [_ann(1, 1, 1, [0, 0, 40, 40]), _ann(2, 1, 1, [50, 50, 40, 40])],
        "categories": [{"id": 1, "name": "cat"}],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 40], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [0, 60, 10, 10], "score": 0.8},
    ]
    (row,) = per_class_table(_coco(dataset), results)
    for key in ("AP", "AP50", "AP75", "APm"):
        assert row[key] == pytest.approx(51 / 101)
    assert row["AR100"] == pytest.approx(0.5)
    assert row["APs"] == UNDEFINED and row["APl"] == UNDEFINED


def test_per_class_empty_results_and_paths(gt_path: Path, tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    results_path.write_text("[]")
    rows = per_class_table(gt_path, results_path)
    for row in rows:
        expected = 0.0 if row["num_gts"] else UNDEFINED
        assert row["AP"] == expected and row["AR100"] == expected
        assert row["num_detections"] == 0
    results_path.write_text(json.dumps(_results()))
    from_paths = per_class_table(gt_path, results_path)
    assert from_paths == per_class_table(_coco(_gt_dataset()), _results())


def test_inputs_are_not_modified() -> None:
    gt, results = _coco(_gt_dataset()), _results()
    before = copy.deepcopy(results)
    per_class_table(gt, results)
    pr_curves(gt, results)
    confusion_matrix(gt, results)
    assert results == before
    assert gt.dataset == _gt_dataset()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_id": 77}, r"results\[3\]: image_id 77"),
        ({"category_id": 4}, r"results\[3\]: category_id 4"),
        ({"bbox": [1, 2, 3]}, r"results\[3\]: bbox"),
    ],
)
def test_bad_results_name_the_record(change: dict[str, Any], message: str) -> None:
    results = _results()
    results[3] = {**results[3], **change}
    gt = _coco(_gt_dataset())
    for fn in (per_class_table, pr_curves, confusion_matrix):
        with pytest.raises(ValueError, match=message):
            fn(gt, results)


def test_missing_field_and_bad_file(tmp_path: Path) -> None:
    results = _results()
    del results[2]["score"]
    with pytest.raises(ValueError, match=r"results\[2\]: lacks \['score'\]"):
        per_class_table(_coco(_gt_dataset()), results)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match=r"results\.json: a COCO results file holds a JSON list"):
        per_class_table(_coco(_gt_dataset()), path)


# ------------------------------------------------------------------------------------------------
# pr_curves
# ------------------------------------------------------------------------------------------------


def test_pr_curve_area_is_the_ap() -> None:
    dataset, results = _gt_dataset(), _results()
    curves = pr_curves(_coco(dataset), results, iou_thresholds=(0.5, 0.75, 0.9))
    assert set(curves) == {(c, t) for c in (1, 2, 5, 9) for t in (0.5, 0.75, 0.9)}
    rows = {r["category_id"]: r for r in per_class_table(_coco(dataset), results)}
    for (cat_id, iou), (recall, precision) in curves.items():
        assert recall.shape == precision.shape == (101,)
        np.testing.assert_allclose(recall, np.linspace(0, 1, 101))
        defined = precision[precision > -1]
        if cat_id == 9:
            assert defined.size == 0
            continue
        assert np.all(np.diff(precision) <= 0)  # interpolated: never increases
        if iou in (0.5, 0.75):
            key = "AP50" if iou == 0.5 else "AP75"
            assert defined.mean() == pytest.approx(rows[cat_id][key], abs=1e-12)
        reference = _reference_stats_at(dataset, results, cat_id, iou)
        assert defined.mean() == pytest.approx(reference, abs=1e-12)


def _reference_stats_at(dataset: dict, results: list[dict], cat_id: int, iou: float) -> float:
    """AP of one category evaluated alone at one IoU threshold (COCO's AP50 slot)."""
    gt = _coco(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "bbox")
        ev.params.catIds = [cat_id]
        ev.params.iouThrs = np.array([iou])
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"][0, :, 0, 0, -1]
    return float(p[p > -1].mean())


def test_pr_curve_rejects_unknown_threshold() -> None:
    with pytest.raises(ValueError, match=r"IoU threshold 0\.52 "):
        pr_curves(_coco(_gt_dataset()), _results(), iou_thresholds=(0.52,))


def test_plot_pr_curves(tmp_path: Path) -> None:
    gt = _coco(_gt_dataset())
    curves = pr_curves(gt, _results())
    out = plot_pr_curves(curves, {1: "cat", 2: "dog", 5: "bird"}, tmp_path / "pr.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no curves"):
        plot_pr_curves({}, None, tmp_path / "none.png")


# ------------------------------------------------------------------------------------------------
# confusion_matrix
# ------------------------------------------------------------------------------------------------


def _two_class_case() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [
            _ann(1, 1, 1, [0, 0, 10, 10]),  # A
            _ann(2, 1, 2, [20, 20, 10, 10]),  # B
            _ann(3, 2, 1, [0, 0, 10, 10]),  # A, never detected
            _ann(4, 2, 2, [50, 50, 30, 30], crowd=1),  # a crowd of B: counts nowhere
        ],
        "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
    }

    def r(image_id: int, cat: int, box: list[float], score: float) -> dict[str, Any]:
        return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}

    results = [
        r(1, 2, [0, 0, 10, 10], 0.9),  # B on the A: a confusion A → B
        r(1, 2, [20, 20, 10, 10], 0.8),  # B on the B
        r(1, 2, [21, 20, 10, 10], 0.7),  # a duplicate of the B: background
        r(1, 1, [60, 60, 5, 5], 0.6),  # A on nothing: background
        r(1, 1, [0, 0, 10, 10], 0.2),  # A on the A (already taken), below 0.3
        r(2, 2, [50, 50, 30, 30], 0.5),  # B on the crowd: background
    ]
    return dataset, results


def test_confusion_hand_computed(tmp_path: Path) -> None:
    dataset, results = _two_class_case()
    cm = confusion_matrix(_coco(dataset), results)
    assert cm.category_ids == (1, 2) and cm.names == ("A", "B")
    #                     pred A  pred B  missed
    expected = np.array([[0, 1, 1], [0, 1, 0], [1, 2, 0]])  # gt A, gt B, background
    np.testing.assert_array_equal(cm.counts, expected)
    path = cm.to_csv(tmp_path / "cm.csv")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ground truth \\ predicted", "A", "B", "missed"]
    assert rows[1:] == [["A", "0", "1", "1"], ["B", "0", "1", "0"], ["background", "1", "2", "0"]]
    np.testing.assert_allclose(
        cm.normalized(), np.array([[0, 0.5, 0.5], [0, 1, 0], [1 / 3, 2 / 3, 0]]), atol=1e-12
    )


def test_confusion_score_threshold() -> None:
    dataset, results = _two_class_case()
    # at 0.1 the low A detection is kept; its A is taken by the B detection: background
    cm = confusion_matrix(_coco(dataset), results, score_threshold=0.1)
    np.testing.assert_array_equal(cm.counts, [[0, 1, 1], [0, 1, 0], [2, 2, 0]])
    # at 0.95 nothing is kept: every (non-crowd) gt is missed
    cm = confusion_matrix(_coco(dataset), results, score_threshold=0.95)
    np.testing.assert_array_equal(cm.counts, [[0, 0, 2], [0, 0, 1], [0, 0, 0]])


def test_confusion_iou_threshold() -> None:
    dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [_ann(1, 1, 2, [2, 0, 10, 10])],
        "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
    }
    results = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.9}]
    # IoU 80 / 120 = 2/3: a match at 0.5 and 0.65, a false positive and a miss at 0.7
    for threshold in (0.5, 0.65):
        cm = confusion_matrix(_coco(dataset), results, iou_threshold=threshold)
        np.testing.assert_array_equal(cm.counts, [[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    cm = confusion_matrix(_coco(dataset), results, iou_threshold=0.7)
    np.testing.assert_array_equal(cm.counts, [[0, 0, 0], [0, 0, 1], [0, 1, 0]])
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        confusion_matrix(_coco(dataset), results, iou_threshold=0.0)


def test_confusion_prefers_own_class_on_ties_and_higher_iou_otherwise() -> None:
    for order in ((1, 2), (2, 1)):
        dataset = {
            "images": [{"id": 1, "width": 100, "height": 100}],
            "annotations": [_ann(i, 1, c, [0, 0, 10, 10]) for i, c in enumerate(order, 1)],
            "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
        }
        results = [
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.8},
        ]
        cm = confusion_matrix(_coco(dataset), results)
        np.testing.assert_array_equal(cm.counts, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    # a B overlapping the B a little and the A well goes to the A: the highest IoU wins
    dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "annotations": [_ann(1, 1, 1, [0, 0, 10, 10]), _ann(2, 1, 2, [2, 0, 10, 10])],
        "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
    }
    results = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.9}]
    cm = confusion_matrix(_coco(dataset), results)
    np.testing.assert_array_equal(cm.counts, [[0, 1, 0], [0, 0, 1], [0, 0, 0]])


def test_confusion_empty_results(gt_path: Path, tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    results_path.write_text("[]")
    cm = confusion_matrix(gt_path, results_path)
    np.testing.assert_array_equal(cm.counts[:-1, -1], [3, 4, 1, 0])
    assert cm.counts.sum() == 8


@pytest.mark.parametrize("seed", range(4))
def test_confusion_sums(seed: int) -> None:
    """Rows sum to the non-crowd gts of each class, columns to the kept detections of each
    predicted class, the background row to the kept detections that matched nothing."""
    rng = np.random.default_rng(seed)
    categories = [1, 4, 6]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for image_id in range(1, 7):
        images.append({"id": image_id, "width": 200, "height": 200})
        for _ in range(int(rng.integers(0, 6))):
            xy, wh = rng.uniform(0, 150, 2), rng.uniform(5, 50, 2)
            annotations.append(
                _ann(
                    len(annotations) + 1,
                    image_id,
                    int(rng.choice(categories)),
                    [*map(float, xy), *map(float, wh)],
                    crowd=int(rng.random() < 0.15),
                )
            )
            for _ in range(int(rng.integers(0, 3))):  # detections near the gt
                jitter = rng.normal(0, 3, 4)
                box = [float(v) for v in np.r_[xy + jitter[:2], np.maximum(wh + jitter[2:], 1)]]
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(rng.choice(categories)),
                        "bbox": box,
                        "score": float(rng.random()),
                    }
                )
        for _ in range(int(rng.integers(0, 3))):  # detections on nothing in particular
            box = [*map(float, rng.uniform(0, 150, 2)), *map(float, rng.uniform(5, 50, 2))]
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice(categories)),
                    "bbox": box,
                    "score": float(rng.random()),
                }
            )
    dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"c{c}"} for c in categories],
    }
    score_threshold = 0.3
    cm = confusion_matrix(_coco(dataset), results, score_threshold=score_threshold)
    counts = cm.counts
    kept = [r for r in results if r["score"] >= score_threshold]
    for i, c in enumerate(categories):
        num_gts = sum(1 for a in annotations if a["category_id"] == c and not a["iscrowd"])
        assert counts[i].sum() == num_gts
        assert counts[:, i].sum() == sum(1 for r in kept if r["category_id"] == c)
    matched = counts[:-1, :-1].sum()
    assert counts[-1].sum() == len(kept) - matched
    assert counts[:, -1].sum() == sum(1 for a in annotations if not a["iscrowd"]) - matched
    assert counts[-1, -1] == 0
    assert matched > 0 and counts[-1].sum() > 0  # the case exercises both


def test_plot_confusion_matrix(tmp_path: Path) -> None:
    dataset, results = _two_class_case()
    cm = confusion_matrix(_coco(dataset), results)
    for normalize in (False, True):
        out = plot_confusion_matrix(cm, None, tmp_path / f"cm{normalize}.png", normalize=normalize)
        assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="1 names for 2 categories"):
        plot_confusion_matrix(cm, ["A"], tmp_path / "bad.png")


def test_per_class_segm_equals_single_category_evaluation() -> None:
    import pycocotools.mask as mask_utils

    def rect_polygon(box: list[float]) -> list[list[float]]:
        x, y, w, h = box
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    def rect_rle(box: list[float]) -> dict[str, Any]:
        x, y, w, h = (int(v) for v in box)
        mask = np.zeros((400, 400), dtype=np.uint8, order="F")
        mask[y : y + h, x : x + w] = 1
        rle = mask_utils.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        return rle

    dataset = _gt_dataset()
    for ann in dataset["annotations"]:
        ann["segmentation"] = rect_polygon(ann["bbox"])
    results = [{**r, "segmentation": rect_rle(r["bbox"])} for r in _results()]
    gt = _coco(dataset)
    rows = per_class_table(gt, results, iou_type="segm")
    assert gt.dataset == dataset  # the polygons are not replaced by RLEs
    for row in rows:
        reference_gt = _coco(dataset)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = reference_gt.loadRes(copy.deepcopy(results))
            ev = COCOeval(reference_gt, dt, "segm")
            ev.params.catIds = [row["category_id"]]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for key, i in _STAT_INDEX.items():
            assert row[key] == pytest.approx(ev.stats[i], abs=1e-12), (row["name"], key)
    assert 0 < rows[0]["AP"] < 1
