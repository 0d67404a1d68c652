from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from fdet import specs
from fdet.data import SHAPE_CATEGORIES, ShapesPaths, ensure_shapes, generate_shapes
from fdet.data import shapes as shapes_module
from tests.data.conftest import SIZE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def _tight_xywh(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] + 1 - cols[0]),
        float(rows[-1] + 1 - rows[0]),
    ]


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", train=5, val=2, size=48, seed=7, min_object_size=4)
    b = generate_shapes(tmp_path / "b", train=5, val=2, size=48, seed=7, min_object_size=4)
    files_a, files_b = _files(a.root), _files(b.root)
    assert len(files_a) == 5 + 2 + 3  # images, two annotation files, the manifest
    assert files_a == files_b


def test_different_seeds_differ(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", train=3, val=1, size=48, seed=1, min_object_size=4)
    b = generate_shapes(tmp_path / "b", train=3, val=1, size=48, seed=2, min_object_size=4)
    for name in ("000001.png", "000002.png", "000003.png"):
        assert (a.train_images / name).read_bytes() != (b.train_images / name).read_bytes()
    assert a.train_annotations.read_bytes() != b.train_annotations.read_bytes()


def test_a_smaller_set_is_a_prefix_of_a_larger_one(shapes_set: ShapesPaths, tmp_path: Path) -> None:
    small = generate_shapes(tmp_path / "s", train=3, val=1, size=SIZE, seed=3, min_object_size=6)
    for name in ("000001.png", "000003.png"):
        assert (small.train_images / name).read_bytes() == (
            shapes_set.train_images / name
        ).read_bytes()
    assert (small.val_images / "000001.png").read_bytes() == (
        shapes_set.val_images / "000001.png"
    ).read_bytes()


def test_boxes_are_the_tight_boxes_of_the_masks(shapes_set: ShapesPaths) -> None:
    for split in ("train", "val"):
        data = _load(
            shapes_set.train_annotations if split == "train" else shapes_set.val_annotations
        )
        by_image: dict[int, list[np.ndarray]] = {}
        for ann in data["annotations"]:
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert mask.shape == (SIZE, SIZE)
            assert ann["bbox"] == _tight_xywh(mask)
            assert ann["area"] == mask.sum()
            assert ann["iscrowd"] == 0
            by_image.setdefault(ann["image_id"], []).append(mask)
        for masks in by_image.values():  # occlusion: visible pixels belong to one object
            assert (np.sum(masks, axis=0) <= 1).all()


def test_every_image_has_objects_and_files(shapes_set: ShapesPaths) -> None:
    data = _load(shapes_set.train_annotations)
    assert [im["id"] for im in data["images"]] == list(range(1, 41))
    with_objects = {ann["image_id"] for ann in data["annotations"]}
    assert with_objects == {im["id"] for im in data["images"]}
    for im in data["images"]:
        with Image.open(shapes_set.train_images / im["file_name"]) as pil:
            assert pil.size == (SIZE, SIZE) and pil.mode == "RGB"
    counts = np.bincount([a["image_id"] for a in data["annotations"]])[1:]
    assert counts.max() <= 12 and counts.min() >= 1


def test_categories_are_named_and_all_used(shapes_set: ShapesPaths) -> None:
    data = _load(shapes_set.train_annotations)
    assert [(c["id"], c["name"]) for c in data["categories"]] == [
        (i + 1, name) for i, name in enumerate(SHAPE_CATEGORIES)
    ]
    assert len(SHAPE_CATEGORIES) >= 5
    assert {a["category_id"] for a in data["annotations"]} == set(
        range(1, len(SHAPE_CATEGORIES) + 1)
    )


def test_object_sizes(shapes_set: ShapesPaths) -> None:
    data = _load(shapes_set.train_annotations)
    wh = np.array([a["bbox"][2:] for a in data["annotations"]])
    assert wh.min() >= shapes_module.MIN_SIDE
    assert wh.max() <= math.ceil(SIZE / 2 * math.sqrt(2)) + 1  # half the image, rotated
    longer = wh.max(1)
    assert (longer >= SIZE / 4).any()  # large objects ...
    assert (longer <= 2 * 6).any()  # ... and objects near min_object_size


def test_objects_stand_out_from_their_surroundings(shapes_set: ShapesPaths) -> None:
    """Learnability: the mean colour of an object differs from that of a 2-pixel ring around it."""
    data = _load(shapes_set.train_annotations)
    images = {im["id"]: im["file_name"] for im in data["images"]}
    distances = []
    for ann in data["annotations"]:
        image = np.asarray(Image.open(shapes_set.train_images / images[ann["image_id"]]), float)
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        grown = mask.copy()
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                grown |= np.roll(mask, (dy, dx), axis=(0, 1))
        ring = grown & ~mask
        distances.append(np.linalg.norm(image[mask].mean(0) - image[ring].mean(0)))
    assert np.percentile(distances, 5) > 50


def test_annotation_files_load_with_pycocotools(shapes_set: ShapesPaths, capsys) -> None:
    coco = COCO(str(shapes_set.val_annotations))
    assert len(coco.getImgIds()) == 8
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    assert coco.annToMask(ann).sum() == ann["area"]


def test_non_empty_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out"):
        generate_shapes(tmp_path / "out", train=1, val=1, size=32, min_object_size=4)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_bad_parameters_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_object_size"):
        generate_shapes(tmp_path / "x", train=1, val=1, size=32, min_object_size=17)
    with pytest.raises(ValueError, match="max_objects"):
        generate_shapes(tmp_path / "x", train=1, val=1, size=32, min_object_size=4, max_objects=0)


def _spec(cache: Path, **kw) -> specs.ShapesData:
    fields = dict(train_images=3, val_images=2, image_size=32, min_object_size=4, seed=1)
    fields.update(kw)
    return specs.ShapesData(cache_dir=str(cache), **fields)


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = ensure_shapes(_spec(tmp_path))
    assert first.root.parent == tmp_path and first.train_annotations.is_file()
    before = _mtimes(first.root)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated a cached set")

    monkeypatch.setattr(shapes_module, "render", fail)
    again = ensure_shapes(_spec(tmp_path))
    assert again == first
    assert _mtimes(first.root) == before
    monkeypatch.undo()
    other = ensure_shapes(_spec(tmp_path, seed=2))  # another key, another folder
    assert other.root != first.root
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.root.name, other.root.name])


