from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from fdet import specs
from fdet.data import Sample, build_transform
from fdet.data import transforms as T
from fdet.data.shapes import render
from tests.strategies import random_boxes, seeds


def shapes_sample(index: int, *, size: int = 64, height: int | None = None) -> Sample:
    """A sample with exact masks from the shapes generator, optionally cut to ``height`` rows
    (a non-square image); boxes are the tight boxes of the masks."""
    r = render(11, "train", index, size=size, min_object_size=6, max_objects=8)
    image = torch.from_numpy(r.image).permute(2, 0, 1).contiguous()
    masks = torch.from_numpy(r.masks.astype("uint8"))
    if height is not None:
        image, masks = image[:, :height].contiguous(), masks[:, :height].contiguous()
    boxes, nonempty = T.masks_to_boxes(masks)
    return Sample(
        image=image,
        boxes=boxes[nonempty],
        labels=torch.from_numpy(r.labels)[nonempty],
        crowd=torch.zeros(int(nonempty.sum()), dtype=torch.bool),
        image_id=index + 1,
        orig_size=tuple(image.shape[1:]),  # type: ignore[arg-type]
        masks=masks[nonempty],
    )


def boxes_only(sample: Sample) -> Sample:
    return sample._replace(masks=None)


def assert_consistent(sample: Sample, atol: float) -> None:
    """Boxes are the tight boxes of their masks, within ``atol`` pixels; fields line up."""
    assert sample.masks is not None
    m = len(sample.labels)
    assert sample.boxes.shape == (m, 4) and sample.crowd.shape == (m,)
    assert sample.masks.shape == (m, *sample.image.shape[1:])
    tight, nonempty = T.masks_to_boxes(sample.masks)
    assert nonempty.all()
    assert torch.allclose(tight, sample.boxes, atol=atol), (tight - sample.boxes).abs().max()


def assert_same(a: Sample, b: Sample) -> None:
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


def test_masks_to_boxes_uses_pixel_edges() -> None:
    masks = torch.zeros(3, 6, 8, dtype=torch.uint8)
    masks[0, 1:3, 2:7] = 1
    masks[1, 5, 7] = 1
    boxes, nonempty = T.masks_to_boxes(masks)
    assert boxes.tolist() == [[2, 1, 7, 3], [7, 5, 8, 6], [0, 0, 0, 0]]
    assert nonempty.tolist() == [True, True, False]


@pytest.mark.parametrize(("min_size", "max_size"), [(96, 1000), (40, 1000), (64, 80), (150, 150)])
def test_resize(min_size: int, max_size: int) -> None:
    sample = shapes_sample(0, height=48)  # 48 x 64
    out = T.resize(sample, min_size=min_size, max_size=max_size)
    h, w = out.image.shape[1:]
    assert min(h, w) == min_size or max(h, w) == max_size
    assert max(h, w) <= max_size and abs(w / h - 64 / 48) < 0.05
    assert out.image.dtype == torch.uint8
    assert out.scale == pytest.approx((h / 48, w / 64))
    assert_consistent(out, atol=1.0)
    # scale maps boxes back to the original pixels
    back = out.boxes / torch.tensor([out.scale[1], out.scale[0]] * 2)
    assert torch.allclose(back, sample.boxes, atol=1e-4)


def test_resize_is_pure_and_handles_no_objects() -> None:
    sample = shapes_sample(1)
    copy = sample._replace(image=sample.image.clone(), boxes=sample.boxes.clone())
    T.resize(sample, min_size=100, max_size=200)
    assert_same(sample, copy)
    empty = sample._replace(
        boxes=sample.boxes[:0],
        labels=sample.labels[:0],
        crowd=sample.crowd[:0],
        masks=torch.zeros(0, 64, 64, dtype=torch.uint8),
    )
    out = T.resize(empty, min_size=100, max_size=200)
    assert out.masks is not None and out.masks.shape == (0, 100, 100)


def test_hflip_twice_is_identity_and_keeps_masks_consistent() -> None:
    sample = shapes_sample(2, height=40)
    flipped = T.hflip(sample)
    assert flipped.flipped and not sample.flipped
    assert_consistent(flipped, atol=0.0)
    assert torch.equal(flipped.image[..., 0], sample.image[..., -1])
    assert_same(T.hflip(flipped), sample)


def test_random_crop_keeps_boxes_and_masks_consistent() -> None:
    for index in range(12):
        sample = shapes_sample(index)
        out = T.random_crop(
            sample, torch.Generator().manual_seed(index), min_scale=0.4, min_visible=0.3
        )
        h, w = out.image.shape[1:]
        assert 0.4 * 64 - 1 <= h <= 64 and 0.4 * 64 - 1 <= w <= 64
        assert_consistent(out, atol=0.0)
        assert out.scale == sample.scale and out.orig_size == sample.orig_size


def test_random_crop_drops_mostly_cut_objects() -> None:
    yy, xx = torch.meshgrid(torch.arange(100), torch.arange(100), indexing="ij")
    image = torch.stack((xx, yy, xx)).to(torch.uint8)  # pixels tell where the window is
    boxes = torch.tensor([[0.0, 0, 100, 100], [10, 10, 30, 30], [70, 60, 90, 95], [45, 5, 55, 95]])
    crowd = torch.tensor([False, True, False, True])
    sample = Sample(image, boxes, torch.arange(4), crowd, 1, (100, 100))
    dropped = 0
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        out = T.random_crop(sample, g, min_scale=0.5, min_visible=0.6)
        h, w = out.image.shape[1:]
        x0, y0 = int(out.image[0, 0, 0]), int(out.image[1, 0, 0])
        window = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32)
        inter = torch.cat((boxes[:, :2].maximum(window[:2]), boxes[:, 2:].minimum(window[2:])), 1)
        wh = (inter[:, 2:] - inter[:, :2]).clamp(min=0)
        visible = wh.prod(1) / (boxes[:, 2:] - boxes[:, :2]).prod(1)
        expected = torch.nonzero(visible >= 0.6).flatten()
        assert out.labels.tolist() == expected.tolist()
        assert torch.equal(out.boxes, inter[expected] - window[:2].repeat(2))
        assert out.crowd.tolist() == crowd[expected].tolist()
        dropped += 4 - len(expected)
    assert dropped > 0


