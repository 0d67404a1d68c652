from __future__ import annotations

from typing import NamedTuple

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou as tv_box_iou

from fdet.ops.assign import IGNORE, NEGATIVE, POSITIVE, Assignment, assign_max_iou
from tests.strategies import random_boxes, seeds

THRESHOLDS = [(0.5, 0.4), (0.7, 0.3), (0.5, 0.5), (0.6, 0.0), (0.4, 0.1)]


class Case(NamedTuple):
    anchors: torch.Tensor  # [A, 4] or [B, A, 4]
    gt_boxes: torch.Tensor  # [B, M, 4]
    gt_valid: torch.Tensor  # [B, M]
    pos_iou: float
    neg_iou: float
    generator_seed: int

    def kwargs(self) -> dict[str, float]:
        return {"pos_iou": self.pos_iou, "neg_iou": self.neg_iou}


@st.composite
def assign_cases(
    draw: st.DrawFn,
    *,
    batch: int | None = None,
    num_gt: int | None = None,
    num_anchors: int | None = None,
    per_image_anchors: bool | None = None,
    min_gt: int = 0,
) -> Case:
    """Small images crowded with boxes; integer coordinates make exact IoU ties common."""
    seed = draw(seeds)
    b = draw(st.integers(1, 3)) if batch is None else batch
    m = draw(st.integers(min_gt, 6)) if num_gt is None else num_gt
    a = draw(st.integers(1, 40)) if num_anchors is None else num_anchors
    per_image = draw(st.booleans()) if per_image_anchors is None else per_image_anchors
    image = draw(st.sampled_from([24.0, 64.0, 160.0]))
    integer = draw(st.booleans())
    degenerate = draw(st.sampled_from([0.0, 0.0, 0.3]))
    valid_fraction = draw(st.sampled_from([1.0, 0.7, 0.3, 0.0]))
    pos_iou, neg_iou = draw(st.sampled_from(THRESHOLDS))

    g = torch.Generator().manual_seed(seed)
    size = {"image_size": image, "min_size": image / 16, "max_size": image / 2}
    anchors = random_boxes(g, (b, a) if per_image else (a,), **size)
    gt_boxes = random_boxes(g, (b, m), degenerate_fraction=degenerate, **size)
    if m >= 2 and draw(st.booleans()):  # a duplicated gt: IoU ties across slots
        gt_boxes[:, -1] = gt_boxes[:, 0]
    if integer:
        anchors, gt_boxes = anchors.round(), gt_boxes.round()
    gt_valid = torch.rand(b, m, generator=g) < valid_fraction
    return Case(anchors, gt_boxes, gt_valid, pos_iou, neg_iou, seed)


low_quality_options = st.sampled_from(
    [
        {"low_quality_matches": False},
        {"low_quality_matches": True},
        {"low_quality_matches": True, "min_low_quality_iou": 0.3},
        {"low_quality_matches": True, "min_low_quality_iou": -1.0},
    ]
)


def _assign(case: Case, **kwargs) -> Assignment:
    return assign_max_iou(case.anchors, case.gt_boxes, case.gt_valid, **case.kwargs(), **kwargs)


def _batched_anchors(case: Case) -> torch.Tensor:
    b = case.gt_boxes.shape[0]
    return case.anchors if case.anchors.dim() == 3 else case.anchors.expand(b, -1, -1)


def _assert_equal(got: Assignment, want: Assignment) -> None:
    for name, g, w in zip(Assignment._fields, got, want):
        assert g.dtype == w.dtype, name
        assert torch.equal(g, w), name


def _iou_matrix(case: Case) -> torch.Tensor:
    """[B, M, A] IoU, from torchvision's implementation, one image at a time."""
    anchors = _batched_anchors(case)
    return torch.stack([tv_box_iou(g, a) for g, a in zip(case.gt_boxes, anchors)])


# --------------------------------------------------------------------------------------------
# Invariants of a single assignment


