"""The RetinaNet objective on padded batches: properties, and the compiled graph against eager."""

from __future__ import annotations

import math
from typing import NamedTuple

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fdet import build, specs
from fdet.data.sample import Batch
from fdet.models.detectors.base import Term, total_loss
from fdet.models.detectors.retinanet import (
    retinanet_anchors,
    retinanet_assign,
    retinanet_loss,
)
from fdet.models.heads.retina import RetinaHeadOutputs
from fdet.ops.assign import IGNORE, NEGATIVE, POSITIVE
from fdet.ops.boxes import box_ioa
from fdet.ops.losses import masked_sum, sigmoid_focal_loss
from tests.strategies import random_boxes

IMAGE = 128
K = 3
ANCHORS = specs.Anchors()
FEATURE_SIZES = tuple((math.ceil(IMAGE / s), math.ceil(IMAGE / s)) for s in ANCHORS.strides)
BOX_LOSSES = (specs.L1Loss(), specs.SmoothL1Loss(beta=0.2), specs.GIoULoss())


def anchors() -> torch.Tensor:
    return retinanet_anchors(FEATURE_SIZES, spec=ANCHORS)


def split_levels(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    counts = [h * w * ANCHORS.per_location for h, w in FEATURE_SIZES]
    return tuple(flat.split(counts, dim=1))


def random_outputs(g: torch.Generator, batch: int, *, grad: bool = False) -> RetinaHeadOutputs:
    num = anchors().shape[0]
    logits = (torch.randn(batch, num, K, generator=g) * 2 - 2).requires_grad_(grad)
    deltas = (torch.randn(batch, num, 4, generator=g) * 0.5).requires_grad_(grad)
    return RetinaHeadOutputs(split_levels(logits), split_levels(deltas), FEATURE_SIZES)


class Gts(NamedTuple):
    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    crowd: torch.Tensor


def random_gts(g: torch.Generator, counts: list[int], crowd_fraction: float = 0.0) -> Gts:
    """Padded gts; padded slots hold garbage (NaN boxes, out-of-range labels, crowd flags)."""
    m = max(counts, default=0)
    boxes = random_boxes(g, (len(counts), m), image_size=IMAGE - 8, min_size=6, max_size=90)
    labels = torch.randint(0, K, (len(counts), m), generator=g)
    valid = torch.arange(m)[None, :] < torch.tensor(counts)[:, None]
    crowd = (torch.rand(len(counts), m, generator=g) < crowd_fraction) & valid
    boxes = torch.where(valid[..., None], boxes, math.nan)
    labels = torch.where(valid, labels, -7)
    crowd = crowd | (~valid & (torch.rand(len(counts), m, generator=g) < 0.5))
    return Gts(boxes, labels, valid, crowd)


class Summary(NamedTuple):
    """The objective of one batch, read off its terms."""

    loss: torch.Tensor
    cls_loss: torch.Tensor
    box_loss: torch.Tensor
    num_pos: torch.Tensor


def summary(terms: dict[str, Term]) -> Summary:
    assert list(terms) == ["cls", "box"]
    assert terms["cls"].count is terms["box"].count  # one normalizer: the step groups them
    assert all(t.total.dtype == t.count.dtype == torch.float32 for t in terms.values())
    return Summary(
        total_loss(terms), terms["cls"].value(), terms["box"].value(), terms["cls"].count
    )


def loss_of(outputs: RetinaHeadOutputs, gts: Gts, **kw) -> Summary:
    return summary(retinanet_loss(outputs, anchors(), *gts, **kw))


@st.composite
def cases(draw: st.DrawFn, *, max_batch: int = 3) -> tuple[RetinaHeadOutputs, Gts, dict]:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    counts = draw(st.lists(st.integers(0, 5), min_size=1, max_size=max_batch))
    crowd = draw(st.sampled_from([0.0, 0.0, 0.3]))
    box_loss = draw(st.sampled_from(BOX_LOSSES))
    return random_outputs(g, len(counts)), random_gts(g, counts, crowd), {"box_loss": box_loss}


def assert_same(a: Summary, b: Summary, **tol) -> None:
    for name, x, y in zip(Summary._fields, a, b):
        torch.testing.assert_close(x, y, msg=name, **tol)


@settings(max_examples=25)
@given(case=cases(), extra=st.integers(1, 4))
def test_padding_is_invisible(case, extra) -> None:
    outputs, gts, kw = case
    b = gts.valid.shape[0]
    g = torch.Generator().manual_seed(extra)
    garbage = Gts(
        boxes=torch.cat(
            (
                torch.full((b, 1, 4), math.nan),
                torch.randn(b, extra - 1, 4, generator=g) * 1e4,
            ),
            dim=1,
        ),
        labels=torch.randint(-5, 1000, (b, extra), generator=g),
        valid=torch.zeros(b, extra, dtype=torch.bool),
        crowd=torch.rand(b, extra, generator=g) < 0.5,
    )
    padded = Gts(*(torch.cat((x, y), dim=1) for x, y in zip(gts, garbage)))
    assert_same(loss_of(outputs, padded, **kw), loss_of(outputs, gts, **kw), rtol=0, atol=0)


@settings(max_examples=25)
@given(case=cases())
def test_batch_normalizes_once_by_all_positives(case) -> None:
    """Batched loss == (sum of the per-image loss sums) / max(total positives, 1)."""
    outputs, gts, kw = case
    whole = loss_of(outputs, gts, **kw)
    cls_sum = box_sum = num_pos = torch.zeros(())
    for i in range(gts.valid.shape[0]):
        one = RetinaHeadOutputs(
            tuple(x[i : i + 1] for x in outputs.cls_logits),
            tuple(x[i : i + 1] for x in outputs.box_deltas),
            FEATURE_SIZES,
        )
        part = loss_of(one, Gts(*(x[i : i + 1] for x in gts)), **kw)
        count = part.num_pos.clamp(min=1)
        cls_sum, box_sum = cls_sum + part.cls_loss * count, box_sum + part.box_loss * count
        num_pos = num_pos + part.num_pos
    torch.testing.assert_close(whole.num_pos, num_pos, rtol=0, atol=0)
    torch.testing.assert_close(whole.cls_loss, cls_sum / num_pos.clamp(min=1))
    torch.testing.assert_close(whole.box_loss, box_sum / num_pos.clamp(min=1))
    torch.testing.assert_close(whole.loss, whole.cls_loss + whole.box_loss, rtol=0, atol=0)


@settings(max_examples=15)
@given(case=cases())
def test_classification_term_is_focal_loss_of_one_hot_targets(case) -> None:
    """The classification term equals the focal loss of one-hot float targets on the positives
    and zeros on the negatives, summed over the anchors that are not IGNORE, gradients included."""
    outputs, gts, _ = case
    logits = torch.cat(outputs.cls_logits, dim=1).requires_grad_()
    assignment = retinanet_assign(
        anchors(), gts.boxes, gts.valid, gts.crowd, assigner=specs.MaxIoUAssigner()
    )
    positive = assignment.label == POSITIVE
    labels = gts.labels.gather(1, assignment.gt_index) if gts.labels.shape[1] else positive.long()
    targets = ((labels[..., None] == torch.arange(K)) & positive[..., None]).float()
    counted = (assignment.label != IGNORE)[..., None]
    count = positive.sum().clamp(min=1)
    expected = masked_sum(sigmoid_focal_loss(logits, targets), counted) / count
    (want,) = torch.autograd.grad(expected, logits)
    split = RetinaHeadOutputs(split_levels(logits), outputs.box_deltas, FEATURE_SIZES)
    got = loss_of(split, gts).cls_loss
    (grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, want)


def test_images_without_objects_are_all_negative() -> None:
    g = torch.Generator().manual_seed(0)
    outputs = random_outputs(g, 2)
    gts = random_gts(g, [3, 0])
    assignment = retinanet_assign(
        anchors(), gts.boxes, gts.valid, gts.crowd, assigner=specs.MaxIoUAssigner()
    )
    assert (assignment.label[1] == NEGATIVE).all()
    assert (assignment.label[0] == POSITIVE).any()

    # an empty batch, with padded slots or none: every anchor and class is a negative
    logits = torch.cat(outputs.cls_logits, dim=1)
    expected = sigmoid_focal_loss(logits, torch.zeros_like(logits)).sum()
    padded_empty = gts._replace(valid=torch.zeros_like(gts.valid))
    no_slots = Gts(*(x[:, :0] for x in gts))
    for empty in (padded_empty, no_slots):
        out = loss_of(outputs, empty)
        assert out.num_pos == 0 and out.box_loss == 0
        torch.testing.assert_close(out.cls_loss, expected)
        assert out.loss.isfinite()


def test_crowd_regions_are_never_matched_and_cover_ignored_anchors() -> None:
    a = anchors()
    crowd_box = torch.tensor([8.0, 8.0, 100.0, 100.0])
    inside_gt = torch.tensor([30.0, 30.0, 62.0, 62.0])  # a real object inside the crowd region
    outside_gt = torch.tensor([100.0, 96.0, 128.0, 128.0])
    boxes = torch.stack((crowd_box, inside_gt, outside_gt))[None]  # [1, 3, 4]
    valid = torch.ones(1, 3, dtype=torch.bool)
    crowd = torch.tensor([[True, False, False]])
    assigner = specs.MaxIoUAssigner()

    with_crowd = retinanet_assign(a, boxes, valid, crowd, assigner=assigner)
    without = retinanet_assign(
        a, boxes, torch.tensor([[False, True, True]]), None, assigner=assigner
    )
    pos = with_crowd.label == POSITIVE
    # matching is as if the crowd were not there
    assert torch.equal(pos, without.label == POSITIVE)
    assert not (with_crowd.gt_index[pos] == 0).any()
    # mostly-inside anchors are ignored, unless positive (those of the object inside stay)
    covered = box_ioa(a, crowd_box[None])[:, 0] > 0.5  # [A]
    assert (pos[0] & covered).any()
    assert (with_crowd.label[0][covered & ~pos[0]] == IGNORE).all()
    assert torch.equal(with_crowd.label[0][~covered], without.label[0][~covered])
    # a crowd box alone gives no positives, and the loss does not see the covered anchors
    g = torch.Generator().manual_seed(1)
    outputs = random_outputs(g, 1)
    only_crowd = Gts(boxes[:, :1], torch.zeros(1, 1, dtype=torch.long), valid[:, :1], crowd[:, :1])
    base = loss_of(outputs, only_crowd)
    assert base.num_pos == 0
    logits = torch.cat(outputs.cls_logits, dim=1).clone()
    logits[0, covered] = 50.0  # confident false positives inside the crowd: not penalized
    moved = outputs._replace(cls_logits=split_levels(logits))
    assert_same(loss_of(moved, only_crowd), base, rtol=0, atol=0)
    logits[0, ~covered] += 1.0
    assert loss_of(outputs._replace(cls_logits=split_levels(logits)), only_crowd).loss > base.loss


@pytest.mark.parametrize("box_loss", BOX_LOSSES, ids=lambda s: type(s).__name__)
def test_gradients_are_finite_with_empty_images_crowds_and_garbage(box_loss) -> None:
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, anchors().shape[0], K, generator=g) * 2).requires_grad_()
    deltas = (torch.randn(3, anchors().shape[0], 4, generator=g) * 3).requires_grad_()
    outputs = RetinaHeadOutputs(split_levels(logits), split_levels(deltas), FEATURE_SIZES)
    gts = random_gts(g, [4, 0, 2], crowd_fraction=0.4)
    loss_of(outputs, gts, box_loss=box_loss).loss.backward()
    for grad in (logits.grad, deltas.grad):
        assert grad is not None and grad.isfinite().all()
    assert logits.grad[1].abs().sum() > 0  # the empty image still teaches "background"
    assert deltas.grad[1].abs().sum() == 0  # ... and nothing about boxes
    assert deltas.grad[0].abs().sum() > 0


