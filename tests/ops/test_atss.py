"""ATSS assignment (fdet.ops.assign.assign_atss): against a literal per-image, per-gt reading of
the paper's Algorithm 1, hand-computed cases, padding, batching and the compiler."""

from __future__ import annotations

import math
from typing import NamedTuple

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torchvision.ops import box_iou as tv_box_iou

from fdet.ops.anchors import anchor_offsets, grid_anchors, level_counts
from fdet.ops.assign import (
    IGNORE,
    NEGATIVE,
    POSITIVE,
    Assignment,
    _nearest_per_level,
    assign_atss,
)
from fdet.ops.boxes import box_ioa
from tests.strategies import random_boxes, seeds


class Case(NamedTuple):
    anchors: torch.Tensor  # [A, 4]
    num_per_level: list[int]
    gt_boxes: torch.Tensor  # [B, M, 4]
    gt_valid: torch.Tensor  # [B, M]
    gt_crowd: torch.Tensor | None  # [B, M]
    topk: int
    unbiased_std: bool

    def assign(self, **changes) -> Assignment:
        case = self._replace(**changes)
        return assign_atss(
            case.anchors,
            case.num_per_level,
            case.gt_boxes,
            case.gt_valid,
            case.gt_crowd,
            topk=case.topk,
            unbiased_std=case.unbiased_std,
        )


@st.composite
def atss_cases(draw: st.DrawFn, *, max_gt: int = 6) -> Case:
    """Pyramids of grid anchors (one or two a location, levels with fewer than ``topk``
    anchors) or scattered anchors split into levels at random; small images crowded with gts,
    often on integer coordinates (equidistant centres and equal IoUs are common)."""
    g = torch.Generator().manual_seed(draw(seeds))
    b = draw(st.integers(1, 3))
    m = draw(st.integers(0, max_gt))
    image = draw(st.sampled_from([32.0, 48.0, 64.0]))
    if draw(st.booleans()):
        strides = draw(st.sampled_from([(8,), (8, 16), (8, 16, 32), (4, 8, 16)]))
        scales = draw(st.sampled_from([(1.0,), (1.0, 1.5)]))
        base = draw(st.sampled_from([2.0, 4.0]))
        sizes = [(math.ceil(image / s), math.ceil(image / s)) for s in strides]
        offsets = [
            anchor_offsets([base * s * c for c in scales], [1.0], round_to_int=False)
            for s in strides
        ]
        anchors = grid_anchors(offsets, sizes, strides)
        num_per_level = level_counts(sizes, len(scales))
    else:
        a = draw(st.integers(1, 40))
        anchors = random_boxes(g, (a,), image_size=image, min_size=4, max_size=image / 2)
        cuts = sorted(draw(st.lists(st.integers(0, a), max_size=3)))
        num_per_level = [hi - lo for lo, hi in zip([0, *cuts], [*cuts, a])]
    gt_boxes = random_boxes(g, (b, m), image_size=image, min_size=image / 8, max_size=image * 0.6)
    if m >= 2 and draw(st.booleans()):  # a duplicated gt: IoU ties across slots
        gt_boxes[:, -1] = gt_boxes[:, 0]
    if draw(st.booleans()):
        anchors, gt_boxes = anchors.round(), gt_boxes.round()
    gt_valid = torch.rand(b, m, generator=g) < draw(st.sampled_from([1.0, 1.0, 0.7, 0.3]))
    gt_crowd = None
    if draw(st.booleans()):
        gt_crowd = torch.rand(b, m, generator=g) < 0.3  # flags on padded slots too
    gt_boxes = torch.where(gt_valid[..., None], gt_boxes, math.nan)
    topk = draw(st.integers(1, 12))
    return Case(anchors, num_per_level, gt_boxes, gt_valid, gt_crowd, topk, draw(st.booleans()))


