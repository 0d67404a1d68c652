"""The region proposal network (fdet.models.detectors.two_stage.rpn): parity with torchvision's
RegionProposalNetwork (v1 and v2 heads; proposals in eval and training mode, losses given the
same sampled anchors), crowds, empty images, the spec and the compiler."""

from __future__ import annotations

import math
from types import SimpleNamespace

import attrs
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from fdet import specs
from fdet.models.detectors.two_stage.rpn import (
    RPN,
    RPNHead,
    RPNOutputs,
    build_rpn,
    rpn_loss,
    rpn_proposals,
    rpn_targets,
)
from fdet.ops.assign import IGNORE, NEGATIVE, POSITIVE
from fdet.ops.boxes import box_ioa
from fdet.registry import build
from fdet.specs import SpecError

CHANNELS = 8
PADDED = (96, 160)  # not a multiple of 64: P6 sits 48 × 53 pixels apart, not 64
IMAGE_SIZES = [(90, 150), (96, 120)]
LEVELS = [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]  # P2–P6 of a 96 × 160 input


def _features(seed: int = 0, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, CHANNELS, h, w, generator=g) for h, w in LEVELS]


def _torchvision_rpn(conv_depth: int) -> RegionProposalNetwork:
    """As ``fasterrcnn_resnet50_fpn`` (conv_depth 1) and its v2 (conv_depth 2) build it, with a
    perturbed head so that logits and deltas vary and many proposals survive NMS."""
    torch.manual_seed(conv_depth)
    sizes = ((32,), (64,), (128,), (256,), (512,))
    generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = TVRPNHead(CHANNELS, 3, conv_depth=conv_depth)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.3)
    return RegionProposalNetwork(
        generator,
        head,
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": 2000, "testing": 1000},
        post_nms_top_n={"training": 2000, "testing": 1000},
        nms_thresh=0.7,
    )


def _fdet_rpn(tv: RegionProposalNetwork, conv_depth: int) -> RPN:
    spec = specs.RPN(
        anchors=attrs.evolve(specs.RPN().anchors, placement="image_ratio"), num_convs=conv_depth
    )
    rpn = build(spec, in_channels=CHANNELS)
    rpn.head.load_state_dict(tv.head.state_dict())  # the same names: no mapping
    return rpn


def _image_list(batch: int = 2) -> ImageList:
    return ImageList(torch.zeros(batch, 3, *PADDED), IMAGE_SIZES[:batch])


def assert_same_proposals(boxes: torch.Tensor, scores: torch.Tensor, want: torch.Tensor) -> float:
    """fdet's valid proposals (``boxes``, ``scores``, in order) against torchvision's (``want``,
    in its order): both are sorted by score, so they agree row by row except where scores tie
    (the order of equal scores is arbitrary); there, and as a whole, they are the same set
    (every box within 1e-3 of one of the other's). Returns the largest difference."""
    assert boxes.shape == want.shape
    tied = torch.zeros(len(scores), dtype=torch.bool)
    tied[1:] |= scores[1:] == scores[:-1]
    tied[:-1] |= scores[1:] == scores[:-1]
    diff = (boxes - want).abs().amax(dim=1)  # [n]
    assert (diff[~tied] <= 1e-3).all(), diff[~tied].max()
    nearest = torch.cdist(boxes.double(), want.double(), p=math.inf)  # [n, n]
    worst = max(nearest.min(dim=0).values.max().item(), nearest.min(dim=1).values.max().item())
    assert worst <= 1e-3
    return worst


GT_BOXES = torch.tensor(
    [
        [[10.0, 12.0, 60.0, 70.0], [70.0, 5.0, 140.0, 50.0], [30.0, 40.0, 45.0, 52.0]],
        [[0.0, 0.0, 0.0, 0.0]] * 3,  # an image without objects
    ]
)
GT_VALID = torch.tensor([[True, True, True], [False, False, False]])


@pytest.mark.parametrize("conv_depth", [1, 2])
def test_eval_proposals_equal_torchvisions(conv_depth: int) -> None:
    tv = _torchvision_rpn(conv_depth).eval()
    rpn = _fdet_rpn(tv, conv_depth).eval()
    features = _features(conv_depth)
    with torch.no_grad():
        tv_boxes, _ = tv(_image_list(), {str(i): f for i, f in enumerate(features)})
        outputs = rpn(features, image_size=PADDED)
        got = rpn.proposals(outputs, torch.tensor(IMAGE_SIZES))
    assert got.boxes.shape == (2, 1000, 4)
    for b, want in enumerate(tv_boxes):
        n = want.shape[0]
        assert n > 200  # many proposals survive: the comparison means something
        assert got.valid[b].sum() == n and got.valid[b, :n].all()
        assert_same_proposals(got.boxes[b, :n], got.scores[b, :n], want)


