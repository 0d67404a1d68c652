from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from fdet import specs
from fdet.data import CocoDataset, DataError, Sample, ShapesPaths, build_dataset, sample_generator
from fdet.data import coco as coco_module
from tests.data.conftest import SIZE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")

H, W = 24, 32


def _dataset_dict() -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
            {"id": 5, "file_name": "c.png", "height": H, "width": W},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 10, "bbox": [2, 3, 10, 8], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [5, 5, 4, 4], "iscrowd": 1},
            {"id": 13, "image_id": 2, "category_id": 7, "bbox": [0, 0, 32, 24]},
        ],
        "categories": [
            {"id": 3, "name": "three"},
            {"id": 10, "name": "ten"},
            {"id": 7, "name": "seven"},
        ],
    }


def _write(
    root: Path,
    data: dict[str, Any] | None = None,
    *,
    modes: tuple[str, ...] = ("RGB", "L", "RGBA"),
) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, mode in zip(("a.png", "b.png", "c.png"), modes):
        rgb = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        rgb.convert(mode).save(images / name)
    ann = root / "ann.json"
    ann.write_text(json.dumps(_dataset_dict() if data is None else data))
    return images, ann


@pytest.fixture
def good(tmp_path: Path) -> tuple[Path, Path]:
    return _write(tmp_path)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def test_round_trip_on_shapes(shapes_set: ShapesPaths) -> None:
    ds = CocoDataset(shapes_set.train_images, shapes_set.train_annotations, with_masks=True)
    assert len(ds) == 40 and ds.image_ids == tuple(range(1, 41))
    assert ds.category_names == ("circle", "square", "triangle", "star", "cross", "ellipse")
    assert ds.label_to_category_id == (1, 2, 3, 4, 5, 6)
    total = 0
    for index in (0, 7, 39):
        sample = ds[index]
        anns = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=[sample.image_id]))
        assert sample.image.dtype == torch.uint8 and sample.image.shape == (3, SIZE, SIZE)
        assert sample.orig_size == (SIZE, SIZE) and sample.scale == (1.0, 1.0)
        xywh = torch.tensor([a["bbox"] for a in anns])
        assert torch.equal(sample.boxes, torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), 1))
        cats = [ds.label_to_category_id[label] for label in sample.labels.tolist()]
        assert cats == [a["category_id"] for a in anns]
        assert not sample.crowd.any()
        assert sample.masks is not None and sample.masks.shape == (len(anns), SIZE, SIZE)
        for mask, a in zip(sample.masks, anns):
            assert torch.equal(mask, torch.from_numpy(mask_utils.decode(a["segmentation"])))
        total += len(anns)
    assert total > 3
    assert ds.skipped == {} and ds.clipped == 0


def test_labels_are_contiguous_in_sorted_category_id_order(good: tuple[Path, Path]) -> None:
    ds = CocoDataset(*good)
    assert ds.label_to_category_id == (3, 7, 10)
    assert ds.category_id_to_label == {3: 0, 7: 1, 10: 2}
    assert ds.category_names == ("three", "seven", "ten")
    assert ds.num_classes == 3
    sample = ds[0]
    assert sample.labels.tolist() == [2, 0]
    assert [ds.label_to_category_id[x] for x in sample.labels.tolist()] == [10, 3]
    assert sample.boxes.tolist() == [[2, 3, 12, 11], [5, 5, 9, 9]]


def test_crowd_and_negative_images(good: tuple[Path, Path]) -> None:
    ds = CocoDataset(*good)
    assert ds[0].crowd.tolist() == [False, True]
    assert ds[1].crowd.tolist() == [False]
    empty = ds[2]  # image 5 has no annotations: kept, as a negative
    assert ds.image_ids == (1, 2, 5) and empty.image_id == 5
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,) and empty.crowd.shape == (0,)


