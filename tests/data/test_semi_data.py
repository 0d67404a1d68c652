"""Semi-supervised data: the strong view and its map, cutout, pairs of views and their loader,
subsets, splits and image folders.

The key property: the teacher's boxes carried into the student's view by ``map_boxes`` are the
boxes the strong view's own transforms give the image's objects."""

from __future__ import annotations

import pickle
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from PIL import Image

from fdet import specs
from fdet.data import CocoDataset, DataError, ShapesPaths, build_transform, sample_generator
from fdet.data.loader import Loader
from fdet.data.sample import Sample
from fdet.data.semi import (
    ImageFolder,
    IndexSubset,
    PairBatch,
    PairSample,
    UnlabeledPairs,
    collate_pairs,
    cutout,
    cutout_patches,
    split_indices,
    strong_view,
)
from fdet.ops.views import map_boxes
from tests.ops.test_views import reference
from tests.strategies import seeds

NO_COLOUR = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def random_sample(g: torch.Generator, h: int, w: int, n: int) -> Sample:
    """Random pixels and ``n`` non-degenerate boxes inside the image, labelled by slot."""
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * (w - 1)
    y1 = torch.rand(n, generator=g, dtype=torch.float64) * (h - 1)
    x2 = x1 + 0.5 + torch.rand(n, generator=g, dtype=torch.float64) * (w - x1 - 0.5)
    y2 = y1 + 0.5 + torch.rand(n, generator=g, dtype=torch.float64) * (h - y1 - 0.5)
    return Sample(
        image=image,
        boxes=torch.stack((x1, y1, x2, y2), dim=1).float(),
        labels=torch.arange(n),
        crowd=torch.zeros(n, dtype=torch.bool),
        image_id=7,
        orig_size=(h, w),
    )


@st.composite
def strong_specs(draw: st.DrawFn) -> specs.StrongAugment:
    lo = draw(st.floats(0.2, 2.0))
    hi = draw(st.floats(lo, 2.5))
    colour = draw(st.booleans())
    return specs.StrongAugment(
        scale=(lo, hi),
        hflip_prob=draw(st.sampled_from([1.0, 0.5, 0.0])),
        crop_prob=draw(st.sampled_from([1.0, 0.5, 0.0])),
        crop_min_scale=draw(st.floats(0.1, 1.0)),
        crop_min_visible=draw(st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0])),
        **(dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1) if colour else NO_COLOUR),
        cutout_count=(0, draw(st.integers(0, 3))),
        cutout_size=(0.05, 0.3),
    )


# -- the strong view and its map ------------------------------------------------------------