@given(case=assign_cases(), lq=low_quality_options)
def test_labels_agree_with_thresholds_and_point_at_valid_gts(case, lq):
    out = _assign(case, **lq)
    b, m = case.gt_valid.shape
    a = case.anchors.shape[-2]
    assert out.label.dtype == torch.int8 and out.label.shape == (b, a)
    assert out.gt_index.dtype == torch.int64 and out.gt_index.shape == (b, a)
    assert out.iou.dtype == torch.float32 and out.iou.shape == (b, a)
    assert set(out.label.unique().tolist()) <= {POSITIVE, NEGATIVE, IGNORE}
    assert bool(torch.isfinite(out.iou).all())
    assert bool(((out.iou >= 0) & (out.iou <= 1)).all())
    if m == 0:
        assert bool((out.label == NEGATIVE).all())
        return
    assert bool(((out.gt_index >= 0) & (out.gt_index < m)).all())

    pos = out.label == POSITIVE
    assert bool(case.gt_valid.gather(1, out.gt_index)[pos].all())
    # the reported IoU is the IoU with the reported gt, and no valid gt overlaps more
    iou = _iou_matrix(case)  # [B, M, A]
    has_gt = case.gt_valid.any(1, keepdim=True).expand_as(out.iou)
    at_index = iou.gather(1, out.gt_index[:, None, :])[:, 0]
    torch.testing.assert_close(out.iou[has_gt], at_index[has_gt], rtol=0, atol=0)
    best = iou.masked_fill(~case.gt_valid[..., None], -1).amax(1)
    torch.testing.assert_close(out.iou[has_gt], best[has_gt], rtol=0, atol=0)
    # thresholds: low-quality matching may only upgrade to POSITIVE
    assert bool((out.label[out.iou >= case.pos_iou] == POSITIVE).all())
    assert bool((out.iou[(out.label == NEGATIVE) & has_gt] < case.neg_iou).all())
    ign = out.label == IGNORE
    assert bool(((out.iou[ign] >= case.neg_iou) & (out.iou[ign] < case.pos_iou)).all())
    if not lq["low_quality_matches"]:
        assert bool((out.iou[pos] >= case.pos_iou).all())


@given(case=assign_cases(), lq=low_quality_options, data=st.data())
def test_padding_is_invisible(case, lq, data):
    extra = data.draw(st.integers(1, 5), label="extra")
    b, m = case.gt_valid.shape
    g = torch.Generator().manual_seed(case.generator_seed + 1)
    garbage = random_boxes(g, (b, extra), image_size=1e6, max_size=1e7)
    garbage[:, 0] = float("nan")
    if case.anchors.shape[-2] and extra >= 2:
        garbage[:, 1] = _batched_anchors(case)[:, 0]  # would be a perfect match
    if extra >= 3:
        garbage[:, 2] = torch.tensor([0.0, 0.0, float("inf"), float("inf")])
    padded_boxes = torch.cat((case.gt_boxes, garbage), dim=1)
    padded_valid = torch.cat((case.gt_valid, torch.zeros(b, extra, dtype=torch.bool)), dim=1)
    # garbage in the existing padded slots too
    padded_boxes[:, :m][~case.gt_valid] = float("nan")
    got = assign_max_iou(case.anchors, padded_boxes, padded_valid, **case.kwargs(), **lq)
    _assert_equal(got, _assign(case, **lq))