def test_weights_scale_the_terms_and_a_step_count_replaces_the_count() -> None:
    g = torch.Generator().manual_seed(3)
    outputs = random_outputs(g, 2)
    gts = random_gts(g, [3, 2])
    base = loss_of(outputs, gts)
    assert base.num_pos > 1
    weighted = loss_of(
        outputs,
        gts,
        cls_loss=specs.SigmoidFocalLoss(weight=2.0),
        box_loss=specs.L1Loss(weight=0.5),
    )
    torch.testing.assert_close(weighted.cls_loss, 2 * base.cls_loss)
    torch.testing.assert_close(weighted.box_loss, 0.5 * base.box_loss)
    torch.testing.assert_close(weighted.loss, weighted.cls_loss + weighted.box_loss)
    terms = retinanet_loss(outputs, anchors(), *gts)
    by_ten = sum(t.value(torch.tensor(10.0)) for t in terms.values())
    torch.testing.assert_close(by_ten * 10, base.loss * base.num_pos)
    torch.testing.assert_close(terms["cls"].total, base.cls_loss * base.num_pos)


def tiny_spec(**kw) -> specs.RetinaNet:
    return specs.RetinaNet(
        backbone=specs.ResNet(depth=18, out_levels=(3, 4, 5), width=16, norm=specs.BatchNorm()),
        neck=specs.FPN(channels=32),
        head=specs.RetinaHead(
            num_classes=K, num_convs=1, channels=32, norm=specs.GroupNorm(groups=8)
        ),
        **kw,
    )