@given(
    seed=seeds,
    spec=strong_specs(),
    h=st.integers(4, 48),
    w=st.integers(4, 48),
    n=st.integers(1, 8),
)
@settings(max_examples=60)
def test_mapped_boxes_are_the_strong_views_boxes(
    seed: int, spec: specs.StrongAugment, h: int, w: int, n: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    weak = random_sample(g, h, w, n)
    strong, affine = strong_view(weak, g, spec)
    size = tuple(strong.image.shape[-2:])
    out, keep = map_boxes(
        weak.boxes[None],
        torch.ones(1, n, dtype=torch.bool),
        torch.tensor([affine]),
        torch.tensor([size]),
        min_visible=spec.crop_min_visible,
    )
    out, keep = out[0], keep[0]
    in_strong = torch.zeros(n, dtype=torch.bool)
    in_strong[strong.labels] = True  # labels are slot numbers
    _, _, borderline = reference(weak.boxes, torch.tensor(affine), size, spec.crop_min_visible)
    sure = ~borderline
    assert torch.equal(keep[sure], in_strong[sure])
    both = keep & in_strong
    position = torch.cumsum(in_strong.long(), 0) - 1
    torch.testing.assert_close(out[both], strong.boxes[position[both]], atol=2e-4, rtol=1e-5)
    assert torch.equal(strong.crowd, weak.crowd[strong.labels])
    assert strong.masks is None and strong.image.dtype == torch.uint8


def test_crop_scale_and_flip_together() -> None:
    spec = specs.StrongAugment(
        scale=(0.5, 1.5),
        hflip_prob=1.0,
        crop_prob=1.0,
        crop_min_scale=0.3,
        crop_min_visible=0.4,
        cutout_count=(0, 0),
        **NO_COLOUR,
    )
    carried = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        weak = random_sample(g, 37, 45, 6)
        strong, affine = strong_view(weak, g, spec)
        assert affine[0] < 0
        out, keep = map_boxes(
            weak.boxes[None],
            torch.ones(1, 6, dtype=torch.bool),
            torch.tensor([affine]),
            torch.tensor([strong.image.shape[-2:]]),
            min_visible=spec.crop_min_visible,
        )
        assert keep[0].sum() == len(strong.boxes)
        torch.testing.assert_close(out[0][keep[0]], strong.boxes, atol=2e-4, rtol=1e-5)
        carried += len(strong.boxes)
    assert carried > 30


def test_crop_alone_is_a_translation_to_the_window() -> None:
    spec = specs.StrongAugment(
        scale=(1.0, 1.0),
        hflip_prob=0.0,
        crop_prob=1.0,
        crop_min_scale=0.3,
        cutout_count=(0, 0),
        **NO_COLOUR,
    )
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        weak = random_sample(g, 30, 40, 3)
        strong, (a_x, b_x, a_y, b_y) = strong_view(weak, g, spec)
        x0, y0 = -b_x, -b_y
        h, w = strong.image.shape[-2:]
        assert (a_x, a_y) == (1.0, 1.0) and x0 == int(x0) and y0 == int(y0)
        assert torch.equal(
            strong.image, weak.image[:, int(y0) : int(y0) + h, int(x0) : int(x0) + w]
        )


def test_scale_and_flip_alone_match_the_transforms() -> None:
    from fdet.data.transforms import hflip, resize_to

    spec = specs.StrongAugment(
        scale=(0.5, 1.7), hflip_prob=0.5, crop_prob=0.0, cutout_count=(0, 0), **NO_COLOUR
    )
    flips = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        weak = random_sample(g, 21, 34, 4)
        strong, (a_x, b_x, a_y, b_y) = strong_view(weak, g, spec)
        h, w = strong.image.shape[-2:]
        expected = resize_to(weak, (h, w))
        flipped = a_x < 0
        flips.add(flipped)
        if flipped:
            expected = hflip(expected)
            assert b_x == w
        else:
            assert b_x == 0
        assert (abs(a_x), a_y, b_y) == (w / 34, h / 21, 0)
        assert torch.equal(strong.image, expected.image)
        torch.testing.assert_close(strong.boxes, expected.boxes)
    assert flips == {True, False}


def test_mapped_box_is_the_tight_box_of_the_objects_pixels() -> None:
    spec = specs.StrongAugment(
        scale=(0.5, 1.8),
        hflip_prob=0.5,
        crop_prob=0.7,
        crop_min_scale=0.5,
        crop_min_visible=0.3,
        cutout_count=(0, 0),
        **NO_COLOUR,
    )
    checked = 0
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        h, w = 40 + seed % 7, 52 - seed % 5
        image = torch.full((3, h, w), 60, dtype=torch.uint8)
        x1, y1 = 6 + seed % 9, 5 + seed % 11
        x2, y2 = x1 + 12 + seed % 8, y1 + 10 + seed % 6
        image[:, y1:y2, x1:x2] = torch.tensor([250, 10, 10], dtype=torch.uint8)[:, None, None]
        weak = Sample(
            image=image,
            boxes=torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32),
            labels=torch.zeros(1, dtype=torch.int64),
            crowd=torch.zeros(1, dtype=torch.bool),
            image_id=1,
            orig_size=(h, w),
        )
        strong, affine = strong_view(weak, g, spec)
        size = tuple(strong.image.shape[-2:])
        out, keep = map_boxes(
            weak.boxes[None],
            torch.ones(1, 1, dtype=torch.bool),
            torch.tensor([affine]),
            torch.tensor([size]),
            min_visible=spec.crop_min_visible,
        )
        red = strong.image[0].int() > 155  # past the middle of background and object
        if not keep[0, 0]:
            assert (
                red.sum() < 0.3 * (x2 - x1) * (y2 - y1) * abs(affine[0] * affine[2]) + 2 * size[1]
            )
            continue
        ys, xs = torch.nonzero(red, as_tuple=True)
        tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        torch.testing.assert_close(out[0, 0], tight, atol=1.0, rtol=0.0)
        checked += 1
    assert checked >= 15


