from __future__ import annotations

import itertools
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from fdet.data import Sample, collate
from fdet.data.collate import slot_buckets
from tests.strategies import random_boxes, seeds


def make_sample(
    g: torch.Generator, *, height: int, width: int, n: int, masks: bool, image_id: int = 1
) -> Sample:
    return Sample(
        image=torch.randint(1, 256, (3, height, width), generator=g, dtype=torch.uint8),
        boxes=random_boxes(g, (n,), image_size=float(min(height, width))),
        labels=torch.randint(0, 5, (n,), generator=g),
        crowd=torch.rand(n, generator=g) < 0.3,
        image_id=image_id,
        orig_size=(height, width),
        scale=(0.5, 0.25),
        masks=torch.randint(1, 2, (n, height, width), generator=g, dtype=torch.uint8)
        if masks
        else None,
    )


@st.composite
def sample_lists(draw: st.DrawFn) -> list[Sample]:
    g = torch.Generator().manual_seed(draw(seeds))
    masks = draw(st.booleans())
    return [
        make_sample(
            g,
            height=draw(st.integers(1, 40)),
            width=draw(st.integers(1, 40)),
            n=draw(st.integers(0, 5)),
            masks=masks,
            image_id=i + 7,
        )
        for i in range(draw(st.integers(1, 4)))
    ]


@given(samples=sample_lists(), pad_divisor=st.sampled_from([1, 8, 32]))
def test_padding_is_invisible(samples: list[Sample], pad_divisor: int) -> None:
    batch = collate(samples, pad_divisor=pad_divisor)
    b = len(samples)
    _, _, height, width = batch.images.shape
    assert batch.images.shape[:2] == (b, 3) and batch.images.dtype == torch.uint8
    assert height % pad_divisor == 0 and width % pad_divisor == 0
    assert height - pad_divisor < max(s.image.shape[1] for s in samples) <= height
    assert width - pad_divisor < max(s.image.shape[2] for s in samples) <= width
    m = max(1, *(len(s.labels) for s in samples))
    assert batch.gt_boxes.shape == (b, m, 4) and batch.gt_labels.shape == (b, m)
    assert batch.gt_valid.shape == (b, m) and batch.gt_crowd.shape == (b, m)
    assert batch.gt_valid.sum(1).tolist() == [len(s.labels) for s in samples]
    assert batch.image_ids.tolist() == [s.image_id for s in samples]
    assert batch.scales.tolist() == [[0.5, 0.25]] * b
    for i, s in enumerate(samples):
        h, w = s.image.shape[1:]
        n = len(s.labels)
        assert batch.image_sizes[i].tolist() == [h, w]
        assert torch.equal(batch.images[i, :, :h, :w], s.image)
        assert not batch.images[i, :, h:].any() and not batch.images[i, :, :, w:].any()
        assert torch.equal(batch.gt_boxes[i, :n], s.boxes)
        assert torch.equal(batch.gt_labels[i, :n], s.labels)
        assert torch.equal(batch.gt_crowd[i, :n], s.crowd)
        assert batch.gt_valid[i, :n].all()
        assert not batch.gt_boxes[i, n:].any() and not batch.gt_labels[i, n:].any()
        assert not batch.gt_crowd[i, n:].any()
        if s.masks is not None:
            assert batch.gt_masks is not None and batch.gt_masks.shape == (b, m, height, width)
            assert torch.equal(batch.gt_masks[i, :n, :h, :w], s.masks)
            assert batch.gt_masks[i].sum() == s.masks.sum()
        else:
            assert batch.gt_masks is None


def test_masks_only_when_every_sample_has_them() -> None:
    g = torch.Generator().manual_seed(0)
    a = make_sample(g, height=10, width=12, n=2, masks=True)
    b = make_sample(g, height=14, width=9, n=1, masks=False)
    assert collate([a, b], pad_divisor=4).gt_masks is None
    assert collate([a, a], pad_divisor=4).gt_masks is not None


def test_no_objects_gives_one_invalid_slot() -> None:
    g = torch.Generator().manual_seed(0)
    batch = collate([make_sample(g, height=5, width=6, n=0, masks=False)] * 2, pad_divisor=4)
    assert batch.gt_boxes.shape == (2, 1, 4) and not batch.gt_valid.any()
    assert batch.images.shape == (2, 3, 8, 8)


def test_fixed_size_and_slots() -> None:
    g = torch.Generator().manual_seed(0)
    samples = [make_sample(g, height=10, width=20, n=2, masks=True)]
    batch = collate(samples, pad_divisor=8, pad_to=(32, 32), slots=5)
    assert batch.images.shape == (1, 3, 32, 32) and batch.gt_boxes.shape == (1, 5, 4)
    assert batch.gt_masks is not None and batch.gt_masks.shape == (1, 5, 32, 32)
    with pytest.raises(ValueError, match="pad_to"):
        collate(samples, pad_divisor=8, pad_to=(8, 32))
    with pytest.raises(ValueError, match="image id 1 \\(2 objects\\)"):
        collate(samples, pad_divisor=8, slots=1)
    with pytest.raises(ValueError, match="no samples"):
        collate([], pad_divisor=8)


def test_batch_moves_between_devices() -> None:
    g = torch.Generator().manual_seed(0)
    batch = collate([make_sample(g, height=4, width=4, n=1, masks=False)], pad_divisor=4)
    moved = batch.to("cpu")
    assert moved.gt_masks is None and torch.equal(moved.images, batch.images)


# ------------------------------------------------------------------------------------------------
# Slot buckets
# ------------------------------------------------------------------------------------------------


