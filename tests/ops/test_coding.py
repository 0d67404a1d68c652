from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from torchvision.models.detection._utils import BoxCoder

from fdet.ops import boxes as B
from fdet.ops import coding as C
from tests.strategies import random_boxes, seeds

TV_WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]

leading_dims = st.lists(st.integers(1, 3), max_size=2).map(tuple)
# Normalisations as used in practice: zero means or small ones, stds from 0.05 to 2.
means_st = st.sampled_from([(0.0, 0.0, 0.0, 0.0), (0.1, -0.2, 0.05, 0.0)])
stds_st = st.tuples(*[st.sampled_from([0.05, 0.1, 0.2, 1.0, 2.0])] * 4)


@st.composite
def anchors_and_targets(
    draw: st.DrawFn, *, min_size: float = 4.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proper boxes ``[*L, A, 4]`` (sides in [min_size, 128]), anchors and targets."""
    g = torch.Generator().manual_seed(draw(seeds))
    shape = (*draw(leading_dims), draw(st.integers(0, 10)))
    a = random_boxes(g, shape, min_size=min_size, dtype=dtype)
    t = random_boxes(g, shape, min_size=min_size, dtype=dtype)
    return a, t


# --------------------------------------------------------------------------------------------
# Delta-xywh
# --------------------------------------------------------------------------------------------


@given(case=anchors_and_targets(dtype=torch.float64), means=means_st, stds=stds_st)
def test_deltas_round_trip_float64(
    case: tuple[torch.Tensor, torch.Tensor], means: tuple[float, ...], stds: tuple[float, ...]
) -> None:
    anchors, targets = case
    deltas = C.encode_deltas(anchors, targets, means=means, stds=stds)
    assert deltas.dtype == torch.float64 and deltas.shape == targets.shape
    # Sides in [4, 128]: |log ratio| <= log 32 < log(1000/16), so the default clip is inactive.
    decoded = C.decode_deltas(anchors, deltas, means=means, stds=stds)
    torch.testing.assert_close(decoded, targets, rtol=0, atol=1e-9)


@given(case=anchors_and_targets(), means=means_st, stds=stds_st)
def test_deltas_round_trip_float32(
    case: tuple[torch.Tensor, torch.Tensor], means: tuple[float, ...], stds: tuple[float, ...]
) -> None:
    anchors, targets = case
    deltas = C.encode_deltas(anchors, targets, means=means, stds=stds)
    decoded = C.decode_deltas(anchors, deltas, means=means, stds=stds, clip=None)
    # Coordinates up to 384 (ulp 3e-5); exp/log and the center/size products cost a few ulps.
    torch.testing.assert_close(decoded, targets, rtol=0, atol=2e-4)


@given(case=anchors_and_targets(), means=means_st, stds=stds_st)
def test_means_and_stds_normalise_the_raw_deltas(
    case: tuple[torch.Tensor, torch.Tensor], means: tuple[float, ...], stds: tuple[float, ...]
) -> None:
    anchors, targets = case
    raw = C.encode_deltas(anchors, targets)
    expected = (raw - torch.tensor(means)) / torch.tensor(stds)
    torch.testing.assert_close(C.encode_deltas(anchors, targets, means=means, stds=stds), expected)


def test_known_deltas() -> None:
    anchor = torch.tensor([0.0, 0.0, 10.0, 20.0])
    target = torch.tensor([5.0, 10.0, 25.0, 30.0])  # center (15, 20), size (20, 20)
    expected = torch.tensor([1.0, 0.5, math.log(2.0), 0.0])
    torch.testing.assert_close(C.encode_deltas(anchor, target), expected)
    torch.testing.assert_close(C.decode_deltas(anchor, expected), target)


@pytest.mark.parametrize("weights", TV_WEIGHTS)
@given(case=anchors_and_targets(min_size=1.0))
def test_encode_matches_torchvision_box_coder(
    weights: tuple[float, ...], case: tuple[torch.Tensor, torch.Tensor]
) -> None:
    # In float64, as the formulas are compared, not their float32 rounding.
    anchors, targets = (x.reshape(-1, 4).double() for x in case)
    # torchvision's argument order is (reference/target boxes, proposals/anchors).
    expected = BoxCoder(weights).encode_single(targets, anchors)
    got = C.encode_deltas(anchors, targets, stds=C.stds_from_weights(weights))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("weights", TV_WEIGHTS)
@given(seed=seeds, n=st.integers(0, 12), scale=st.sampled_from([0.5, 3.0, 30.0]))
def test_decode_matches_torchvision_box_coder(
    weights: tuple[float, ...], seed: int, n: int, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    anchors = random_boxes(g, (n,), min_size=1.0, dtype=torch.float64)
    # scale 30 with weight 5 puts |dw| near 6 > log(1000/16) ~ 4.1: the clamp is exercised.
    # In float64: a decoded x1 = cx - w/2 of a box grown 60x cancels ~3 float32 digits.
    deltas = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    expected = BoxCoder(weights).decode_single(deltas, anchors)
    got = C.decode_deltas(anchors, deltas, stds=C.stds_from_weights(weights))
    torch.testing.assert_close(got, expected)


def test_decode_clip_bounds_only_the_growth() -> None:
    anchor = torch.tensor([0.0, 0.0, 16.0, 16.0])
    big = C.decode_deltas(anchor, torch.tensor([0.0, 0.0, 50.0, 50.0]))
    torch.testing.assert_close(big, torch.tensor([-492.0, -492.0, 508.0, 508.0]))  # 16·1000/16
    unclipped = C.decode_deltas(anchor, torch.tensor([0.0, 0.0, 5.0, 5.0]), clip=None)
    torch.testing.assert_close(B.xyxy_to_cxcywh(unclipped)[2], torch.tensor(16 * math.exp(5.0)))
    tiny = C.decode_deltas(anchor, torch.tensor([0.0, 0.0, -50.0, -50.0]))
    assert torch.isfinite(tiny).all()
    torch.testing.assert_close(tiny, torch.full((4,), 8.0))


def test_stds_from_weights() -> None:
    assert C.stds_from_weights((10, 10, 5, 5)) == (0.1, 0.1, 0.2, 0.2)
    assert C.stds_from_weights(C.stds_from_weights((10, 10, 5, 5))) == (10, 10, 5, 5)
    with pytest.raises(ValueError, match="positive"):
        C.stds_from_weights((1, 1, 0, 1))
    with pytest.raises(ValueError, match="4 entries"):
        C.stds_from_weights((1, 1, 1))


@given(seed=seeds, bsz=st.integers(1, 3), n=st.integers(0, 8))
def test_batched_deltas_equal_per_image(seed: int, bsz: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    anchors = random_boxes(g, (n,), min_size=4.0)  # shared by every image
    targets = random_boxes(g, (bsz, n), min_size=4.0)
    sizes = torch.randint(50, 400, (bsz, 2), generator=g)
    deltas = C.encode_deltas(anchors, targets, stds=(0.1, 0.1, 0.2, 0.2))
    assert deltas.shape == (bsz, n, 4)
    decoded = C.decode_deltas(anchors, deltas * 3, stds=(0.1, 0.1, 0.2, 0.2), image_size=sizes)
    for i in range(bsz):
        di = C.encode_deltas(anchors, targets[i], stds=(0.1, 0.1, 0.2, 0.2))
        torch.testing.assert_close(deltas[i], di)
        hw = (int(sizes[i, 0]), int(sizes[i, 1]))
        bi = C.decode_deltas(anchors, di * 3, stds=(0.1, 0.1, 0.2, 0.2), image_size=hw)
        torch.testing.assert_close(decoded[i], bi)
        torch.testing.assert_close(
            bi, B.clip_boxes(C.decode_deltas(anchors, di * 3, stds=(0.1, 0.1, 0.2, 0.2)), hw)
        )


def test_degenerate_boxes_encode_to_finite_deltas() -> None:
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 4.0, 4.0], [0.0, 0.0, 0.0, 5.0]])
    padding = torch.zeros(3, 4)  # all-zero padded ground-truth slots
    assert torch.isfinite(C.encode_deltas(anchors, padding)).all()
    assert torch.isfinite(C.encode_deltas(anchors, anchors)).all()
    assert torch.isfinite(C.decode_deltas(anchors, torch.zeros(3, 4))).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_deltas_are_decoded_in_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(g, (64,), min_size=4.0)
    deltas = (torch.randn(64, 4, generator=g) * 2).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boxes = C.decode_deltas(anchors, deltas, stds=(0.1, 0.1, 0.2, 0.2))
        enc = C.encode_deltas(anchors.to(dtype), boxes)
    assert boxes.dtype == torch.float32 and enc.dtype == torch.float32
    expected = C.decode_deltas(anchors, deltas.float(), stds=(0.1, 0.1, 0.2, 0.2))
    torch.testing.assert_close(boxes, expected, rtol=0, atol=0)
    expected_enc = C.encode_deltas(anchors.to(dtype).float(), expected)
    torch.testing.assert_close(enc, expected_enc, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------


@st.composite
def points_and_boxes(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points ``[*L, A, 2]`` anywhere in the image, boxes ``[*L, A, 4]``, strides ``[A]``."""
    g = torch.Generator().manual_seed(draw(seeds))
    shape = (*draw(leading_dims), draw(st.integers(0, 10)))
    points = torch.rand(*shape, 2, generator=g) * 384
    boxes = random_boxes(g, shape, degenerate_fraction=draw(st.sampled_from([0.0, 0.3])))
    strides = 2.0 ** torch.randint(3, 8, shape[-1:], generator=g).float()  # 8..128
    return points, boxes, strides


@given(case=points_and_boxes())
def test_distances_round_trip(case: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    points, boxes, strides = case
    ltrb = C.encode_distances(points, boxes)
    assert ltrb.shape == boxes.shape
    # px - (px - x1) loses at most an ulp of the larger of |px|, |x1| (< 384: ulp 3e-5).
    torch.testing.assert_close(C.decode_distances(points, ltrb), boxes, rtol=0, atol=1e-4)
    # Power-of-two strides scale exactly.
    scaled = C.encode_distances(points, boxes, stride=strides)
    torch.testing.assert_close(scaled, ltrb / strides[:, None], rtol=0, atol=0)
    decoded = C.decode_distances(points, scaled, stride=strides)
    torch.testing.assert_close(decoded, boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(C.encode_distances(points, boxes, stride=8), ltrb / 8)


@given(case=points_and_boxes())
def test_distances_say_whether_a_point_is_inside(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    points, boxes, _ = case
    ltrb = C.encode_distances(points, boxes)
    inside = (
        (points[..., 0] > boxes[..., 0])
        & (points[..., 0] < boxes[..., 2])
        & (points[..., 1] > boxes[..., 1])
        & (points[..., 1] < boxes[..., 3])
    )
    assert torch.equal(ltrb.amin(-1) > 0, inside)


@given(case=points_and_boxes(), max_distance=st.sampled_from([4.0, 16.0]))
def test_max_distance_clamps_below_the_last_bin(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor], max_distance: float
) -> None:
    points, boxes, strides = case
    ltrb = C.encode_distances(points, boxes, stride=strides, max_distance=max_distance, eps=0.01)
    assert (ltrb >= 0).all() and (ltrb <= max_distance - 0.01).all()
    raw = C.encode_distances(points, boxes, stride=strides)
    torch.testing.assert_close(ltrb, raw.clamp(0, max_distance - 0.01))


def test_decode_distances_clips_to_the_image() -> None:
    points = torch.tensor([[[10.0, 10.0]], [[50.0, 5.0]]])  # [B=2, A=1, 2]
    ltrb = torch.tensor([[[20.0, 5.0, 5.0, 100.0]], [[1.0, 10.0, 100.0, 1.0]]])
    sizes = torch.tensor([[40, 60], [30, 120]])
    boxes = C.decode_distances(points, ltrb, image_size=sizes)
    expected = torch.tensor([[[0.0, 5.0, 15.0, 40.0]], [[49.0, 0.0, 120.0, 6.0]]])
    torch.testing.assert_close(boxes, expected)


# --------------------------------------------------------------------------------------------
# Compiled == eager
# --------------------------------------------------------------------------------------------


def _all_coding_ops(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    deltas: torch.Tensor,
    points: torch.Tensor,
    strides: torch.Tensor,
    sizes: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    stds = C.stds_from_weights((10.0, 10.0, 5.0, 5.0))
    ltrb = C.encode_distances(points, targets, stride=strides, max_distance=16.0)
    return (
        C.encode_deltas(anchors, targets, means=(0.1, 0.0, 0.0, 0.2), stds=stds),
        C.decode_deltas(anchors, deltas, stds=stds),
        C.decode_deltas(anchors, deltas, clip=None, image_size=sizes),
        C.decode_deltas(anchors, deltas, image_size=(100, 200)),
        ltrb,
        C.decode_distances(points, ltrb, stride=strides, image_size=sizes),
        C.encode_distances(points, targets),
    )


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(g, (6,), min_size=2.0)
    targets = random_boxes(g, (2, 6), degenerate_fraction=0.3)
    targets[0, 0] = 0.0  # a padding slot
    deltas = torch.randn(2, 6, 4, generator=g) * 20
    points = torch.rand(6, 2, generator=g) * 256
    strides = torch.tensor([8.0, 8.0, 16.0, 16.0, 32.0, 64.0])
    sizes = torch.tensor([[200, 150], [90, 300]])
    args = (anchors, targets, deltas, points, strides, sizes)
    compiled = torch.compile(_all_coding_ops, fullgraph=True)
    for got, expected in zip(compiled(*args), _all_coding_ops(*args), strict=True):
        torch.testing.assert_close(got, expected)


def test_centerness_hand_computed_and_bounds() -> None:
    # FCOS eq. 3: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))
    ltrb = torch.tensor([[2.0, 1.0, 2.0, 1.0], [1.0, 2.0, 3.0, 6.0], [0.0, 1.0, 4.0, 1.0]])
    expected = torch.tensor([1.0, (1 / 3 * 2 / 6) ** 0.5, 0.0])
    torch.testing.assert_close(C.centerness(ltrb), expected)
    # a point outside its box (a negative distance) has centerness 0, never NaN
    outside = torch.tensor([-1.0, 2.0, 5.0, 2.0])
    assert C.centerness(outside).item() == 0.0
    # unit-free: scaling all distances (e.g. by a stride) leaves it unchanged
    torch.testing.assert_close(C.centerness(ltrb * 8), expected)
    random = torch.rand(1000, 4, dtype=torch.float64) * 50
    values = C.centerness(random)
    assert values.dtype == torch.float64 and bool(((values >= 0) & (values <= 1)).all())