def test_strong_view_drops_masks_and_is_deterministic() -> None:
    spec = specs.StrongAugment()
    g = torch.Generator().manual_seed(0)
    weak = random_sample(g, 32, 32, 3)
    weak = weak._replace(masks=torch.ones(3, 32, 32, dtype=torch.uint8))
    a, affine_a = strong_view(weak, torch.Generator().manual_seed(5), spec)
    b, affine_b = strong_view(weak, torch.Generator().manual_seed(5), spec)
    assert a.masks is None and affine_a == affine_b
    assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes)


# -- cutout ---------------------------------------------------------------------------------


def flat(h: int, w: int, value: int = 7) -> Sample:
    return Sample(
        image=torch.full((3, h, w), value, dtype=torch.uint8),
        boxes=torch.tensor([[1.0, 2.0, 5.0, 6.0]]),
        labels=torch.tensor([3]),
        crowd=torch.zeros(1, dtype=torch.bool),
        image_id=1,
        orig_size=(h, w),
        masks=torch.ones(1, h, w, dtype=torch.uint8),
    )


@given(
    seed=seeds,
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    lo=st.integers(0, 3),
    extra=st.integers(0, 3),
    size=st.sampled_from([(0.0, 0.1), (0.1, 0.4), (0.5, 1.0)]),
)
@settings(max_examples=40)
def test_cutout_changes_exactly_its_patches(
    seed: int, h: int, w: int, lo: int, extra: int, size: tuple[float, float]
) -> None:
    count = (lo, lo + extra)
    g = torch.Generator().manual_seed(seed)
    probe = torch.Generator().manual_seed(seed)
    patches = cutout_patches(h, w, probe, count=count, size=size)
    sample = flat(h, w)
    out = cutout(sample, g, count=count, size=size)
    assert lo <= len(patches) <= lo + extra
    inside = torch.zeros(h, w, dtype=torch.bool)
    for x1, y1, x2, y2 in patches.tolist():
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
        inside[y1:y2, x1:x2] = True
    changed = (out.image != sample.image).any(0)
    assert torch.equal(changed, inside)
    assert (out.image[:, inside] == 128).all()
    assert torch.equal(out.boxes, sample.boxes) and torch.equal(out.labels, sample.labels)
    assert out.masks is sample.masks
    # a fixed number of draws whatever the patch count: the streams are in step afterwards
    after = torch.Generator().manual_seed(seed)
    torch.rand(1 + 3 * count[1], generator=after, dtype=torch.float64)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=after))


def test_cutout_patch_from_the_generator_by_hand() -> None:
    # one patch of side 0.5 * 20 = 10 centred at the drawn point, clipped to the image
    g = torch.Generator().manual_seed(11)
    u = torch.rand(4, generator=torch.Generator().manual_seed(11), dtype=torch.float64).tolist()
    cx, cy = int(u[2] * 20), int(u[3] * 30)
    expected = [max(0, cx - 5), max(0, cy - 5), min(20, cx + 5), min(30, cy + 5)]
    patches = cutout_patches(30, 20, g, count=(1, 1), size=(0.5, 0.5))
    assert patches.tolist() == [expected]


