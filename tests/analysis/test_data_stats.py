from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from fdet import specs
from fdet.analysis.data_stats import (
    ASPECT_EDGES,
    SIZE_EDGES,
    AdaptiveCoverage,
    CentreCoverage,
    PointCoverage,
    data_statistics,
    plot_data_statistics,
    prior_coverage,
)
from fdet.data.shapes import generate

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------
# data_statistics
# ------------------------------------------------------------------------------------------------


def hand_set() -> dict[str, Any]:
    """3 images, categories 1, 2 and 5 (5 has no instance); one crowd, one zero-height box."""

    def ann(i: int, img: int, cat: int, bbox: list[float], **kw: Any) -> dict[str, Any]:
        area = kw.get("area", bbox[2] * bbox[3])
        return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "area": area,
                "iscrowd": kw.get("iscrowd", 0)}  # fmt: skip

    return {
        "images": [
            {"id": i, "width": 640, "height": 480, "file_name": f"{i}.png"} for i in (10, 20, 30)
        ],
        "categories": [
            {"id": 1, "name": "cat"},
            {"id": 2, "name": "dog"},
            {"id": 5, "name": "kite"},
        ],
        "annotations": [
            ann(1, 10, 1, [0, 0, 10, 20]),  # w 10 h 20: aspect 2, small
            ann(2, 10, 1, [5, 5, 40, 40], area=1500.0),  # medium by the area field (1600 by w·h)
            ann(3, 10, 2, [0, 0, 100, 100]),  # large, aspect 1
            ann(4, 20, 2, [0, 0, 300, 30]),  # aspect 0.1, sqrt area ~94.9
            ann(5, 20, 1, [0, 0, 200, 200], iscrowd=1),  # counted only as crowd
            ann(6, 20, 2, [3, 3, 12, 0]),  # degenerate: height 0
        ],
    }


def test_hand_counts() -> None:
    stats = data_statistics(hand_set())
    assert stats.num_images == 3
    assert stats.num_annotations == 6
    assert stats.num_crowd == 1
    assert stats.num_instances == 5
    assert stats.num_degenerate == 1
    assert stats.category_names == {1: "cat", 2: "dog", 5: "kite"}
    assert stats.class_counts == {1: 2, 2: 3, 5: 0}
    assert stats.class_images == {1: 1, 2: 2, 5: 0}
    assert stats.objects_per_image == (3, 2, 0)
    assert stats.objects_histogram == (1, 0, 1, 1)  # one image each with 0, 2 and 3 objects
    np.testing.assert_array_equal(stats.widths, [10, 40, 100, 300, 12])
    np.testing.assert_array_equal(stats.heights, [20, 40, 100, 30, 0])
    np.testing.assert_array_equal(stats.areas, [200, 1500, 10000, 9000, 0])
    # 200, 0 < 32² <= 1500, 9000 < 96² <= 10000
    assert stats.area_counts == {"small": 2, "medium": 2, "large": 1}
    # widths 10 | 40 | 100 | 300 | 12 in [0,8,16,32,64,128,256,512,inf)
    assert stats.width_histogram.edges == SIZE_EDGES
    assert stats.width_histogram.counts == (0, 2, 0, 1, 1, 0, 1, 0)
    assert stats.height_histogram.counts == (1, 0, 2, 1, 1, 0, 0, 0)  # 0 | 20, 30 | 40 | 100
    # sqrt areas: 14.1, 40, 100, 94.9, 0
    assert stats.sqrt_area_histogram.counts == (1, 1, 0, 1, 2, 0, 0, 0)
    # aspects (h / w) of the 4 non-degenerate boxes: 2, 1, 1, 0.1
    assert stats.aspect_histogram.edges == ASPECT_EDGES
    assert stats.aspect_histogram.counts == (1, 0, 0, 0, 2, 1, 0, 0)
    assert sum(stats.aspect_histogram.counts) == stats.num_instances - stats.num_degenerate


