"""Pseudo-label ops (fdet.ops.pseudo): the teacher's confident detections as padded ground truth
(against a per-image Python reference, batched against per image, padding, the compiler), the box
jitter and its spread (hand computations), and the pseudo-labels' precision and recall counts
(against a Python loop over torchvision's box_iou)."""

from __future__ import annotations

import math
import statistics

import hypothesis.strategies as st
import pytest
import torch
import torchvision
from hypothesis import given, settings

from fdet.ops.postprocess import Detections
from fdet.ops.pseudo import (
    PseudoLabels,
    jitter_boxes,
    jitter_std,
    pseudo_labels,
    pseudo_quality,
)
from tests.strategies import random_boxes, seeds

# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def random_detections(
    g: torch.Generator, batch: int, n: int, *, num_classes: int = 4, tie_step: float = 0.1
) -> Detections:
    """Padded detections with scores on a grid of ``tie_step`` (many ties), random validity
    and garbage in invalid slots (NaN boxes, out-of-range labels, high scores)."""
    boxes = random_boxes(g, (batch, n), image_size=100.0, min_size=2.0, max_size=50.0)
    scores = (torch.rand(batch, n, generator=g) / tie_step).floor() * tie_step
    labels = torch.randint(0, num_classes, (batch, n), generator=g)
    valid = torch.rand(batch, n, generator=g) < 0.7
    boxes = torch.where(valid[..., None], boxes, math.nan)
    labels = torch.where(valid, labels, 99)
    scores = torch.where(valid, scores, 0.95)
    return Detections(boxes=boxes, scores=scores, labels=labels, valid=valid)


@st.composite
def detection_cases(draw: st.DrawFn) -> tuple[Detections, float, int]:
    seed = draw(seeds)
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(0, 12))
    threshold = draw(st.sampled_from([0.0, 0.3, 0.5, 0.85, 1.0]))
    max_labels = draw(st.integers(1, 15))
    g = torch.Generator().manual_seed(seed)
    return random_detections(g, batch, n), threshold, max_labels


def reference_pseudo_labels(
    det: Detections, image: int, threshold: float, max_labels: int
) -> list[int]:
    """Indices of the detections one image keeps, in order: a plain Python filter and a stable
    sort by score."""
    n = det.scores.shape[1]
    kept = [i for i in range(n) if det.valid[image, i] and float(det.scores[image, i]) >= threshold]
    kept.sort(key=lambda i: -float(det.scores[image, i]))
    return kept[: min(max_labels, n)]


def assert_same(a: PseudoLabels, b: PseudoLabels) -> None:
    assert torch.equal(a.valid, b.valid)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.boxes, b.boxes)


# ------------------------------------------------------------------------------------------------
# pseudo_labels
# ------------------------------------------------------------------------------------------------


def test_pseudo_labels_hand_case() -> None:
    det = Detections(
        boxes=torch.tensor(
            [
                [[0.0, 0, 10, 10], [1, 1, 5, 5], [2, 2, 8, 9], [3, 3, 4, 4], [5, 5, 9, 9]],
                [[0.0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3], [0, 0, 4, 4], [0, 0, 5, 5]],
            ]
        ),
        scores=torch.tensor([[0.4, 0.9, 0.6, 0.95, 0.6], [0.2, 0.1, 0.3, 0.0, 0.45]]),
        labels=torch.tensor([[1, 2, 0, 3, 4], [0, 1, 2, 3, 4]]),
        valid=torch.tensor([[True, True, True, False, True], [True, True, True, True, True]]),
    )
    out = pseudo_labels(det, score_threshold=0.5, max_labels=3)
    # image 0: slot 3 (0.95) is invalid; 0.9, then the two 0.6 in their order; 0.4 is below
    assert out.valid.tolist() == [[True, True, True], [False, False, False]]
    assert out.labels.tolist() == [[2, 0, 4], [0, 0, 0]]
    assert out.labels.dtype == torch.int64
    torch.testing.assert_close(out.scores, torch.tensor([[0.9, 0.6, 0.6], [0.0, 0.0, 0.0]]))
    assert out.boxes.tolist() == [
        [[1, 1, 5, 5], [2, 2, 8, 9], [5, 5, 9, 9]],
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    ]
    # more slots than detections: K = N
    wide = pseudo_labels(det, score_threshold=0.0, max_labels=50)
    assert wide.boxes.shape == (2, 5, 4)
    assert wide.valid.sum(1).tolist() == [4, 5]
    assert wide.scores[1].tolist() == pytest.approx([0.45, 0.3, 0.2, 0.1, 0.0])


