"""The RoI stage ops (fdet.ops.roi): the FPN level rule and multi-scale RoI Align against
torchvision's LevelMapper and MultiScaleRoIAlign, RoI labelling and sampling against a literal
per-image reading (padding, batching, appended gts, crowds), class-specific deltas, the
per-class postprocess against a per-image torchvision reference, and the compiler."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import (
    MultiScaleRoIAlign,
    box_iou,
    clip_boxes_to_image,
    remove_small_boxes,
    roi_align,
)
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops.poolers import LevelMapper

from fdet.ops.coding import decode_deltas
from fdet.ops.roi import (
    SampledRoIs,
    multiscale_roi_align,
    roi_detections,
    roi_levels,
    sample_rois,
    select_class_deltas,
)
from tests.strategies import random_boxes, seeds

LEVELS = (2, 3, 4, 5)
STDS = (0.1, 0.1, 0.2, 0.2)


# ---------------------------------------------------------------------------------------------
# Level rule and pooling
# ---------------------------------------------------------------------------------------------


def _level(side: float, **kw) -> int:
    boxes = torch.tensor([[10.0, 20.0, 10.0 + side, 20.0 + side]])
    kw = {"min_level": 2, "max_level": 5, "canonical_scale": 224.0, "canonical_level": 4} | kw
    return int(roi_levels(boxes, **kw)[0])


def test_level_rule_by_hand() -> None:
    assert _level(224) == 4  # canonical
    assert _level(112) == 3 and _level(56) == 2 and _level(448) == 5
    assert _level(223.9) == 3  # just below a power of two
    assert _level(28) == 2 and _level(0) == 2  # clamped below, zero area at the bottom
    assert _level(5000) == 5  # clamped above
    assert _level(224, canonical_level=3) == 3 and _level(100, canonical_scale=100.0) == 4


@given(seed=seeds, n=st.integers(1, 50))
def test_level_rule_matches_torchvision(seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(g, (n,), image_size=800, min_size=0, max_size=900).round()
    boxes[:3] = torch.tensor([0.0, 0.0, 112.0, 112.0])  # exact powers of two
    want = LevelMapper(2, 5)([boxes]) + 2
    got = roi_levels(boxes, min_level=2, max_level=5, canonical_scale=224.0, canonical_level=4)
    torch.testing.assert_close(got, want)


def _pyramid(g: torch.Generator, batch: int, channels: int, size: int) -> list[torch.Tensor]:
    return [
        torch.randn(
            batch, channels, math.ceil(size / 2**lvl), math.ceil(size / 2**lvl), generator=g
        )
        for lvl in LEVELS
    ]


def _align(features, boxes, **kw):
    kw = {"levels": LEVELS, "output_size": 7, "sampling_ratio": 2} | kw
    return multiscale_roi_align(features, boxes, canonical_scale=224.0, canonical_level=4, **kw)


@settings(max_examples=15)
@given(
    seed=seeds,
    batch=st.integers(1, 3),
    rois=st.integers(1, 12),
    image=st.sampled_from([96, 128, 160]),
)
def test_multiscale_roi_align_matches_torchvision(seed, batch, rois, image) -> None:
    """Values and feature gradients equal torchvision's MultiScaleRoIAlign (whose scales,
    inferred from these feature and image sizes, are 2**-level)."""
    g = torch.Generator().manual_seed(seed)
    features = [f.requires_grad_() for f in _pyramid(g, batch, 4, image)]
    boxes = random_boxes(g, (batch, rois), image_size=image, min_size=1, max_size=image)
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    named = OrderedDict((str(i), f) for i, f in enumerate(features))
    want = pool(named, list(boxes.unbind(0)), [(image, image)] * batch)  # [B*R, C, 7, 7]
    assert pool.scales == [2.0**-lvl for lvl in LEVELS]
    got = _align(features, boxes)
    assert got.shape == (batch, rois, 4, 7, 7)
    torch.testing.assert_close(got.flatten(0, 1), want, rtol=0, atol=0)
    upstream = torch.randn(want.shape, generator=g)
    want_grads = torch.autograd.grad(want, features, upstream)
    got_grads = torch.autograd.grad(got.flatten(0, 1), features, upstream)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_multiscale_roi_align_levels_options() -> None:
    """Each RoI equals roi_align from its own level, with aligned sampling and adaptive
    sampling too; non-finite boxes pool zeros."""
    g = torch.Generator().manual_seed(0)
    features = _pyramid(g, 2, 3, 128)
    boxes = random_boxes(g, (2, 6), image_size=128, min_size=4, max_size=128)
    boxes[1, 5] = math.nan
    levels = roi_levels(boxes, min_level=2, max_level=5, canonical_scale=224.0, canonical_level=4)
    for aligned, ratio in ((False, 2), (True, 2), (False, 0), (True, -1)):
        got = _align(features, boxes, aligned=aligned, sampling_ratio=ratio, output_size=(5, 3))
        for b in range(2):
            for r in range(6):
                if r == 5 and b == 1:
                    assert (got[b, r] == 0).all()
                    continue
                lvl = int(levels[b, r])
                roi = torch.cat((torch.tensor([0.0]), boxes[b, r]))[None]
                want = roi_align(
                    features[lvl - 2][b : b + 1], roi, (5, 3), 2.0**-lvl, ratio, aligned
                )
                torch.testing.assert_close(got[b, r], want[0], rtol=0, atol=0)


def test_multiscale_roi_align_of_rois_packed_in_one_row() -> None:
    """``image`` names each RoI's image: RoIs of three images in one row, in any order, pool
    as in the ``[B, R]`` layout, gradients too."""
    g = torch.Generator().manual_seed(1)
    features = [f.requires_grad_() for f in _pyramid(g, 3, 2, 96)]
    boxes = random_boxes(g, (3, 5), image_size=96, min_size=2, max_size=96)
    whole = _align(features, boxes)
    order = torch.randperm(15, generator=g)
    image = torch.arange(3).repeat_interleave(5)[order][None]  # [1, 15]
    packed = _align(features, boxes.reshape(1, 15, 4)[:, order], image=image)
    assert packed.shape == (1, 15, 2, 7, 7)
    torch.testing.assert_close(packed[0], whole.flatten(0, 1)[order], rtol=0, atol=0)
    upstream = torch.randn(whole.shape, generator=g)
    want = torch.autograd.grad(whole, features, upstream)
    got = torch.autograd.grad(packed[0], features, upstream.flatten(0, 1)[order])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="image indices"):
        _align(features, boxes, image=image)


@pytest.mark.compile
def test_pyramid_operator_passes_opcheck_and_compiles_with_gradients() -> None:
    """``fdet::roi_align_levels`` and its backward: torch.library's checks (schema, fake
    kernel, autograd registration), and forward and feature gradients under
    ``torch.compile(fullgraph=True)`` equal to eager, with a level no RoI lands on."""
    g = torch.Generator().manual_seed(4)
    features = [f.requires_grad_() for f in _pyramid(g, 2, 3, 128)]
    boxes = random_boxes(g, (2, 5), image_size=64, min_size=8, max_size=64)
    boxes[1, 4] = math.nan  # pooled from no level
    kw = {"canonical_scale": 224.0, "canonical_level": 4, "levels": LEVELS}
    kw |= {"output_size": 7, "sampling_ratio": 2}
    level = roi_levels(boxes, min_level=2, max_level=5, canonical_scale=224.0, canonical_level=4)
    assert not (level == 5).any()  # P5 gets no RoI: its gradient is zeros
    rois = torch.cat((torch.arange(2.0).repeat_interleave(5)[:, None], boxes.reshape(-1, 4)), 1)
    index = torch.where(rois[:, 1:].isfinite().all(1), level.flatten() - 2, -1)
    rois = torch.where(rois.isfinite(), rois, 0.0)
    args = (features, rois, index, [2.0**-lvl for lvl in LEVELS], 7, 7, 2, False)
    torch.library.opcheck(torch.ops.fdet.roi_align_levels.default, args)

    def run(*features):
        return multiscale_roi_align(list(features), boxes, **kw)

    want = run(*features)
    upstream = torch.randn(want.shape, generator=g)
    want_grads = torch.autograd.grad(want, features, upstream)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    got = compiled(*features)
    got_grads = torch.autograd.grad(got, features, upstream)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[1, 4] == 0).all()
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (got_grads[3] == 0).all() and got_grads[0].abs().sum() > 0


def test_half_precision_features_pool_in_float32() -> None:
    """bfloat16 features are pooled at float32 RoI coordinates (not rounded to bfloat16)."""
    g = torch.Generator().manual_seed(2)
    features = [f.to(torch.bfloat16) for f in _pyramid(g, 1, 3, 128)]
    boxes = random_boxes(g, (1, 6), image_size=128, min_size=4, max_size=128) + 0.3
    got = _align(features, boxes)
    assert got.dtype == torch.bfloat16
    want = _align([f.float() for f in features], boxes).to(torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_multiscale_roi_align_one_level_and_errors() -> None:
    g = torch.Generator().manual_seed(1)
    feature = torch.randn(1, 2, 16, 16, generator=g)
    boxes = torch.tensor([[[0.0, 0.0, 500.0, 500.0], [3.0, 3.0, 9.0, 12.0]]])
    got = _align([feature], boxes, levels=(3,))
    rois = torch.cat((torch.zeros(2, 1), boxes[0]), dim=1)
    torch.testing.assert_close(got[0], roi_align(feature, rois, 7, 1 / 8, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="consecutive"):
        _align([feature, feature], boxes, levels=(3, 5))
    with pytest.raises(ValueError, match="feature maps"):
        _align([feature], boxes, levels=(3, 4))


# ---------------------------------------------------------------------------------------------
# Labelling and sampling
# ---------------------------------------------------------------------------------------------


class Case(NamedTuple):
    boxes: torch.Tensor  # [B, R, 4]
    valid: torch.Tensor  # [B, R]
    gt_boxes: torch.Tensor  # [B, M, 4]
    gt_labels: torch.Tensor  # [B, M]
    gt_valid: torch.Tensor  # [B, M]
    gt_crowd: torch.Tensor | None
    keys: torch.Tensor  # [B, R + M]
    pos_iou: float
    neg_iou: float
    num_samples: int
    fraction: float

    def sample(self, **changes) -> SampledRoIs:
        c = self._replace(**changes)
        return sample_rois(
            c.boxes,
            c.valid,
            c.gt_boxes,
            c.gt_labels,
            c.gt_valid,
            c.gt_crowd,
            pos_iou=c.pos_iou,
            neg_iou=c.neg_iou,
            num_samples=c.num_samples,
            positive_fraction=c.fraction,
            stds=STDS,
            keys=c.keys,
        )


@st.composite
def roi_cases(draw: st.DrawFn, *, crowd: bool = True) -> Case:
    """Proposals scattered over small images and jittered copies of the gts (so that there are
    positives, near-threshold IoUs and duplicates), padded proposals and gt slots (NaN boxes)."""
    g = torch.Generator().manual_seed(draw(seeds))
    b, r, m = draw(st.integers(1, 3)), draw(st.integers(0, 30)), draw(st.integers(0, 5))
    gt_boxes = random_boxes(g, (b, m), image_size=64, min_size=6, max_size=40)
    if m >= 2 and draw(st.booleans()):
        gt_boxes[:, 1] = gt_boxes[:, 0]  # a duplicated gt
    boxes = random_boxes(g, (b, r), image_size=64, min_size=2, max_size=48)
    if m and r:
        near = torch.randint(0, m, (b, r), generator=g)
        jitter = torch.randn(b, r, 4, generator=g) * draw(st.sampled_from([1.0, 4.0]))
        copies = gt_boxes.gather(1, near[..., None].expand(-1, -1, 4)) + jitter
        pick = torch.rand(b, r, generator=g) < 0.5
        boxes = torch.where(pick[..., None], copies, boxes)
        boxes = torch.cat(
            (boxes[..., :2].minimum(boxes[..., 2:]), boxes[..., :2].maximum(boxes[..., 2:])), -1
        )
    if draw(st.booleans()):
        boxes, gt_boxes = boxes.round(), gt_boxes.round()
    valid = torch.rand(b, r, generator=g) < draw(st.sampled_from([1.0, 0.7]))
    gt_valid = torch.rand(b, m, generator=g) < draw(st.sampled_from([1.0, 0.7]))
    gt_crowd = None
    if crowd and draw(st.booleans()):
        gt_crowd = torch.rand(b, m, generator=g) < 0.3
    gt_boxes = torch.where(gt_valid[..., None], gt_boxes, math.nan)
    gt_labels = torch.randint(0, 4, (b, m), generator=g)
    pos_iou = draw(st.sampled_from([0.5, 0.6, 0.7]))
    neg_iou = draw(st.sampled_from([pos_iou, 0.3]))
    return Case(
        boxes=boxes,
        valid=valid,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_valid=gt_valid,
        gt_crowd=gt_crowd,
        keys=torch.rand(b, r + m, generator=g),
        pos_iou=pos_iou,
        neg_iou=neg_iou,
        num_samples=draw(st.sampled_from([4, 16, 64])),
        fraction=draw(st.sampled_from([0.25, 0.5, 1.0])),
    )


def _reference(case: Case, b: int) -> SampledRoIs:
    """One image, literally: append the matchable gts, label by max IoU, take the positives
    then the negatives with the largest keys, in candidate order."""
    boxes, valid = case.boxes[b], case.valid[b]
    r = boxes.shape[0]
    crowd = (
        torch.zeros_like(case.gt_valid[b]) if case.gt_crowd is None else case.gt_crowd[b]
    ) & case.gt_valid[b]
    matchable = case.gt_valid[b] & ~crowd
    candidates = [(boxes[i], bool(valid[i])) for i in range(r)]
    candidates += [(case.gt_boxes[b, j], bool(matchable[j])) for j in range(len(matchable))]
    pos, neg, gt_of = [], [], {}
    for i, (box, ok) in enumerate(candidates):
        if not ok:
            continue
        ious = [
            float(box_iou(box[None], case.gt_boxes[b, j][None])[0, 0]) if matchable[j] else -1.0
            for j in range(len(matchable))
        ]
        best = max(ious, default=-1.0)
        covered = any(
            bool(crowd[j]) and float(_ioa(box, case.gt_boxes[b, j])) > 0.5
            for j in range(len(matchable))
        )
        if best >= case.pos_iou:
            pos.append(i)
            gt_of[i] = ious.index(best)
        elif best < case.neg_iou and not covered:
            neg.append(i)
    keys = case.keys[b]
    num_pos = min(len(pos), int(case.num_samples * case.fraction))
    pos = sorted(sorted(pos, key=lambda i: -float(keys[i]))[:num_pos])
    num_neg = min(len(neg), case.num_samples - num_pos)
    neg = sorted(sorted(neg, key=lambda i: -float(keys[i]))[:num_neg])
    chosen = sorted(pos + neg)
    s = case.num_samples
    out_boxes = torch.zeros(s, 4)
    labels = torch.zeros(s, dtype=torch.int64)
    valid_out = torch.zeros(s, dtype=torch.bool)
    targets = torch.zeros(s, 4)
    gt_index = torch.zeros(s, dtype=torch.int64)
    for slot, i in enumerate(chosen):
        out_boxes[slot] = candidates[i][0]
        valid_out[slot] = True
        targets[slot] = candidates[i][0]
        if i in gt_of:
            labels[slot] = int(case.gt_labels[b, gt_of[i]]) + 1
            targets[slot] = case.gt_boxes[b, gt_of[i]]
            gt_index[slot] = gt_of[i]
    return SampledRoIs(
        out_boxes,
        labels,
        gt_index,
        valid_out,
        targets,
        targets,
        torch.tensor(chosen, dtype=torch.int64),
    )


def _ioa(box: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(box[:2], region[:2])
    rb = torch.minimum(box[2:], region[2:])
    inter = (rb - lt).clamp(min=0).prod()
    area = (box[2:] - box[:2]).clamp(min=0).prod()
    return inter / area if area > 0 else torch.tensor(0.0)


def _check_against_reference(got: SampledRoIs, case: Case) -> None:
    for b in range(case.boxes.shape[0]):
        want = _reference(case, b)
        n = int(want.valid.sum())
        torch.testing.assert_close(got.valid[b], want.valid)
        torch.testing.assert_close(got.roi_index[b, :n], want.roi_index)
        torch.testing.assert_close(got.boxes[b], want.boxes)
        torch.testing.assert_close(got.labels[b], want.labels)
        pos = want.labels > 0
        # a duplicated gt may match either copy: compare the boxes, not the slots
        torch.testing.assert_close(got.target_boxes[b], want.target_boxes)
        if pos.any():
            gt_box = case.gt_boxes[b].gather(0, got.gt_index[b][pos][:, None].expand(-1, 4))
            torch.testing.assert_close(gt_box, want.target_boxes[pos])
        # regression targets decode back to the gts, and are 0 elsewhere
        decoded = decode_deltas(got.boxes[b], got.box_targets[b], stds=STDS, clip=None)
        torch.testing.assert_close(decoded[pos], want.target_boxes[pos], rtol=1e-4, atol=1e-3)
        assert (got.box_targets[b][~pos] == 0).all()


@settings(max_examples=40)
@given(case=roi_cases())
def test_sampling_matches_literal_reference(case: Case) -> None:
    got = case.sample()
    s = case.num_samples
    assert got.boxes.shape == (case.boxes.shape[0], s, 4) and got.labels.dtype == torch.int64
    _check_against_reference(got, case)


@settings(max_examples=25)
@given(case=roi_cases(), extra_rois=st.integers(1, 5), extra_gts=st.integers(1, 3))
def test_padding_is_invisible(case: Case, extra_rois: int, extra_gts: int) -> None:
    b, r, _ = case.boxes.shape
    m = case.gt_valid.shape[1]
    want = case.sample()
    keys_r, keys_m = case.keys[:, :r], case.keys[:, r:]
    padded = case._replace(
        boxes=torch.cat((case.boxes, torch.full((b, extra_rois, 4), math.nan)), dim=1),
        valid=torch.cat((case.valid, torch.zeros(b, extra_rois, dtype=torch.bool)), dim=1),
        gt_boxes=torch.cat((case.gt_boxes, torch.full((b, extra_gts, 4), math.nan)), dim=1),
        gt_labels=torch.cat((case.gt_labels, torch.full((b, extra_gts), 7)), dim=1),
        gt_valid=torch.cat((case.gt_valid, torch.zeros(b, extra_gts, dtype=torch.bool)), dim=1),
        gt_crowd=None
        if case.gt_crowd is None
        else torch.cat((case.gt_crowd, torch.ones(b, extra_gts, dtype=torch.bool)), dim=1),
        keys=torch.cat(
            (keys_r, torch.rand(b, extra_rois), keys_m, torch.rand(b, extra_gts)), dim=1
        ),
    )
    got = padded.sample()
    for name in ("boxes", "labels", "valid", "target_boxes", "box_targets"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
    pos = want.positive
    torch.testing.assert_close(got.gt_index[pos], want.gt_index[pos])
    # the index moves by the padded proposals for appended gts only
    shift = torch.where(want.roi_index >= r, extra_rois, 0)
    assert m == 0 or torch.equal(got.roi_index[want.valid], (want.roi_index + shift)[want.valid])


@settings(max_examples=20)
@given(case=roi_cases())
def test_batched_equals_per_image(case: Case) -> None:
    got = case.sample()
    for b in range(case.boxes.shape[0]):
        one = case._replace(
            boxes=case.boxes[b : b + 1],
            valid=case.valid[b : b + 1],
            gt_boxes=case.gt_boxes[b : b + 1],
            gt_labels=case.gt_labels[b : b + 1],
            gt_valid=case.gt_valid[b : b + 1],
            gt_crowd=None if case.gt_crowd is None else case.gt_crowd[b : b + 1],
            keys=case.keys[b : b + 1],
        ).sample()
        for name, value in one._asdict().items():
            torch.testing.assert_close(getattr(got, name)[b : b + 1], value, msg=name)


@settings(max_examples=30)
@given(case=roi_cases())
def test_every_gt_is_its_own_positive(case: Case) -> None:
    """With room for every candidate, each valid non-crowd gt is sampled as a positive RoI
    (itself, IoU 1) of its own class; crowd gts are never matched nor appended."""
    b, r, _ = case.boxes.shape
    m = case.gt_valid.shape[1]
    got = case.sample(num_samples=r + m + 1, fraction=1.0)
    crowd = torch.zeros_like(case.gt_valid) if case.gt_crowd is None else case.gt_crowd
    for i in range(b):
        for j in range(m):
            slot = (got.roi_index[i] == r + j) & got.valid[i]
            if case.gt_valid[i, j] and not crowd[i, j]:
                assert slot.sum() == 1
                # itself, or an identical gt in a lower slot (and that one's class)
                matched = int(got.gt_index[i][slot])
                assert matched <= j
                torch.testing.assert_close(case.gt_boxes[i, matched], case.gt_boxes[i, j])
                assert int(got.labels[i][slot]) == int(case.gt_labels[i, matched]) + 1
            else:
                assert slot.sum() == 0
        if case.gt_crowd is not None and m:
            assert not (got.positive[i] & crowd[i].gather(0, got.gt_index[i])).any()


def test_sampling_by_hand() -> None:
    """One image, two gts: the labels, the positive cap, padding of a short sample."""
    gt_boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]])
    gt_labels = torch.tensor([[3, 0]])
    boxes = torch.tensor(
        [
            [
                [0.0, 0.0, 10.0, 9.0],  # IoU 0.9 with gt0: positive, class 3
                [20.0, 20.0, 40.0, 30.0],  # IoU 0.5 with gt1: positive (>= 0.5), class 0
                [20.0, 20.0, 40.0, 29.0],  # IoU 0.45: background
                [50.0, 50.0, 60.0, 60.0],  # IoU 0: background
            ]
        ]
    )
    valid = torch.ones(1, 4, dtype=torch.bool)
    kw = {"pos_iou": 0.5, "neg_iou": 0.5, "stds": STDS}
    got = sample_rois(
        boxes, valid, gt_boxes, gt_labels, valid[:, :2], num_samples=8, positive_fraction=0.5, **kw
    )
    assert got.labels.tolist() == [[4, 1, 0, 0, 4, 1, 0, 0]]
    assert got.valid.tolist() == [[True] * 6 + [False] * 2]
    assert got.roi_index[0, :6].tolist() == [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(got.box_targets[0, 4:6], torch.zeros(2, 4))  # the gts themselves
    torch.testing.assert_close(
        got.box_targets[0, 1], torch.tensor([0.0, 5.0 / 10 / 0.1, 0.0, math.log(2.0) / 0.2])
    )
    # at most floor(4 * 0.25) = 1 positive; the largest keys win
    keys = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.3, 0.4]])
    got = sample_rois(
        boxes,
        valid,
        gt_boxes,
        gt_labels,
        valid[:, :2],
        num_samples=4,
        positive_fraction=0.25,
        keys=keys,
        **kw,
    )
    # positives 0, 1, 4, 5 (keys .1 .9 .3 .4): 1 wins; both negatives; one slot left empty
    assert got.roi_index[0, :3].tolist() == [1, 2, 3]
    assert got.labels[0].tolist() == [1, 0, 0, 0]
    assert got.valid[0].tolist() == [True, True, True, False]
    # no gts: everything is background; no gts appended
    none = sample_rois(
        boxes,
        valid,
        gt_boxes[:, :0],
        gt_labels[:, :0],
        valid[:, :0],
        num_samples=8,
        positive_fraction=0.25,
        **kw,
    )
    assert none.labels.eq(0).all() and none.valid.sum() == 4


def test_select_class_deltas() -> None:
    deltas = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    labels = torch.tensor([[0, 3, 1], [2, 2, 0]])
    got = select_class_deltas(deltas, labels)
    for b in range(2):
        for s in range(3):
            torch.testing.assert_close(got[b, s], deltas[b, s, labels[b, s]])
    agnostic = deltas[:, :, :1]
    torch.testing.assert_close(select_class_deltas(agnostic, labels), deltas[:, :, 0])


# ---------------------------------------------------------------------------------------------
# Postprocess
# ---------------------------------------------------------------------------------------------


def _tv_postprocess(logits, deltas, boxes, image_size, *, score, nms, top, min_size):
    """torchvision's RoIHeads.postprocess_detections for one image, spelled out."""
    k1 = logits.shape[-1]
    if deltas.shape[1] == 1:
        deltas = deltas.expand(-1, k1, 4)
    pred = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode(deltas.reshape(len(boxes), -1), [boxes])
    pred = clip_boxes_to_image(pred.reshape(-1, 4), image_size).view(-1, k1, 4)
    scores = torch.softmax(logits, -1)
    labels = torch.arange(k1).expand_as(scores)
    pred, scores, labels = pred[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:]
    labels = labels.reshape(-1)
    keep = torch.where(scores > score)[0]
    pred, scores, labels = pred[keep], scores[keep], labels[keep]
    keep = remove_small_boxes(pred, min_size)
    pred, scores, labels = pred[keep], scores[keep], labels[keep]
    keep = tv_batched_nms(pred, scores, labels, nms)[:top]
    return pred[keep], scores[keep], labels[keep] - 1


