"""CenterNet's heatmap ops: the radius rule and its guarantee, drawn targets, the penalty-reduced
focal loss and peak extraction, against definitions written out by hand."""

from __future__ import annotations

import math
from typing import NamedTuple

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fdet.ops.boxes import aligned_box_iou
from fdet.ops.heatmap import (
    draw_heatmaps,
    gaussian_radius,
    heatmap_focal_loss,
    heatmap_peaks,
)
from tests.strategies import seeds

sizes = st.floats(0.5, 300.0)
overlaps = st.floats(0.05, 0.95)


# --- radius ----------------------------------------------------------------------------------


def exact_radius(h: float, w: float, o: float) -> float:
    """The three quadratics of CornerNet's rule, solved with the school formula."""
    a1, b1, c1 = 1.0, -(h + w), w * h * (1 - o) / (1 + o)
    a2, b2, c2 = 4.0, -2 * (h + w), (1 - o) * w * h
    a3, b3, c3 = 4 * o, 2 * o * (h + w), (o - 1) * w * h
    r1 = (-b1 - math.sqrt(b1 * b1 - 4 * a1 * c1)) / (2 * a1)  # smaller root
    r2 = (-b2 - math.sqrt(b2 * b2 - 4 * a2 * c2)) / (2 * a2)  # smaller root
    r3 = (-b3 + math.sqrt(b3 * b3 - 4 * a3 * c3)) / (2 * a3)  # positive root
    return min(r1, r2, r3)


def released_code_radius(h: float, w: float, o: float) -> float:
    """The arithmetic of the code released with CornerNet and CenterNet, as it is written."""
    b1, c1 = h + w, w * h * (1 - o) / (1 + o)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2, c2 = 2 * (h + w), (1 - o) * w * h
    r2 = (b2 + math.sqrt(b2**2 - 4 * 4 * c2)) / 2
    a3, b3, c3 = 4 * o, -2 * o * (h + w), (o - 1) * w * h
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def radius_of(h: float, w: float, o: float, variant: str = "exact") -> float:
    hw = torch.tensor([h, w], dtype=torch.float64)
    return gaussian_radius(hw[0], hw[1], min_overlap=o, variant=variant).item()


@given(h=sizes, w=sizes, o=overlaps)
def test_radius_solves_the_three_quadratics(h, w, o) -> None:
    assert radius_of(h, w, o) == pytest.approx(exact_radius(h, w, o), rel=1e-9, abs=1e-12)
    assert radius_of(h, w, o, "cornernet") == pytest.approx(released_code_radius(h, w, o), rel=1e-9)


def test_radius_by_hand_and_degenerate_boxes() -> None:
    # 8 × 8 at o = 0.3: case 2 binds, 4r² - 32r + 44.8 = 0 -> r = (32 - √(1024 - 716.8)) / 8
    assert radius_of(8, 8, 0.3) == pytest.approx((32 - math.sqrt(307.2)) / 8, rel=1e-12)
    # the released arithmetic at 0.7: case 3 times 4o, (-22.4 + √716.8) / 2
    assert radius_of(8, 8, 0.7, "cornernet") == pytest.approx((-22.4 + math.sqrt(716.8)) / 2)
    h = torch.tensor([0.0, 0.0, 5.0, -3.0, 10.0])
    w = torch.tensor([0.0, 7.0, 0.0, 4.0, 10.0])
    r = gaussian_radius(h, w, min_overlap=0.5)
    assert r.dtype == torch.float32 and r.isfinite().all()
    assert (r[:4] == 0).all() and r[4] > 0  # an empty box has radius 0


def shifted_ious(h: float, w: float, r: float) -> torch.Tensor:
    """IoUs of the box with the three worst moves of its corners by ``r``: shifted (one corner
    in, one out), shrunk (both in), grown (both out)."""
    box = torch.tensor([0.0, 0.0, w, h], dtype=torch.float64)
    moved = torch.tensor(
        [[r, r, w + r, h + r], [r, r, w - r, h - r], [-r, -r, w + r, h + r]], dtype=torch.float64
    )
    return aligned_box_iou(box, moved)


@given(h=sizes, w=sizes, o=overlaps, seed=seeds)
def test_radius_keeps_the_overlap_for_any_corner_move_within_it(h, w, o, seed) -> None:
    """The guarantee the rule encodes: move each of the four coordinates by at most the radius
    (the corners of every sign pattern, and random moves inside) and the IoU stays >=
    min_overlap; in the worst of the three cases it is exactly min_overlap (the radius is not
    needlessly small)."""
    r = radius_of(h, w, o)
    signs = torch.cartesian_prod(*[torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)] * 4)
    g = torch.Generator().manual_seed(seed)
    inside = torch.rand(200, 4, generator=g, dtype=torch.float64) * 2 - 1
    moves = torch.cat((signs, inside)) * r  # [81 + 200, 4]
    box = torch.tensor([0.0, 0.0, w, h], dtype=torch.float64)
    ious = aligned_box_iou(box, box + moves)
    assert ious.min().item() >= o - 1e-9
    assert shifted_ious(h, w, r).min().item() == pytest.approx(o, abs=1e-9)