@given(case=detection_cases())
@settings(max_examples=40)
def test_pseudo_labels_keep_the_best_valid_detections_above_the_threshold(case) -> None:
    det, threshold, max_labels = case
    out = pseudo_labels(det, score_threshold=threshold, max_labels=max_labels)
    batch, n = det.scores.shape
    k = min(max_labels, n)
    assert out.boxes.shape == (batch, k, 4) and out.valid.shape == (batch, k)
    for b in range(batch):
        kept = reference_pseudo_labels(det, b, threshold, max_labels)
        count = len(kept)
        assert out.valid[b].tolist() == [True] * count + [False] * (k - count)
        assert torch.equal(out.boxes[b, :count], det.boxes[b, kept])
        assert torch.equal(out.scores[b, :count], det.scores[b, kept])
        assert torch.equal(out.labels[b, :count], det.labels[b, kept])
        # padding: zero box, label 0, score 0
        assert (out.boxes[b, count:] == 0).all() and (out.labels[b, count:] == 0).all()
        assert (out.scores[b, count:] == 0).all()


@given(case=detection_cases())
@settings(max_examples=25)
def test_pseudo_labels_batched_equals_per_image(case) -> None:
    det, threshold, max_labels = case
    out = pseudo_labels(det, score_threshold=threshold, max_labels=max_labels)
    for b in range(det.scores.shape[0]):
        one = Detections(*(t[b : b + 1] for t in det[:4]))
        assert_same(
            pseudo_labels(one, score_threshold=threshold, max_labels=max_labels),
            PseudoLabels(*(t[b : b + 1] for t in out)),
        )


@given(case=detection_cases(), extra=st.integers(1, 6), seed=seeds)
@settings(max_examples=25)
def test_pseudo_labels_padding_is_invisible(case, extra, seed) -> None:
    """Invalid slots with garbage, inserted anywhere, change nothing but the number of padded
    slots at the end."""
    det, threshold, max_labels = case
    g = torch.Generator().manual_seed(seed)
    batch, n = det.scores.shape
    garbage = random_detections(g, batch, extra)
    garbage = garbage._replace(valid=torch.zeros(batch, extra, dtype=torch.bool))
    order = torch.randperm(n + extra, generator=g)  # a random interleaving that keeps ...
    position = order.argsort()  # ... the original slots in their order: sort the positions
    first, second = position[:n].sort().values, position[n:].sort().values
    padded = []
    for a, b in zip(det[:4], garbage[:4]):
        shape = (batch, n + extra, *a.shape[2:])
        t = torch.empty(shape, dtype=a.dtype)
        t[:, first], t[:, second] = a, b
        padded.append(t)
    out = pseudo_labels(det, score_threshold=threshold, max_labels=max_labels)
    wide = pseudo_labels(Detections(*padded), score_threshold=threshold, max_labels=max_labels)
    k = out.valid.shape[1]
    assert_same(PseudoLabels(*(t[:, :k] for t in wide)), out)
    assert not wide.valid[:, k:].any() and (wide.boxes[:, k:] == 0).all()


def test_pseudo_labels_never_keep_nan_scores_and_carry_no_gradient() -> None:
    boxes = torch.tensor([[[0.0, 0, 4, 4], [1, 1, 5, 5]]], requires_grad=True)
    scores = torch.tensor([[math.nan, 0.7]], requires_grad=True)
    det = Detections(boxes, scores, torch.tensor([[1, 2]]), torch.tensor([[True, True]]))
    out = pseudo_labels(det, score_threshold=0.0, max_labels=2)
    assert out.valid.tolist() == [[True, False]] and out.labels.tolist() == [[2, 0]]
    assert not out.boxes.requires_grad and not out.scores.requires_grad


def test_pseudo_labels_reject_bad_arguments() -> None:
    det = random_detections(torch.Generator().manual_seed(0), 1, 3)
    with pytest.raises(ValueError, match="max_labels"):
        pseudo_labels(det, score_threshold=0.5, max_labels=0)
    with pytest.raises(ValueError, match="score_threshold"):
        pseudo_labels(det, score_threshold=math.nan, max_labels=2)
    flat = det._replace(boxes=det.boxes[0], scores=det.scores[0])
    with pytest.raises(ValueError, match=r"detections\.boxes.*\[B, N, 4\]"):
        pseudo_labels(flat, score_threshold=0.5, max_labels=2)


