"""FCOS: points, assignment, targets, objective and postprocess on padded batches — cases worked
out by hand from the paper's definitions, properties against a plain per-point reference, the
compiled graph against eager — and the spec, module and zoo files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import attrs
import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.ops import generalized_box_iou_loss

from fdet import build, specs
from fdet.data.sample import Batch
from fdet.models.detectors.base import Term, total_loss
from fdet.models.detectors.dense import box_coder
from fdet.models.detectors.fcos import (
    FCOS,
    PointGrid,
    fcos_assign,
    fcos_loss,
    fcos_points,
    fcos_postprocess,
    fcos_targets,
    point_cells,
)
from fdet.models.heads.fcos import FCOSHeadOutputs
from fdet.ops.assign import IGNORE, NEGATIVE, POSITIVE
from fdet.ops.losses import sigmoid_focal_loss

ROOT = Path(__file__).resolve().parents[2]
K = 3

# --------------------------------------------------------------------------------------------
# Points


def test_points_follow_offset_and_placement() -> None:
    sizes = [(36, 36), (18, 18), (9, 9), (5, 5), (3, 3)]  # ResNet + FPN at 288 × 288
    nominal = fcos_points(sizes, spec=specs.Points(offset=0.5))
    assert nominal.points.shape == (sum(h * w for h, w in sizes), 2)
    assert nominal.points[0].tolist() == [4.0, 4.0]  # (⌊s/2⌋, ⌊s/2⌋) on P3
    first_p6 = 36 * 36 + 18 * 18 + 9 * 9
    assert nominal.points[first_p6 + 1].tolist() == [96.0, 32.0]  # (1.5 · 64, 0.5 · 64)
    assert nominal.levels[first_p6].item() == 3 and nominal.strides[first_p6].item() == 64

    placed = fcos_points(
        sizes, spec=specs.Points(offset=0.0, placement="image_ratio"), image_size=(288, 288)
    )
    # torchvision's P6 and P7 points are 288 // 5 = 57 and 288 // 3 = 96 apart
    assert placed.points[first_p6 + 1].tolist() == [57.0, 0.0]
    assert placed.points[-1].tolist() == [192.0, 192.0]
    # the nominal strides still scale ranges, radius and coding
    torch.testing.assert_close(placed.strides, nominal.strides, rtol=0, atol=0)
    cells = point_cells(placed)
    assert cells[first_p6 + 1].tolist() == [25.0, -32.0, 89.0, 32.0]
    with pytest.raises(ValueError, match="image_size"):
        fcos_points(sizes, spec=specs.Points(placement="image_ratio"))
    with pytest.raises(ValueError, match="5 point levels"):
        fcos_points(sizes[:3], spec=specs.Points())


# --------------------------------------------------------------------------------------------
# Assignment: cases from the definitions
#
# One level of stride 8 on a 32 × 32 image, points at the cell centres x, y ∈ {4, 12, 20, 28}
# (point index = 4 · row + column). The gt A = (2, 2, 14, 30) has centre (8, 16) and holds the
# points x ∈ {4, 12}, y ∈ {4, 12, 20, 28}. Within 1.5 strides (12 px, strictly) of its centre:
# y ∈ {12, 20} only. The largest side distance of the four middle points is 18 (e.g. (4, 12):
# l, t, r, b = 2, 10, 10, 18), of the four corner ones 26 (e.g. (4, 4): 2, 2, 10, 26).

ONE_LEVEL = [(4, 4)]
GT_A = [2.0, 2.0, 14.0, 30.0]
MIDDLE = [4, 5, 8, 9]  # (4, 12), (12, 12), (4, 20), (12, 20)
CORNERS = [0, 1, 12, 13]  # (4, 4), (12, 4), (4, 28), (12, 28)


def one_level_grid() -> PointGrid:
    return fcos_points(ONE_LEVEL, spec=specs.Points(strides=(8,), offset=0.5))


def assign(
    boxes, *, ranges=((-1.0, 64.0),), closed=True, radius=1.5, valid=None, crowd=None, grid=None
):
    gt = torch.tensor(boxes, dtype=torch.float32)[None]  # [1, M, 4]
    valid = torch.ones(gt.shape[:2], dtype=torch.bool) if valid is None else torch.tensor([valid])
    crowd = None if crowd is None else torch.tensor([crowd])
    assigner = specs.FCOSAssigner(regress_ranges=ranges, closed_ranges=closed, center_radius=radius)
    return fcos_assign(grid or one_level_grid(), gt, valid, crowd, assigner=assigner)


def positives(assignment) -> list[int]:
    return (assignment.label[0] == POSITIVE).nonzero().flatten().tolist()


def test_a_point_must_be_inside_near_the_centre_and_in_range() -> None:
    assert positives(assign([GT_A])) == MIDDLE  # center sampling keeps y ∈ {12, 20}
    assert positives(assign([GT_A], radius=None)) == sorted(MIDDLE + CORNERS)  # all inside
    # regression ranges: the middle points reach 18, the corners 26; the paper's ranges are
    # closed, torchvision's open
    assert positives(assign([GT_A], ranges=((-1.0, 18.0),))) == MIDDLE
    assert positives(assign([GT_A], ranges=((18.0, 64.0),))) == MIDDLE
    assert positives(assign([GT_A], ranges=((-1.0, 17.5),))) == []
    assert positives(assign([GT_A], ranges=((18.5, 64.0),))) == []
    assert positives(assign([GT_A], ranges=((-1.0, 18.0),), closed=False)) == []
    assert positives(assign([GT_A], ranges=((18.0, 64.0),), closed=False)) == []
    assert positives(assign([GT_A], ranges=((17.5, 18.5),), closed=False)) == MIDDLE
    assert positives(assign([GT_A], ranges=((20.0, 64.0),), radius=None)) == CORNERS
    assert positives(assign([GT_A], ranges=((-1.0, 20.0),), radius=None)) == MIDDLE
    # a point on the border is not inside: (2, 2, 12, 30) has (12, ·) on its right side
    assert positives(assign([[2.0, 2.0, 12.0, 30.0]])) == [4, 8]


def test_the_smallest_box_wins_then_the_first_slot() -> None:
    small = [0.0, 8.0, 16.0, 24.0]  # area 256 < 336 of A; holds the middle points only
    for boxes, winner in (([GT_A, small], 1), ([small, GT_A], 0)):
        out = assign(boxes, radius=None)
        assert positives(out) == sorted(MIDDLE + CORNERS)
        assert out.gt_index[0, MIDDLE].tolist() == [winner] * 4
        assert out.gt_index[0, CORNERS].tolist() == [1 - winner] * 4
    out = assign([GT_A, GT_A])  # equal areas: the first slot
    assert out.gt_index[0, MIDDLE].tolist() == [0] * 4


def test_ranges_send_a_box_to_its_level() -> None:
    """Strides 8 and 16 on 32 × 32 (level 1 points at 8 and 24), ranges (-1, 16], (16, ∞).
    The whole image C: every level-0 point reaches at least 20, so C is learned on level 1 only.
    D = (2, 2, 14, 14) reaches at most 10 from its level-0 points, and 6 from the level-1 point
    (8, 8), which is out of level 1's range: that point learns C although D is smaller."""
    grid = fcos_points([(4, 4), (2, 2)], spec=specs.Points(strides=(8, 16), offset=0.5))
    ranges = ((-1.0, 16.0), (16.0, None))
    whole, d = [0.0, 0.0, 32.0, 32.0], [2.0, 2.0, 14.0, 14.0]
    out = assign([whole], ranges=ranges, radius=None, grid=grid)
    assert positives(out) == [16, 17, 18, 19]
    out = assign([whole, d], ranges=ranges, radius=None, grid=grid)
    assert positives(out) == [0, 1, 4, 5, 16, 17, 18, 19]
    assert out.gt_index[0, [0, 1, 4, 5]].tolist() == [1] * 4
    assert out.gt_index[0, 16].item() == 0