def test_grayscale_and_rgba_images_become_rgb(good: tuple[Path, Path]) -> None:
    ds = CocoDataset(*good)
    for index in range(3):
        assert ds[index].image.shape == (3, H, W)
    gray = ds[1].image
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_masks_from_polygons_and_missing_segmentations(tmp_path: Path) -> None:
    data = _dataset_dict()
    data["annotations"][0]["segmentation"] = [[2, 3, 12, 3, 12, 11, 2, 11]]
    images, ann = _write(tmp_path, data)
    sample = CocoDataset(images, ann, with_masks=True)[0]
    assert sample.masks is not None and sample.masks.shape == (2, H, W)
    assert sample.masks[0, 3:11, 2:12].all()
    assert sample.masks[1].sum() == 16  # no outline: the box


def test_transform_gets_a_deterministic_generator(good: tuple[Path, Path]) -> None:
    def tag(sample: Sample, generator: torch.Generator) -> Sample:
        return sample._replace(scale=(float(torch.rand(1, generator=generator)), 1.0))

    ds = CocoDataset(*good, transform=tag, seed=4)
    first = [ds[i].scale[0] for i in range(3)]
    assert first == [ds.get(i, epoch=0).scale[0] for i in range(3)]
    assert len(set(first)) == 3
    ds.set_epoch(1)
    assert [ds[i].scale[0] for i in range(3)] != first
    expected = torch.rand(1, generator=sample_generator(4, 1, 2)).item()
    assert ds[2].scale[0] == pytest.approx(expected)
    with pytest.raises(IndexError):
        ds[3]


def test_build_dataset_from_specs(tmp_path: Path, good: tuple[Path, Path]) -> None:
    shapes = specs.ShapesData(
        train_images=2, val_images=1, image_size=32, min_object_size=4, cache_dir=str(tmp_path)
    )
    assert len(build_dataset(shapes, train=True)) == 2
    assert len(build_dataset(shapes, train=False)) == 1
    images, ann = good
    coco = specs.CocoData(
        train_images=str(images),
        train_annotations=str(ann),
        val_images=str(images),
        val_annotations=str(ann),
        on_bad_input="skip",
    )
    ds = build_dataset(coco, train=False)
    assert len(ds) == 3 and ds.on_bad_input == "skip"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set_ann(index: int, **fields: Any) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        data["annotations"][index].update(fields)

    return mutate


def _add_ann(**fields: Any) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        data["annotations"].append(
            {"id": 99, "image_id": 2, "category_id": 3, "bbox": [1, 1, 4, 4], **fields}
        )

    return mutate


