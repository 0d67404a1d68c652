from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from faster_coco_eval import COCO as FasterCOCO
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from fdet.data.sample import Batch
from fdet.eval import (
    STAT_NAMES,
    CocoMetrics,
    detections_to_coco,
    evaluate_coco,
    evaluate_model,
    format_table,
)
from fdet.eval.coco import Backend
from fdet.ops.postprocess import Detections

BACKENDS: tuple[Backend, ...] = ("faster", "pycocotools")
CATEGORY_IDS = (1, 3, 7, 12)  # 12 never has ground truth; 7 has only small boxes and a crowd
NAMES = {1: "cat", 3: "dog", 7: "bird", 12: "kite"}

# ------------------------------------------------------------------------------------------------
# Synthetic ground truth and results
# ------------------------------------------------------------------------------------------------


def make_gt(seed: int, *, num_images: int = 14, empty_images: int = 3) -> dict[str, Any]:
    """Images of several sizes, the last ``empty_images`` without annotations; boxes of every
    area range; some crowd regions."""
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        height, width = int(rng.integers(200, 700)), int(rng.integers(200, 700))
        images.append(
            {"id": 100 + 7 * i, "height": height, "width": width, "file_name": f"{i}.jpg"}
        )
        if i >= num_images - empty_images:
            continue
        for _ in range(int(rng.integers(1, 9))):
            category = int(rng.choice([1, 3, 7]))
            side = {0: (4, 30), 1: (34, 94), 2: (100, 190)}[int(rng.integers(0, 3))]
            if category == 7:
                side = (4, 30)
            w, h = rng.uniform(*side, size=2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": images[-1]["id"],
                    "category_id": category,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": int(rng.random() < 0.12),
                }
            )
    annotations.append(  # a crowd region of a category, on the first image
        {
            "id": len(annotations) + 1,
            "image_id": images[0]["id"],
            "category_id": 7,
            "bbox": [0.0, 0.0, 150.0, 150.0],
            "area": 150.0 * 150.0,
            "iscrowd": 1,
        }
    )
    categories = [{"id": c, "name": NAMES[c]} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_results(gt: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Jittered copies of ground truth (some with the wrong class), and random boxes, with
    distinct random scores; detections on images without ground truth too."""
    rng = np.random.default_rng(seed + 1000)
    results = []
    for ann in gt["annotations"]:
        for _ in range(int(rng.integers(0, 4))):
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0.0, 0.12, size=4) * [w, h, w, h]
            category = ann["category_id"] if rng.random() < 0.8 else int(rng.choice(CATEGORY_IDS))
            box = [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]
            results.append({"image_id": ann["image_id"], "category_id": category, "bbox": box})
    for image in gt["images"]:
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(5, 200, size=2)
            x, y = rng.uniform(0, image["width"] - 5), rng.uniform(0, image["height"] - 5)
            category = int(rng.choice(CATEGORY_IDS))
            results.append({"image_id": image["id"], "category_id": category, "bbox": [x, y, w, h]})
    scores = rng.permutation(len(results)) / len(results) + 1e-3
    for r, s in zip(results, scores):
        r["bbox"] = [float(v) for v in r["bbox"]]
        r["score"] = float(s)
    return results


def pycocotools_eval(gt: dict[str, Any], results: list[dict[str, Any]]) -> COCOeval:
    """The reference, run directly."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        dt = coco.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def write_json(tmp_path: Path, gt: dict[str, Any], name: str = "gt.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(gt))
    return path


# ------------------------------------------------------------------------------------------------
# evaluate_coco
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_agree(tmp_path: Path, seed: int) -> None:
    gt = make_gt(seed)
    results = make_results(gt, seed)
    path = write_json(tmp_path, gt)
    faster = evaluate_coco(path, results, backend="faster")
    reference = evaluate_coco(path, results, backend="pycocotools")
    for name in STAT_NAMES:
        assert getattr(faster, name) == pytest.approx(getattr(reference, name), abs=1e-9), name
    assert faster.per_class_ap.keys() == reference.per_class_ap.keys()
    for name, ap in reference.per_class_ap.items():
        assert faster.per_class_ap[name] == pytest.approx(ap, abs=1e-9), name
    assert (faster.num_images, faster.num_detections) == (len(gt["images"]), len(results))
    assert faster.num_detections == reference.num_detections
    # The direct pycocotools run gives the same 12 stats.
    direct = pycocotools_eval(gt, results).stats
    np.testing.assert_allclose(reference.stats, direct, rtol=0, atol=1e-12)
    # A nontrivial case: some AP neither 0 nor 1, APs/APm/APl all defined.
    assert 0.05 < reference.AP < 0.95
    assert min(reference.APs, reference.APm, reference.APl) >= 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_class_ap_is_the_precision_slice(tmp_path: Path, backend: Backend) -> None:
    gt = make_gt(3)
    results = make_results(gt, 3)
    metrics = evaluate_coco(write_json(tmp_path, gt), results, backend=backend)
    evaluator = pycocotools_eval(gt, results)
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]
    expected = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, evaluator.params.areaRngLbl.index("all"), -1]
        if (p > -1).any():
            expected[NAMES[cat_id]] = float(p[p > -1].mean())
    assert "kite" not in expected  # no ground truth: left out, not NaN
    assert set(expected) == {"cat", "dog", "bird"}
    assert metrics.per_class_ap.keys() == expected.keys()
    for name, ap in expected.items():
        assert metrics.per_class_ap[name] == pytest.approx(ap, abs=1e-9), name
    assert all(math.isfinite(v) for v in metrics.per_class_ap.values())
    # The mean of the per-class APs is the AP.
    assert np.mean(list(metrics.per_class_ap.values())) == pytest.approx(metrics.AP, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_results(tmp_path: Path, backend: Backend) -> None:
    gt = make_gt(4)
    metrics = evaluate_coco(write_json(tmp_path, gt), [], backend=backend)
    assert metrics.stats == (0.0,) * 12
    assert metrics.per_class_ap == {"cat": 0.0, "dog": 0.0, "bird": 0.0}
    assert (metrics.num_images, metrics.num_detections) == (len(gt["images"]), 0)


def test_empty_results_agree_where_a_range_has_no_ground_truth(tmp_path: Path) -> None:
    gt = make_gt(5)
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] >= 32**2]
    path = write_json(tmp_path, gt)
    faster = evaluate_coco(path, [], backend="faster")
    reference = evaluate_coco(path, [], backend="pycocotools")
    assert faster == reference
    assert faster.APs == faster.ARs == -1.0
    assert faster.APm == faster.APl == faster.AP == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_subset_equals_restricted_ground_truth(tmp_path: Path, backend: Backend) -> None:
    gt = make_gt(6)
    results = make_results(gt, 6)
    subset = [im["id"] for im in gt["images"][::3]] + [gt["images"][-1]["id"]]
    restricted = copy.deepcopy(gt)
    restricted["images"] = [im for im in gt["images"] if im["id"] in subset]
    restricted["annotations"] = [a for a in gt["annotations"] if a["image_id"] in subset]
    restricted_results = [r for r in results if r["image_id"] in subset]
    metrics = evaluate_coco(
        write_json(tmp_path, gt),
        results,
        backend=backend,
        image_ids=reversed(subset),
    )
    expected = pycocotools_eval(restricted, restricted_results).stats
    np.testing.assert_allclose(metrics.stats, expected, rtol=0, atol=1e-9)
    assert metrics.num_images == len(subset)
    assert metrics.num_detections == len(restricted_results)
    full = evaluate_coco(write_json(tmp_path, gt, "full.json"), results, backend=backend)
    assert full.stats != metrics.stats