@given(case=assign_cases(), lq=low_quality_options, data=st.data())
def test_images_without_objects_are_all_negative(case, lq, data):
    b = case.gt_valid.shape[0]
    empty = torch.tensor(data.draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    gt_valid = case.gt_valid & ~empty[:, None]
    out = assign_max_iou(case.anchors, case.gt_boxes, gt_valid, **case.kwargs(), **lq)
    assert bool((out.label[empty] == NEGATIVE).all())
    assert bool((out.iou[empty] == 0).all())
    assert bool((out.gt_index[empty] == 0).all())
    _assert_equal(
        Assignment(*(t[~empty] for t in out)),
        assign_max_iou(
            case.anchors if case.anchors.dim() == 2 else case.anchors[~empty],
            case.gt_boxes[~empty],
            gt_valid[~empty],
            **case.kwargs(),
            **lq,
        ),
    )


@given(case=assign_cases(num_gt=0))
def test_no_gt_slots_at_all(case):
    out = _assign(case)
    assert bool((out.label == NEGATIVE).all()) and bool((out.iou == 0).all())


@given(case=assign_cases(min_gt=1), min_iou=st.sampled_from([0.0, 0.2]))
def test_every_overlapping_gt_gets_its_best_anchors(case, min_iou):
    out = _assign(case, low_quality_matches=True, min_low_quality_iou=min_iou)
    iou = _iou_matrix(case)  # [B, M, A]
    gt_best = iou.amax(2, keepdim=True)  # [B, M, 1]
    is_best = iou == gt_best  # [B, M, A]
    pos = (out.label == POSITIVE)[:, None, :]  # [B, 1, A]
    promotes = case.gt_valid & (gt_best[..., 0] > min_iou)  # [B, M]
    # every anchor reaching such a gt's best IoU is positive (ties included) ...
    assert bool(((is_best & ~pos).sum(2) == 0)[promotes].all())
    # ... and every positive below pos_iou reaches some promoting gt's best
    low = (out.label == POSITIVE) & (out.iou < case.pos_iou)  # [B, A]
    reached = (is_best & promotes[..., None]).any(1)  # [B, A]
    assert bool(reached[low].all())


@given(case=assign_cases(min_gt=1), lq=low_quality_options)
def test_gts_overlapping_nothing_change_no_label(case, lq):
    """Zero-area gts and gts away from every anchor (IoU 0 everywhere) promote nothing."""
    if case.neg_iou == 0.0 or lq.get("min_low_quality_iou", 0.0) < 0:
        return  # IoU 0 is IGNORE rather than NEGATIVE, or torchvision's quirk was asked for
    iou = _iou_matrix(case)
    blank = iou.amax(2) == 0  # [B, M]
    out = _assign(case, **lq)
    without = assign_max_iou(
        case.anchors, case.gt_boxes, case.gt_valid & ~blank, **case.kwargs(), **lq
    )
    assert torch.equal(out.label, without.label)
    assert torch.equal(out.iou, without.iou)


# --------------------------------------------------------------------------------------------
# Batching and symmetry


@given(case=assign_cases(), lq=low_quality_options)
def test_batched_equals_per_image(case, lq):
    out = _assign(case, **lq)
    anchors = _batched_anchors(case)
    _assert_equal(assign_max_iou(anchors, case.gt_boxes, case.gt_valid, **case.kwargs(), **lq), out)
    for i in range(case.gt_boxes.shape[0]):
        single = assign_max_iou(
            anchors[i],
            case.gt_boxes[i : i + 1],
            case.gt_valid[i : i + 1],
            **case.kwargs(),
            **lq,
        )
        _assert_equal(single, Assignment(*(t[i : i + 1] for t in out)))


@given(case=assign_cases(min_gt=1), lq=low_quality_options)
def test_permuting_gt_slots_permutes_gt_index(case, lq):
    m = case.gt_valid.shape[1]
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(case.generator_seed))
    inverse = torch.argsort(perm)
    out = _assign(case, **lq)
    permuted = assign_max_iou(
        case.anchors, case.gt_boxes[:, perm], case.gt_valid[:, perm], **case.kwargs(), **lq
    )
    assert torch.equal(out.label, permuted.label)
    assert torch.equal(out.iou, permuted.iou)
    iou = _iou_matrix(case).masked_fill(~case.gt_valid[..., None], -1)  # [B, M, A]
    untied = (iou == iou.amax(1, keepdim=True)).sum(1) == 1  # [B, A]
    assert torch.equal(inverse[out.gt_index][untied], permuted.gt_index[untied])