# ------------------------------------------------------------------------------------------------
# jitter_boxes and jitter_std
# ------------------------------------------------------------------------------------------------


def test_jitter_with_scale_zero_gives_copies() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(g, (2, 5), min_size=0.0, degenerate_fraction=0.3)
    out = jitter_boxes(boxes, times=4, scale=0.0, generator=g)
    assert out.shape == (2, 5, 4, 4)
    assert torch.equal(out, boxes[:, :, None, :].expand(-1, -1, 4, -1))


def test_jitter_offsets_hand_case() -> None:
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 60.0], [5.0, 5.0, 5.5, 5.0]]])  # 20×40; 0.5×0
    noise = torch.tensor(
        [[[[1.0, -1.0, 0.5, 2.0], [0.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]] * 2]]
    )  # [1, 2, 2, 4]
    out = jitter_boxes(boxes, times=2, scale=0.1, noise=noise)
    # box 0: offsets 0.1 · (20, 40, 20, 40) · n
    assert out[0, 0, 0].tolist() == pytest.approx([12.0, 16.0, 31.0, 68.0])
    assert out[0, 0, 1].tolist() == [10.0, 20.0, 30.0, 60.0]
    # box 1: sides below 1 px are taken as 1 px: every coordinate moves by 0.1
    assert out[0, 1, 0].tolist() == pytest.approx([5.1, 5.1, 5.6, 5.1])
    # crossed sides are put in order: x1 moves by 6 · 0.2 · 20 = 24 to 34, past x2 = 30
    crossed = jitter_boxes(
        boxes[:, :1], times=1, scale=0.2, noise=torch.tensor([[[[6.0, 0, 0, 0]]]])
    )
    assert crossed[0, 0, 0].tolist() == pytest.approx([30.0, 20.0, 34.0, 60.0])


@given(seed=seeds, times=st.integers(1, 5), scale=st.sampled_from([0.01, 0.06, 0.5, 2.0]))
@settings(max_examples=20)
def test_jitter_keeps_corners_ordered_and_follows_the_generator(seed, times, scale) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(g, (2, 6), min_size=0.0, degenerate_fraction=0.3)
    out = jitter_boxes(boxes, times=times, scale=scale, generator=torch.Generator().manual_seed(3))
    again = jitter_boxes(
        boxes, times=times, scale=scale, generator=torch.Generator().manual_seed(3)
    )
    assert out.shape == (2, 6, times, 4) and torch.equal(out, again)
    assert (out[..., 2] >= out[..., 0]).all() and (out[..., 3] >= out[..., 1]).all()
    # the same draws given as noise: unsorted corners are the box plus noise · scale · size
    noise = torch.randn(2, 6, times, 4, generator=torch.Generator().manual_seed(3))
    size = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1.0).repeat(1, 1, 2)[:, :, None]
    moved = boxes[:, :, None] + noise * scale * size
    want = torch.cat(
        (moved[..., :2].minimum(moved[..., 2:]), moved[..., :2].maximum(moved[..., 2:])), -1
    )
    torch.testing.assert_close(out, want)


def test_jitter_spread_matches_the_scale() -> None:
    """Over many copies the offsets' standard deviation is scale × the side."""
    boxes = torch.tensor([[[100.0, 100.0, 300.0, 150.0]]])  # 200 × 50
    out = jitter_boxes(boxes, times=20000, scale=0.05, generator=torch.Generator().manual_seed(0))
    offsets = out[0, 0] - boxes[0, 0]  # [J, 4]; sides never cross at this scale
    torch.testing.assert_close(offsets.mean(0), torch.zeros(4), atol=0.1, rtol=0)
    torch.testing.assert_close(
        offsets.std(0), torch.tensor([10.0, 2.5, 10.0, 2.5]), rtol=0.03, atol=0
    )


def test_jitter_rejects_bad_arguments() -> None:
    boxes = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="times"):
        jitter_boxes(boxes, times=0, scale=0.1)
    with pytest.raises(ValueError, match="scale"):
        jitter_boxes(boxes, times=2, scale=-0.1)
    with pytest.raises(ValueError, match="noise"):
        jitter_boxes(boxes, times=2, scale=0.1, noise=torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"boxes.*\[B, K, 4\]"):
        jitter_boxes(torch.zeros(2, 4), times=2, scale=0.1)