def test_accepts_coco_and_path(tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(hand_set()))
    from_dict = data_statistics(hand_set())
    assert data_statistics(path) == from_dict
    coco = COCO()
    coco.dataset = hand_set()
    coco.createIndex()
    assert data_statistics(coco) == from_dict


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_id", 99, "annotation 3: image_id 99"),
        ("category_id", 4, "annotation 3: category_id 4"),
        ("bbox", [0, 0, -1, 5], "annotation 3: bbox has a negative width"),
    ],
)
def test_bad_annotation_is_named(field: str, value: Any, message: str) -> None:
    data = hand_set()
    data["annotations"][2][field] = value
    with pytest.raises(ValueError, match=message):
        data_statistics(data)


def test_shapes_set_against_pycocotools(tmp_path: Path) -> None:
    paths = generate(tmp_path / "shapes", train=0, val=6, size=64, min_object_size=8)
    gt_file = tmp_path / "shapes" / "annotations" / "val.json"
    assert gt_file.is_file(), paths
    coco = COCO(str(gt_file))
    stats = data_statistics(gt_file)
    img_ids = [img["id"] for img in coco.dataset["images"]]
    assert stats.num_images == len(img_ids) == 6
    for cat in coco.getCatIds():
        anns = coco.getAnnIds(catIds=[cat], iscrowd=False)
        assert stats.class_counts[cat] == len(anns)
        assert stats.class_images[cat] == len({coco.anns[a]["image_id"] for a in anns})
    assert stats.objects_per_image == tuple(
        len(coco.getAnnIds(imgIds=[i], iscrowd=False)) for i in img_ids
    )
    assert sum(stats.class_counts.values()) == stats.num_instances > 0
    boxes = np.array([coco.anns[a]["bbox"] for a in coco.getAnnIds(iscrowd=False)])
    assert sorted(stats.widths) == sorted(boxes[:, 2])
    assert stats.widths.min() >= 1 and stats.widths.max() <= 64
    # COCO evaluation's own area ranges over the same annotations
    small = coco.getAnnIds(areaRng=[0, 32**2], iscrowd=False)
    assert stats.area_counts["small"] == len([a for a in small if coco.anns[a]["area"] < 32**2])


