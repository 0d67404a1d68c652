"""Carrying boxes between views of an image: checked against the data transforms that make the
views (hflip, resize_to, random_crop applied to ground-truth boxes) and hand-computed cases."""

from __future__ import annotations

import functools

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fdet.data.sample import Sample
from fdet.data.transforms import hflip, random_crop, resize_to
from fdet.ops.views import compose_affine, invert_affine, map_boxes
from tests.strategies import seeds

IDENTITY = torch.tensor([1.0, 0.0, 1.0, 0.0])


def coordinate_sample(g: torch.Generator, h: int, w: int, n: int) -> Sample:
    """An image whose pixel (y, x) holds (x, y, 0), so a crop's first pixel names its window,
    and ``n`` non-degenerate boxes inside it."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    image = torch.stack((xs, ys, torch.zeros_like(xs))).to(torch.uint8)
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * (w - 1)
    y1 = torch.rand(n, generator=g, dtype=torch.float64) * (h - 1)
    x2 = x1 + 0.5 + torch.rand(n, generator=g, dtype=torch.float64) * (w - x1 - 0.5)
    y2 = y1 + 0.5 + torch.rand(n, generator=g, dtype=torch.float64) * (h - y1 - 0.5)
    boxes = torch.stack((x1, y1, x2, y2), dim=1).float()
    return Sample(
        image=image,
        boxes=boxes,
        labels=torch.arange(n),
        crowd=torch.zeros(n, dtype=torch.bool),
        image_id=1,
        orig_size=(h, w),
    )


def reference(
    boxes: torch.Tensor, affine: torch.Tensor, size: tuple[int, int], min_visible: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[M, 4]`` boxes mapped in float64 by the written rule: (boxes, keep, borderline), where
    borderline marks boxes whose keep decision is within rounding of the threshold."""
    a_x, b_x, a_y, b_y = affine.double().tolist()
    b = boxes.double()
    xs = torch.stack((a_x * b[:, 0] + b_x, a_x * b[:, 2] + b_x), dim=1).sort(dim=1).values
    ys = torch.stack((a_y * b[:, 1] + b_y, a_y * b[:, 3] + b_y), dim=1).sort(dim=1).values
    h, w = size
    cx, cy = xs.clamp(0, w), ys.clamp(0, h)
    cw, chh = cx[:, 1] - cx[:, 0], cy[:, 1] - cy[:, 0]
    area = (xs[:, 1] - xs[:, 0]) * (ys[:, 1] - ys[:, 0])
    ratio = cw.clamp(min=0) * chh.clamp(min=0) / area
    keep = (ratio >= min_visible) & (cw > 0) & (chh > 0)
    # the overlap with the view along each axis, negative when apart: near 0, the box touches
    overlap_w = xs[:, 1].clamp(max=w) - xs[:, 0].clamp(min=0)
    overlap_h = ys[:, 1].clamp(max=h) - ys[:, 0].clamp(min=0)
    touching = (overlap_w.abs() < 1e-3) | (overlap_h.abs() < 1e-3)
    borderline = ((ratio - min_visible).abs() < 1e-4) | touching
    mapped = torch.stack((cx[:, 0], cy[:, 0], cx[:, 1], cy[:, 1]), dim=1)
    return mapped, keep, borderline


def one(boxes: torch.Tensor, affine: torch.Tensor, size: tuple[int, int], min_visible: float):
    """map_boxes of one image's boxes, all slots valid."""
    out, valid = map_boxes(
        boxes[None],
        torch.ones(1, len(boxes), dtype=torch.bool),
        affine[None],
        torch.tensor([size]),
        min_visible=min_visible,
    )
    return out[0], valid[0]