def test_crowds_are_never_assigned_and_cover_ignored_points() -> None:
    crowd_box = [0.0, 0.0, 32.0, 16.0]  # the cells of rows y = 4 and y = 12 lie inside
    out = assign([crowd_box, GT_A], crowd=[True, False])
    label = out.label[0]
    assert positives(out) == MIDDLE and (out.gt_index[0, MIDDLE] == 1).all()
    assert label[[0, 1, 2, 3, 6, 7]].tolist() == [IGNORE] * 6  # covered, not positive
    assert (label[10:] == NEGATIVE).all() and label[11].item() == NEGATIVE
    # a crowd alone: no positives; a padded slot flagged crowd plays no part
    assert positives(assign([crowd_box], crowd=[True])) == []
    out = assign([crowd_box, GT_A], crowd=[True, False], valid=[False, True])
    assert (out.label[0] != IGNORE).all()


def test_targets_hold_class_box_and_centerness() -> None:
    """The middle points of A have l, r = 2, 10 or 10, 2 and t, b = 10, 18 or 18, 10, so
    centerness* = sqrt(2/10 · 10/18) = 1/3 (paper eq. 3)."""
    grid = one_level_grid()
    gt = torch.tensor([[GT_A, [math.nan] * 4]])
    labels = torch.tensor([[2, -5]])
    valid = torch.tensor([[True, False]])
    targets = fcos_targets(grid, gt, labels, valid, assigner=specs.FCOSAssigner())
    positive = targets.assignment.label[0] == POSITIVE
    torch.testing.assert_close(targets.centerness[0, MIDDLE], torch.full((4,), 1 / 3))
    assert (targets.centerness[0, ~positive] == 0).all()
    assert (
        targets.labels[0, MIDDLE].tolist() == [2] * 4 and (targets.labels[0, ~positive] == 0).all()
    )
    assert (targets.boxes[0, MIDDLE] == torch.tensor(GT_A)).all()
    torch.testing.assert_close(targets.boxes[0, ~positive], point_cells(grid)[~positive])