@pytest.mark.parametrize("conv_depth", [1, 2])
def test_training_losses_and_proposals_equal_torchvisions(conv_depth: int) -> None:
    """torchvision's sampler is replaced by one returning fdet's draw; the labels it is given
    must be fdet's assignment, and the losses and training-mode proposals must agree."""
    tv = _torchvision_rpn(conv_depth).train()
    rpn = _fdet_rpn(tv, conv_depth).train()
    features = _features(10 + conv_depth)
    outputs = rpn(features, image_size=PADDED)
    keys = torch.rand(outputs.objectness.shape, generator=torch.Generator().manual_seed(5))
    targets = rpn_targets(
        outputs.anchors,
        GT_BOXES,
        GT_VALID,
        assigner=rpn.spec.assigner,
        sampler=rpn.spec.sampler,
        keys=keys,
    )
    seen = []

    def sampler(labels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        seen.extend(labels)
        pos, neg = targets.sampled
        return [p.to(torch.uint8) for p in pos], [n.to(torch.uint8) for n in neg]

    tv.fg_bg_sampler = sampler  # type: ignore[assignment]
    tv_targets = [{"boxes": GT_BOXES[0]}, {"boxes": GT_BOXES[1, :0]}]
    tv_boxes, tv_losses = tv(_image_list(), {str(i): f for i, f in enumerate(features)}, tv_targets)

    label = targets.assignment.label
    want_label = torch.stack(seen)  # 1 positive, 0 negative, -1 between thresholds
    assert torch.equal(want_label, torch.where(label == IGNORE, -1, label).float())
    pos, neg = targets.sampled
    assert pos.sum() > 10 and neg[1].sum() == 256 and not pos[1].any()

    terms = rpn.loss(outputs, SimpleNamespace(gt_boxes=GT_BOXES, gt_valid=GT_VALID), keys=keys)
    assert terms["rpn_cls"].count is terms["rpn_box"].count
    assert terms["rpn_cls"].count == 512
    torch.testing.assert_close(
        terms["rpn_cls"].value(), tv_losses["loss_objectness"], atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(
        terms["rpn_box"].value(), tv_losses["loss_rpn_box_reg"], atol=1e-6, rtol=1e-5
    )
    # the gradients too
    grads = torch.autograd.grad(
        terms["rpn_cls"].value() + terms["rpn_box"].value(), list(rpn.head.parameters())
    )
    tv_grads = torch.autograd.grad(
        tv_losses["loss_objectness"] + tv_losses["loss_rpn_box_reg"], list(tv.head.parameters())
    )
    for g, w in zip(grads, tv_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)

    with torch.no_grad():
        got = rpn.proposals(outputs, torch.tensor(IMAGE_SIZES))
    assert got.boxes.shape == (2, 2000, 4)
    for b, want in enumerate(tv_boxes):
        n = want.shape[0]
        assert got.valid[b].sum() == n and got.valid[b, :n].all()
        assert_same_proposals(got.boxes[b, :n], got.scores[b, :n], want.detach())


def test_loss_without_any_gt_is_all_negative() -> None:
    rpn = build(specs.RPN(), in_channels=CHANNELS)
    for m in (0, 2):
        outputs = rpn(_features(), image_size=PADDED)
        batch = SimpleNamespace(
            gt_boxes=torch.full((2, m, 4), math.nan), gt_valid=torch.zeros(2, m, dtype=torch.bool)
        )
        terms = rpn.loss(outputs, batch)
        assert terms["rpn_cls"].count == 512
        assert terms["rpn_box"].total == 0 and torch.isfinite(terms["rpn_cls"].total)
        terms["rpn_cls"].value().backward()
        assert all(torch.isfinite(p.grad).all() for p in rpn.parameters() if p.grad is not None)
        rpn.zero_grad()


def test_only_sampled_anchors_get_gradients() -> None:
    """The objectness gradient is nonzero exactly on the sampled anchors, the delta gradient
    only on the sampled positives; the keys decide which ones."""
    rpn = build(specs.RPN(), in_channels=CHANNELS)
    with torch.no_grad():
        out = rpn(_features(), image_size=PADDED)
    objectness = out.objectness.clone().requires_grad_()
    deltas = out.deltas.clone().requires_grad_()
    outputs = out._replace(objectness=objectness, deltas=deltas)
    keys = torch.rand(objectness.shape, generator=torch.Generator().manual_seed(1))
    terms = rpn_loss(outputs, GT_BOXES, GT_VALID, keys=keys)
    g_obj, g_box = torch.autograd.grad(
        terms["rpn_cls"].total + terms["rpn_box"].total, [objectness, deltas]
    )
    pos, neg = rpn_targets(out.anchors, GT_BOXES, GT_VALID, keys=keys).sampled
    assert torch.equal(g_obj != 0, pos | neg)
    assert not (g_box[~pos] != 0).any() and (g_box[pos] != 0).any(dim=-1).all()
    other = rpn_loss(outputs, GT_BOXES, GT_VALID, keys=1 - keys)
    assert not torch.equal(other["rpn_cls"].total, terms["rpn_cls"].total)


def test_crowd_covered_anchors_are_never_sampled() -> None:
    """A crowd region: its covered anchors are IGNORE (never sampled), it is never matched,
    and the other gts' positives are unchanged."""
    rpn = build(specs.RPN(sampler=specs.Sampler(num_samples=4000)), in_channels=CHANNELS)
    outputs = rpn(_features(batch=1), image_size=PADDED)
    boxes = torch.tensor([[[10.0, 12.0, 60.0, 70.0], [80.0, 10.0, 150.0, 90.0]]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    crowd = torch.tensor([[False, True]])
    with_crowd = rpn_targets(outputs.anchors, boxes, valid, crowd, sampler=rpn.spec.sampler)
    without = rpn_targets(outputs.anchors, boxes[:, :1], valid[:, :1], sampler=rpn.spec.sampler)
    covered = box_ioa(outputs.anchors, boxes[0, 1:])[:, 0] > 0.5  # [A]
    pos = with_crowd.assignment.label[0] == POSITIVE
    assert torch.equal(pos, without.assignment.label[0] == POSITIVE)
    assert (with_crowd.assignment.label[0][covered & ~pos] == IGNORE).all()
    assert (covered & ~pos).sum() > 20
    sampled = with_crowd.sampled.positive[0] | with_crowd.sampled.negative[0]
    assert not (sampled & covered & ~pos).any()
    assert pos.any() and (with_crowd.assignment.gt_index[0][pos] == 0).all()  # crowd unmatched
    assert (without.assignment.label[0][covered & ~pos] == NEGATIVE).any()


def test_head_layout_and_builder() -> None:
    rpn = build_rpn(specs.RPN(num_convs=2), in_channels=CHANNELS)
    assert isinstance(rpn.head, RPNHead)
    assert sorted(rpn.head.state_dict()) == sorted(TVRPNHead(CHANNELS, 3, 2).state_dict())
    outputs = rpn(_features(), image_size=PADDED)
    assert isinstance(outputs, RPNOutputs)
    assert outputs.num_per_level == tuple(h * w * 3 for h, w in LEVELS)
    assert outputs.objectness.shape == (2, sum(outputs.num_per_level))
    assert outputs.deltas.shape == (2, sum(outputs.num_per_level), 4)
    with pytest.raises(ValueError, match="anchors a location"):
        RPN(head=RPNHead(in_channels=4, num_anchors=2), spec=specs.RPN())
    with pytest.raises(ValueError, match="feature maps"):
        rpn(_features()[:3], image_size=PADDED)


def test_spec_defaults_validation_and_json() -> None:
    spec = specs.RPN()
    assert spec.assigner.pos_iou == 0.7 and spec.assigner.neg_iou == 0.3
    assert spec.sampler == specs.Sampler(num_samples=256, positive_fraction=0.5)
    assert spec.box_loss == specs.SmoothL1Loss(beta=1 / 9)
    assert spec.coder.stds == (1.0, 1.0, 1.0, 1.0) and spec.coder.clip == math.log(1000 / 16)
    assert (spec.pre_nms_topk(True), spec.post_nms_topk(True)) == (2000, 2000)
    assert (spec.pre_nms_topk(False), spec.post_nms_topk(False)) == (1000, 1000)
    for bad, field in [
        ({"num_convs": -1}, "num_convs"),
        ({"nms_threshold": 1.5}, "nms_threshold"),
        ({"post_nms_topk_test": 0}, "post_nms_topk_test"),
        ({"min_size": -1.0}, "min_size"),
    ]:
        with pytest.raises(SpecError, match=field):
            specs.RPN(**bad)
    with pytest.raises(SpecError, match="positive_fraction"):
        specs.Sampler(positive_fraction=2.0)
    for s in (spec, specs.RPN(num_convs=2, sampler=specs.Sampler(num_samples=64))):
        assert specs.from_json(specs.to_json(s)) == s


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    rpn = build(specs.RPN(), in_channels=CHANNELS)
    features = _features()
    sizes = torch.tensor(IMAGE_SIZES)
    spec = attrs.evolve(rpn.spec, pre_nms_topk_test=200, post_nms_topk_test=100)

    def step(objectness, deltas, keys, gt_boxes, gt_valid):
        outputs = RPNOutputs(
            objectness, deltas, anchors, eager_out.num_per_level, eager_out.feature_sizes
        )
        terms = rpn_loss(outputs, gt_boxes, gt_valid, spec=spec, keys=keys)
        proposals = rpn_proposals(outputs, sizes, spec=spec, training=False)
        return terms["rpn_cls"], terms["rpn_box"], proposals

    with torch.no_grad():
        eager_out = rpn(features, image_size=PADDED)
    anchors = eager_out.anchors
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    for seed in (0, 1):  # the same shapes: one graph, two batches
        keys = torch.rand(eager_out.objectness.shape, generator=torch.Generator().manual_seed(seed))
        objectness = eager_out.objectness + seed
        args = (objectness, eager_out.deltas, keys, GT_BOXES, GT_VALID)
        want, got = step(*args), compiled(*args)
        for w, g in zip(want[:2], got[:2]):
            torch.testing.assert_close(g.total, w.total, rtol=1e-5, atol=1e-5)
            assert torch.equal(g.count, w.count)
        assert torch.equal(got[2].valid, want[2].valid) and want[2].valid.sum() > 100
        torch.testing.assert_close(got[2].boxes, want[2].boxes)