@pytest.mark.parametrize("backend", BACKENDS)
def test_accepts_either_coco_class_and_leaves_inputs_alone(backend: Backend) -> None:
    gt = make_gt(7)
    results = make_results(gt, 7)
    before = copy.deepcopy(results)
    with contextlib.redirect_stdout(io.StringIO()):
        reference_gt = COCO()
        reference_gt.dataset = copy.deepcopy(gt)
        reference_gt.createIndex()
    faster_gt = FasterCOCO(copy.deepcopy(gt))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        a = evaluate_coco(reference_gt, results, backend=backend)
        b = evaluate_coco(faster_gt, results, backend=backend)
    assert out.getvalue() == ""
    assert a == b
    assert results == before
    assert len(reference_gt.dataset["annotations"]) == len(gt["annotations"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_images_is_undefined(tmp_path: Path, backend: Backend) -> None:
    gt = make_gt(8)
    metrics = evaluate_coco(
        write_json(tmp_path, gt), make_results(gt, 8), backend=backend, image_ids=[]
    )
    assert metrics.stats == (-1.0,) * 12
    assert (metrics.num_images, metrics.num_detections, metrics.per_class_ap) == (0, 0, {})


def test_bad_results_name_the_problem(tmp_path: Path) -> None:
    gt = make_gt(9)
    path = write_json(tmp_path, gt)
    good = {"image_id": 100, "category_id": 1, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.5}
    with pytest.raises(ValueError, match=r"image ids absent.*99999"):
        evaluate_coco(path, [good, {**good, "image_id": 99999}])
    with pytest.raises(ValueError, match=r"category ids absent.*5"):
        evaluate_coco(path, [good, {**good, "category_id": 5}])
    with pytest.raises(ValueError, match=r"results\[1\] lacks \['score'\]"):
        evaluate_coco(path, [good, {k: v for k, v in good.items() if k != "score"}])
    with pytest.raises(ValueError, match=r"image_ids absent.*4242"):
        evaluate_coco(path, [good], image_ids=[100, 4242])
    with pytest.raises(ValueError, match="backend"):
        evaluate_coco(path, [good], backend="detectron")  # type: ignore[arg-type]


def test_metrics_to_dict_and_table(tmp_path: Path) -> None:
    gt = make_gt(10)
    metrics = evaluate_coco(write_json(tmp_path, gt), make_results(gt, 10))
    data = json.loads(json.dumps(metrics.to_dict()))
    assert [data[name] for name in STAT_NAMES] == list(metrics.stats)
    assert data["per_class_ap"] == metrics.per_class_ap
    assert data["num_images"] == metrics.num_images
    rebuilt = CocoMetrics.from_stats(
        [data[n] for n in STAT_NAMES],
        per_class_ap=data["per_class_ap"],
        num_images=data["num_images"],
        num_detections=data["num_detections"],
    )
    assert rebuilt == metrics
    table = format_table(metrics)
    for name in (*STAT_NAMES, "cat", "dog", "bird"):
        assert name in table
    assert f"{metrics.AP:.3f}" in table and f"{metrics.per_class_ap['dog']:.3f}" in table
    assert "kite" not in table
    assert "cat" not in format_table(metrics, per_class=False)
    undefined = CocoMetrics.from_stats([-1.0] * 12)
    assert format_table(undefined).count("n/a") == 12


# ------------------------------------------------------------------------------------------------
# detections_to_coco
# ------------------------------------------------------------------------------------------------


def test_detections_to_coco_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    label_to_category_id = (1, 3, 7, 12)
    image_ids = torch.tensor([100, 107, 114])
    scales = torch.tensor([[0.5, 0.75], [2.0, 1.25], [1.0, 1.0]])  # (y, x)
    num_slots = 6
    num_valid = [4, 0, 6]
    expected = []
    boxes = torch.rand(3, num_slots, 4, generator=g) * 1e4  # garbage in padded slots
    scores = torch.rand(3, num_slots, generator=g)
    labels = torch.randint(0, 4, (3, num_slots), generator=g)
    valid = torch.zeros(3, num_slots, dtype=torch.bool)
    for b in range(3):
        for n in range(num_valid[b]):
            x, y = torch.rand(2, generator=g).tolist()
            w, h = (torch.rand(2, generator=g) * 50 + 1).tolist()
            x, y = x * 300, y * 300
            sy, sx = scales[b].tolist()
            boxes[b, n] = torch.tensor([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
            valid[b, n] = True
            expected.append(
                (int(image_ids[b]), label_to_category_id[int(labels[b, n])], [x, y, w, h])
            )
        labels[b, num_valid[b] :] = 99  # out of range, but padding: never looked up
    records = detections_to_coco(
        Detections(boxes, scores, labels, valid),
        image_ids=image_ids,
        scales=scales,
        label_to_category_id=label_to_category_id,
    )
    assert len(records) == sum(num_valid)
    valid_scores = scores[valid].tolist()
    for record, (image_id, category_id, bbox), score in zip(records, expected, valid_scores):
        assert set(record) == {"image_id", "category_id", "bbox", "score"}
        assert type(record["image_id"]) is int and record["image_id"] == image_id
        assert type(record["category_id"]) is int and record["category_id"] == category_id
        assert type(record["score"]) is float and record["score"] == score
        assert all(type(v) is float for v in record["bbox"])
        np.testing.assert_allclose(record["bbox"], bbox, rtol=1e-5, atol=1e-3)
    json.dumps(records)


def test_detections_to_coco_accepts_sequences_and_checks_labels() -> None:
    detections = Detections(
        boxes=torch.tensor([[[10.0, 20.0, 30.0, 60.0]]]),
        scores=torch.tensor([[0.5]]),
        labels=torch.tensor([[2]]),
        valid=torch.tensor([[True]]),
    )
    records = detections_to_coco(
        detections, image_ids=[5], scales=[[2.0, 0.5]], label_to_category_id=(4, 8, 9)
    )
    assert records == [
        {"image_id": 5, "category_id": 9, "bbox": [20.0, 10.0, 40.0, 20.0], "score": 0.5}
    ]
    with pytest.raises(ValueError, match="label 2 of image 5"):
        detections_to_coco(
            detections, image_ids=[5], scales=[[1.0, 1.0]], label_to_category_id=(4, 8)
        )
    with pytest.raises(ValueError, match="1 images in the detections but 2 image_ids"):
        detections_to_coco(
            detections, image_ids=[5, 6], scales=[[1.0, 1.0]], label_to_category_id=(4, 8, 9)
        )
    empty = Detections(
        torch.zeros(2, 0, 4),
        torch.zeros(2, 0),
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0, dtype=torch.bool),
    )
    assert (
        detections_to_coco(
            empty, image_ids=[1, 2], scales=torch.ones(2, 2), label_to_category_id=(1,)
        )
        == []
    )


# ------------------------------------------------------------------------------------------------
# evaluate_model
# ------------------------------------------------------------------------------------------------


class FakeDataset:
    def __init__(self, gt: dict[str, Any]) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = copy.deepcopy(gt)
            self.coco.createIndex()
        self.label_to_category_id = CATEGORY_IDS


class FakeModel(nn.Module):
    """Answers each predict call with the next prepared Detections (cut to the batch size)."""

    def __init__(self, answers: list[Detections]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.answers = list(answers)
        self.calls: list[tuple[int, ...]] = []

    def predict(self, images: Tensor, image_sizes: Tensor) -> Detections:
        assert not self.training
        assert torch.is_inference_mode_enabled()
        self.calls.append(tuple(images.shape))
        answer = self.answers.pop(0)
        return Detections(*(None if t is None else t[: images.shape[0]] for t in answer))


def make_batches(
    gt: dict[str, Any], batch_size: int, *, shift: float = 0.0
) -> tuple[list[Batch], list[Detections]]:
    """Batches of the ground truth resized by per-image (y, x) factors and padded, and, for each,
    Detections holding its non-crowd boxes (shifted right by ``shift`` × width) with score 1."""
    label_of = {c: k for k, c in enumerate(CATEGORY_IDS)}
    batches, answers = [], []
    images = gt["images"]
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        factors = [(0.5 + 0.25 * (i % 3), 0.75 + 0.25 * (i % 2)) for i in range(len(chunk))]
        sizes = [
            (round(im["height"] * fy), round(im["width"] * fx))
            for im, (fy, fx) in zip(chunk, factors)
        ]
        anns = [
            [a for a in gt["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
            for im in chunk
        ]
        num_slots = max(1, *(len(a) for a in anns)) + 2
        boxes = torch.zeros(len(chunk), num_slots, 4)
        labels = torch.zeros(len(chunk), num_slots, dtype=torch.long)
        valid = torch.zeros(len(chunk), num_slots, dtype=torch.bool)
        for b, (image_anns, (fy, fx)) in enumerate(zip(anns, factors)):
            for n, a in enumerate(image_anns):
                x, y, w, h = a["bbox"]
                x += shift * w
                boxes[b, n] = torch.tensor([x * fx, y * fy, (x + w) * fx, (y + h) * fy])
                labels[b, n] = label_of[a["category_id"]]
                valid[b, n] = True
        answers.append(Detections(boxes, valid.float(), labels, valid))
        height = max(s[0] for s in sizes)
        width = max(s[1] for s in sizes)
        batches.append(
            Batch(
                images=torch.zeros(len(chunk), 3, height, width, dtype=torch.uint8),
                image_sizes=torch.tensor(sizes),
                gt_boxes=boxes,
                gt_labels=labels,
                gt_valid=valid,
                gt_crowd=torch.zeros_like(valid),
                image_ids=torch.tensor([im["id"] for im in chunk]),
                scales=torch.tensor(factors),
            )
        )
    return batches, answers


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_model_ground_truth_is_perfect(backend: Backend) -> None:
    gt = make_gt(11)
    batches, answers = make_batches(gt, 4)
    model = FakeModel(answers)
    model.train()
    metrics, results = evaluate_model(model, batches, FakeDataset(gt), backend=backend)
    assert pytest.approx(1.0, abs=1e-12) == metrics.AP
    assert metrics.AP50 == metrics.AR100 == pytest.approx(1.0, abs=1e-12)
    assert metrics.per_class_ap == pytest.approx({"cat": 1.0, "dog": 1.0, "bird": 1.0})
    assert metrics.num_images == len(gt["images"])
    assert (
        metrics.num_detections == len(results) == sum(not a["iscrowd"] for a in gt["annotations"])
    )
    assert model.training  # restored
    assert len(model.calls) == len(batches)


def test_evaluate_model_shifted_boxes_score_lower() -> None:
    gt = make_gt(12)
    batches, answers = make_batches(gt, 5, shift=0.2)
    metrics, _ = evaluate_model(FakeModel(answers), batches, FakeDataset(gt))
    assert 0.0 < metrics.AP < 0.7
    assert pytest.approx(1.0) == metrics.AP50  # IoU of a 20% shift is 0.8/1.2 = 0.67
    assert metrics.AP75 == 0.0


def test_evaluate_model_max_images_cuts_the_last_batch() -> None:
    gt = make_gt(13)
    batches, answers = make_batches(gt, 4)
    model = FakeModel(answers)
    model.eval()
    metrics, results = evaluate_model(model, batches, FakeDataset(gt), max_images=6)
    assert metrics.num_images == 6
    assert [shape[0] for shape in model.calls] == [4, 2]
    seen = {im["id"] for im in gt["images"][:6]}
    assert {r["image_id"] for r in results} <= seen
    assert pytest.approx(1.0, abs=1e-12) == metrics.AP
    assert not model.training