# --------------------------------------------------------------------------------------------
# Assignment: properties against a per-point reference

IMAGE = 64
STRIDES = (8, 16, 32)
SIZES = [(IMAGE // s, IMAGE // s) for s in STRIDES]
RANGES = ((-1.0, 16.0), (16.0, 32.0), (32.0, None))


def grid(offset: float = 0.5) -> PointGrid:
    return fcos_points(SIZES, spec=specs.Points(strides=STRIDES, offset=offset))


class Gts(NamedTuple):
    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    crowd: torch.Tensor


def random_gts(g: torch.Generator, counts: list[int], crowd_fraction: float = 0.0) -> Gts:
    """Boxes on a half-pixel lattice (so that points land on borders, centres and range bounds
    exactly, and every comparison is exact in float32); padded slots hold garbage."""
    m = max(counts, default=0)
    b = len(counts)
    xy = torch.randint(-8, 2 * IMAGE - 16, (b, m, 2), generator=g) / 2
    wh = torch.randint(4, 2 * 56, (b, m, 2), generator=g) / 2
    boxes = torch.cat((xy, xy + wh), dim=-1)
    labels = torch.randint(0, K, (b, m), generator=g)
    valid = torch.arange(m)[None, :] < torch.tensor(counts)[:, None]
    crowd = (torch.rand(b, m, generator=g) < crowd_fraction) & valid
    boxes = torch.where(valid[..., None], boxes, math.nan)
    labels = torch.where(valid, labels, -7)
    crowd = crowd | (~valid & (torch.rand(b, m, generator=g) < 0.5))
    return Gts(boxes, labels, valid, crowd)


@st.composite
def gt_cases(draw: st.DrawFn, *, max_batch: int = 3, max_gts: int = 5) -> tuple[Gts, dict]:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    counts = draw(st.lists(st.integers(0, max_gts), min_size=1, max_size=max_batch))
    crowd = draw(st.sampled_from([0.0, 0.0, 0.3]))
    radius = draw(st.sampled_from([1.5, None, 1.0]))
    offset = draw(st.sampled_from([0.5, 0.0]))
    closed = draw(st.booleans())
    return random_gts(g, counts, crowd), {"radius": radius, "offset": offset, "closed": closed}


def reference_assign(points, strides, levels, gts: Gts, radius, ranges, closed=True):
    """FCOS assignment written point by point and gt by gt, straight from the definitions."""
    b, m = gts.valid.shape
    label = torch.zeros(b, len(points), dtype=torch.int8)
    gt_index = torch.full((b, len(points)), -1)
    for i in range(b):
        for a, ((px, py), s, lvl) in enumerate(zip(points, strides, levels)):
            lower, upper = ranges[lvl]
            best, best_area = -1, math.inf
            covered = False
            for j in range(m):
                if not gts.valid[i, j]:
                    continue
                x1, y1, x2, y2 = gts.boxes[i, j].tolist()
                if gts.crowd[i, j]:
                    iw = max(0.0, min(px + s / 2, x2) - max(px - s / 2, x1))
                    ih = max(0.0, min(py + s / 2, y2) - max(py - s / 2, y1))
                    covered |= iw * ih / (s * s) > 0.5
                    continue
                ltrb = (px - x1, py - y1, x2 - px, y2 - py)
                upper = math.inf if upper is None else upper
                if closed:
                    ok = min(ltrb) > 0 and lower <= max(ltrb) <= upper
                else:
                    ok = min(ltrb) > 0 and lower < max(ltrb) < upper
                if radius is not None:
                    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                    ok = ok and abs(px - cx) < radius * s and abs(py - cy) < radius * s
                area = (x2 - x1) * (y2 - y1)
                if ok and area < best_area:
                    best, best_area = j, area
            if best >= 0:
                label[i, a], gt_index[i, a] = POSITIVE, best
            elif covered:
                label[i, a] = IGNORE
    return label, gt_index


def assign_case(gts: Gts, kw: dict):
    assigner = specs.FCOSAssigner(
        regress_ranges=RANGES, closed_ranges=kw.get("closed", True), center_radius=kw["radius"]
    )
    return fcos_assign(grid(kw["offset"]), gts.boxes, gts.valid, gts.crowd, assigner=assigner)


@settings(max_examples=30)
@given(case=gt_cases())
def test_assignment_equals_the_per_point_reference(case) -> None:
    gts, kw = case
    pg = grid(kw["offset"])
    got = assign_case(gts, kw)
    label, gt_index = reference_assign(
        pg.points.tolist(),
        pg.strides.tolist(),
        pg.levels.tolist(),
        gts,
        kw["radius"],
        RANGES,
        kw["closed"],
    )
    assert torch.equal(got.label, label)
    positive = label == POSITIVE
    assert torch.equal(got.gt_index[positive], gt_index[positive])


@settings(max_examples=30)
@given(case=gt_cases(), extra=st.integers(1, 4))
def test_assignment_padding_is_invisible(case, extra) -> None:
    gts, kw = case
    padded = Gts(*(torch.cat((x, y), dim=1) for x, y in zip(gts, garbage(gts, extra))))
    a, b = assign_case(padded, kw), assign_case(gts, kw)
    assert torch.equal(a.label, b.label)
    positive = a.label == POSITIVE
    assert torch.equal(a.gt_index[positive], b.gt_index[positive])


def garbage(gts: Gts, extra: int) -> Gts:
    """``extra`` padded slots per image: NaN and huge boxes, wild labels, crowd flags."""
    b = gts.valid.shape[0]
    g = torch.Generator().manual_seed(extra)
    boxes = torch.cat(
        (torch.full((b, 1, 4), math.nan), torch.randn(b, extra - 1, 4, generator=g) * 1e4), dim=1
    )
    return Gts(
        boxes=boxes,
        labels=torch.randint(-5, 1000, (b, extra), generator=g),
        valid=torch.zeros(b, extra, dtype=torch.bool),
        crowd=torch.rand(b, extra, generator=g) < 0.5,
    )


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), radius=st.sampled_from([None, 1.5]))
def test_every_gt_with_a_point_in_range_gets_a_positive(seed, radius) -> None:
    """Disjoint gts (one per 32 × 32 quadrant, so that none takes another's points): each gt
    with an inside point whose largest side distance fits that point's level range (within
    the center-sampling radius when on) has at least one positive. Boxes with both sides in
    (8, 16] (P3's range and stride) always qualify without center sampling."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.tensor([[0.0, 0.0], [32.0, 0.0], [0.0, 32.0], [32.0, 32.0]])  # [4, 2]
    wh = torch.randint(8, 64, (2, 4, 2), generator=g) / 2  # [B, 4, 2], 4 to 31.5
    xy = corner + torch.rand(2, 4, 2, generator=g) * (32 - wh)
    xy = (xy * 2).floor() / 2
    boxes = torch.cat((xy, xy + wh), dim=-1)
    valid = torch.ones(2, 4, dtype=torch.bool)
    gts = Gts(boxes, torch.zeros(2, 4, dtype=torch.long), valid, torch.zeros_like(valid))
    kw = {"radius": radius, "offset": 0.5}
    out = assign_case(gts, kw)
    pg = grid()
    fits = torch.zeros(2, 4, dtype=torch.bool)
    for i in range(2):
        for j in range(4):
            single = Gts(*(x[i : i + 1, j : j + 1] for x in gts))
            label, _ = reference_assign(
                pg.points.tolist(), pg.strides.tolist(), pg.levels.tolist(), single, radius, RANGES
            )
            fits[i, j] = bool((label == POSITIVE).any())
    got = torch.stack(
        [((out.label == POSITIVE) & (out.gt_index == j)).any(dim=1) for j in range(4)], dim=1
    )  # [B, 4]
    assert torch.equal(got, fits)
    side = wh.amin(-1), wh.amax(-1)
    small = (side[0] > 8) & (side[1] <= 16)
    if radius is None:
        assert fits[small].all()


@settings(max_examples=20)
@given(case=gt_cases())
def test_batched_assignment_equals_per_image(case) -> None:
    gts, kw = case
    whole = assign_case(gts, kw)
    for i in range(gts.valid.shape[0]):
        one = assign_case(Gts(*(x[i : i + 1] for x in gts)), kw)
        assert torch.equal(one.label[0], whole.label[i])
        positive = one.label[0] == POSITIVE
        assert torch.equal(one.gt_index[0][positive], whole.gt_index[i][positive])


# --------------------------------------------------------------------------------------------
# The distance coder


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), normalize=st.booleans())
def test_distance_coder_round_trips_and_is_torchvisions_linear_coder(seed, normalize) -> None:
    """On point cells (torchvision's FCOS anchors) the coder is ``BoxLinearCoder``: distances
    from the centre, divided by the cell's width when normalizing; decode inverts encode."""
    g = torch.Generator().manual_seed(seed)
    cells = point_cells(grid(offset=0.0))  # [A, 4]
    boxes = random_gts(g, [cells.shape[0]]).boxes[0]  # [A, 4]
    coder = box_coder(specs.DistanceCoder(normalize_by_stride=normalize))
    codes = coder.encode(cells, boxes)
    reference = BoxLinearCoder(normalize_by_size=normalize)
    torch.testing.assert_close(codes, reference.encode(cells, boxes), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(coder.decode(cells, codes), boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(
        coder.decode(cells, codes), reference.decode(codes, cells), rtol=1e-6, atol=1e-5
    )
    # a box reaching one stride from the point on every side codes to 1 (in strides) or to
    # the stride (in pixels)
    centre, side = (cells[:, :2] + cells[:, 2:]) / 2, cells[:, 2:] - cells[:, :2]
    unit = torch.cat((centre - side, centre + side), dim=1)
    expected = torch.ones_like(unit) if normalize else side[:, :1].expand_as(unit)
    torch.testing.assert_close(coder.encode(cells, unit), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The objective


def split_levels(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(flat.split([h * w for h, w in SIZES], dim=1))


def random_outputs(g: torch.Generator, batch: int, *, grad: bool = False) -> FCOSHeadOutputs:
    num = sum(h * w for h, w in SIZES)
    logits = (torch.randn(batch, num, K, generator=g) * 2 - 2).requires_grad_(grad)
    ltrb = (torch.rand(batch, num, 4, generator=g) * 3).requires_grad_(grad)
    ctr = torch.randn(batch, num, generator=g).requires_grad_(grad)
    return FCOSHeadOutputs(split_levels(logits), split_levels(ltrb), split_levels(ctr), SIZES)


class Summary(NamedTuple):
    loss: torch.Tensor
    cls: torch.Tensor
    box: torch.Tensor
    centerness: torch.Tensor
    num_pos: torch.Tensor
    box_count: torch.Tensor


def summary(terms: dict[str, Term], *, weighted: bool = False) -> Summary:
    assert list(terms) == ["cls", "box", "centerness"]
    assert terms["cls"].count is terms["centerness"].count  # one normalizer: one group
    assert (terms["box"].count is terms["cls"].count) == (not weighted)
    assert all(t.total.dtype == t.count.dtype == torch.float32 for t in terms.values())
    return Summary(
        total_loss(terms),
        terms["cls"].value(),
        terms["box"].value(),
        terms["centerness"].value(),
        terms["cls"].count,
        terms["box"].count,
    )


def loss_of(outputs: FCOSHeadOutputs, gts: Gts, *, offset: float = 0.5, **kw) -> Summary:
    kw.setdefault("assigner", specs.FCOSAssigner(regress_ranges=RANGES))
    terms = fcos_loss(outputs, grid(offset), *gts, **kw)
    return summary(terms, weighted=kw.get("box_weight_by_centerness", False))


LOSS_OPTIONS = [
    {},
    {"box_weight_by_centerness": True},
    {"box_loss": specs.L1Loss(), "coder": specs.DistanceCoder(normalize_by_stride=False)},
    {"assigner": specs.FCOSAssigner(regress_ranges=RANGES, center_radius=None)},
]


@st.composite
def loss_cases(draw: st.DrawFn) -> tuple[FCOSHeadOutputs, Gts, dict]:
    gts, _ = draw(gt_cases())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    options = draw(st.sampled_from(LOSS_OPTIONS))
    return random_outputs(g, gts.valid.shape[0]), gts, options


def assert_same(a: Summary, b: Summary, **tol) -> None:
    for name, x, y in zip(Summary._fields, a, b):
        torch.testing.assert_close(x, y, msg=name, **tol)


@settings(max_examples=25)
@given(case=loss_cases(), extra=st.integers(1, 4))
def test_loss_padding_is_invisible(case, extra) -> None:
    outputs, gts, kw = case
    padded = Gts(*(torch.cat((x, y), dim=1) for x, y in zip(gts, garbage(gts, extra))))
    assert_same(loss_of(outputs, padded, **kw), loss_of(outputs, gts, **kw), rtol=0, atol=0)


@settings(max_examples=25)
@given(case=loss_cases())
def test_batched_loss_is_the_per_image_sums_over_the_batch_counts(case) -> None:
    outputs, gts, kw = case
    weighted = kw.get("box_weight_by_centerness", False)
    whole = fcos_loss(
        outputs, grid(), *gts, **{"assigner": specs.FCOSAssigner(regress_ranges=RANGES), **kw}
    )
    sums = {name: torch.zeros(()) for name in whole}
    counts = {name: torch.zeros(()) for name in whole}
    for i in range(gts.valid.shape[0]):
        one = FCOSHeadOutputs(*(tuple(x[i : i + 1] for x in part) for part in outputs[:3]), SIZES)
        part = fcos_loss(
            one,
            grid(),
            *(x[i : i + 1] for x in gts),
            **{"assigner": specs.FCOSAssigner(regress_ranges=RANGES), **kw},
        )
        for name, term in part.items():
            sums[name] = sums[name] + term.total
            counts[name] = counts[name] + term.count
    for name, term in whole.items():
        torch.testing.assert_close(term.total, sums[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(term.count, counts[name], rtol=1e-6, atol=1e-6)
    summary(whole, weighted=weighted)


@settings(max_examples=15)
@given(case=loss_cases())
def test_terms_are_focal_giou_and_centerness_bce_from_their_definitions(case) -> None:
    """Each term against the formula of docs/fcos.md written with other ops: torchvision's
    GIoU loss, torch's BCE, fdet's focal loss on dense one-hot targets."""
    outputs, gts, kw = case
    if "box_loss" in kw:
        kw = {}
    assigner = kw.get("assigner", specs.FCOSAssigner(regress_ranges=RANGES))
    weighted = kw.get("box_weight_by_centerness", False)
    pg = grid()
    targets = fcos_targets(pg, *gts, assigner=assigner)
    positive = targets.assignment.label == POSITIVE
    counted = targets.assignment.label != IGNORE
    logits = torch.cat(outputs.cls_logits, dim=1)
    one_hot = (targets.labels[..., None] == torch.arange(K)) & positive[..., None]
    focal = (sigmoid_focal_loss(logits, one_hot.float()) * counted[..., None]).sum()

    ltrb = torch.cat(outputs.box_ltrb, dim=1)[positive]  # [P, 4]
    p = pg.points.expand(*positive.shape, 2)[positive]  # [P, 2]
    s = pg.strides.expand(positive.shape)[positive][:, None]  # [P, 1]
    pred = torch.cat((p - ltrb[:, :2] * s, p + ltrb[:, 2:] * s), dim=1)
    giou = generalized_box_iou_loss(pred, targets.boxes[positive], reduction="none")
    ctr = targets.centerness[positive]
    ctr_logits = torch.cat(outputs.centerness, dim=1)[positive]
    bce = F.binary_cross_entropy_with_logits(ctr_logits, ctr, reduction="sum")

    terms = fcos_loss(outputs, pg, *gts, assigner=assigner, box_weight_by_centerness=weighted)
    n = positive.sum().float()
    torch.testing.assert_close(terms["cls"].total, focal, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms["centerness"].total, bce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["cls"].count, n, rtol=0, atol=0)
    if weighted:
        torch.testing.assert_close(terms["box"].total, (giou * ctr).sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(terms["box"].count, ctr.sum(), rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(terms["box"].total, giou.sum(), rtol=1e-5, atol=1e-5)


def test_images_without_objects_teach_only_background() -> None:
    g = torch.Generator().manual_seed(0)
    outputs = random_outputs(g, 2)
    logits = torch.cat(outputs.cls_logits, dim=1)
    expected = sigmoid_focal_loss(logits, torch.zeros_like(logits)).sum()
    gts = random_gts(g, [3, 2])
    for empty in (gts._replace(valid=torch.zeros_like(gts.valid)), Gts(*(x[:, :0] for x in gts))):
        out = loss_of(outputs, empty)
        assert out.num_pos == 0 and out.box == 0 and out.centerness == 0
        torch.testing.assert_close(out.cls, expected)
        assert out.loss.isfinite()
        weighted = loss_of(outputs, empty, box_weight_by_centerness=True)
        assert weighted.box_count == 0 and weighted.loss.isfinite()


@pytest.mark.parametrize("options", LOSS_OPTIONS[:3], ids=["giou", "weighted", "l1"])
def test_gradients_are_finite_with_empty_images_crowds_and_garbage(options) -> None:
    g = torch.Generator().manual_seed(2)
    outputs = random_outputs(g, 3, grad=True)
    gts = random_gts(g, [4, 0, 3], crowd_fraction=0.3)
    out = loss_of(outputs, gts, **options)
    assert out.num_pos > 0
    grads = torch.autograd.grad(out.loss, [x for part in outputs[:3] for x in part])
    assert all(gr.isfinite().all() for gr in grads)
    ltrb_grad = torch.cat(grads[3:6], dim=1)
    cls_grad = torch.cat(grads[:3], dim=1)
    assert cls_grad[1].abs().sum() > 0  # the empty image still teaches "background"
    assert ltrb_grad[1].abs().sum() == 0  # ... and nothing about boxes
    assert ltrb_grad[0].abs().sum() > 0


def test_weights_scale_the_terms() -> None:
    g = torch.Generator().manual_seed(3)
    outputs = random_outputs(g, 2)
    gts = random_gts(g, [3, 2])
    base = loss_of(outputs, gts)
    assert base.num_pos > 1
    weighted = loss_of(
        outputs,
        gts,
        cls_loss=specs.SigmoidFocalLoss(weight=2.0),
        box_loss=specs.GIoULoss(weight=0.5),
        centerness_weight=3.0,
    )
    torch.testing.assert_close(weighted.cls, 2 * base.cls)
    torch.testing.assert_close(weighted.box, 0.5 * base.box)
    torch.testing.assert_close(weighted.centerness, 3 * base.centerness)
    torch.testing.assert_close(weighted.loss, weighted.cls + weighted.box + weighted.centerness)


@pytest.mark.compile
def test_compiled_objective_equals_eager() -> None:
    assigner = specs.FCOSAssigner(regress_ranges=RANGES)
    points = specs.Points(strides=STRIDES, offset=0.5)

    def objective(cls_logits, ltrb, ctr, boxes, labels, valid, crowd):
        outputs = FCOSHeadOutputs(
            split_levels(cls_logits), split_levels(ltrb), split_levels(ctr), SIZES
        )
        pg = fcos_points(SIZES, spec=points, device=ltrb.device)
        return fcos_loss(
            outputs,
            pg,
            boxes,
            labels,
            valid,
            crowd,
            assigner=assigner,
            box_weight_by_centerness=True,
            centerness_weight=0.5,
        )

    compiled = torch.compile(objective, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(6)
    for counts in ([4, 0, 2], [1, 3, 0]):  # the same shapes: one graph, two batches
        outputs = random_outputs(g, 3)
        gts = random_gts(g, counts, crowd_fraction=0.4)
        args = (*(torch.cat(part, dim=1) for part in outputs[:3]), *gts)
        want = summary(objective(*args), weighted=True)
        assert want.num_pos > 0
        assert_same(summary(compiled(*args), weighted=True), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Postprocess


def test_scores_combine_class_and_centerness_before_the_threshold() -> None:
    """Score = sqrt(sigmoid(cls) · sigmoid(centerness)); the threshold (0.2) applies to it. Point
    5 ((12, 12), stride 8) has class probability 0.3 but centerness 0.1: sqrt(0.03) = 0.17, out.
    Point 6 ((20, 12)) has 0.25 and 0.9: sqrt(0.225) = 0.474, in, with its box decoded from
    distances (1, 1, 2, 0.5) strides: (12, 4, 36, 16), clipped to the 32-pixel image."""
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    cls = torch.full((1, 16, 2), -10.0)
    ctr = torch.full((1, 16), -10.0)
    cls[0, 5, 1], ctr[0, 5] = logit(0.3), logit(0.1)
    cls[0, 6, 0], ctr[0, 6] = logit(0.25), logit(0.9)
    ltrb = torch.zeros(1, 16, 4)
    ltrb[0, 6] = torch.tensor([1.0, 1.0, 2.0, 0.5])
    outputs = FCOSHeadOutputs((cls,), (ltrb,), (ctr,), ONE_LEVEL)
    post = specs.DensePostprocess(score_threshold=0.2, nms_iou=0.6, max_detections=5)
    det = fcos_postprocess(outputs, one_level_grid(), torch.tensor([[32, 32]]), postprocess=post)
    assert det.valid[0].tolist() == [True, False, False, False, False]
    torch.testing.assert_close(det.scores[0, 0], torch.tensor(math.sqrt(0.225)))
    assert det.labels[0, 0].item() == 0
    assert det.boxes[0, 0].tolist() == [12.0, 4.0, 32.0, 16.0]


# --------------------------------------------------------------------------------------------
# Specs, module, zoo


def tiny_spec(**kw) -> specs.FCOS:
    head = kw.pop(
        "head",
        specs.FCOSHead(num_classes=K, num_convs=1, channels=32, norm=specs.GroupNorm(groups=8)),
    )
    return specs.FCOS(
        backbone=specs.ResNet(depth=18, out_levels=(3, 4, 5), width=16, norm=specs.BatchNorm()),
        neck=specs.FPN(channels=32),
        head=head,
        **kw,
    )


def tiny_batch(g: torch.Generator, counts: list[int], size: int = 128) -> Batch:
    gts = random_gts(g, counts, crowd_fraction=0.2)
    b = len(counts)
    return Batch(
        images=torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
        image_sizes=torch.full((b, 2), size),
        gt_boxes=gts.boxes * (size / IMAGE),
        gt_labels=gts.labels,
        gt_valid=gts.valid,
        gt_crowd=gts.crowd,
        image_ids=torch.arange(b),
        scales=torch.ones(b, 2),
    )


HEAD_VARIANTS = {
    "torchvision": {},
    "paper": {
        "distance_activation": "exp",
        "learned_scales": True,
        "centerness_on": "cls",
        "norm": None,
    },
    "improved": {"learned_scales": True, "tower_bias": False},
}


@pytest.mark.parametrize("variant", HEAD_VARIANTS)
def test_module_trains_end_to_end(variant) -> None:
    torch.manual_seed(0)
    head = specs.FCOSHead(
        num_classes=K,
        num_convs=1,
        channels=32,
        **{"norm": specs.GroupNorm(groups=8), **HEAD_VARIANTS[variant]},
    )
    spec = tiny_spec(
        head=head,
        points=specs.Points(offset=0.5),
        coder=specs.DistanceCoder(normalize_by_stride=variant != "paper"),
        box_weight_by_centerness=variant == "improved",
    )
    model = build(spec).train()
    assert isinstance(model, FCOS) and model.num_classes == K
    conv = model.head.cls_tower[0][0]
    assert (conv.bias is not None) == (variant != "improved")
    batch = tiny_batch(torch.Generator().manual_seed(4), [3, 0])
    outputs = model(batch.images)
    assert outputs.image_size == (128, 128)
    assert all(x.min() >= 0 for x in outputs.box_ltrb)
    out = summary(model.loss(outputs, batch), weighted=variant == "improved")
    assert out.num_pos > 0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and gr.isfinite().all() for gr in grads)
    assert model.head.centerness.weight.grad.abs().sum() > 0
    if HEAD_VARIANTS[variant].get("learned_scales"):
        assert model.head.scales.grad.abs().sum() > 0
    det = model.predict(batch.images, batch.image_sizes)
    assert det.boxes.shape == (2, spec.postprocess.max_detections, 4)


def test_losses_are_float32_under_autocast() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).eval()
    batch = tiny_batch(torch.Generator().manual_seed(5), [2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch.images)
        assert outputs.cls_logits[0].dtype == torch.bfloat16
        low = summary(model.loss(outputs, batch))
    assert all(x.dtype == torch.float32 for x in low)
    as_float = FCOSHeadOutputs(
        *(tuple(x.float() for x in part) for part in outputs[:3]), *outputs[3:]
    )
    assert_same(low, summary(model.loss(as_float, batch)), rtol=0, atol=0)


def test_specs_validate_with_the_field_named() -> None:
    with pytest.raises(specs.SpecError, match=r"assigner\.regress_ranges.*3 levels"):
        tiny_spec(assigner=specs.FCOSAssigner(regress_ranges=RANGES))
    with pytest.raises(specs.SpecError, match=r"points\.strides"):
        tiny_spec(points=specs.Points(strides=(8, 16, 32)))
    with pytest.raises(specs.SpecError, match=r"regress_ranges\[1\].*> lower"):
        specs.FCOSAssigner(regress_ranges=((-1, 64), (64, 64)))
    with pytest.raises(specs.SpecError, match=r"regress_ranges\[0\].*finite"):
        specs.FCOSAssigner(regress_ranges=((-math.inf, 64),))
    with pytest.raises(specs.SpecError, match="center_radius"):
        specs.FCOSAssigner(center_radius=0.0)
    with pytest.raises(specs.SpecError, match="offset"):
        specs.Points(offset=1.0)
    with pytest.raises(specs.SpecError, match="placement"):
        specs.Points(placement="torchvision")  # type: ignore[arg-type]
    with pytest.raises(specs.SpecError, match="placement"):
        specs.Anchors(placement="middle")  # type: ignore[arg-type]
    with pytest.raises(specs.SpecError, match="distance_activation"):
        specs.FCOSHead(num_classes=2, distance_activation="softplus")  # type: ignore[arg-type]
    with pytest.raises(specs.SpecError, match=r"norm\.groups"):
        specs.FCOSHead(num_classes=2, channels=48, norm=specs.GroupNorm(groups=32))


def test_specs_round_trip_json() -> None:
    spec = tiny_spec(
        head=specs.FCOSHead(
            num_classes=K, num_convs=2, channels=32, norm=None, learned_scales=True
        ),
        points=specs.Points(offset=0.5, placement="image_ratio"),
        assigner=specs.FCOSAssigner(
            regress_ranges=[[-1, 64], [64, 128], [128, 256], [256, 512], [512, None]],
            center_radius=None,
            crowd_ioa=0.7,
        ),
        coder=specs.DistanceCoder(normalize_by_stride=False),
        box_weight_by_centerness=True,
        centerness_weight=0.5,
    )
    assert spec.assigner.regress_ranges[-1] == (512.0, None)
    text = specs.to_json(spec)
    assert specs.from_json(text) == spec
    assert specs.from_json(specs.to_json(specs.Anchors(placement="image_ratio"))).placement == (
        "image_ratio"
    )
    bad = text.replace('"center_radius": null', '"center_radus": null')
    with pytest.raises(specs.SpecError, match=r"assigner\.center_radus"):
        specs.from_json(bad)


@pytest.mark.parametrize("path", ["specs/fcos/r50_fpn_1x_coco.py", "specs/shapes/fcos_r18_fpn.py"])
def test_zoo_spec_builds_and_round_trips(path) -> None:
    experiment = specs.load(ROOT / path)
    assert specs.from_json(specs.to_json(experiment)) == experiment
    model = experiment.model
    assert isinstance(model, specs.FCOS)
    with torch.device("meta"):
        module = build(model)
    assert isinstance(module, FCOS)
    if "coco" in path:
        # the paper's improved recipe
        assert model.head.norm == specs.GroupNorm(groups=32) and model.head.centerness_on == "box"
        assert model.assigner.center_radius == 1.5 and model.box_weight_by_centerness
        assert isinstance(model.box_loss, specs.GIoULoss)
        assert experiment.iterations == 90_000 and experiment.batch_size == 16
        assert experiment.optimizer.lr == 0.01
    else:
        assert model.points.strides == (8, 16, 32)
        shapes = specs.load(ROOT / "specs/shapes/retinanet_r18_fpn.py")
        # the RetinaNet spec's ResNet and FPN, on C3–C5 (the pyramid FCOS was measured with)
        assert model.backbone == attrs.evolve(shapes.model.backbone, out_levels=(3, 4, 5))
        assert model.neck == attrs.evolve(shapes.model.neck, in_levels=(3, 4, 5))
        assert experiment.iterations == shapes.iterations
        assert experiment.batch_size == shapes.batch_size
        assert attrs.evolve(experiment, model=shapes.model) == shapes