def test_std_of_identical_copies_is_zero() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(g, (2, 3), min_size=1.0)
    copies = boxes[:, :, None].expand(-1, -1, 7, -1)
    assert torch.equal(jitter_std(copies, boxes), torch.zeros(2, 3))
    assert torch.equal(jitter_std(boxes[:, :, None], boxes), torch.zeros(2, 3))  # J = 1


def test_std_of_known_offsets() -> None:
    boxes = torch.tensor([[[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 0.5, 0.0]]])  # 20×40; tiny
    refined = boxes[:, :, None].repeat(1, 1, 3, 1)  # [1, 2, 3, 4]
    refined[0, 0, :, 0] += torch.tensor([-1.0, 0.0, 1.0])  # x1: std 1 (Bessel), / w 20
    refined[0, 0, :, 3] += torch.tensor([0.0, 0.0, 6.0])  # y2: std sqrt(12), / h 40
    refined[0, 1, :, 1] += torch.tensor([2.0, 4.0, 9.0])  # y1: sides clamped to 1 px
    got = jitter_std(refined, boxes)
    box0 = (1.0 / 20 + math.sqrt(12.0) / 40) / 4
    box1 = statistics.stdev([2.0, 4.0, 9.0]) / 1.0 / 4
    torch.testing.assert_close(got, torch.tensor([[box0, box1]]))


def test_std_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        jitter_std(torch.zeros(1, 3, 5, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=r"refined.*\[B, K, J, 4\]"):
        jitter_std(torch.zeros(3, 5, 4), torch.zeros(1, 3, 4))


# ------------------------------------------------------------------------------------------------
# pseudo_quality
# ------------------------------------------------------------------------------------------------


def reference_quality(
    pseudo: PseudoLabels, gt_boxes, gt_labels, gt_valid, iou_threshold: float
) -> tuple[float, float, float, float]:
    hits = count = found = gts = 0
    for b in range(pseudo.boxes.shape[0]):
        p = [i for i in range(pseudo.boxes.shape[1]) if pseudo.valid[b, i]]
        g = [j for j in range(gt_boxes.shape[1]) if gt_valid[b, j]]
        iou = torchvision.ops.box_iou(pseudo.boxes[b, p], gt_boxes[b, g])  # [P, G]
        match = [
            [
                float(iou[a, c]) >= iou_threshold
                and int(pseudo.labels[b, i]) == int(gt_labels[b, j])
                for c, j in enumerate(g)
            ]
            for a, i in enumerate(p)
        ]
        hits += sum(any(row) for row in match)
        found += sum(any(match[a][c] for a in range(len(p))) for c in range(len(g)))
        count += len(p)
        gts += len(g)
    return float(hits), float(count), float(found), float(gts)


@st.composite
def quality_cases(draw: st.DrawFn):
    seed = draw(seeds)
    batch, k, m = draw(st.integers(1, 3)), draw(st.integers(0, 8)), draw(st.integers(0, 6))
    g = torch.Generator().manual_seed(seed)
    gt_boxes = random_boxes(g, (batch, m), image_size=60.0, min_size=4.0, max_size=30.0)
    gt_labels = torch.randint(0, 3, (batch, m), generator=g)
    gt_valid = torch.rand(batch, m, generator=g) < 0.8
    # pseudo-labels: noisy copies of gts (many overlaps) and random boxes
    source = torch.randint(0, max(m, 1), (batch, k), generator=g)
    near = (
        gt_boxes.gather(1, source[..., None].expand(-1, -1, 4)) if m else torch.zeros(batch, k, 4)
    )
    near = near + torch.randn(batch, k, 4, generator=g) * 3
    far = random_boxes(g, (batch, k), image_size=60.0, min_size=4.0, max_size=30.0)
    pick = torch.rand(batch, k, 1, generator=g) < 0.7
    boxes = torch.where(pick, near, far)
    boxes = torch.cat(
        (boxes[..., :2].minimum(boxes[..., 2:]), boxes[..., :2].maximum(boxes[..., 2:])), -1
    )
    labels = torch.where(
        torch.rand(batch, k, generator=g) < 0.8,
        gt_labels.gather(1, source) if m else torch.zeros(batch, k, dtype=torch.long),
        torch.randint(0, 3, (batch, k), generator=g),
    )
    valid = torch.rand(batch, k, generator=g) < 0.8
    pseudo = PseudoLabels(
        boxes=torch.where(valid[..., None], boxes, 0.0),
        labels=torch.where(valid, labels, 0),
        scores=torch.where(valid, 0.9, 0.0).expand(batch, k),
        valid=valid,
    )
    gt_boxes = torch.where(gt_valid[..., None], gt_boxes, math.nan)  # padded gts hold garbage
    gt_labels = torch.where(gt_valid, gt_labels, -3)
    threshold = draw(st.sampled_from([0.3, 0.5, 0.75]))
    return pseudo, gt_boxes, gt_labels, gt_valid, threshold


@given(case=quality_cases())
@settings(max_examples=40)
def test_quality_matches_a_python_loop(case) -> None:
    pseudo, gt_boxes, gt_labels, gt_valid, threshold = case
    got = pseudo_quality(pseudo, gt_boxes, gt_labels, gt_valid, iou_threshold=threshold)
    assert all(t.dtype == torch.float32 and t.ndim == 0 for t in got)
    want = reference_quality(pseudo, gt_boxes, gt_labels, gt_valid, threshold)
    assert tuple(float(t) for t in got) == want


def test_quality_hand_case() -> None:
    pseudo = PseudoLabels(
        boxes=torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]]]),
        labels=torch.tensor([[1, 2, 1, 0]]),
        scores=torch.tensor([[0.9, 0.8, 0.7, 0.0]]),
        valid=torch.tensor([[True, True, True, False]]),
    )
    gt_boxes = torch.tensor([[[0.0, 0, 10, 12], [21, 21, 31, 31], [0, 0, 10, 10]]])
    gt_labels = torch.tensor([[1, 1, 0]])
    # pseudo 0 hits gt 0 (IoU 10/12); pseudo 1 has no class-2 gt; pseudo 2 and gt 1: IoU 81/119
    # gt 2 (class 0) is padding: the padded pseudo slot (label 0, zero box) must not count
    got = pseudo_quality(pseudo, gt_boxes, gt_labels, torch.tensor([[True, True, False]]))
    assert [float(t) for t in got] == [2.0, 3.0, 2.0, 2.0]
    strict = pseudo_quality(
        pseudo, gt_boxes, gt_labels, torch.tensor([[True, True, False]]), iou_threshold=0.75
    )
    assert [float(t) for t in strict] == [1.0, 3.0, 1.0, 2.0]