def reference(case: Case) -> Assignment:
    """Algorithm 1 of the paper read literally: a loop over images, gts and levels, candidates
    by a stable sort of the centre distances (ties to the lowest index), the threshold from
    ``torch.std`` in float64 (an IoU within 1e-12 below it reaches it), then the crowds."""
    anchors, gts = case.anchors, case.gt_boxes
    b_count, m_count = case.gt_valid.shape
    a_count = anchors.shape[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    label = torch.full((b_count, a_count), NEGATIVE, dtype=torch.int8)
    gt_index = torch.zeros(b_count, a_count, dtype=torch.int64)
    iou_out = torch.zeros(b_count, a_count)
    for b in range(b_count):
        crowd = [
            bool(case.gt_valid[b, m]) and case.gt_crowd is not None and bool(case.gt_crowd[b, m])
            for m in range(m_count)
        ]
        usable = [m for m in range(m_count) if case.gt_valid[b, m] and not crowd[m]]
        ious = {m: tv_box_iou(gts[b, m][None], anchors)[0] for m in usable}  # [A] each
        claims: dict[int, tuple[float, int]] = {}
        for m in usable:
            x1, y1, x2, y2 = gts[b, m]
            gt_centre = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2))
            candidates: list[int] = []
            start = 0
            for count in case.num_per_level:
                dist = ((centres[start : start + count] - gt_centre) ** 2).sum(-1).tolist()
                order = sorted(range(count), key=lambda i: (dist[i], i))
                candidates += [start + i for i in order[: case.topk]]
                start += count
            values = ious[m][candidates].double()
            spread = values.std(correction=int(case.unbiased_std)) if len(candidates) > 1 else 0.0
            threshold = float(values.mean() + spread)
            for a in candidates:
                cx, cy = centres[a].tolist()
                inside = min(cx - x1, cy - y1, x2 - cx, y2 - cy) > 0.01
                value = float(ious[m][a])
                if inside and value >= threshold - 1e-12 and value > claims.get(a, (-1.0, 0))[0]:
                    claims[a] = (value, m)
        for a in range(a_count):
            if a in claims:
                label[b, a] = POSITIVE
                iou_out[b, a], gt_index[b, a] = claims[a]
            elif usable:
                column = torch.stack([ious[m][a] for m in usable])
                best = int(column.argmax())
                gt_index[b, a], iou_out[b, a] = usable[best], column[best]
        for m in range(m_count):
            if crowd[m]:
                covered = box_ioa(anchors, gts[b, m][None])[:, 0] > 0.5
                label[b] = torch.where(covered & (label[b] != POSITIVE), IGNORE, label[b])
    return Assignment(gt_index, label, iou_out)


def assert_same(got: Assignment, want: Assignment) -> None:
    for name, g, w in zip(Assignment._fields, got, want):
        assert g.dtype == w.dtype, name
        assert torch.equal(g, w), (name, g, w)


@given(case=atss_cases())
def test_assignment_is_the_papers_algorithm(case: Case) -> None:
    assert_same(case.assign(), reference(case))


@given(case=atss_cases())
def test_positives_are_candidates_inside_their_valid_gt(case: Case) -> None:
    """What holds for every positive, whatever the thresholds: a valid, non-crowd gt whose box
    contains the anchor's centre, and no gt that the anchor also qualifies for overlaps it more
    (checked against the reference); non-positive anchors are NEGATIVE unless crowd-covered."""
    out = case.assign()
    pos = out.label == POSITIVE
    if not pos.any():
        return
    b, a = pos.nonzero(as_tuple=True)
    m = out.gt_index[b, a]
    assert case.gt_valid[b, m].all()
    if case.gt_crowd is not None:
        assert not case.gt_crowd[b, m].any()
    box = case.gt_boxes[b, m]  # [P, 4]
    centre = (case.anchors[a, :2] + case.anchors[a, 2:]) / 2  # [P, 2]
    assert (centre > box[:, :2]).all() and (centre < box[:, 2:]).all()
    torch.testing.assert_close(
        out.iou[b, a], tv_box_iou(box, case.anchors).gather(1, a[:, None])[:, 0]
    )
    if case.gt_crowd is None:
        assert set(out.label.unique().tolist()) <= {POSITIVE, NEGATIVE}


@settings(max_examples=30)
@given(case=atss_cases(), extra=st.integers(1, 4))
def test_padding_is_invisible(case: Case, extra: int) -> None:
    b = case.gt_valid.shape[0]
    g = torch.Generator().manual_seed(extra)
    garbage = torch.cat(
        (torch.full((b, 1, 4), math.nan), torch.randn(b, extra - 1, 4, generator=g) * 1e4), dim=1
    )
    crowd = case.gt_crowd if case.gt_crowd is not None else torch.zeros_like(case.gt_valid)
    padded = case._replace(
        gt_boxes=torch.cat((case.gt_boxes, garbage), dim=1),
        gt_valid=torch.cat((case.gt_valid, torch.zeros(b, extra, dtype=torch.bool)), dim=1),
        gt_crowd=torch.cat((crowd, torch.rand(b, extra, generator=g) < 0.5), dim=1),
    )
    assert_same(padded.assign(), case.assign(gt_crowd=crowd))


@settings(max_examples=30)
@given(case=atss_cases())
def test_batched_equals_per_image(case: Case) -> None:
    whole = case.assign()
    for i in range(case.gt_valid.shape[0]):
        crowd = None if case.gt_crowd is None else case.gt_crowd[i : i + 1]
        one = case.assign(
            gt_boxes=case.gt_boxes[i : i + 1], gt_valid=case.gt_valid[i : i + 1], gt_crowd=crowd
        )
        assert_same(Assignment(*(x[i : i + 1] for x in whole)), one)