# (mutation, reason counted with "skip", fragments the "error" message names)
BAD_ANNOTATIONS = {
    "unknown image": (
        _add_ann(image_id=404),
        coco_module.UNKNOWN_IMAGE,
        ["annotation id 99", "image id 404"],
    ),
    "unknown category": (
        _add_ann(category_id=8),
        coco_module.UNKNOWN_CATEGORY,
        ["annotation id 99", "category id 8"],
    ),
    "outside": (
        _add_ann(bbox=[40, 2, 5, 5]),
        coco_module.OUTSIDE_BOX,
        ["annotation id 99", "image id 2"],
    ),
    "above": (_add_ann(bbox=[3, -9, 5, 5]), coco_module.OUTSIDE_BOX, ["annotation id 99"]),
    "zero width": (_add_ann(bbox=[1, 1, 0, 4]), coco_module.EMPTY_BOX, ["annotation id 99"]),
    "negative height": (_add_ann(bbox=[1, 1, 3, -2]), coco_module.EMPTY_BOX, ["annotation id 99"]),
    "nan": (
        _add_ann(bbox=[1, float("nan"), 3, 2]),
        coco_module.NON_FINITE_BOX,
        ["annotation id 99"],
    ),
    "infinite": (
        _add_ann(bbox=[1, 1, float("inf"), 2]),
        coco_module.NON_FINITE_BOX,
        ["annotation id 99"],
    ),
    "short bbox": (
        _add_ann(bbox=[1, 1, 3]),
        coco_module.MALFORMED_ANNOTATION,
        ["annotation id 99"],
    ),
    "string bbox": (
        _add_ann(bbox="1 1 3 3"),
        coco_module.MALFORMED_ANNOTATION,
        ["annotation id 99"],
    ),
    "no category": (
        _set_ann(2, category_id=None),
        coco_module.MALFORMED_ANNOTATION,
        ["annotation id 13"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
def test_bad_annotation_is_an_error(tmp_path: Path, case: str) -> None:
    mutate, reason, fragments = BAD_ANNOTATIONS[case]
    data = _dataset_dict()
    mutate(data)
    images, ann = _write(tmp_path, data)
    with pytest.raises(DataError) as info:
        CocoDataset(images, ann)
    message = str(info.value)
    for fragment in [str(ann), reason, *fragments]:
        assert fragment in message


@pytest.mark.parametrize("case", list(BAD_ANNOTATIONS))
def test_bad_annotation_is_skipped_and_counted(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    mutate, reason, _ = BAD_ANNOTATIONS[case]
    data = _dataset_dict()
    mutate(data)
    images, ann = _write(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="fdet.data"):
        ds = CocoDataset(images, ann, on_bad_input="skip")
    assert ds.skipped == {reason: 1}
    assert len(ds) == 3
    kept = sum(len(ds[i].labels) for i in range(3))
    assert kept == len(data["annotations"]) - 1 == len(ds.coco.anns)
    records = [r for r in caplog.records if r.name == "fdet.data"]
    assert len(records) == 1 and reason in records[0].getMessage()
    assert str(ann) in records[0].getMessage()


def test_box_partly_outside_is_clipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _dataset_dict()
    data["annotations"][0]["bbox"] = [-3, 20, 10, 10]
    images, ann = _write(tmp_path, data)
    for mode in ("error", "skip"):
        ds = CocoDataset(images, ann, on_bad_input=mode)  # type: ignore[arg-type]
        assert ds.skipped == {} and ds.clipped == 1
        assert ds[0].boxes[0].tolist() == [0, 20, 7, 24]
        assert ds.coco.anns[11]["bbox"] == [0, 20, 7, 4]


def test_missing_image_file(tmp_path: Path) -> None:
    images, ann = _write(tmp_path)
    (images / "a.png").unlink()
    with pytest.raises(DataError, match=r"a\.png.*missing image file.*image id 1"):
        CocoDataset(images, ann)
    ds = CocoDataset(images, ann, on_bad_input="skip")
    assert ds.image_ids == (2, 5)
    assert ds.skipped == {coco_module.MISSING_IMAGE: 1, coco_module.OF_SKIPPED_IMAGE: 2}
    assert sorted(ds.coco.getImgIds()) == [2, 5] and len(ds.coco.anns) == 1


def test_missing_image_folder(tmp_path: Path) -> None:
    _, ann = _write(tmp_path)
    with pytest.raises(DataError, match="nowhere"):
        CocoDataset(tmp_path / "nowhere", ann, on_bad_input="skip")


@pytest.mark.parametrize(
    "content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40]
)
def test_corrupt_image(tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    images, ann = _write(tmp_path)
    (images / "a.png").write_bytes(content)
    ds = CocoDataset(images, ann)  # files exist: decoding happens on read
    with pytest.raises(DataError, match=r"a\.png.*image id 1"):
        ds[0]
    assert ds[1].image.shape == (3, H, W)

    skipping = CocoDataset(images, ann, on_bad_input="skip")
    with caplog.at_level(logging.WARNING, logger="fdet.data"):
        sample = skipping[0]
    assert sample.image_id == 1 and sample.image.shape == (3, H, W) and not sample.image.any()
    assert sample.boxes.shape == (0, 4)
    assert skipping.skipped == {coco_module.UNREADABLE_IMAGE: 1}
    assert "a.png" in caplog.text

    checked = CocoDataset(images, ann, on_bad_input="skip", check_images=True)
    assert checked.image_ids == (2, 5)
    with pytest.raises(DataError, match=r"a\.png"):
        CocoDataset(images, ann, check_images=True)


def test_image_of_the_wrong_size(tmp_path: Path) -> None:
    data = _dataset_dict()
    data["images"][1]["height"] = H + 1
    images, ann = _write(tmp_path, data)
    with pytest.raises(DataError, match=r"b\.png.*24x32.*25x32.*image id 2"):
        CocoDataset(images, ann)[1]


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "malformed JSON"),
        ("[]", "expected a JSON object"),
        (json.dumps({"images": [], "categories": []}), "missing top-level key 'annotations'"),
        (json.dumps({"annotations": [], "categories": []}), "missing top-level key 'images'"),
        (json.dumps({"images": [], "annotations": []}), "missing top-level key 'categories'"),
        (
            json.dumps({"images": {}, "annotations": [], "categories": []}),
            "'images' must be a list",
        ),
    ],
)
def test_malformed_file_is_always_an_error(
    tmp_path: Path, mode: str, text: str, match: str
) -> None:
    images, ann = _write(tmp_path)
    ann.write_text(text)
    with pytest.raises(DataError, match=match) as info:
        CocoDataset(images, ann, on_bad_input=mode)  # type: ignore[arg-type]
    assert str(ann) in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda d: d["annotations"].append(dict(d["annotations"][0])),
            "duplicate annotation id 11",
        ),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id 1"),
        (lambda d: d["categories"].append({"id": 3}), "duplicate category id 3"),
        (lambda d: d["categories"].append({"name": "x"}), r"categories\[3\]"),
    ],
)
def test_duplicate_ids_are_errors(tmp_path: Path, mutate: Mutation, match: str) -> None:
    data = _dataset_dict()
    mutate(data)
    images, ann = _write(tmp_path, data)
    with pytest.raises(DataError, match=match):
        CocoDataset(images, ann, on_bad_input="skip")