def test_cutout_counts_cover_the_range_and_depend_on_the_seed() -> None:
    counts = set()
    images = set()
    for seed in range(60):
        patches = cutout_patches(
            32, 32, torch.Generator().manual_seed(seed), count=(1, 3), size=(0.1, 0.3)
        )
        counts.add(len(patches))
        out = cutout(
            flat(32, 32), torch.Generator().manual_seed(seed), count=(1, 3), size=(0.1, 0.3)
        )
        again = cutout(
            flat(32, 32), torch.Generator().manual_seed(seed), count=(1, 3), size=(0.1, 0.3)
        )
        assert torch.equal(out.image, again.image)
        images.add(out.image.numpy().tobytes())
    assert counts == {1, 2, 3}
    assert len(images) == 60
    with pytest.raises(ValueError, match="count"):
        cutout_patches(8, 8, torch.Generator(), count=(2, 1), size=(0.1, 0.2))


# -- pairs, their batches and their loader ----------------------------------------------------

WEAK = specs.Transforms(min_size=(48, 56), max_size=80, hflip_prob=0.5, crop_prob=0.5)


def pairs_of(dataset: object, seed: int = 0) -> UnlabeledPairs:
    return UnlabeledPairs(
        dataset, weak=build_transform(WEAK, train=True), strong=specs.StrongAugment(), seed=seed
    )


def assert_same_pair(a: PairSample, b: PairSample) -> None:
    assert a.affine == b.affine
    for x, y in ((a.weak, b.weak), (a.strong, b.strong)):
        assert torch.equal(x.image, y.image) and torch.equal(x.boxes, y.boxes)
        assert torch.equal(x.labels, y.labels) and x.image_id == y.image_id


def test_pairs_are_a_function_of_seed_epoch_and_index(shapes_set: ShapesPaths) -> None:
    dataset = CocoDataset(shapes_set.train_images, shapes_set.train_annotations)
    pairs = pairs_of(dataset, seed=3)
    assert len(pairs) == len(dataset)
    pair = pairs.get(5, epoch=2)
    assert_same_pair(pair, pairs_of(dataset, seed=3).get(5, epoch=2))
    assert_same_pair(pair, pickle.loads(pickle.dumps(pairs)).get(5, epoch=2))
    other_epoch = pairs.get(5, epoch=3)
    other_seed = pairs_of(dataset, seed=4).get(5, epoch=2)
    for other in (other_epoch, other_seed):
        assert other.affine != pair.affine or not torch.equal(other.strong.image, pair.strong.image)
    # the weak view is the weak transform of the stored sample, labels kept
    stored = dataset.read(5)
    weak = pairs.weak(stored, pairs.generator(5, 2))
    assert torch.equal(pair.weak.image, weak.image) and torch.equal(pair.weak.boxes, weak.boxes)
    assert torch.equal(pair.weak.labels, weak.labels) and len(stored.labels) > 0
    # the unlabeled stream's draws are not the labeled stream's (same seed, epoch, index)
    draws = torch.rand(8, generator=pairs.generator(5, 2))
    assert torch.equal(draws, torch.rand(8, generator=pairs.generator(5, 2)))
    assert not torch.equal(draws, torch.rand(8, generator=sample_generator(3, 2, 5)))
    # strong boxes are the weak boxes carried by the map
    out, keep = map_boxes(
        pair.weak.boxes[None],
        torch.ones(1, len(pair.weak.boxes), dtype=torch.bool),
        torch.tensor([pair.affine]),
        torch.tensor([pair.strong.image.shape[-2:]]),
        min_visible=pairs.strong.crop_min_visible,
    )
    torch.testing.assert_close(out[0][keep[0]], pair.strong.boxes, atol=2e-4, rtol=1e-5)
    # pass-through of the wrapped set
    assert pairs.category_names == dataset.category_names
    assert pairs.label_to_category_id == dataset.label_to_category_id
    assert pairs.coco is dataset.coco and pairs.annotation_file == dataset.annotation_file
    pairs.set_epoch(2)
    assert_same_pair(pairs[5], pair)