# --------------------------------------------------------------------------------------------
# ignore_mask


@given(case=assign_cases(), lq=low_quality_options, data=st.data())
def test_ignored_anchors_are_left_out(case, lq, data):
    b, a = case.gt_valid.shape[0], case.anchors.shape[-2]
    g = torch.Generator().manual_seed(case.generator_seed + 2)
    mask = torch.rand(a, generator=g) < data.draw(st.sampled_from([0.0, 0.3, 1.0]))
    out = _assign(case, ignore_mask=mask, **lq)
    assert bool((out.label[:, mask] == IGNORE).all())
    # the rest is labelled as if the ignored anchors were not there
    anchors = case.anchors[..., ~mask, :]
    subset = assign_max_iou(anchors, case.gt_boxes, case.gt_valid, **case.kwargs(), **lq)
    _assert_equal(Assignment(*(t[:, ~mask] for t in out)), subset)
    # a per-image mask works image by image; an all-False mask is no mask
    per_image = torch.rand(b, a, generator=g) < 0.3
    batched = _assign(case, ignore_mask=per_image, **lq)
    anchors = _batched_anchors(case)
    for i in range(b):
        single = assign_max_iou(
            anchors[i],
            case.gt_boxes[i : i + 1],
            case.gt_valid[i : i + 1],
            ignore_mask=per_image[i],
            **case.kwargs(),
            **lq,
        )
        _assert_equal(single, Assignment(*(t[i : i + 1] for t in batched)))
    _assert_equal(
        _assign(case, ignore_mask=torch.zeros(a, dtype=torch.bool), **lq), _assign(case, **lq)
    )


# --------------------------------------------------------------------------------------------
# Parity with torchvision's Matcher


def _torchvision_assignment(case: Case, gt_valid: torch.Tensor, low_quality: bool):
    """Labels and gt slots from torchvision's Matcher, for the images that have a valid gt."""
    matcher = Matcher(case.pos_iou, case.neg_iou, allow_low_quality_matches=low_quality)
    anchors = _batched_anchors(case)
    rows = []
    for boxes, valid, image_anchors in zip(case.gt_boxes, gt_valid, anchors):
        if not valid.any():
            rows.append(None)
            continue
        slots = valid.nonzero()[:, 0]
        matches = matcher(tv_box_iou(boxes[valid], image_anchors))
        label = torch.full_like(matches, POSITIVE)
        label[matches == Matcher.BELOW_LOW_THRESHOLD] = NEGATIVE
        label[matches == Matcher.BETWEEN_THRESHOLDS] = IGNORE
        rows.append((label.to(torch.int8), slots[matches.clamp(min=0)]))
    return rows


def _assert_matches_torchvision(out: Assignment, rows) -> None:
    for i, row in enumerate(rows):
        if row is None:
            assert bool((out.label[i] == NEGATIVE).all())
            continue
        label, gt_index = row
        assert torch.equal(out.label[i], label)
        pos = label == POSITIVE
        assert torch.equal(out.gt_index[i][pos], gt_index[pos])


@given(case=assign_cases(), low_quality=st.booleans())
def test_matches_torchvision_when_every_gt_overlaps_an_anchor(case, low_quality):
    # slots whose gt overlaps no anchor are dropped: that is where fdet differs on purpose
    gt_valid = case.gt_valid & (_iou_matrix(case).amax(2) > 0)
    out = assign_max_iou(
        case.anchors,
        case.gt_boxes,
        gt_valid,
        **case.kwargs(),
        low_quality_matches=low_quality,
    )
    _assert_matches_torchvision(out, _torchvision_assignment(case, gt_valid, low_quality))


@given(case=assign_cases())
def test_negative_min_low_quality_iou_reproduces_torchvision_exactly(case):
    out = _assign(case, low_quality_matches=True, min_low_quality_iou=-1.0)
    _assert_matches_torchvision(out, _torchvision_assignment(case, case.gt_valid, True))