def test_the_released_arithmetic_breaks_the_guarantee_at_its_own_setting() -> None:
    """Why fdet's default is the exact rule: the released code's radius at 0.7 lets a
    centre-shifted 8 × 8 box fall far below IoU 0.7."""
    r = radius_of(8, 8, 0.7, "cornernet")
    assert r > 2 * radius_of(8, 8, 0.7)
    assert shifted_ious(8, 8, r)[0] < 0.4
    # the default, exact at 0.3, stays close to the released radii at 0.7 (docs/centernet.md)
    for h, w in ((8, 8), (40, 40), (8, 32), (120, 30)):
        assert 0.69 < radius_of(h, w, 0.3) / radius_of(h, w, 0.7, "cornernet") < 0.84


# --- drawing ---------------------------------------------------------------------------------


class DrawCase(NamedTuple):
    centres: torch.Tensor  # [B, M, 2] long (x, y)
    radii: torch.Tensor  # [B, M] long
    labels: torch.Tensor  # [B, M]
    valid: torch.Tensor  # [B, M]
    num_classes: int
    size: tuple[int, int]


@st.composite
def draw_cases(draw: st.DrawFn) -> DrawCase:
    g = torch.Generator().manual_seed(draw(seeds))
    b, m = draw(st.integers(1, 3)), draw(st.integers(0, 7))
    k = draw(st.integers(1, 3))
    size = (draw(st.integers(3, 20)), draw(st.integers(3, 20)))
    xs = torch.randint(0, size[1], (b, m), generator=g)
    ys = torch.randint(0, size[0], (b, m), generator=g)
    return DrawCase(
        centres=torch.stack((xs, ys), dim=-1),
        radii=torch.randint(0, 5, (b, m), generator=g),
        labels=torch.randint(0, k, (b, m), generator=g),
        valid=torch.rand(b, m, generator=g) < 0.8,
        num_classes=k,
        size=size,
    )


def draw(case: DrawCase) -> torch.Tensor:
    return draw_heatmaps(
        case.centres,
        case.radii,
        case.labels,
        case.valid,
        num_classes=case.num_classes,
        size=case.size,
    )


def reference_heatmaps(case: DrawCase) -> torch.Tensor:
    """One Gaussian at a time, cut to its window, max-combined: the paper's drawing as a loop."""
    b, m = case.valid.shape
    height, width = case.size
    out = torch.zeros(b, case.num_classes, height, width, dtype=torch.float64)
    ys = torch.arange(height, dtype=torch.float64)[:, None]
    xs = torch.arange(width, dtype=torch.float64)[None, :]
    for i in range(b):
        for j in range(m):
            if not case.valid[i, j]:
                continue
            (cx, cy), r = case.centres[i, j].tolist(), int(case.radii[i, j])
            sigma = (2 * r + 1) / 6
            g = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
            window = ((xs - cx).abs() <= r) & ((ys - cy).abs() <= r)
            k = int(case.labels[i, j])
            out[i, k] = torch.maximum(out[i, k], torch.where(window, g, 0.0))
    return out.float()


@given(case=draw_cases())
def test_drawn_heatmaps_are_the_max_of_cut_gaussians(case) -> None:
    heat = draw(case)
    assert heat.shape == (case.valid.shape[0], case.num_classes, *case.size)
    assert heat.dtype == torch.float32
    torch.testing.assert_close(heat, reference_heatmaps(case), rtol=1e-6, atol=1e-7)
    for i, j in case.valid.nonzero().tolist():  # exactly 1 at each valid centre
        cx, cy = case.centres[i, j].tolist()
        assert heat[i, case.labels[i, j], cy, cx] == 1.0