def test_random_crop_is_deterministic_given_the_generator() -> None:
    sample = shapes_sample(3)
    a = T.random_crop(sample, torch.Generator().manual_seed(5), min_scale=0.3, min_visible=0.5)
    b = T.random_crop(sample, torch.Generator().manual_seed(5), min_scale=0.3, min_visible=0.5)
    c = T.random_crop(sample, torch.Generator().manual_seed(6), min_scale=0.3, min_visible=0.5)
    assert_same(a, b)
    assert a.image.shape != c.image.shape or not torch.equal(a.image, c.image)


@given(
    seed=seeds,
    n=st.integers(0, 12),
    height=st.integers(1, 80),
    width=st.integers(1, 80),
    min_scale=st.floats(0.05, 1.0),
    min_visible=st.floats(0.0, 1.0),
)
def test_random_crop_never_yields_boxes_outside_or_degenerate(
    seed: int, n: int, height: int, width: int, min_scale: float, min_visible: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(g, (n,), image_size=90.0, max_size=60.0, degenerate_fraction=0.2) - 5
    sample = Sample(
        torch.zeros(3, height, width, dtype=torch.uint8),
        boxes,
        torch.arange(n),
        torch.rand(n, generator=g) < 0.3,
        1,
        (height, width),
    )
    out = T.random_crop(sample, g, min_scale=min_scale, min_visible=min_visible)
    h, w = out.image.shape[1:]
    assert 1 <= h <= height and 1 <= w <= width
    b = out.boxes
    assert b.shape == (len(out.labels), 4) and out.crowd.shape == out.labels.shape
    assert (
        (b[:, 0] >= 0).all()
        and (b[:, 1] >= 0).all()
        and (b[:, 2] <= w).all()
        and (b[:, 3] <= h).all()
    )
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    kept = out.labels.tolist()
    assert kept == sorted(kept)  # survivors keep their order
    assert out.crowd.tolist() == sample.crowd[out.labels].tolist()


@given(
    seed=seeds,
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    min_size=st.integers(1, 200),
    extra=st.integers(0, 200),
)
def test_resize_respects_min_and_max(
    seed: int, height: int, width: int, min_size: int, extra: int
) -> None:
    max_size = min_size + extra
    sample = Sample(
        torch.zeros(3, height, width, dtype=torch.uint8),
        torch.tensor([[0.0, 0.0, width, height]]),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, dtype=torch.bool),
        1,
        (height, width),
    )
    out = T.resize(sample, min_size=min_size, max_size=max_size)
    h, w = out.image.shape[1:]
    assert max(h, w) <= max_size + 1
    assert min(h, w) <= min_size + 1
    assert min(h, w) >= min_size - 1 or max(h, w) >= max_size - 1 or min(h, w) == 1
    assert torch.allclose(out.boxes, torch.tensor([[0.0, 0.0, w, h]]), atol=1e-3)


def test_photometric_changes_colours_only() -> None:
    sample = shapes_sample(4)
    kw = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    out = T.photometric(sample, torch.Generator().manual_seed(0), **kw)
    assert out.image.dtype == torch.uint8 and out.image.shape == sample.image.shape
    assert not torch.equal(out.image, sample.image)
    assert_same(out._replace(image=sample.image), sample)
    again = T.photometric(sample, torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out.image, again.image)
    off = T.photometric(
        sample, torch.Generator().manual_seed(0), brightness=0, contrast=0, saturation=0, hue=0
    )
    assert torch.equal(off.image, sample.image)


TRAIN = specs.Transforms(
    min_size=(48, 64, 80),
    max_size=120,
    hflip_prob=0.5,
    brightness=0.2,
    contrast=0.2,
    saturation=0.2,
    hue=0.05,
    crop_prob=0.5,
    crop_min_scale=0.5,
    crop_min_visible=0.5,
    pad_divisor=32,
)


def test_train_transform_is_deterministic_and_consistent() -> None:
    transform = build_transform(TRAIN, train=True)
    sizes, flips = set(), set()
    for index in range(16):
        sample = shapes_sample(index)
        a = transform(sample, torch.Generator().manual_seed(index))
        b = transform(sample, torch.Generator().manual_seed(index))
        assert_same(a, b)
        assert_consistent(a, atol=1.0)
        sizes.add(min(a.image.shape[1:]))
        flips.add(a.flipped)
    assert sizes <= {48, 64, 80} and len(sizes) > 1
    assert flips == {True, False}


def test_val_transform_only_resizes() -> None:
    transform = build_transform(TRAIN, train=False)
    sample = shapes_sample(0, height=32)
    a = transform(sample, torch.Generator().manual_seed(0))
    b = transform(sample, torch.Generator().manual_seed(1))
    assert_same(a, b)
    assert_same(a, T.resize(sample, min_size=48, max_size=120))
    assert a.image.shape[1:] == (48, 96) and not a.flipped


def test_transform_pipeline_pickles() -> None:
    import pickle

    transform = build_transform(TRAIN, train=True)
    assert pickle.loads(pickle.dumps(transform)) == transform
