"""Per-image AP against pycocotools run image by image, the best/worst ranking, the marks'
counts against hand counts, and the gallery's PNGs."""

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
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fdet.analysis.images import (
    ERROR_COLOR,
    best_worst_images,
    match_image,
    per_image_ap,
)

SIZE = (64, 48)  # width, height of every image


def ann(image_id: int, cat: int, box: list[float], crowd: int = 0) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "category_id": cat,
        "bbox": box,
        "area": box[2] * box[3],
        "iscrowd": crowd,
    }


def det(image_id: int, cat: int, box: list[float], score: float) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


# 1: two gts found exactly -> AP 1 (TP 2)
# 2: two gts of cat 1, one found -> recall 0.5: AP 51/101 (TP 1, missed 1)
# 3: one gt found, but a higher-scoring FP of its class -> AP 0.5 (TP 1, FP 1)
# 4: no gt, one detection -> NaN;  5: no gt, nothing -> NaN
# 6: a gt found at IoU 0.675 (AP 4/10 over 0.5:0.95), a FP of cat 3 absent from the image (no
#    effect on COCO AP), a cat-2 detection below the score threshold, and a detection on a crowd
#    region of cat 1 (ignored) -> TP 1, FP 1
# 7: image 1 plus a FP of cat 3 -> AP 1 with one mistake
ANNOTATIONS = [
    ann(1, 1, [4, 4, 20, 16]),
    ann(1, 2, [30, 20, 24, 20]),
    ann(2, 1, [4, 4, 20, 16]),
    ann(2, 1, [36, 24, 20, 16]),
    ann(3, 1, [8, 8, 24, 24]),
    ann(6, 2, [10, 10, 20, 20]),
    ann(6, 1, [36, 30, 20, 10], crowd=1),
    ann(7, 1, [4, 4, 20, 16]),
    ann(7, 2, [30, 20, 24, 20]),
]
RESULTS = [
    det(1, 1, [4, 4, 20, 16], 0.9),
    det(1, 2, [30, 20, 24, 20], 0.8),
    det(2, 1, [4, 4, 20, 16], 0.9),
    det(3, 1, [8, 8, 24, 24], 0.9),
    det(3, 1, [40, 30, 16, 12], 0.95),
    det(4, 2, [10, 10, 10, 10], 0.7),
    det(6, 2, [10, 10, 20, 13.5], 0.6),
    det(6, 3, [40, 2, 10, 10], 0.9),
    det(6, 2, [2, 36, 8, 8], 0.1),
    det(6, 1, [40, 31, 10, 8], 0.8),
    det(7, 1, [4, 4, 20, 16], 0.9),
    det(7, 2, [30, 20, 24, 20], 0.8),
    det(7, 3, [44, 2, 12, 10], 0.85),
]
HAND_AP = {1: 1.0, 2: 51 / 101, 3: 0.5, 4: math.nan, 5: math.nan, 6: 0.4, 7: 1.0}
HAND_COUNTS = {  # (TP, FP, missed) at score >= 0.3, IoU >= 0.5
    1: (2, 0, 0),
    2: (1, 0, 1),
    3: (1, 1, 0),
    4: (0, 1, 0),
    5: (0, 0, 0),
    6: (1, 1, 0),
    7: (2, 1, 0),
}


def dataset() -> dict[str, Any]:
    images = [
        {"id": i, "file_name": f"img{i}.png", "width": SIZE[0], "height": SIZE[1]}
        for i in range(1, 8)
    ]
    anns = [{**a, "id": k} for k, a in enumerate(ANNOTATIONS, start=1)]
    cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "star"}]
    return {"images": images, "annotations": anns, "categories": cats}


def coco(data: dict[str, Any]) -> COCO:
    api = COCO()
    api.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def pycocotools_ap(data: dict[str, Any], results: list[dict[str, Any]], image_id: int) -> float:
    """COCOeval's AP with ``params.imgIds = [image_id]``: ``stats[0]`` (-1 when undefined)."""
    gt = coco(data)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.imgIds = [image_id]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(1, 8):
        Image.new("RGB", SIZE, (128, 128, 128)).save(folder / f"img{i}.png")
    return folder


def test_per_image_ap_equals_pycocotools_image_by_image() -> None:
    data = dataset()
    aps = per_image_ap(coco(data), RESULTS)
    assert list(aps) == list(range(1, 8))
    for image_id, ap in aps.items():
        reference = pycocotools_ap(data, RESULTS, image_id)
        expected = HAND_AP[image_id]
        if math.isnan(expected):
            assert math.isnan(ap) and reference == -1
        else:
            assert ap == pytest.approx(reference, abs=1e-12)
            assert ap == pytest.approx(expected, abs=1e-12)


def test_per_image_ap_reads_files_and_leaves_inputs_alone(tmp_path: Path) -> None:
    data = dataset()
    gt_path, results_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(data))
    results_path.write_text(json.dumps(RESULTS))
    gt = coco(data)
    before = copy.deepcopy(gt.dataset)
    assert per_image_ap(gt_path, results_path)[2] == pytest.approx(51 / 101)
    per_image_ap(gt, RESULTS)
    assert gt.dataset == before
    empty = per_image_ap(gt, [])
    assert [empty[i] for i in (1, 2, 3, 6, 7)] == [0.0] * 5
    assert math.isnan(empty[4]) and math.isnan(empty[5])