def test_drawing_by_hand() -> None:
    """r = 1: σ = 1/2, neighbours exp(-2), diagonals exp(-4), nothing 2 cells away. A second
    object of the same class overlapping it keeps the larger value; another class draws on its
    own channel."""
    centres = torch.tensor([[[2, 2], [4, 2], [2, 2]]])
    radii = torch.tensor([[1, 2, 0]])
    labels = torch.tensor([[0, 0, 1]])
    heat = draw_heatmaps(
        centres, radii, labels, torch.ones(1, 3, dtype=torch.bool), num_classes=2, size=(5, 7)
    )[0]
    e = math.exp
    assert heat[0, 2, 2] == 1.0 and heat[0, 2, 4] == 1.0
    assert heat[0, 1, 2].item() == pytest.approx(e(-2))  # (2, 1): above the first centre
    assert heat[0, 1, 1].item() == pytest.approx(e(-4))  # a diagonal of the first
    # (3, 2) is 1 from the first (exp(-2)) and 1 from the second (σ = 5/6: exp(-18/25)): the max
    assert heat[0, 2, 3].item() == pytest.approx(max(e(-2), e(-18 / 25)))
    assert heat[0, 2, 6].item() == pytest.approx(e(-4 * 18 / 25))  # 2 from the second only
    assert heat[0, 0, 0] == 0.0  # two cells from the first, three from the second: outside
    assert heat[0, 4, 1] == 0.0
    assert heat[1].sum() == 1.0 and heat[1, 2, 2] == 1.0  # r = 0: a single cell


@given(case=draw_cases(), extra=st.integers(1, 4), seed=seeds)
def test_padding_is_invisible(case, extra, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    b = case.valid.shape[0]
    garbage = DrawCase(
        centres=torch.cat(
            (torch.full((b, 1, 2), math.nan), torch.randn(b, extra - 1, 2, generator=g) * 1e3),
            dim=1,
        ),
        radii=torch.cat(
            (torch.full((b, 1), math.nan), torch.randn(b, extra - 1, generator=g) * 50), dim=1
        ),
        labels=torch.randint(-5, 1000, (b, extra), generator=g),
        valid=torch.zeros(b, extra, dtype=torch.bool),
        num_classes=case.num_classes,
        size=case.size,
    )
    padded = case._replace(
        centres=torch.cat((case.centres.float(), garbage.centres), dim=1),
        radii=torch.cat((case.radii.float(), garbage.radii), dim=1),
        labels=torch.cat((case.labels, garbage.labels), dim=1),
        valid=torch.cat((case.valid, garbage.valid), dim=1),
    )
    torch.testing.assert_close(draw(padded), draw(case), rtol=0, atol=0)


@given(case=draw_cases())
def test_batched_equals_per_image(case) -> None:
    whole = draw(case)
    for i in range(case.valid.shape[0]):
        one = DrawCase(
            *(x[i : i + 1] for x in case[:4]), num_classes=case.num_classes, size=case.size
        )
        torch.testing.assert_close(whole[i : i + 1], draw(one), rtol=0, atol=0)


# --- focal loss ------------------------------------------------------------------------------


def focal_by_hand(x: float, y: float, alpha: float = 2.0, beta: float = 4.0) -> float:
    p = 1 / (1 + math.exp(-x))
    if y == 1:
        return -((1 - p) ** alpha) * math.log(p)
    return -((1 - y) ** beta) * p**alpha * math.log(1 - p)


def test_focal_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0], [3.0, -2.5, 0.7]])
    target = torch.tensor([[1.0, 0.5, 0.0], [0.9, 1.0, 0.25]])
    got = heatmap_focal_loss(logits, target)
    want = [
        [focal_by_hand(x, y) for x, y in zip(*rows)]
        for rows in zip(logits.tolist(), target.tolist())
    ]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)
    # the first: a peak predicted at p = 1/2 costs (1/2)² log 2
    assert got[0, 0].item() == pytest.approx(0.25 * math.log(2))
    # other exponents
    got = heatmap_focal_loss(logits, target, alpha=1.0, beta=2.0)
    want = [
        [focal_by_hand(x, y, 1.0, 2.0) for x, y in zip(*rows)]
        for rows in zip(logits.tolist(), target.tolist())
    ]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)


@settings(max_examples=30)
@given(seed=seeds)
def test_focal_loss_matches_the_formula_on_random_maps(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64) * 3
    target = torch.rand(2, 3, 6, 5, generator=g, dtype=torch.float64)
    target = torch.where(torch.rand(target.shape, generator=g) < 0.1, 1.0, target)
    p = torch.sigmoid(logits)
    want = torch.where(
        target == 1,
        -((1 - p) ** 2) * torch.log(p),
        -((1 - target) ** 4) * p**2 * torch.log(1 - p),
    )
    torch.testing.assert_close(heatmap_focal_loss(logits, target), want)


def test_focal_loss_is_finite_for_saturated_logits() -> None:
    logits = torch.tensor([50.0, -50.0, 50.0, -50.0, 1e4, -1e4], requires_grad=True)
    target = torch.tensor([1.0, 1.0, 0.0, 0.3, 0.0, 1.0])
    loss = heatmap_focal_loss(logits, target)
    assert loss.isfinite().all()
    loss.sum().backward()
    assert logits.grad is not None and logits.grad.isfinite().all()
    # a confident miss of a peak costs about its logit; a confident false positive too
    assert loss[1].item() == pytest.approx(50.0)
    assert loss[2].item() == pytest.approx(50.0)
    assert loss[0].item() < 1e-20 and loss[3].item() < 1e-20
    assert logits.grad[1] < 0 and logits.grad[2] > 0  # pushed the right way


