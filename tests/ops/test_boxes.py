from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torchvision.ops as tvo
from hypothesis import given

from fdet.ops import boxes as B
from tests.strategies import boxes, random_boxes, seeds

PAIRWISE = {
    "iou": (B.box_iou, B.aligned_box_iou, tvo.box_iou),
    "giou": (B.generalized_box_iou, B.aligned_generalized_box_iou, tvo.generalized_box_iou),
    "diou": (B.distance_box_iou, B.aligned_distance_box_iou, tvo.distance_box_iou),
    "ciou": (B.complete_box_iou, B.aligned_complete_box_iou, tvo.complete_box_iou),
}
# Lower bounds of each measure (upper bound 1 for all); CIoU = DIoU - α·v with α·v <= 1/2 there.
LOWER = {"iou": 0.0, "giou": -1.0, "diou": -1.0, "ciou": -1.5}
# Slack for inequalities that hold exactly in real arithmetic: a few float32 ulps at 1.
ULP_SLACK = 1e-6


@st.composite
def box_pairs(
    draw: st.DrawFn,
    *,
    same_n: bool = False,
    min_size: float = 0.0,
    degenerate: bool = True,
    max_leading_dims: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two box tensors ``[*L, N, 4]``, ``[*L, M, 4]`` with shared leading dims L.

    The second set is drawn independently, or as a jittered or exact copy of the first (then
    M = N), so near-identical and identical pairs (IoU ~ 1) are common.
    """
    g = torch.Generator().manual_seed(draw(seeds))
    leading = tuple(draw(st.lists(st.integers(1, 3), max_size=max_leading_dims)))
    n = draw(st.integers(0 if not same_n else 1, 10))
    frac = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])) if degenerate else 0.0
    a = random_boxes(g, (*leading, n), min_size=min_size, degenerate_fraction=frac)
    relation = draw(st.sampled_from(["independent", "jittered", "same"]))
    if relation == "same":
        return a, a.clone()
    if relation == "jittered":
        jitter = torch.randn(a.shape, generator=g) * draw(st.sampled_from([0.5, 4.0]))
        b = a + jitter
        b = torch.cat((b[..., :2], torch.maximum(b[..., 2:], b[..., :2] + min_size)), dim=-1)
        return a, b
    m = n if same_n else draw(st.integers(0, 10))
    return a, random_boxes(g, (*leading, m), min_size=min_size, degenerate_fraction=frac)


def _diag(x: torch.Tensor) -> torch.Tensor:
    return x.diagonal(dim1=-2, dim2=-1)


# --------------------------------------------------------------------------------------------
# Formats and areas
# --------------------------------------------------------------------------------------------


@given(b=boxes())
def test_format_round_trips(b: torch.Tensor) -> None:
    # Coordinates are below 384, where a float32 ulp is 3e-5; a round trip costs a few ulps.
    atol = 1e-4
    torch.testing.assert_close(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(b)), b, rtol=0, atol=atol)
    torch.testing.assert_close(B.xywh_to_xyxy(B.xyxy_to_xywh(b)), b, rtol=0, atol=atol)
    c = B.xyxy_to_cxcywh(b)
    torch.testing.assert_close(B.xyxy_to_cxcywh(B.cxcywh_to_xyxy(c)), c, rtol=0, atol=atol)


@given(b=boxes())
def test_formats_match_torchvision(b: torch.Tensor) -> None:
    for fmt, ours_from, ours_to in (
        ("cxcywh", B.xyxy_to_cxcywh, B.cxcywh_to_xyxy),
        ("xywh", B.xyxy_to_xywh, B.xywh_to_xyxy),
    ):
        converted = tvo.box_convert(b, "xyxy", fmt)
        torch.testing.assert_close(ours_from(b), converted)
        torch.testing.assert_close(ours_to(converted), tvo.box_convert(converted, fmt, "xyxy"))


@given(b=boxes())
def test_box_area_matches_torchvision(b: torch.Tensor) -> None:
    area = B.box_area(b)
    assert area.shape == b.shape[:-1]
    torch.testing.assert_close(area, tvo.box_area(b))


def test_inverted_box_has_zero_area() -> None:
    b = torch.tensor([[5.0, 0.0, 2.0, 3.0], [0.0, 4.0, 2.0, 1.0], [0.0, 0.0, 2.0, 3.0]])
    torch.testing.assert_close(B.box_area(b), torch.tensor([0.0, 0.0, 6.0]))
    # Inverted boxes are empty for overlaps too: no negative IoU.
    assert (B.box_iou(b, b) >= 0).all()


# --------------------------------------------------------------------------------------------
# Pairwise overlaps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRWISE))
@given(pair=box_pairs(min_size=1.0, degenerate=False, max_leading_dims=1))
def test_pairwise_matches_torchvision(name: str, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    ours, _, theirs = PAIRWISE[name]
    # In float64: the formulas, not float32 rounding, are compared. (For tiny boxes far from
    # the origin torchvision's float32 DIoU is off by ~1e-5 where ours is not.)
    a, b = (x.double() for x in pair)
    torch.testing.assert_close(ours(a, b), theirs(a, b))
    # Gradients agree too (CIoU's α is a constant in both).
    a64, b64 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(a.shape[:-1] + b.shape[-2:-1], generator=g, dtype=torch.float64)
    g_ours = torch.autograd.grad((ours(a64, b64) * weights).sum(), (a64, b64))
    g_theirs = torch.autograd.grad((theirs(a64, b64) * weights).sum(), (a64, b64))
    for x, y in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("name", list(PAIRWISE))
@given(pair=box_pairs(max_leading_dims=1))
def test_pairwise_matches_torchvision_where_it_is_finite(
    name: str, pair: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """With zero-width/height boxes torchvision returns NaN for some pairs; elsewhere we agree."""
    ours, _, theirs = PAIRWISE[name]
    assert torch.isfinite(ours(*pair)).all()
    a, b = (x.double() for x in pair)
    expected = theirs(a, b)
    got = ours(a, b)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite])


@given(pair=box_pairs())
def test_overlap_bounds_and_symmetry(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = pair
    values = {name: fns[0](a, b) for name, fns in PAIRWISE.items()}
    for name, v in values.items():
        assert v.shape == (*a.shape[:-1], b.shape[-2])
        assert torch.isfinite(v).all(), name
        assert (v >= LOWER[name] - ULP_SLACK).all(), name
        assert (v <= 1 + ULP_SLACK).all(), name
        # Symmetric in its arguments (CIoU's α and v are symmetric too).
        torch.testing.assert_close(PAIRWISE[name][0](b, a), v.mT, msg=name)
    # Each refinement only subtracts a non-negative penalty. GIoU's, |C| - |union|, can round
    # to -1 ulp when one box encloses the other (|C| and |union| are computed differently).
    assert (values["giou"] <= values["iou"] + ULP_SLACK).all()
    assert (values["diou"] <= values["iou"]).all()
    assert (values["ciou"] <= values["diou"]).all()
    # Only the IoU itself is exactly 0 or 1 for disjoint / identical boxes; IoA >= IoU.
    ioa = B.box_ioa(a, b)
    assert ((ioa >= 0) & (ioa <= 1)).all()
    assert (ioa >= values["iou"] - ULP_SLACK).all()


@given(pair=box_pairs(same_n=True))
def test_self_overlap_is_one_for_proper_boxes_and_zero_for_empty(
    pair: tuple[torch.Tensor, torch.Tensor],
) -> None:
    a, _ = pair
    nonempty = B.box_area(a) > 0
    for name, (pairwise, aligned, _) in PAIRWISE.items():
        d = _diag(pairwise(a, a))
        # Identical empty boxes have no overlap and no offset: every measure is 0.
        torch.testing.assert_close(d, nonempty.to(d.dtype), msg=name)
        torch.testing.assert_close(aligned(a, a), d, msg=name)
    torch.testing.assert_close(_diag(B.box_ioa(a, a)), nonempty.float())
    # IoU of two empty boxes is 0, not NaN.
    assert (_diag(B.box_iou(a, a))[~nonempty] == 0).all()


def test_box_ioa_is_relative_to_the_first_argument() -> None:
    small = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    big = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    torch.testing.assert_close(B.box_ioa(small, big), torch.tensor([[1.0]]))
    torch.testing.assert_close(B.box_ioa(big, small), torch.tensor([[0.25]]))
    torch.testing.assert_close(B.box_iou(small, big), torch.tensor([[0.25]]))


def test_known_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    # inter 2, union 6, enclosing 3x2 = 6: GIoU = IoU. Centers 1 apart, diagonal² 13.
    torch.testing.assert_close(B.box_iou(a, b), torch.tensor([[1 / 3]]))
    torch.testing.assert_close(B.generalized_box_iou(a, b), torch.tensor([[1 / 3]]))
    torch.testing.assert_close(B.distance_box_iou(a, b), torch.tensor([[1 / 3 - 1 / 13]]))
    # Same aspect ratio: v = 0, CIoU = DIoU.
    torch.testing.assert_close(B.complete_box_iou(a, b), B.distance_box_iou(a, b))
    far = torch.tensor([[10.0, 0.0, 12.0, 2.0]])
    torch.testing.assert_close(B.generalized_box_iou(a, far), torch.tensor([[-(24 - 8) / 24]]))


# --------------------------------------------------------------------------------------------
# Elementwise overlaps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRWISE))
@given(pair=box_pairs(same_n=True))
def test_aligned_equals_pairwise(name: str, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    pairwise, aligned, _ = PAIRWISE[name]
    a, b = pair
    full = pairwise(a, b)  # [..., N, N]
    torch.testing.assert_close(aligned(a, b), _diag(full))
    # Broadcasting the aligned form rebuilds the whole pairwise matrix.
    torch.testing.assert_close(aligned(a[..., :, None, :], b[..., None, :, :]), full)


@pytest.mark.parametrize("name", list(PAIRWISE))
@given(
    seed=seeds,
    n=st.integers(1, 8),
    frac=st.sampled_from([0.3, 1.0]),
    relation=st.sampled_from(["independent", "same", "shifted"]),
)
def test_degenerate_boxes_give_finite_values_and_gradients(
    name: str, seed: int, n: int, frac: float, relation: str
) -> None:
    pairwise, aligned, _ = PAIRWISE[name]
    g = torch.Generator().manual_seed(seed)
    a = random_boxes(g, (n,), degenerate_fraction=frac)
    if relation == "same":
        b = a.clone()
    elif relation == "shifted":
        b = a + torch.tensor([3.0, 0.0, 3.0, 0.0])
    else:
        b = random_boxes(g, (n,), degenerate_fraction=frac)
    a.requires_grad_(True)
    b.requires_grad_(True)
    for eps in (0.0, 1e-7):
        assert torch.isfinite(pairwise(a, b, eps=eps)).all()
        loss = 1 - aligned(a, b, eps=eps)
        assert torch.isfinite(loss).all()
        ga, gb = torch.autograd.grad(loss.sum(), (a, b))
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


@pytest.mark.parametrize("name", list(PAIRWISE))
def test_explicit_degenerate_cases_are_finite(name: str) -> None:
    _, aligned, _ = PAIRWISE[name]
    pairs = torch.tensor(
        [
            [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # two identical points
            [[1.0, 1.0, 1.0, 1.0], [3.0, 2.0, 3.0, 2.0]],  # two distinct points
            [[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 5.0]],  # identical zero-width
            [[0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 3.0, 0.0]],  # collinear zero-height
            [[0.0, 0.0, 0.0, 5.0], [1.0, 1.0, 3.0, 3.0]],  # empty vs proper
            [[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 2.0]],  # identical proper
        ]
    )
    a = pairs[:, 0].clone().requires_grad_(True)
    b = pairs[:, 1].clone().requires_grad_(True)
    v = aligned(a, b, eps=0.0)
    assert torch.isfinite(v).all()
    assert v[0] == 0 and v[2] <= 0 and v[-1] == 1
    ga, gb = torch.autograd.grad(v.sum(), (a, b))
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


def test_aligned_losses_have_useful_gradients() -> None:
    """The gradient of 1 - GIoU/DIoU/CIoU moves a disjoint prediction towards its target."""
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]], requires_grad=True)
    target = torch.tensor([[5.0, 0.0, 7.0, 2.0]])
    for name in ("giou", "diou", "ciou"):
        (g,) = torch.autograd.grad((1 - PAIRWISE[name][1](pred, target)).sum(), pred)
        assert g[0, 2] < 0, name  # increasing x2 lowers the loss


@pytest.mark.parametrize("name", list(PAIRWISE))
@given(pair=box_pairs(max_leading_dims=2))
def test_batched_equals_per_slice(name: str, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    pairwise, aligned, _ = PAIRWISE[name]
    a, b = pair
    full = pairwise(a, b)
    k = math.prod(a.shape[:-2])
    flat_a, flat_b = a.reshape(k, *a.shape[-2:]), b.reshape(k, *b.shape[-2:])
    flat = full.reshape(k, *full.shape[-2:])
    for i in range(flat_a.shape[0]):
        torch.testing.assert_close(flat[i], pairwise(flat_a[i], flat_b[i]))
    # Boxes shared by every image broadcast against a batch.
    if a.ndim > 2:
        torch.testing.assert_close(pairwise(a[0, ..., :, :], b), pairwise(a[0].expand_as(a), b))
    n = min(a.shape[-2], b.shape[-2])
    al = aligned(a[..., :n, :], b[..., :n, :]).reshape(k, n)
    for i in range(flat_a.shape[0]):
        torch.testing.assert_close(al[i], aligned(flat_a[i, :n], flat_b[i, :n]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    # A 300x300 box has an area beyond float16's range (65504).
    a = torch.tensor([[0.0, 0.0, 300.0, 300.0], [10.0, 10.0, 200.0, 250.0]])
    b = torch.tensor([[0.0, 0.0, 300.0, 150.0], [20.0, 0.0, 220.0, 240.0]])
    low_a, low_b = a.to(dtype), b.to(dtype)
    for name, (pairwise, aligned, _) in PAIRWISE.items():
        got = pairwise(low_a, low_b)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, pairwise(low_a.float(), low_b.float()), msg=name)
        assert aligned(low_a, low_b).dtype == torch.float32
    torch.testing.assert_close(B.box_iou(a.half(), b.half())[0, 0], torch.tensor(0.5))
    torch.testing.assert_close(B.box_area(a.to(dtype)), tvo.box_area(a.to(dtype)))
    assert B.box_area(a.half())[0] == 90000


# --------------------------------------------------------------------------------------------
# Clipping and size filtering
# --------------------------------------------------------------------------------------------


@st.composite
def boxes_and_sizes(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``[B, N, 4]`` partly outside their images, and image sizes ``[B, 2]`` (h, w)."""
    g = torch.Generator().manual_seed(draw(seeds))
    bsz, n = draw(st.integers(1, 4)), draw(st.integers(0, 10))
    b = random_boxes(g, (bsz, n), degenerate_fraction=0.2) - 64.0  # some start below 0
    sizes = torch.randint(1, 400, (bsz, 2), generator=g)
    return b, sizes


@given(case=boxes_and_sizes())
def test_clip_boxes(case: tuple[torch.Tensor, torch.Tensor]) -> None:
    b, sizes = case
    clipped = B.clip_boxes(b, sizes)
    assert clipped.shape == b.shape and clipped.dtype == b.dtype
    h = sizes[:, None, 0].float()
    w = sizes[:, None, 1].float()
    assert (clipped >= 0).all()
    assert (clipped[..., 0::2] <= w[..., None]).all()
    assert (clipped[..., 1::2] <= h[..., None]).all()
    assert torch.equal(B.clip_boxes(clipped, sizes), clipped)  # idempotent
    for i in range(b.shape[0]):
        hw = (int(sizes[i, 0]), int(sizes[i, 1]))
        per_image = B.clip_boxes(b[i], hw)
        torch.testing.assert_close(clipped[i], per_image)
        torch.testing.assert_close(per_image, tvo.clip_boxes_to_image(b[i], hw))
        # A float tensor of one image's size works too, with the same result.
        torch.testing.assert_close(B.clip_boxes(b[i], sizes[i].float()), per_image)
    # Proper boxes already inside the image are untouched.
    inside = (b[..., :2] >= 0).all(-1) & (b[..., 2] <= w) & (b[..., 3] <= h)
    assert torch.equal(clipped[inside], b[inside])


@given(b=boxes(), min_size=st.sampled_from([0.0, 1.0, 16.0, 64.0]))
def test_small_box_mask_matches_torchvision(b: torch.Tensor, min_size: float) -> None:
    mask = B.small_box_mask(b, min_size=min_size)
    assert mask.shape == b.shape[:-1] and mask.dtype == torch.bool
    flat = b.reshape(-1, 4)
    keep = tvo.remove_small_boxes(flat, min_size)
    assert torch.equal(B.remove_small_boxes(flat, min_size=min_size), keep)
    assert torch.equal(torch.nonzero(~mask.reshape(-1)).squeeze(1), keep)


def test_remove_small_boxes_rejects_batches() -> None:
    with pytest.raises(ValueError, match="small_box_mask"):
        B.remove_small_boxes(torch.zeros(2, 3, 4), min_size=1.0)


# --------------------------------------------------------------------------------------------
# Compiled == eager
# --------------------------------------------------------------------------------------------


def _all_box_ops(a: torch.Tensor, b: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (
        B.xyxy_to_cxcywh(a),
        B.cxcywh_to_xyxy(a),
        B.xyxy_to_xywh(a),
        B.xywh_to_xyxy(a),
        B.box_area(a),
        B.box_iou(a, b),
        B.box_ioa(a, b),
        B.generalized_box_iou(a, b),
        B.distance_box_iou(a, b),
        B.complete_box_iou(a, b),
        B.clip_boxes(b, (100, 120)),
        B.clip_boxes(b, sizes),
        B.small_box_mask(a, min_size=8.0),
    )


def _iou_losses(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (
        (1 - B.aligned_box_iou(pred, target))
        + (1 - B.aligned_generalized_box_iou(pred, target))
        + (1 - B.aligned_distance_box_iou(pred, target))
        + (1 - B.aligned_complete_box_iou(pred, target))
    )


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    g = torch.Generator().manual_seed(0)
    a = random_boxes(g, (2, 5), degenerate_fraction=0.4)
    b = random_boxes(g, (2, 7), degenerate_fraction=0.4)
    b[0, 0] = a[0, 0]  # an identical pair, empty or not
    sizes = torch.tensor([[200, 150], [90, 300]])
    compiled = torch.compile(_all_box_ops, fullgraph=True)
    for got, expected in zip(compiled(a, b, sizes), _all_box_ops(a, b, sizes), strict=True):
        torch.testing.assert_close(got, expected)
    # The aligned measures as losses: values and gradients through the compiled graph.
    compiled_losses = torch.compile(_iou_losses, fullgraph=True)
    results = []
    for fn in (compiled_losses, _iou_losses):
        pred = b[..., :5, :].clone().requires_grad_(True)
        loss = fn(pred, a)
        results.append((loss, *torch.autograd.grad(loss.sum(), pred)))
    for got, expected in zip(*results, strict=True):
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(got, expected)


@given(
    pair=box_pairs(),
    eps=st.sampled_from([0.0, 1e-7, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    nan=st.booleans(),
)
def test_box_iou_without_autograd_equals_the_differentiable_path(pair, eps, dtype, nan) -> None:
    """Without autograd ``box_iou`` works in place; the result is the same, bit for bit."""
    a, b = (x.to(dtype) for x in pair)
    if nan and a.numel():
        a = a.clone()
        a.view(-1, 4)[0] = math.nan
    with torch.no_grad():
        fast = B.box_iou(a, b, eps=eps)
    slow = B.box_iou(a.clone().requires_grad_(True), b, eps=eps)
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0, equal_nan=True)