def test_gt_overlapping_nothing_differs_from_torchvision_on_purpose():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [0, 10, 10, 20]])
    gt_boxes = torch.tensor([[[0.0, 0.0, 9.0, 10.0], [50.0, 50.0, 60.0, 60.0]]])
    gt_valid = torch.tensor([[True, True]])
    kwargs = {"pos_iou": 0.5, "neg_iou": 0.4}
    # torchvision: gt 1 has best IoU 0, reached by every anchor, so all become positive
    tv = Matcher(0.5, 0.4, allow_low_quality_matches=True)(tv_box_iou(gt_boxes[0], anchors))
    assert tv.tolist() == [0, 0, 0]
    out = assign_max_iou(anchors, gt_boxes, gt_valid, **kwargs)
    assert out.label.tolist() == [[POSITIVE, NEGATIVE, NEGATIVE]]
    assert out.gt_index[0, 0] == 0
    quirk = assign_max_iou(anchors, gt_boxes, gt_valid, min_low_quality_iou=-1.0, **kwargs)
    assert quirk.label.tolist() == [[POSITIVE, POSITIVE, POSITIVE]]
    # a zero-area gt behaves the same way, without NaNs
    gt_boxes[0, 1] = torch.tensor([5.0, 5.0, 5.0, 8.0])
    out = assign_max_iou(anchors, gt_boxes, gt_valid, **kwargs)
    assert out.label.tolist() == [[POSITIVE, NEGATIVE, NEGATIVE]]
    assert bool(torch.isfinite(out.iou).all())


def test_thresholds_are_checked():
    case = (torch.zeros(1, 4), torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="neg_iou <= pos_iou"):
        assign_max_iou(*case, pos_iou=0.3, neg_iou=0.4)
    with pytest.raises(ValueError, match="neg_iou <= pos_iou"):
        assign_max_iou(*case, pos_iou=0.3, neg_iou=-0.1)


# --------------------------------------------------------------------------------------------
# Compiler


def _three_ways(anchors, per_image_anchors, gt_boxes, gt_valid, ignore_mask):
    return (
        assign_max_iou(anchors, gt_boxes, gt_valid, pos_iou=0.5, neg_iou=0.4),
        assign_max_iou(
            per_image_anchors,
            gt_boxes,
            gt_valid,
            pos_iou=0.7,
            neg_iou=0.3,
            low_quality_matches=False,
        ),
        assign_max_iou(
            anchors, gt_boxes, gt_valid, pos_iou=0.5, neg_iou=0.5, ignore_mask=ignore_mask
        ),
    )


_compiled_three_ways = torch.compile(_three_ways, fullgraph=True, dynamic=False)


@pytest.mark.compile
@settings(max_examples=15)
@given(case=assign_cases(batch=3, num_gt=5, num_anchors=40, per_image_anchors=False))
def test_compiled_equals_eager(case):
    g = torch.Generator().manual_seed(case.generator_seed + 3)
    per_image = random_boxes(g, (3, 40), image_size=64.0, min_size=4.0, max_size=32.0).round()
    ignore = torch.rand(3, 40, generator=g) < 0.2
    args = (case.anchors, per_image, case.gt_boxes, case.gt_valid, ignore)
    for got, want in zip(_compiled_three_ways(*args), _three_ways(*args)):
        _assert_equal(got, want)


@settings(max_examples=15)
@given(case=assign_cases())
def test_inputs_that_require_grad_give_the_same_assignment(case):
    want = assign_max_iou(case.anchors, case.gt_boxes, case.gt_valid, pos_iou=0.5, neg_iou=0.4)
    got = assign_max_iou(
        case.anchors.clone().requires_grad_(),
        case.gt_boxes.clone().requires_grad_(),
        case.gt_valid,
        pos_iou=0.5,
        neg_iou=0.4,
    )
    assert not got.iou.requires_grad
    _assert_equal(got, want)