def test_focal_loss_is_float32_for_low_precision_inputs() -> None:
    logits = torch.randn(2, 3, 4, 4).bfloat16()
    target = torch.rand(2, 3, 4, 4)
    got = heatmap_focal_loss(logits, target)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, heatmap_focal_loss(logits.float(), target))


# --- peaks -----------------------------------------------------------------------------------


def test_peaks_of_a_hand_made_heatmap() -> None:
    heat = torch.zeros(1, 2, 5, 6)
    heat[0, 0, 1, 1] = 0.9  # a peak ...
    heat[0, 0, 1, 2] = 0.8  # ... and its neighbour: suppressed
    heat[0, 0, 2, 2] = 0.7  # diagonal neighbour: suppressed
    heat[0, 0, 3, 4] = 0.6  # two cells from the first: a peak of its own
    heat[0, 1, 1, 2] = 0.5  # same place on another class: a peak (classes are separate)
    heat[0, 1, 4, 5] = 0.3  # in a corner
    peaks = heatmap_peaks(heat, topk=4)
    assert peaks.scores[0].tolist() == pytest.approx([0.9, 0.6, 0.5, 0.3])
    assert peaks.labels.tolist() == [[0, 0, 1, 1]]
    assert peaks.ys.tolist() == [[1, 3, 1, 4]]
    assert peaks.xs.tolist() == [[1, 4, 2, 5]]
    # beyond the peaks come zeros; topk larger than the map gives the whole map
    peaks = heatmap_peaks(heat, topk=1000)
    assert peaks.scores.shape == (1, 2 * 5 * 6)
    assert (peaks.scores[0, 4:] == 0).all()
    # a 5 × 5 window around the 0.6 reaches the 0.8 and the 0.7: no longer a peak
    wide = heatmap_peaks(heat, kernel=5, topk=4)
    assert wide.scores[0].tolist() == pytest.approx([0.9, 0.5, 0.3, 0.0])


@settings(max_examples=30)
@given(seed=seeds, topk=st.integers(1, 40))
def test_peaks_are_the_best_local_maxima(seed, topk) -> None:
    g = torch.Generator().manual_seed(seed)
    heat = torch.rand(2, 3, 7, 9, generator=g)
    peaks = heatmap_peaks(heat, topk=topk)
    padded = torch.nn.functional.pad(heat, (1, 1, 1, 1), value=-1.0)
    for b in range(2):
        maxima = []
        for k in range(3):
            for y in range(7):
                for x in range(9):
                    if heat[b, k, y, x] >= padded[b, k, y : y + 3, x : x + 3].max():
                        maxima.append(heat[b, k, y, x].item())
        maxima.sort(reverse=True)
        want = (maxima + [0.0] * topk)[:topk]
        assert peaks.scores[b].tolist() == pytest.approx(want)
        got = heat[b, peaks.labels[b], peaks.ys[b], peaks.xs[b]]  # the scores are at the cells
        is_peak = peaks.scores[b] > 0
        assert torch.equal(got[is_peak], peaks.scores[b][is_peak])


# --- compiled --------------------------------------------------------------------------------


def _pipeline(centres, radii, labels, valid, logits):
    heat = draw_heatmaps(centres, radii, labels, valid, num_classes=3, size=(12, 10))
    loss = heatmap_focal_loss(logits, heat).sum()
    radius = gaussian_radius(radii.float() + 3, radii.float() + 5, min_overlap=0.3)
    return heat, loss, radius, heatmap_peaks(torch.sigmoid(logits), topk=20)


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    compiled = torch.compile(_pipeline, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the same shapes: one graph, two inputs
        case = DrawCase(
            centres=torch.stack(
                (
                    torch.randint(0, 10, (2, 5), generator=g),
                    torch.randint(0, 12, (2, 5), generator=g),
                ),
                dim=-1,
            ),
            radii=torch.randint(0, 4, (2, 5), generator=g),
            labels=torch.randint(0, 3, (2, 5), generator=g),
            valid=torch.rand(2, 5, generator=g) < 0.7,
            num_classes=3,
            size=(12, 10),
        )
        logits = torch.randn(2, 3, 12, 10, generator=g) * 2
        got = compiled(*case[:4], logits)
        want = _pipeline(*case[:4], logits)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], want[2])
        for a, b in zip(got[3], want[3]):
            torch.testing.assert_close(a, b)