@st.composite
def bucketed(draw: st.DrawFn) -> tuple[list[Sample], tuple[int, ...]]:
    """Samples of 0 to 9 objects, and strictly ascending bucket sizes whose largest holds them."""
    g = torch.Generator().manual_seed(draw(seeds))
    masks = draw(st.booleans())
    counts = draw(st.lists(st.integers(0, 9), min_size=1, max_size=4))
    samples = [
        make_sample(g, height=draw(st.integers(1, 12)), width=7, n=n, masks=masks, image_id=i)
        for i, n in enumerate(counts)
    ]
    sizes = draw(st.sets(st.integers(0, 14), min_size=1, max_size=5))
    return samples, tuple(sorted(sizes | {draw(st.integers(max(counts), 14))}))


@given(case=bucketed())
def test_buckets_pad_to_the_smallest_that_holds_the_batch(
    case: tuple[list[Sample], tuple[int, ...]],
) -> None:
    samples, buckets = case
    most = max(len(s.labels) for s in samples)
    m = min(b for b in buckets if b >= most)
    batch = collate(samples, pad_divisor=4, slots=buckets)
    assert collate(samples, pad_divisor=4, slots=list(buckets)).gt_valid.shape[1] == m
    exact = collate(samples, pad_divisor=4, slots=m)
    unpadded = collate(samples, pad_divisor=4)  # M = max(1, most)
    assert batch.gt_boxes.shape == (len(samples), m, 4)
    assert (
        batch.gt_labels.shape == batch.gt_valid.shape == batch.gt_crowd.shape == (len(samples), m)
    )
    for field in batch._fields:
        a, b = getattr(batch, field), getattr(exact, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    # Equal to the unpadded collation on every valid slot; extra slots are invalid and zero.
    n = unpadded.gt_valid.shape[1]
    k = min(m, n)
    assert torch.equal(batch.images, unpadded.images)
    assert torch.equal(batch.gt_valid[:, :k], unpadded.gt_valid[:, :k])
    assert not batch.gt_valid[:, k:].any() and not unpadded.gt_valid[:, k:].any()
    valid = batch.gt_valid[:, :k]
    assert torch.equal(batch.gt_boxes[:, :k][valid], unpadded.gt_boxes[:, :k][valid])
    assert torch.equal(batch.gt_labels[:, :k][valid], unpadded.gt_labels[:, :k][valid])
    assert torch.equal(batch.gt_crowd[:, :k][valid], unpadded.gt_crowd[:, :k][valid])
    pad = ~batch.gt_valid
    assert not batch.gt_boxes[pad].any() and not batch.gt_labels[pad].any()
    assert not batch.gt_crowd[pad].any()
    if batch.gt_masks is not None:
        assert not batch.gt_masks[pad].any()


def test_more_objects_than_the_largest_bucket_is_an_error_naming_the_images() -> None:
    g = torch.Generator().manual_seed(0)
    samples = [
        make_sample(g, height=8, width=8, n=n, masks=False, image_id=i)
        for i, n in [(11, 3), (12, 7), (13, 5), (14, 9)]
    ]
    assert collate(samples, pad_divisor=4, slots=(4, 9)).gt_valid.shape == (4, 9)
    with pytest.raises(
        ValueError, match=r"largest slot bucket 6: image id 12 \(7 objects\), image id 14 \(9"
    ):
        collate(samples, pad_divisor=4, slots=(2, 4, 6))


@pytest.mark.parametrize(
    ("slots", "error"),
    [
        ((), ValueError),
        ((4, 4), ValueError),
        ((8, 4), ValueError),
        ((-1, 4), ValueError),
        (-1, ValueError),
        ((2.0, 4), TypeError),
        ("48", TypeError),
        (True, TypeError),
    ],
)
def test_bad_slots_are_errors(slots: object, error: type[Exception]) -> None:
    g = torch.Generator().manual_seed(0)
    samples = [make_sample(g, height=8, width=8, n=1, masks=False)]
    with pytest.raises(error, match="slots"):
        collate(samples, pad_divisor=4, slots=slots)  # type: ignore[arg-type]


def test_slot_buckets_examples() -> None:
    assert slot_buckets(93) == (8, 16, 32, 64, 93)
    assert slot_buckets(64) == (8, 16, 32, 64)
    assert slot_buckets(12) == (8, 12)
    assert slot_buckets(5) == (5,)
    assert slot_buckets(0) == (1,)
    assert slot_buckets(100, smallest=10, growth=3) == (10, 30, 90, 100)
    for bad in (dict(max_count=-1), dict(max_count=9, smallest=0), dict(max_count=9, growth=1)):
        with pytest.raises(ValueError, match="slot_buckets"):
            slot_buckets(**bad)  # type: ignore[arg-type]


@given(
    max_count=st.integers(0, 5000),
    smallest=st.integers(1, 64),
    growth=st.floats(1.01, 4.0),
)
def test_slot_buckets_ascend_to_the_maximum(max_count: int, smallest: int, growth: float) -> None:
    buckets = slot_buckets(max_count, smallest=smallest, growth=growth)
    assert buckets[-1] == max(1, max_count)
    assert all(a < b for a, b in itertools.pairwise(buckets))
    assert buckets[0] == min(smallest, max(1, max_count))
    for a, b in itertools.pairwise(buckets[:-1]):  # geometric below the maximum
        assert b == max(a + 1, -(-a * growth // 1))
    if growth >= 1.5:
        assert len(buckets) <= 2 + math.log(max(1, max_count) / smallest + 1, growth)