def test_hand_computed_flip_scale_and_partial_visibility() -> None:
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 40.0], [40.0, 0.0, 60.0, 10.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    # flip a 100-wide image and halve it: x' = 50 - x / 2, y' = y / 2
    out, keep = map_boxes(
        boxes,
        valid,
        torch.tensor([[-0.5, 50.0, 0.5, 0.0]]),
        torch.tensor([[50, 50]]),
        min_visible=1,
    )
    torch.testing.assert_close(
        out[0], torch.tensor([[35.0, 10.0, 45.0, 20.0], [20.0, 0.0, 30.0, 5.0]])
    )
    assert keep.all()
    # shift left by 50: the second box is half outside (-10..10)
    shift = torch.tensor([[1.0, -50.0, 1.0, 0.0]])
    out, keep = map_boxes(boxes, valid, shift, torch.tensor([[100, 100]]), min_visible=0.5)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 10.0, 10.0]]))
    assert keep.tolist() == [[False, True]]  # the first is wholly outside (x -40..-20)
    _, keep = map_boxes(boxes, valid, shift, torch.tensor([[100, 100]]), min_visible=0.6)
    assert keep.tolist() == [[False, False]]


def test_degenerate_boxes_stay_invalid() -> None:
    boxes = torch.tensor([[[30.0, 5.0, 10.0, 15.0], [5.0, 9.0, 15.0, 9.0], [5.0, 5.0, 15.0, 15.0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    for affine in ([1.0, 0.0, 1.0, 0.0], [-1.0, 40.0, 1.0, 0.0], [-2.0, 80.0, -2.0, 80.0]):
        out, keep = map_boxes(
            boxes, valid, torch.tensor([affine]), torch.tensor([[80, 80]]), min_visible=0.0
        )
        assert keep.tolist() == [[False, False, True]], affine
        assert (out[0, :2] == 0).all()


@given(seed=seeds, h=st.integers(2, 60), w=st.integers(2, 60), n=st.integers(0, 6))
@settings(max_examples=30)
def test_flip_equals_hflip(seed: int, h: int, w: int, n: int) -> None:
    s = coordinate_sample(torch.Generator().manual_seed(seed), h, w, n)
    out, keep = one(s.boxes, torch.tensor([-1.0, w, 1.0, 0.0]), (h, w), 1.0)
    assert keep.all()
    torch.testing.assert_close(out, hflip(s).boxes, atol=1e-4, rtol=1e-5)


@given(
    seed=seeds,
    h=st.integers(2, 60),
    w=st.integers(2, 60),
    nh=st.integers(1, 90),
    nw=st.integers(1, 90),
    n=st.integers(0, 6),
)
@settings(max_examples=30)
def test_scale_equals_resize_to(seed: int, h: int, w: int, nh: int, nw: int, n: int) -> None:
    s = coordinate_sample(torch.Generator().manual_seed(seed), h, w, n)
    out, keep = one(s.boxes, torch.tensor([nw / w, 0.0, nh / h, 0.0]), (nh, nw), 1.0)
    assert keep.all()
    torch.testing.assert_close(out, resize_to(s, (nh, nw)).boxes, atol=1e-4, rtol=1e-5)


@given(
    seed=seeds,
    h=st.integers(2, 60),
    w=st.integers(2, 60),
    n=st.integers(0, 8),
    min_scale=st.floats(0.1, 1.0),
    min_visible=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
)
@settings(max_examples=40)
def test_crop_equals_random_crop(
    seed: int, h: int, w: int, n: int, min_scale: float, min_visible: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    s = coordinate_sample(g, h, w, n)
    cropped = random_crop(s, g, min_scale=min_scale, min_visible=min_visible)
    x0, y0 = cropped.image[0, 0, 0].item(), cropped.image[1, 0, 0].item()  # the window's origin
    size = tuple(cropped.image.shape[-2:])
    affine = torch.tensor([1.0, -x0, 1.0, -y0])
    out, keep = one(s.boxes, affine, size, min_visible)
    _, expected_keep, borderline = reference(s.boxes, affine, size, min_visible)
    kept_by_crop = torch.zeros(n, dtype=torch.bool)
    kept_by_crop[cropped.labels] = True  # labels are the slot numbers
    sure = ~borderline
    assert torch.equal(keep[sure], kept_by_crop[sure])
    assert torch.equal(keep[sure], expected_keep[sure])
    both = keep & kept_by_crop
    position = torch.cumsum(kept_by_crop.long(), 0) - 1
    torch.testing.assert_close(out[both], cropped.boxes[position[both]], atol=1e-4, rtol=1e-5)
    assert (out[~keep] == 0).all()


@given(seed=seeds, h=st.integers(2, 60), w=st.integers(2, 60), n=st.integers(0, 6))
@settings(max_examples=20)
def test_flip_twice_is_the_identity(seed: int, h: int, w: int, n: int) -> None:
    s = coordinate_sample(torch.Generator().manual_seed(seed), h, w, n)
    flip = torch.tensor([-1.0, w, 1.0, 0.0])
    torch.testing.assert_close(compose_affine(flip[None], flip[None])[0], IDENTITY)
    once, _ = one(s.boxes, flip, (h, w), 1.0)
    twice, keep = one(once, flip, (h, w), 1.0)
    assert keep.all()
    torch.testing.assert_close(twice, s.boxes, atol=1e-4, rtol=1e-5)


@st.composite
def affines(draw: st.DrawFn, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw(seeds))
    scale = 0.25 + 2 * torch.rand(b, 2, generator=g)
    sign = torch.where(torch.rand(b, 1, generator=g) < 0.5, -1.0, 1.0)
    a_x, a_y = scale[:, 0] * sign[:, 0], scale[:, 1]
    offset = 100 * torch.rand(b, 2, generator=g) - 50
    return torch.stack((a_x, offset[:, 0], a_y, offset[:, 1]), dim=1)


@given(data=st.data(), b=st.integers(1, 4))
@settings(max_examples=30)
def test_compose_and_invert_round_trip(data: st.DataObject, b: int) -> None:
    first, second = data.draw(affines(b)), data.draw(affines(b))
    identity = IDENTITY.expand(b, 4)
    torch.testing.assert_close(compose_affine(first, invert_affine(first)), identity)
    torch.testing.assert_close(compose_affine(invert_affine(first), first), identity)
    torch.testing.assert_close(invert_affine(invert_affine(first)), first)
    # on points: composing equals applying one after the other
    pts = 100 * torch.rand(b, 5, 2, generator=torch.Generator().manual_seed(b))

    def apply(affine: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            (
                affine[:, None, 0] * p[..., 0] + affine[:, None, 1],
                affine[:, None, 2] * p[..., 1] + affine[:, None, 3],
            ),
            dim=-1,
        )

    both = compose_affine(first, second)
    torch.testing.assert_close(
        apply(both, pts), apply(second, apply(first, pts)), atol=1e-4, rtol=1e-5
    )
    # on boxes in a view large enough for nothing to be clipped
    boxes = torch.cat((pts, pts + 5), dim=-1)
    valid = torch.ones(b, 5, dtype=torch.bool)

    def shift(by: float) -> torch.Tensor:
        return torch.tensor([[1.0, by, 1.0, by]]).expand(b, 4)

    # shifted so that each step lands at positive coordinates, inside a view of 10^4 pixels
    far, near = compose_affine(first, shift(1e3)), compose_affine(second, shift(5e3))
    big = torch.full((b, 2), 10**4)
    direct, keep = map_boxes(boxes, valid, compose_affine(far, near), big, min_visible=1)
    step, _ = map_boxes(boxes, valid, far, big, min_visible=1)
    step, keep2 = map_boxes(step, valid, near, big, min_visible=1)
    assert keep.all() and keep2.all()
    torch.testing.assert_close(direct, step, atol=1e-2, rtol=1e-5)


def batch_case(seed: int, b: int, m: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(8, 80, (b, 2), generator=g)
    boxes = torch.rand(b, m, 4, generator=g) * 90 - 5
    boxes = torch.cat((boxes[..., :2], boxes[..., :2] + boxes[..., 2:].abs() / 2), dim=-1)
    valid = torch.rand(b, m, generator=g) < 0.7
    scale = 0.5 + torch.rand(b, 2, generator=g)
    sign = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    affine = torch.stack(
        (
            sign * scale[:, 0],
            torch.where(sign < 0, sizes[:, 1].float(), 0.0) - 5,
            scale[:, 1],
            -3 + 0 * sign,
        ),
        dim=1,
    )
    return boxes, valid, affine, sizes


@given(
    seed=seeds,
    b=st.integers(1, 4),
    m=st.integers(0, 7),
    min_visible=st.sampled_from([0.0, 0.5, 1.0]),
)
@settings(max_examples=30)
def test_batched_equals_per_image(seed: int, b: int, m: int, min_visible: float) -> None:
    boxes, valid, affine, sizes = batch_case(seed, b, m)
    out, keep = map_boxes(boxes, valid, affine, sizes, min_visible=min_visible)
    assert out.shape == (b, m, 4) and keep.shape == (b, m)
    for i in range(b):
        o, k = map_boxes(
            boxes[i : i + 1],
            valid[i : i + 1],
            affine[i : i + 1],
            sizes[i : i + 1],
            min_visible=min_visible,
        )
        torch.testing.assert_close(out[i], o[0])
        assert torch.equal(keep[i], k[0])
        ref, ref_keep, borderline = reference(
            boxes[i], affine[i], tuple(sizes[i].tolist()), min_visible
        )
        sure = ~borderline
        assert torch.equal(keep[i][sure], (ref_keep & valid[i])[sure])
        torch.testing.assert_close(out[i][keep[i]], ref[keep[i]].float(), atol=1e-4, rtol=1e-5)
        assert (out[i][~keep[i]] == 0).all()


@given(seed=seeds, extra=st.integers(1, 5))
@settings(max_examples=20)
def test_padding_slots_are_invisible(seed: int, extra: int) -> None:
    boxes, valid, affine, sizes = batch_case(seed, 2, 4)
    out, keep = map_boxes(boxes, valid, affine, sizes, min_visible=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    junk = torch.randn(2, extra, 4, generator=g) * 1e3
    junk[0, 0] = float("nan")
    padded_out, padded_keep = map_boxes(
        torch.cat((boxes, junk), dim=1),
        torch.cat((valid, torch.zeros(2, extra, dtype=torch.bool)), dim=1),
        affine,
        sizes,
        min_visible=0.5,
    )
    torch.testing.assert_close(padded_out[:, :4], out)
    assert torch.equal(padded_keep[:, :4], keep)
    assert not padded_keep[:, 4:].any() and (padded_out[:, 4:] == 0).all()


def test_low_precision_inputs_compute_in_float32() -> None:
    boxes, valid, affine, sizes = batch_case(7, 3, 6)
    boxes = boxes.round()  # exact in bfloat16
    expected, _ = map_boxes(boxes, valid, affine, sizes, min_visible=0.5)
    for dtype in (torch.bfloat16, torch.float16):
        out, k = map_boxes(boxes.to(dtype), valid, affine.to(dtype), sizes, min_visible=0.5)
        assert out.dtype == dtype
        assert torch.equal(k, map_boxes(boxes, valid, affine.to(dtype), sizes, min_visible=0.5)[1])
        torch.testing.assert_close(out.float(), expected, atol=1.0, rtol=2e-2)


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    boxes, valid, affine, sizes = batch_case(3, 3, 6)
    eager = functools.partial(map_boxes, min_visible=0.5)
    compiled = torch.compile(eager, fullgraph=True)
    for got, expected in zip(
        compiled(boxes, valid, affine, sizes), eager(boxes, valid, affine, sizes), strict=True
    ):
        torch.testing.assert_close(got, expected)