def test_no_slots_and_no_valid_gts_give_all_negative() -> None:
    anchors = grid_anchors([anchor_offsets([16.0], [1.0])], [(4, 4)], [8])
    for m in (0, 3):
        out = assign_atss(
            anchors,
            [16],
            torch.full((2, m, 4), math.nan),
            torch.zeros(2, m, dtype=torch.bool),
            topk=9,
        )
        assert (out.label == NEGATIVE).all() and (out.gt_index == 0).all() and (out.iou == 0).all()


# --- hand-computed cases --------------------------------------------------------------------

# Level 0: 3 × 3 anchors of side 10 centred on (10 j, 10 i), index 3 i + j; level 1: one anchor
# of side 40 centred on (10, 10).
HAND_ANCHORS = torch.tensor(
    [[10.0 * j - 5, 10.0 * i - 5, 10.0 * j + 5, 10.0 * i + 5] for i in range(3) for j in range(3)]
    + [[-10.0, -10.0, 30.0, 30.0]]
)
HAND_LEVELS = [9, 1]
G1 = [2.0, 2.0, 14.0, 12.0]  # centre (8, 7), area 120
G2 = [4.0, 8.0, 18.0, 14.0]  # centre (11, 11), area 84


def _hand(gts: list[list[float]], **kw) -> Assignment:
    boxes = torch.tensor([gts])
    return assign_atss(
        HAND_ANCHORS, HAND_LEVELS, boxes, torch.ones(1, len(gts), dtype=torch.bool), topk=4, **kw
    )


@pytest.mark.parametrize("unbiased_std", [True, False])
def test_hand_computed_single_gt(unbiased_std: bool) -> None:
    """G1: squared centre distances 113, 53, 193 / 73, 13, 153 / 233, 173, 313, so the 4
    candidates of level 0 are anchors 4, 1, 3, 0 with IoUs 63/157, 27/193, 21/199, 9/211, and
    level 1 (one anchor, fewer than k) adds 120/1600. Mean 0.15287; deviation 0.14346 with
    n - 1 (threshold 0.29633) or 0.12832 with n (0.28119): only anchor 4 (IoU 0.40127)
    reaches it, and its centre (10, 10) lies inside G1."""
    ious = torch.tensor([63 / 157, 27 / 193, 21 / 199, 9 / 211, 120 / 1600], dtype=torch.float64)
    threshold = ious.mean() + ious.std(correction=int(unbiased_std))
    assert 0.28 < threshold < 0.30 and (ious >= threshold).tolist() == [True] + [False] * 4
    out = _hand([G1], unbiased_std=unbiased_std)
    assert out.label[0].tolist() == [NEGATIVE] * 4 + [POSITIVE] + [NEGATIVE] * 5
    assert out.gt_index[0, 4] == 0
    torch.testing.assert_close(out.iou[0, 4], torch.tensor(63 / 157))


def test_hand_computed_conflict_goes_to_the_better_overlap() -> None:
    """G2 (14 × 6, centre (11, 11)) has candidates 4, 5, 7 and 1 (squared distances 2, 82, 82,
    122; see the tie below) with IoUs 60/124, 18/166, 0, 0 and 84/1600 on level 1: mean
    0.12896, threshold 0.3324 with n - 1, reached by anchor 4 alone. Anchor 4 is positive for
    G1 (IoU 0.40127) and for G2 (0.48387): it goes to G2, and G1 is left without a positive."""
    out = _hand([G1, G2])
    assert out.label[0].tolist() == [NEGATIVE] * 4 + [POSITIVE] + [NEGATIVE] * 5
    assert out.gt_index[0, 4] == 1
    torch.testing.assert_close(out.iou[0, 4], torch.tensor(60 / 124))
    alone = _hand([G2])
    assert torch.equal(alone.label, out.label)


def test_ties_at_the_kth_distance_go_to_the_lowest_index() -> None:
    """From G2's centre (11, 11), anchors 1 (10, 0) and 3 (0, 10) are both at squared distance
    122, fourth after anchors 4, 5 and 7: with k = 4 anchor 1 is taken, whatever order topk
    returns equal values in; with k = 5 both are."""
    centres = (HAND_ANCHORS[:9, :2] + HAND_ANCHORS[:9, 2:]) / 2
    dist = ((centres - torch.tensor([11.0, 11.0])) ** 2).sum(-1)  # [9]
    assert dist[1] == dist[3] == 122
    rows = torch.stack((dist, dist.flip(0)))[None]  # [1, 2, 9], the second row mirrored
    four = _nearest_per_level(rows, [9], 4)[0]
    assert four[0].nonzero().flatten().tolist() == [1, 4, 5, 7]
    assert four[1].nonzero().flatten().tolist() == [1, 3, 4, 5]  # mirrored: 5 and 7 tie
    five = _nearest_per_level(rows, [9], 5)[0]
    assert five[0].nonzero().flatten().tolist() == [1, 3, 4, 5, 7]
    # per level: 5 candidates asked of a level of 4 anchors take all of them
    split = _nearest_per_level(rows, [4, 5], 5)[0]
    assert split[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]