def test_match_image_counts_by_hand() -> None:
    gt = coco(dataset())
    for image_id, (tp, fp, missed) in HAND_COUNTS.items():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        dets = [r for r in RESULTS if r["image_id"] == image_id]
        match = match_image(dets, anns, iou_threshold=0.5, score_threshold=0.3)
        got = (len(match.true_positives), len(match.false_positives), len(match.missed))
        assert got == (tp, fp, missed), image_id
    anns6 = gt.loadAnns(gt.getAnnIds(imgIds=[6]))
    dets6 = [r for r in RESULTS if r["image_id"] == 6]
    match = match_image(dets6, anns6)
    assert match.true_positives == (0,) and match.false_positives == (1,)
    assert match.ignored == (3,)  # on the crowd region; the 0.1 detection is in no list
    # a stricter IoU makes the 0.675 match a false positive and its gt missed
    strict = match_image(dets6, anns6, iou_threshold=0.7)
    assert strict.false_positives == (1, 0) and strict.missed == (0,)


def test_greedy_matching_by_score() -> None:
    anns = [ann(1, 1, [0, 0, 10, 10])]
    dets = [det(1, 1, [0, 0, 10, 9], 0.5), det(1, 1, [0, 0, 10, 10], 0.4)]
    match = match_image(dets, anns)
    # the higher score takes the gt although the other box fits it better
    assert match.true_positives == (0,) and match.false_positives == (1,)


def red_pixels(panel: np.ndarray) -> int:
    return int((panel == np.array(ERROR_COLOR, dtype=np.uint8)).all(axis=-1).sum())


def test_best_worst_ordering_counts_and_pngs(image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gallery"
    gallery = best_worst_images(coco(dataset()), RESULTS, image_dir, out, count=10, panel_size=128)
    assert set(gallery) == {"best", "worst"}
    # NaN images (4, 5) are ranked in neither; ties (1 and 7, AP 1) by mistakes
    assert [g.image_id for g in gallery["best"]] == [1, 7, 2, 3, 6]
    assert [g.image_id for g in gallery["worst"]] == [6, 3, 2, 7, 1]
    for g in gallery["best"] + gallery["worst"]:
        assert g.ap == pytest.approx(HAND_AP[g.image_id], abs=1e-12)
        assert (g.true_positives, g.false_positives, g.missed) == HAND_COUNTS[g.image_id]
        assert g.file_name == f"img{g.image_id}.png"
        assert g.path.parent == out and g.path.is_file()
        with Image.open(g.path) as png:
            assert png.format == "PNG"
            assert png.size == (2 * 128 + 8, 128 + 48)
            pixels = np.asarray(png.convert("RGB"))
        left, right = pixels[48:, :128], pixels[48:, 136:]
        # missed gts are red on the left, false positives red on the right, nothing else red
        assert (red_pixels(left) > 0) == (g.missed > 0), g.image_id
        assert (red_pixels(right) > 0) == (g.false_positives > 0), g.image_id
        assert red_pixels(pixels[:48]) == 0
    assert gallery["best"][0].path.name == "best_01_1.png"
    assert gallery["worst"][0].path.name == "worst_01_6.png"

    short = best_worst_images(coco(dataset()), RESULTS, image_dir, tmp_path / "g2", count=2)
    assert [g.image_id for g in short["best"]] == [1, 7]
    assert [g.image_id for g in short["worst"]] == [6, 3]
    assert len(list((tmp_path / "g2").glob("*.png"))) == 4


def test_missing_image_file_is_named(image_dir: Path, tmp_path: Path) -> None:
    (image_dir / "img2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"img2\.png.*image id 2"):
        best_worst_images(coco(dataset()), RESULTS, image_dir, tmp_path / "out", count=3)
    # an image that is not drawn is not read
    gallery = best_worst_images(coco(dataset()), RESULTS, image_dir, tmp_path / "out", count=1)
    assert [g.image_id for g in gallery["best"] + gallery["worst"]] == [1, 6]
    with pytest.raises(ValueError, match="count must be >= 1"):
        best_worst_images(coco(dataset()), RESULTS, image_dir, tmp_path / "out", count=0)


def test_gallery_of_a_trained_run(make_tiny_run, tmp_path: Path) -> None:
    from fdet.eval.evaluate import predict_coco
    from fdet.train.data import experiment_loader, make_datasets
    from fdet.train.run_dir import load_run
    from tests.inference.conftest import RETINANET_DETECTS

    exp, model = load_run(make_tiny_run("retinanet_r18_fpn.py", RETINANET_DETECTS))
    val = make_datasets(exp, with_train=False).val
    results = predict_coco(model, experiment_loader(exp, val, train=False), val).results
    assert results, "the tiny model detects something"
    aps = per_image_ap(val.coco, results)
    data = val.coco.dataset
    for image_id, ap in aps.items():
        reference = pycocotools_ap(data, results, image_id)
        assert (math.isnan(ap) and reference == -1) or ap == pytest.approx(reference, abs=1e-12)
    gallery = best_worst_images(
        val.coco, results, val.images_dir, tmp_path, count=2, score_threshold=0.0
    )
    ranked = sorted(a for a in aps.values() if not math.isnan(a))
    assert [g.ap for g in gallery["worst"]] == ranked[:2]
    assert [g.ap for g in gallery["best"]] == ranked[::-1][:2]
    for g in gallery["best"] + gallery["worst"]:
        num_gt = len(val.coco.getAnnIds(imgIds=[g.image_id], iscrowd=False))
        num_dets = sum(r["image_id"] == g.image_id for r in results)
        assert g.true_positives + g.missed == num_gt
        assert g.true_positives + g.false_positives == num_dets  # score >= 0, no crowd
        with Image.open(g.path) as png:
            assert png.size == (2 * 256 + 8, 256 + 48)