def test_cache_folder_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FDET_CACHE", str(tmp_path / "env"))
    spec = specs.ShapesData(train_images=1, val_images=1, image_size=32, min_object_size=4)
    assert ensure_shapes(spec).root.parent == tmp_path / "env"


def test_interrupted_generation_leaves_no_complete_looking_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_render = shapes_module.render
    calls = []

    def render_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(shapes_module, "render", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ensure_shapes(_spec(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no set, no leftover temporary folder

    # A folder without its manifest (say, a copy cut short) is not taken for a set.
    monkeypatch.setattr(shapes_module, "render", real_render)
    paths = ensure_shapes(_spec(tmp_path))
    (paths.root / shapes_module.MANIFEST).unlink()
    paths.train_annotations.unlink()
    again = ensure_shapes(_spec(tmp_path))
    assert again.train_annotations.is_file() and (again.root / shapes_module.MANIFEST).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [paths.root.name]


def test_the_set_folder_follows_the_umask(tmp_path: Path) -> None:
    """The set is made in a temporary folder and renamed into place: it must not keep the
    temporary folder's private mode."""
    import os

    umask = os.umask(0o022)
    try:
        paths = generate_shapes(tmp_path / "set", train=1, val=1, size=32, min_object_size=8)
    finally:
        os.umask(umask)
    assert (paths.root.stat().st_mode & 0o777) == 0o755