def test_a_gt_with_centres_inside_may_get_no_positive() -> None:
    """The max candidate IoU need not reach mean + std: two anchors equal to the gt and one
    far away give IoUs 1, 1, 0 and a threshold of 2/3 + 0.577 (n - 1) or 2/3 + 0.471 (n), so
    no anchor is positive although two centres lie inside the gt. (The paper's claim that
    every gt gets positives does not hold in general; the algorithm has no fallback.)"""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [40, 40, 50, 50]])
    gts = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]])
    for unbiased in (True, False):
        out = assign_atss(
            anchors, [1, 2], gts, torch.ones(1, 1, dtype=torch.bool), topk=2, unbiased_std=unbiased
        )
        assert (out.label == NEGATIVE).all()
        assert torch.equal(out.iou[0], torch.tensor([1.0, 1.0, 0.0]))


def test_equal_candidate_ious_all_reach_the_threshold() -> None:
    """Three anchors of side 38 shifted by 5 pixels left, right and down from a 38-pixel gt all
    have IoU 1254/1634. Their float32 mean + std lies above that value (so a float32
    computation labels none of them); in float64 the threshold is the IoU itself and all three
    are positive."""
    anchors = torch.tensor(
        [[5.0, 0.0, 43.0, 38.0], [-5.0, 0.0, 33.0, 38.0], [0.0, 5.0, 38.0, 43.0]]
    )
    gts = torch.tensor([[[0.0, 0.0, 38.0, 38.0]]])
    ious = tv_box_iou(gts[0], anchors)[0]
    assert (ious == ious[0]).all()
    assert ious.mean() + ious.std() > ious[0]  # float32 would miss them all
    out = assign_atss(anchors, [3], gts, torch.ones(1, 1, dtype=torch.bool), topk=3)
    assert (out.label == POSITIVE).all()


def test_crowds_are_never_matched_and_cover_ignored_anchors() -> None:
    anchors = grid_anchors([anchor_offsets([16.0], [1.0], round_to_int=False)], [(8, 8)], [8])
    boxes = torch.tensor([[[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 30.0, 30.0], [44, 44, 60, 60]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    crowd = torch.tensor([[True, False, False]])
    with_crowd = assign_atss(anchors, [64], boxes, valid, crowd, topk=9)
    without = assign_atss(anchors, [64], boxes[:, 1:], valid[:, 1:], topk=9)
    pos = with_crowd.label == POSITIVE
    assert torch.equal(pos, without.label == POSITIVE) and pos.any()
    assert (with_crowd.gt_index[pos] > 0).all()
    assert torch.equal(with_crowd.gt_index[pos] - 1, without.gt_index[pos])
    covered = box_ioa(anchors, boxes[0, :1])[:, 0] > 0.5
    assert (with_crowd.label[0][covered & ~pos[0]] == IGNORE).all()
    assert (with_crowd.label[0][~covered & ~pos[0]] == NEGATIVE).all()
    assert (covered & ~pos[0]).any()


def test_bad_level_split_is_an_error() -> None:
    anchors = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="adds up to 4"):
        assign_atss(anchors, [2, 2], torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=bool), topk=9)


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    def run(anchors, boxes, valid, crowd):
        return assign_atss(anchors, [64, 16, 4], boxes, valid, crowd, topk=9)

    compiled = torch.compile(run, fullgraph=True, dynamic=False)
    sizes = [(8, 8), (4, 4), (2, 2)]
    offsets = [anchor_offsets([2.0 * s], [1.0], round_to_int=False) for s in (8, 16, 32)]
    anchors = grid_anchors(offsets, sizes, (8, 16, 32))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the same shapes: one graph, two batches
        boxes = random_boxes(g, (3, 5), image_size=64, min_size=4, max_size=40).round()
        valid = torch.rand(3, 5, generator=g) < 0.8
        crowd = torch.rand(3, 5, generator=g) < 0.2
        boxes = torch.where(valid[..., None], boxes, math.nan)
        eager = run(anchors, boxes, valid, crowd)
        assert (eager.label == POSITIVE).sum() > 5
        assert_same(compiled(anchors, boxes, valid, crowd), eager)