def test_malformed_image_entry(tmp_path: Path) -> None:
    data = _dataset_dict()
    data["images"][1]["width"] = 0
    images, ann = _write(tmp_path, data)
    with pytest.raises(DataError, match="image id 2: malformed image entry"):
        CocoDataset(images, ann)
    ds = CocoDataset(images, ann, on_bad_input="skip")
    assert ds.image_ids == (1, 5)
    assert ds.skipped == {coco_module.MALFORMED_IMAGE: 1, coco_module.OF_SKIPPED_IMAGE: 1}


def test_malformed_segmentation_only_matters_with_masks(tmp_path: Path) -> None:
    data = _dataset_dict()
    data["annotations"][0]["segmentation"] = [[1, 2, 3]]
    images, ann = _write(tmp_path, data)
    assert len(CocoDataset(images, ann).coco.anns) == 3
    with pytest.raises(DataError, match=r"annotation id 11.*malformed segmentation"):
        CocoDataset(images, ann, with_masks=True)
    ds = CocoDataset(images, ann, with_masks=True, on_bad_input="skip")
    assert ds.skipped == {coco_module.MALFORMED_SEGMENTATION: 1}


def test_many_bad_annotations_are_checked_quickly(tmp_path: Path) -> None:
    data = _dataset_dict()
    rng = np.random.default_rng(0)
    xy = rng.uniform(-10, 40, (20000, 2))
    wh = rng.uniform(-2, 12, (20000, 2))
    data["annotations"] = [
        {"id": k + 1, "image_id": int(rng.choice([1, 2, 5, 9])), "category_id": 3, "bbox": [*p, *s]}
        for k, (p, s) in enumerate(zip(xy.tolist(), wh.tolist()))
    ]
    images, ann = _write(tmp_path, data)
    ds = CocoDataset(images, ann, on_bad_input="skip")
    kept = len(ds.coco.anns)
    assert kept + sum(ds.skipped.values()) == 20000
    assert set(ds.skipped) == {
        coco_module.UNKNOWN_IMAGE,
        coco_module.EMPTY_BOX,
        coco_module.OUTSIDE_BOX,
    }
    boxes = torch.cat([ds[i].boxes for i in range(3)])
    assert len(boxes) == kept
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min() >= 0 and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