def test_collate_pairs_stacks_both_views(shapes_set: ShapesPaths) -> None:
    dataset = CocoDataset(shapes_set.train_images, shapes_set.train_annotations)
    pairs = pairs_of(dataset)
    items = [pairs.get(i, epoch=0) for i in range(3)]
    batch = collate_pairs(items, pad_divisor=32, slots=(8, 16, 32))
    assert isinstance(batch, PairBatch)
    assert batch.affine.dtype == torch.float32 and batch.affine.shape == (3, 4)
    assert batch.affine.tolist() == [list(torch.tensor(p.affine).float().tolist()) for p in items]
    for view, samples in (
        (batch.weak, [p.weak for p in items]),
        (batch.strong, [p.strong for p in items]),
    ):
        assert view.images.shape[-1] % 32 == 0 and view.gt_boxes.shape[1] in (8, 16, 32)
        for i, s in enumerate(samples):
            h, w = s.image.shape[-2:]
            assert view.image_sizes[i].tolist() == [h, w]
            assert torch.equal(view.images[i, :, :h, :w], s.image)
            assert torch.equal(view.gt_boxes[i, : len(s.boxes)], s.boxes)
            assert view.gt_valid[i].sum() == len(s.boxes)
    moved = batch.to("cpu")
    assert isinstance(moved, PairBatch) and torch.equal(moved.affine, batch.affine)
    with pytest.raises(ValueError, match="no samples"):
        collate_pairs([], pad_divisor=32)


def test_loader_of_pairs_with_and_without_workers(shapes_set: ShapesPaths) -> None:
    dataset = CocoDataset(shapes_set.train_images, shapes_set.train_annotations)
    pairs = pairs_of(IndexSubset(dataset, range(8)), seed=1)
    results = []
    for workers in (0, 1):
        loader = Loader(
            pairs,
            batch_size=4,
            shuffle=True,
            seed=2,
            num_workers=workers,
            pad_divisor=32,
            drop_last=True,
            collate=collate_pairs,
            pin_memory=False,
        )
        batches = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            batches += list(loader)
        results.append(batches)
    assert len(results[0]) == 4
    assert not torch.equal(results[0][0].affine, results[0][2].affine)  # epochs differ
    for a, b in zip(*results, strict=True):
        assert isinstance(a, PairBatch)
        assert torch.equal(a.affine, b.affine)
        assert torch.equal(a.strong.images, b.strong.images) and torch.equal(
            a.weak.gt_boxes, b.weak.gt_boxes
        )
    # the batch holds the pairs the sampler names
    loader = Loader(
        pairs,
        batch_size=4,
        shuffle=True,
        seed=2,
        num_workers=0,
        pad_divisor=32,
        drop_last=True,
        collate=collate_pairs,
        epoch=1,
    )
    first = next(iter(loader))
    keys = loader.sampler.indices(1)[:4]
    expected = collate_pairs([pairs.get(i, epoch=1) for i in keys], pad_divisor=32)
    assert torch.equal(first.affine, expected.affine)
    assert torch.equal(first.strong.images, expected.strong.images)


# -- subsets and splits -----------------------------------------------------------------------


def test_index_subset_passes_through(shapes_set: ShapesPaths) -> None:
    transform = build_transform(WEAK, train=True)
    dataset = CocoDataset(
        shapes_set.train_images, shapes_set.train_annotations, transform=transform, seed=9
    )
    subset = IndexSubset(dataset, [7, 2, 30])
    assert len(subset) == 3
    for i, inner in enumerate([7, 2, 30]):
        for epoch in (0, 4):
            a, b = subset.get(i, epoch=epoch), dataset.get(inner, epoch=epoch)
            assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes)
        assert torch.equal(subset.read(i).image, dataset.read(inner).image)
    views = {subset.get(0, epoch=e).boxes.numpy().tobytes() for e in range(6)}
    assert len(views) > 1  # the epoch reaches the wrapped set's transform
    assert subset.coco is dataset.coco and subset.category_names == dataset.category_names
    assert subset.label_to_category_id == dataset.label_to_category_id
    assert subset.annotation_file == dataset.annotation_file
    assert subset.image_ids == tuple(dataset.image_ids[i] for i in (7, 2, 30))
    assert subset[-1].image_id == dataset.image_ids[30]
    copy = pickle.loads(pickle.dumps(subset))
    assert copy.indices == [7, 2, 30] and torch.equal(copy.read(1).image, subset.read(1).image)
    with pytest.raises(AttributeError):
        _ = subset.no_such_attribute
    with pytest.raises(IndexError, match="out of range"):
        IndexSubset(dataset, [0, len(dataset)])
    with pytest.raises(IndexError, match="out of range"):
        subset.get(3)