def test_plots_are_pngs(tmp_path: Path) -> None:
    paths = plot_data_statistics(data_statistics(hand_set()), tmp_path / "plots")
    assert [p.name for p in paths] == [
        "class_counts.png",
        "objects_per_image.png",
        "box_sizes.png",
        "aspect_ratios.png",
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100


# ------------------------------------------------------------------------------------------------
# prior_coverage
# ------------------------------------------------------------------------------------------------

SHAPES = specs.load(ROOT / "specs" / "shapes" / "retinanet_r18_fpn.py", specs.Experiment).model
# one square anchor a location: strides 8, 16, 32 with sizes 16, 32, 64
SQUARE = attrs.evolve(
    SHAPES, anchors=attrs.evolve(SHAPES.anchors, octave_scales=(1.0,), ratios=(1.0,))
)


def brute_force_anchors(anchors: specs.Anchors, image_size: tuple[int, int]) -> np.ndarray:
    """Every anchor, written out one by one from the spec's definition (no rounding)."""
    out = []
    for stride, base in zip(anchors.strides, anchors.base_sizes):
        rows, cols = -(-image_size[0] // stride), -(-image_size[1] // stride)
        for i, j, r, s in itertools.product(
            range(rows), range(cols), anchors.ratios, anchors.octave_scales
        ):
            w, h = base * s / np.sqrt(r), base * s * np.sqrt(r)
            cx, cy = j * stride, i * stride
            out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return np.array(out)


def np_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_hand_boxes() -> None:
    boxes = [
        [0, 8, 16, 24],  # level 0 anchor at row 2, col 1 (centre (8, 16), size 16)
        [32, 32, 96, 96],  # level 2 anchor at row 2, col 2 (centre (64, 64), size 64)
        [40, 40, 44, 100],  # 4 × 60: no square anchor reaches 0.5
    ]
    cov = prior_coverage(SQUARE, boxes, (128, 128))
    assert cov.num_anchors == 16 * 16 + 8 * 8 + 4 * 4
    torch.testing.assert_close(cov.best_iou[:2], torch.ones(2))
    assert cov.best_anchor[:2].tolist() == [2 * 16 + 1, 16 * 16 + 8 * 8 + 2 * 4 + 2]
    assert cov.best_level.tolist()[:2] == [0, 2]
    # the thin box: at best 4·16 / (240 + 256 - 64) with a 16-pixel anchor
    assert 0 < float(cov.best_iou[2]) <= 64 / 432 + 1e-6
    assert cov.reached.tolist() == [True, True, False]
    assert cov.num_missed == 1 and cov.missed.tolist() == [2]
    assert cov.pos_iou == 0.5
    assert cov.low_quality_only.tolist() == [False, False, True]  # low-quality matching saves it
    strict = attrs.evolve(SQUARE, assigner=attrs.evolve(SQUARE.assigner, low_quality_matches=False))
    assert not prior_coverage(strict, boxes, (128, 128)).low_quality_only.any()


def test_matches_brute_force() -> None:
    gen = np.random.default_rng(0)
    xy = gen.uniform(0, 120, size=(40, 2))
    wh = gen.uniform(2, 90, size=(40, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    cov = prior_coverage(SHAPES, boxes, (128, 96), chunk=7)
    expected = np_iou(boxes, brute_force_anchors(SHAPES.anchors, (128, 96))).max(axis=1)
    np.testing.assert_allclose(cov.best_iou.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert cov.reached.tolist() == (expected >= 0.5).tolist()


def test_two_stage_uses_the_rpn() -> None:
    faster = specs.load(ROOT / "specs" / "shapes" / "faster_rcnn_r18_fpn.py", specs.Experiment)
    cov = prior_coverage(faster.model, [[10, 10, 50, 50]], (128, 128))
    assert cov.pos_iou == faster.model.rpn.assigner.pos_iou == 0.7


@pytest.mark.parametrize(("offset", "expected"), [(0.5, 9), (0.0, 4)])
def test_fcos_points(offset: float, expected: int) -> None:
    """Default FCOS: strides 8…128, range [-1, 64] on stride 8, center radius 1.5 strides.

    Box (0, 0, 40, 40), centre (20, 20), on stride 8: with offset 0.5 the points 12, 20, 28
    lie inside and within 12 px of the centre on each axis (3 × 3); with offset 0 the points
    16, 24 (2 × 2: 8 and 32 are exactly 12 away). On stride 16 the farthest side is 32 or less
    from every inside point, below that level's range [64, 128]. The 2-pixel-wide box holds no
    point of any level.
    """
    fcos = specs.FCOS(head=specs.FCOSHead(num_classes=2), points=specs.Points(offset=offset))
    cov = prior_coverage(fcos, [[0, 0, 40, 40], [1, 1, 3, 100]], (128, 128), chunk=1)
    assert isinstance(cov, PointCoverage)
    assert cov.num_positive.tolist() == [expected, 0]
    assert cov.best_level.tolist()[0] == 0
    assert cov.reached.tolist() == [True, False]
    assert cov.num_missed == 1 and cov.missed.tolist() == [1]
    assert cov.num_points == 16**2 + 8**2 + 4**2 + 2**2 + 1


def test_unsupported_families_say_so() -> None:
    with pytest.raises(ValueError, match=r"does not cover ResNet"):
        prior_coverage(specs.ResNet(), [[0, 0, 8, 8]], (64, 64))


# ATSS on one level of 16-pixel square anchors centred at 0, 16, 32, 48 (4 × 4 on 64 × 64)
ONE_LEVEL = specs.ATSS(
    head=specs.ATSSHead(num_classes=2),
    backbone=specs.ResNet(out_levels=(4,)),
    neck=specs.FPN(in_levels=(4,), out_levels=(4,)),
    anchors=specs.Anchors(
        strides=(16,),
        base_sizes=(16.0,),
        octave_scales=(1.0,),
        ratios=(1.0,),
        truncate_sizes=False,
        round_offsets=False,
    ),
    assigner=specs.ATSSAssigner(topk=4),
)


def test_atss_hand_boxes() -> None:
    """Box (8, 8, 40, 40), centre (24, 24): its 4 candidates are the anchors centred at
    (16|32, 16|32), each inside it with IoU 256 / 1024; all equal, so all reach mean + std and
    their centres lie inside: 4 positives. Box (20, 2, 28, 62) is 8 px wide: its nearest anchor
    centres have x = 16 or 32, outside it, so none is positive."""
    boxes = [[8, 8, 40, 40], [20, 2, 28, 62]]
    cov = prior_coverage(ONE_LEVEL, boxes, (64, 64))
    assert isinstance(cov, AdaptiveCoverage)
    assert cov.num_anchors == 16
    assert cov.num_positive.tolist() == [4, 0]
    assert cov.reached.tolist() == [True, False]
    assert cov.num_missed == 1 and cov.missed.tolist() == [1]
    assert cov.best_level.tolist() == [0, 0]
    # box 2: best anchor (16, 0..): columns 16 / 32 overlap it 4 px wide, 16 px tall
    torch.testing.assert_close(cov.best_iou, torch.tensor([0.25, 64 / (256 + 480 - 64)]))


def _direct_atss_counts(spec: Any, boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    from fdet.models.detectors.atss import atss_assign
    from fdet.models.detectors.retinanet import retinanet_anchors
    from fdet.ops.anchors import level_counts
    from fdet.ops.assign import POSITIVE

    sizes = [(-(-image_size[0] // s), -(-image_size[1] // s)) for s in spec.anchors.strides]
    anchors = retinanet_anchors(sizes, spec=spec.anchors, image_size=image_size)
    gt = torch.as_tensor(boxes, dtype=torch.float32)[None]
    valid = torch.ones(gt.shape[:2], dtype=torch.bool)
    result = atss_assign(
        anchors, level_counts(sizes, spec.anchors.per_location), gt, valid, assigner=spec.assigner
    )
    index = result.gt_index[0][result.label[0] == POSITIVE]
    return np.bincount(index.numpy(), minlength=len(boxes))


def _random_boxes(seed: int, n: int, size: int = 128) -> np.ndarray:
    gen = np.random.default_rng(seed)
    xy = gen.uniform(0, size - 10, size=(n, 2))
    wh = gen.uniform(3, 90, size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, size)], axis=1)


@pytest.mark.parametrize("family", ["atss", "gfl"])
def test_atss_gfl_match_the_assigner(family: str) -> None:
    spec = specs.load(ROOT / "specs" / "shapes" / f"{family}_r18_fpn.py", specs.Experiment).model
    boxes = _random_boxes(1, 30)
    cov = prior_coverage(spec, boxes, (128, 96))
    expected = _direct_atss_counts(spec, boxes, (128, 96))
    assert cov.num_positive.tolist() == expected.tolist()
    assert cov.num_missed == int((expected == 0).sum())
    assert cov.reached.tolist() == (expected > 0).tolist()
    all_anchors = brute_force_anchors(spec.anchors, (128, 96))
    assert cov.num_anchors == len(all_anchors)
    np.testing.assert_allclose(
        cov.best_iou.numpy(), np_iou(boxes, all_anchors).max(axis=1), rtol=1e-5, atol=1e-6
    )
    # two images: each assigned on its own, whatever the chunk
    image = np.arange(30) % 2
    split = prior_coverage(spec, boxes, (128, 96), image_index=image, chunk=1)
    for i in (0, 1):
        alone = _direct_atss_counts(spec, boxes[image == i], (128, 96))
        assert split.num_positive[torch.from_numpy(image == i)].tolist() == alone.tolist()


CENTERNET = specs.CenterNet(head=specs.CenterNetHead(num_classes=3))  # stride 4


def test_centernet_hand_boxes() -> None:
    """Stride 4 on 64 × 64: a 16 × 16 map. Boxes 0 and 1 (class 0) are centred at (4, 4), cell
    (1, 1): one peak for both, and the smaller (box 1) wins size and offset. Boxes 2 (class 0)
    and 3 (class 1) are centred at (40, 40), cell (10, 10): a peak each, but one size and offset
    fit in the cell, and the smaller (box 3) takes it. Box 4 is 2 px wide, below a cell; box 5
    has no width."""
    boxes = [
        [0, 0, 8, 8],
        [2, 2, 6, 6],
        [32, 32, 48, 48],
        [36, 36, 44, 44],
        [50, 50, 52, 60],
        [60, 10, 60, 20],
    ]
    labels = [0, 0, 0, 1, 2, 2]
    cov = prior_coverage(CENTERNET, boxes, (64, 64), labels=labels)
    assert isinstance(cov, CentreCoverage)
    assert cov.stride == 4 and cov.map_size == (16, 16)
    assert cov.cell.tolist()[:4] == [[1, 1], [1, 1], [10, 10], [10, 10]]
    assert cov.cell.tolist()[4] == [13, 12]  # centre (51, 55) / 4 = (12.75, 13.75): x 12, y 13
    assert cov.is_object.tolist() == [True, True, True, True, True, False]
    assert cov.shares_peak.tolist() == [True, True, False, False, False, False]
    assert cov.regressed.tolist() == [False, True, False, True, True, False]
    assert cov.below_cell.tolist() == [False, False, False, False, True, True]
    assert cov.reached.tolist() == [False, False, False, True, True, False]
    assert cov.num_missed == 4 and cov.missed.tolist() == [0, 1, 2, 5]
    # in different images nothing collides
    apart = prior_coverage(
        CENTERNET, boxes[:4], (64, 64), labels=labels[:4], image_index=[0, 1, 2, 3]
    )
    assert not apart.shares_peak.any() and apart.regressed.all()


def test_centernet_matches_the_targets() -> None:
    from fdet.models.detectors.centernet import centernet_targets

    boxes = _random_boxes(2, 40, size=64)
    boxes[:10] = boxes[10:20] + 1  # near-duplicates: centres in one cell
    labels = np.random.default_rng(3).integers(0, 3, size=40)
    cov = prior_coverage(CENTERNET, boxes, (64, 64), labels=labels, chunk=5)
    targets = centernet_targets(
        torch.as_tensor(boxes, dtype=torch.float32)[None],
        torch.as_tensor(labels)[None],
        torch.ones(1, 40, dtype=torch.bool),
        num_classes=3,
        size=(16, 16),
        stride=4,
    )
    assert cov.regressed.tolist() == targets.regress[0].tolist()
    assert cov.is_object.tolist() == targets.objects[0].tolist()
    assert (cov.cell[:, 0] * 16 + cov.cell[:, 1]).tolist() == targets.centre_index[0].tolist()
    assert not cov.regressed.all()
    # shared peaks by hand: same class, same cell
    cells = [tuple(c) for c in cov.cell.tolist()]
    for i in range(40):
        others = [
            j for j in range(40) if j != i and labels[j] == labels[i] and cells[j] == cells[i]
        ]
        assert bool(cov.shares_peak[i]) == bool(others)


def test_no_boxes() -> None:
    for spec in (ONE_LEVEL, CENTERNET):
        cov = prior_coverage(spec, np.zeros((0, 4)), (64, 64))
        assert cov.num_missed == 0 and len(cov.reached) == 0


def test_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"labels\[1\]: 3 is not a class in \[0, 3\)"):
        prior_coverage(CENTERNET, [[0, 0, 8, 8], [0, 0, 9, 9]], (64, 64), labels=[0, 3])
    with pytest.raises(ValueError, match=r"image_index: 1 entries for 2 boxes"):
        prior_coverage(CENTERNET, [[0, 0, 8, 8], [0, 0, 9, 9]], (64, 64), image_index=[0])


def test_bad_boxes() -> None:
    with pytest.raises(ValueError, match=r"boxes\[1\]: x2 < x1"):
        prior_coverage(SHAPES, [[0, 0, 8, 8], [10, 0, 5, 8]], (64, 64))