@settings(max_examples=20)
@given(seed=seeds, agnostic=st.booleans(), r=st.integers(0, 30), top=st.sampled_from([5, 100]))
def test_postprocess_matches_per_image_reference(seed, agnostic, r, top) -> None:
    g = torch.Generator().manual_seed(seed)
    b, k = 2, 3
    boxes = random_boxes(g, (b, r), image_size=64, min_size=1, max_size=40)
    valid = torch.rand(b, r, generator=g) < 0.8
    logits = torch.randn(b, r, k + 1, generator=g) * 2
    deltas = torch.randn(b, r, 1 if agnostic else k + 1, 4, generator=g)
    sizes = torch.tensor([[60, 64], [48, 40]])
    kw = {"score_threshold": 0.05, "nms_iou": 0.5, "max_detections": top, "min_box_size": 0.5}
    got = roi_detections(logits, deltas, boxes, valid, sizes, stds=STDS, **kw)
    assert got.boxes.shape == (b, top, 4)
    for i in range(b):
        if not valid[i].any():
            assert not got.valid[i].any()
            continue
        want = _tv_postprocess(
            logits[i][valid[i]],
            deltas[i][valid[i]],
            boxes[i][valid[i]],
            tuple(sizes[i].tolist()),
            score=0.05,
            nms=0.5,
            top=top,
            min_size=0.5,
        )
        n = len(want[0])
        assert int(got.valid[i].sum()) == n
        torch.testing.assert_close(got.boxes[i, :n], want[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(got.scores[i, :n], want[1], rtol=0, atol=1e-6)
        assert got.labels[i, :n].tolist() == want[2].tolist()


def test_postprocess_rejects_bad_columns() -> None:
    with pytest.raises(ValueError, match="columns"):
        roi_detections(
            torch.zeros(1, 2, 4),
            torch.zeros(1, 2, 3, 4),
            torch.zeros(1, 2, 4),
            torch.ones(1, 2, dtype=torch.bool),
            (10, 10),
            score_threshold=0.05,
            nms_iou=0.5,
            max_detections=5,
            min_box_size=0.0,
        )


# ---------------------------------------------------------------------------------------------
# The compiler
# ---------------------------------------------------------------------------------------------


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    """Sampling, pooling and the postprocess in one fullgraph (aot_eager: the pooling and the
    NMS are operators with fake kernels). tests/models/test_roi_heads.py runs the loss under
    inductor."""

    def run(features, boxes, valid, gt_boxes, gt_labels, gt_valid, keys, logits, deltas):
        sampled = sample_rois(
            boxes,
            valid,
            gt_boxes,
            gt_labels,
            gt_valid,
            pos_iou=0.5,
            neg_iou=0.5,
            num_samples=16,
            positive_fraction=0.25,
            stds=STDS,
            keys=keys,
        )
        pooled = _align(features, sampled.boxes)
        dets = roi_detections(
            logits,
            deltas,
            boxes,
            valid,
            (128, 128),
            score_threshold=0.05,
            nms_iou=0.5,
            max_detections=20,
            min_box_size=0.01,
            stds=STDS,
        )
        return sampled, pooled, dets

    compiled = torch.compile(run, fullgraph=True, dynamic=False, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        features = _pyramid(g, 2, 3, 128)
        gt_boxes = random_boxes(g, (2, 3), image_size=128, min_size=8, max_size=64)
        boxes = torch.cat(
            (gt_boxes + torch.randn(2, 3, 4, generator=g), random_boxes(g, (2, 9))), 1
        )
        valid = torch.rand(2, 12, generator=g) < 0.9
        gt_valid = torch.tensor([[True, True, False], [True, False, False]])
        gt_boxes = torch.where(gt_valid[..., None], gt_boxes, math.nan)
        gt_labels = torch.randint(0, 3, (2, 3), generator=g)
        keys = torch.rand(2, 15, generator=g)
        logits, deltas = torch.randn(2, 12, 4, generator=g), torch.randn(2, 12, 4, 4, generator=g)
        args = (features, boxes, valid, gt_boxes, gt_labels, gt_valid, keys, logits, deltas)
        eager = run(*args)
        assert eager[0].positive.any() and eager[2].valid.any()
        torch.testing.assert_close(compiled(*args), eager)