def test_quality_rejects_bad_arguments() -> None:
    pseudo = PseudoLabels(
        torch.zeros(1, 2, 4),
        torch.zeros(1, 2),
        torch.zeros(1, 2),
        torch.zeros(1, 2, dtype=torch.bool),
    )
    gts = (torch.zeros(1, 3, 4), torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="iou_threshold"):
        pseudo_quality(pseudo, *gts, iou_threshold=0.0)
    with pytest.raises(ValueError, match="images"):
        pseudo_quality(pseudo, torch.zeros(2, 3, 4), *gts[1:])


# ------------------------------------------------------------------------------------------------
# The compiler
# ------------------------------------------------------------------------------------------------


def _teacher_steps(det: Detections, noise, gt_boxes, gt_labels, gt_valid):
    pseudo = pseudo_labels(det, score_threshold=0.3, max_labels=6)
    jittered = jitter_boxes(pseudo.boxes, times=noise.shape[2], scale=0.06, noise=noise)
    spread = jitter_std(jittered, pseudo.boxes)
    return pseudo, jittered, spread, pseudo_quality(pseudo, gt_boxes, gt_labels, gt_valid)


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    g = torch.Generator().manual_seed(5)
    det = random_detections(g, 2, 10)
    noise = torch.randn(2, 6, 4, 4, generator=g)
    gt_boxes = torch.cat((det.boxes[:, :3].nan_to_num(), random_boxes(g, (2, 2))), dim=1)
    gt_labels = torch.cat((det.labels[:, :3] % 4, torch.randint(0, 4, (2, 2), generator=g)), 1)
    gt_valid = torch.rand(2, 5, generator=g) < 0.8
    args = (det, noise, gt_boxes, gt_labels, gt_valid)
    compiled = torch.compile(_teacher_steps, fullgraph=True)
    got, want = compiled(*args), _teacher_steps(*args)
    assert_same(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
    for a, b in zip(got[3], want[3]):
        assert torch.equal(a, b)