def tiny_batch(g: torch.Generator, counts: list[int]) -> Batch:
    gts = random_gts(g, counts, crowd_fraction=0.3)
    b = len(counts)
    return Batch(
        images=torch.randint(0, 256, (b, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=g),
        image_sizes=torch.full((b, 2), IMAGE),
        gt_boxes=gts.boxes,
        gt_labels=gts.labels,
        gt_valid=gts.valid,
        gt_crowd=gts.crowd,
        image_ids=torch.arange(b),
        scales=torch.ones(b, 2),
    )


def test_module_loss_trains_end_to_end_with_finite_gradients() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec(box_loss=specs.GIoULoss())).train()
    batch = tiny_batch(torch.Generator().manual_seed(4), [3, 0])
    out = summary(model.loss(model(batch.images), batch))
    assert out.num_pos > 0
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and gr.isfinite().all() for gr in grads)
    assert model.head.box_deltas.weight.grad.abs().sum() > 0


def test_losses_are_float32_under_autocast() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).eval()
    batch = tiny_batch(torch.Generator().manual_seed(5), [2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch.images)
        assert outputs.cls_logits[0].dtype == torch.bfloat16
        low = summary(model.loss(outputs, batch))
    assert all(x.dtype == torch.float32 for x in low)
    as_float = RetinaHeadOutputs(
        tuple(x.float() for x in outputs.cls_logits),
        tuple(x.float() for x in outputs.box_deltas),
        outputs.feature_sizes,
    )
    assert_same(low, summary(model.loss(as_float, batch)), rtol=0, atol=0)


@pytest.mark.compile
def test_compiled_objective_equals_eager() -> None:
    spec = tiny_spec(box_loss=specs.GIoULoss(weight=2.0))

    def objective(cls_logits, box_deltas, boxes, labels, valid, crowd):
        outputs = RetinaHeadOutputs(
            split_levels(cls_logits), split_levels(box_deltas), FEATURE_SIZES
        )
        terms = retinanet_loss(
            outputs,
            retinanet_anchors(FEATURE_SIZES, spec=spec.anchors, device=cls_logits.device),
            boxes,
            labels,
            valid,
            crowd,
            assigner=spec.assigner,
            coder=spec.coder,
            cls_loss=spec.cls_loss,
            box_loss=spec.box_loss,
        )
        assert terms["box"].weight == 2.0
        return terms

    compiled = torch.compile(objective, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(6)
    for counts in ([4, 0, 2], [1, 3, 0]):  # the same shapes: one graph, two batches
        outputs = random_outputs(g, 3)
        gts = random_gts(g, counts, crowd_fraction=0.4)
        args = (torch.cat(outputs.cls_logits, 1), torch.cat(outputs.box_deltas, 1), *gts)
        # the compiled graph returns the terms as eager does, one count object shared
        assert_same(summary(compiled(*args)), summary(objective(*args)), rtol=1e-5, atol=1e-6)