@given(n=st.integers(2, 300), fraction=st.floats(0.001, 0.999), seed=st.integers(0, 2**31))
@settings(max_examples=60)
def test_split_indices(n: int, fraction: float, seed: int) -> None:
    k = max(1, round(fraction * n))
    if k >= n:
        with pytest.raises(ValueError, match="no unlabeled image"):
            split_indices(n, fraction, seed)
        return
    labeled, unlabeled = split_indices(n, fraction, seed)
    assert len(labeled) == k and len(unlabeled) == n - k
    assert labeled == sorted(labeled) and unlabeled == sorted(unlabeled)
    assert sorted(labeled + unlabeled) == list(range(n))
    assert (labeled, unlabeled) == split_indices(n, fraction, seed)


def test_split_indices_depends_on_the_seed_and_rejects_bad_input() -> None:
    splits = {tuple(split_indices(100, 0.1, seed)[0]) for seed in range(10)}
    assert len(splits) == 10
    for n, fraction, message in (
        (1, 0.5, "at least 2 images"),
        (10, 0.0, r"in \(0, 1\)"),
        (10, 1.0, r"in \(0, 1\)"),
        (3, 0.9, "no unlabeled image"),
    ):
        with pytest.raises(ValueError, match=message):
            split_indices(n, fraction, 0)


# -- image folders ----------------------------------------------------------------------------


def write_png(path: Path, h: int, w: int, value: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(h * w * 3).reshape(h, w, 3) + value).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return pixels


def test_image_folder_reads_every_image_sorted(tmp_path: Path) -> None:
    root = tmp_path / "images"
    written = {
        "b.png": write_png(root / "b.png", 9, 7, 1),
        "a.PNG": write_png(root / "a.PNG", 5, 6, 2),
        "sub/c.png": write_png(root / "sub" / "c.png", 4, 4, 3),
    }
    (root / "notes.txt").write_text("not an image")
    folder = ImageFolder(root)
    assert len(folder) == 3
    assert [p.relative_to(root).as_posix() for p in folder.files] == ["a.PNG", "b.png", "sub/c.png"]
    for i, name in enumerate(["a.PNG", "b.png", "sub/c.png"]):
        s = folder[i]
        pixels = written[name]
        assert torch.equal(s.image, torch.from_numpy(pixels).permute(2, 0, 1))
        assert s.image_id == i + 1 and s.orig_size == pixels.shape[:2]
        assert s.boxes.shape == (0, 4) and s.boxes.dtype == torch.float32
        assert s.labels.dtype == torch.int64 and s.crowd.dtype == torch.bool and len(s.labels) == 0
        assert torch.equal(folder.get(i, epoch=3).image, s.image)
    assert folder.category_names is None and folder.label_to_category_id is None
    assert folder.coco is None and folder.image_ids == (1, 2, 3)
    # unlabeled pairs of it, through a loader
    pairs = pairs_of(folder)
    loader = Loader(
        pairs,
        batch_size=3,
        shuffle=False,
        seed=0,
        num_workers=0,
        pad_divisor=16,
        drop_last=False,
        collate=collate_pairs,
    )
    (batch,) = list(loader)
    assert not batch.weak.gt_valid.any() and not batch.strong.gt_valid.any()
    assert batch.weak.image_ids.tolist() == [1, 2, 3]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such image folder"):
        ImageFolder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=f"{empty}: no image files"):
        ImageFolder(empty)
    bad = tmp_path / "bad"
    write_png(bad / "good.png", 4, 4, 0)
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    folder = ImageFolder(bad)
    with pytest.raises(DataError, match=r"broken\.jpg"):
        folder.read(0)
    assert folder.read(1).image.shape == (3, 4, 4)
    with pytest.raises(IndexError):
        folder.read(2)
