"""The RoI heads (fdet.models.detectors.two_stage.roi_heads) against torchvision's RoIHeads box
path with random weights, as in fasterrcnn_resnet50_fpn (TwoMLPHead + FastRCNNPredictor) and
fasterrcnn_resnet50_fpn_v2 (FastRCNNConvFCHead with batch norm): the same detections in eval
mode, the same losses in training mode on the same sampled RoIs; then the spec, the builder,
the loss variants and the compiler."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import (
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    TwoMLPHead,
)
from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads
from torchvision.ops import MultiScaleRoIAlign

from fdet import specs
from fdet.models.detectors.two_stage.roi_heads import (
    RoIHeads,
    RoIOutputs,
    rename_torchvision_keys,
    roi_loss,
    roi_postprocess,
    roi_targets,
)
from fdet.ops.roi import SampledRoIs
from fdet.registry import build
from tests.strategies import random_boxes

K = 4  # classes (fdet labels 0..3, torchvision 1..4)
CHANNELS = 8
IMAGE = 128
SIZES = [(128, 128), (120, 100)]  # (height, width) of the two images
FC = 32
CONV = 16
S = 32  # sampled RoIs an image


def _spec(kind: str, **kw: Any) -> specs.RoIHead:
    head = specs.BoxHead(
        kind=kind, fc_channels=FC, conv_channels=CONV, num_convs=4, norm=specs.BatchNorm()
    )
    sampler = specs.Sampler(num_samples=S, positive_fraction=0.25)
    return specs.RoIHead(box_head=head, sampler=sampler, **kw)


def _torchvision(kind: str) -> TVRoIHeads:
    torch.manual_seed(0)  # torchvision's own initialisation draws from the global generator
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    if kind == "2fc":
        head: nn.Module = TwoMLPHead(CHANNELS * 49, FC)
    else:
        head = FastRCNNConvFCHead((CHANNELS, 7, 7), [CONV] * 4, [FC], norm_layer=nn.BatchNorm2d)
    predictor = FastRCNNPredictor(FC, K + 1)
    tv = TVRoIHeads(pool, head, predictor, 0.5, 0.5, S, 0.25, None, 0.05, 0.5, 100)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # spread the scores and the deltas: many detections survive
        predictor.cls_score.weight.copy_(torch.randn(K + 1, FC, generator=g))
        predictor.bbox_pred.weight.copy_(torch.randn(4 * (K + 1), FC, generator=g) * 0.3)
        for module in head.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(CONV, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(CONV, generator=g) + 0.5)
                module.weight.copy_(torch.rand(CONV, generator=g) + 0.5)
                module.bias.copy_(torch.randn(CONV, generator=g) * 0.1)
    return tv


def _fdet(kind: str, tv: TVRoIHeads, **kw: Any) -> RoIHeads:
    heads = build(_spec(kind, **kw), in_channels=CHANNELS, num_classes=K)
    heads.load_state_dict(rename_torchvision_keys(tv.state_dict()))
    return heads


def _batch(seed: int, r: int = 40, m: int = 4):
    g = torch.Generator().manual_seed(seed)
    features = [
        torch.randn(2, CHANNELS, IMAGE // 2**lvl, IMAGE // 2**lvl, generator=g)
        for lvl in (2, 3, 4, 5)
    ]
    gt_boxes = random_boxes(g, (2, m), image_size=90, min_size=10, max_size=60)
    gt_valid = torch.tensor([[True] * m, [True] * (m - 2) + [False] * 2])
    gt_labels = torch.randint(0, K, (2, m), generator=g)
    boxes = random_boxes(g, (2, r), image_size=100, min_size=4, max_size=80)
    near = torch.randint(0, m, (2, r), generator=g)
    jitter = torch.randn(2, r, 4, generator=g) * 3
    copies = gt_boxes.gather(1, near[..., None].expand(-1, -1, 4)) + jitter
    boxes = torch.where((torch.rand(2, r, generator=g) < 0.4)[..., None], copies, boxes)
    lo, hi = boxes[..., :2].minimum(boxes[..., 2:]), boxes[..., :2].maximum(boxes[..., 2:])
    boxes = torch.cat((lo.clamp(min=0), hi.clamp(min=0) + 1), dim=-1)
    valid = torch.ones(2, r, dtype=torch.bool)
    valid[1, r - r // 4 :] = False  # padded proposals in the second image
    boxes = torch.where(valid[..., None], boxes, 0.0)
    gt_boxes = torch.where(gt_valid[..., None], gt_boxes, math.nan)
    return features, boxes, valid, gt_boxes, gt_labels, gt_valid, g


def _named(features: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((str(i), f) for i, f in enumerate(features))


@pytest.mark.parametrize("kind", ["2fc", "4conv1fc"])
def test_detections_match_torchvision(kind: str) -> None:
    tv = _torchvision(kind).eval()
    heads = _fdet(kind, tv).eval()
    features, boxes, valid, *_ = _batch(0)
    with torch.no_grad():
        want, _ = tv(_named(features), [boxes[b][valid[b]] for b in range(2)], SIZES)
        outputs = heads(features, boxes)
        got = roi_postprocess(outputs, boxes, valid, torch.tensor(SIZES), spec=_spec(kind))
    for b in range(2):
        n = len(want[b]["boxes"])
        assert n > 30  # many survive the threshold and NMS
        assert int(got.valid[b].sum()) == n and not got.valid[b, n:].any()
        torch.testing.assert_close(got.boxes[b, :n], want[b]["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(got.scores[b, :n], want[b]["scores"], rtol=0, atol=1e-4)
        assert torch.equal(got.labels[b, :n], want[b]["labels"] - 1)


def _tv_index(valid: torch.Tensor, gt_valid: torch.Tensor) -> torch.Tensor:
    """For one image, each fdet candidate's index among torchvision's (the valid proposals,
    then the valid gts); -1 where torchvision has no such candidate."""
    both = torch.cat((valid, gt_valid))
    return torch.where(both, both.long().cumsum(0) - 1, -1)


@pytest.mark.parametrize("kind", ["2fc", "4conv1fc"])
def test_losses_match_torchvision(kind: str) -> None:
    """torchvision's sampler is made to choose fdet's RoIs; its matcher labels them on its own,
    and the labels, the classification loss and the box loss agree."""
    tv = _torchvision(kind).train()
    heads = _fdet(kind, tv).train()
    features, boxes, valid, gt_boxes, gt_labels, gt_valid, g = _batch(1)
    spec = _spec(kind)
    keys = torch.rand(2, boxes.shape[1] + gt_boxes.shape[1], generator=g)
    sampled = roi_targets(boxes, valid, gt_boxes, gt_labels, gt_valid, spec=spec, keys=keys)
    assert sampled.valid.all()  # batch norm sees the same RoIs as torchvision's
    assert sampled.positive.sum() >= 8

    seen: list[torch.Tensor] = []

    def choose(labels: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pos, neg = [], []
        for b, tv_labels in enumerate(labels):
            index = _tv_index(valid[b], gt_valid[b])[sampled.roi_index[b]]  # [S]
            assert (index >= 0).all()
            assert torch.equal(tv_labels[index], sampled.labels[b])  # the same labels
            seen.append(index)
            p = torch.zeros_like(tv_labels, dtype=torch.uint8)
            n = torch.zeros_like(tv_labels, dtype=torch.uint8)
            p[index[sampled.positive[b]]] = 1
            n[index[~sampled.positive[b]]] = 1
            pos.append(p)
            neg.append(n)
        return pos, neg

    tv.fg_bg_sampler = choose  # type: ignore[assignment]
    targets = [
        {"boxes": gt_boxes[b][gt_valid[b]], "labels": gt_labels[b][gt_valid[b]] + 1}
        for b in range(2)
    ]
    _, want = tv(_named(features), [boxes[b][valid[b]] for b in range(2)], SIZES, targets)
    assert len(seen) == 2
    outputs = heads(features, sampled.boxes)
    terms = roi_loss(outputs, sampled, spec=spec)
    assert set(terms) == {"roi_cls", "roi_box"}
    assert (
        terms["roi_cls"].count is terms["roi_box"].count and float(terms["roi_cls"].count) == 2 * S
    )
    torch.testing.assert_close(
        terms["roi_cls"].value(), want["loss_classifier"], rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(terms["roi_box"].value(), want["loss_box_reg"], rtol=1e-5, atol=1e-6)
    assert float(want["loss_box_reg"].detach()) > 0


def test_torchvision_keys_map_onto_the_modules() -> None:
    for kind in ("2fc", "4conv1fc"):
        tv = _torchvision(kind)
        renamed = rename_torchvision_keys(tv.state_dict())
        heads = build(_spec(kind), in_channels=CHANNELS, num_classes=K)
        assert set(renamed) == set(heads.state_dict())
    assert rename_torchvision_keys({"box_head.fc6.weight": torch.zeros(1)}) == {
        "box_head.fcs.0.weight": torch.zeros(1)
    }


def test_head_shapes_and_feature_levels() -> None:
    features, boxes, *_ = _batch(2)
    spec = specs.RoIHead(class_agnostic=True, box_head=specs.BoxHead(fc_channels=16))
    extra = torch.zeros(2, CHANNELS, 2, 2)  # an RPN-only P6 the RoIs never read
    heads = build(spec, in_channels=CHANNELS, num_classes=K, feature_levels=(2, 3, 4, 5, 6))
    outputs = heads([*features, extra], boxes)
    assert outputs.class_logits.shape == (2, boxes.shape[1], K + 1)
    assert outputs.box_deltas.shape == (2, boxes.shape[1], 1, 4)
    plain = build(spec, in_channels=CHANNELS, num_classes=K)
    plain.load_state_dict(heads.state_dict())
    torch.testing.assert_close(plain(features, boxes), outputs)
    with pytest.raises(ValueError, match="feature maps"):
        heads(features, boxes)
    with pytest.raises(ValueError, match="not all among"):
        RoIHeads(in_channels=4, num_classes=2, feature_levels=(3, 4, 5, 6))


@pytest.mark.parametrize(
    "box_loss", [specs.SmoothL1Loss(beta=0.0, weight=2.0), specs.L1Loss(), specs.GIoULoss()]
)
@pytest.mark.parametrize("agnostic", [False, True])
def test_loss_variants_by_hand(box_loss: specs.BoxLoss, agnostic: bool) -> None:
    """The box term sums the positives' loss on their own class's deltas (or the agnostic
    column); the classification term is the softmax cross-entropy of every sampled RoI."""
    g = torch.Generator().manual_seed(3)
    spec = specs.RoIHead(box_loss=box_loss, class_agnostic=agnostic, cls_weight=0.5)
    rois = random_boxes(g, (1, 4), image_size=64, min_size=8, max_size=32)
    target = rois + torch.randn(1, 4, 4, generator=g)
    labels = torch.tensor([[2, 0, 1, 0]])
    valid = torch.tensor([[True, True, True, False]])
    pos = (labels > 0) & valid
    sampled = SampledRoIs(
        boxes=rois,
        labels=labels,
        gt_index=torch.zeros_like(labels),
        valid=valid,
        target_boxes=torch.where(pos[..., None], target, rois),
        box_targets=torch.zeros(1, 4, 4),
        roi_index=torch.arange(4)[None],
    )
    columns = 1 if agnostic else K + 1
    outputs = RoIOutputs(
        class_logits=torch.randn(1, 4, K + 1, generator=g),
        box_deltas=torch.randn(1, 4, columns, 4, generator=g),
    )
    terms = roi_loss(outputs, sampled, spec=spec, prefix="stage2")
    assert set(terms) == {"stage2_cls", "stage2_box"}
    assert float(terms["stage2_cls"].count) == 3 and terms["stage2_cls"].weight == 0.5
    ce = nn.functional.cross_entropy(outputs.class_logits[0, :3], labels[0, :3], reduction="sum")
    torch.testing.assert_close(terms["stage2_cls"].total, ce)
    want = torch.tensor(0.0)
    stds = spec.coder.stds
    for r in (0, 2):
        deltas = outputs.box_deltas[0, r, 0 if agnostic else int(labels[0, r])]
        if isinstance(box_loss, specs.GIoULoss):
            from torchvision.models.detection._utils import BoxCoder
            from torchvision.ops import generalized_box_iou_loss

            coder = BoxCoder(tuple(1 / s for s in stds))
            pred = coder.decode_single(deltas[None], rois[0, r][None])
            want = want + generalized_box_iou_loss(pred, target[0, r][None], reduction="sum")
        else:
            from torchvision.models.detection._utils import BoxCoder

            coder = BoxCoder(tuple(1 / s for s in stds))
            t = coder.encode_single(target[0, r][None], rois[0, r][None])[0]
            want = want + (deltas - t).abs().sum()
    torch.testing.assert_close(terms["stage2_box"].total, want, rtol=1e-5, atol=1e-5)
    assert terms["stage2_box"].weight == box_loss.weight


def test_empty_batch_gives_zero_counts() -> None:
    features, boxes, *_ = _batch(4)
    heads = build(specs.RoIHead(), in_channels=CHANNELS, num_classes=K)
    none = torch.zeros(2, boxes.shape[1], dtype=torch.bool)
    gt = torch.zeros(2, 0, 4)
    sampled = roi_targets(
        boxes, none, gt, torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, dtype=torch.bool)
    )
    assert not sampled.valid.any()
    terms = roi_loss(heads(features, sampled.boxes), sampled)
    for term in terms.values():
        assert float(term.total.detach()) == 0 and float(term.count) == 0
    dets = roi_postprocess(heads(features, boxes), boxes, none, (IMAGE, IMAGE))
    assert not dets.valid.any() and dets.boxes.shape == (2, 100, 4)


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(specs.SpecError, match=r"^levels: must be consecutive"):
        specs.RoIAlign(levels=(2, 4))
    with pytest.raises(specs.SpecError, match=r"^output_size"):
        specs.RoIAlign(output_size=0)
    with pytest.raises(specs.SpecError, match=r"^kind"):
        specs.BoxHead(kind="3fc")  # type: ignore[arg-type]
    with pytest.raises(specs.SpecError, match=r"^norm.groups"):
        specs.BoxHead(kind="4conv1fc", conv_channels=40, norm=specs.GroupNorm(groups=32))
    with pytest.raises(specs.SpecError, match=r"^score_threshold"):
        specs.RoIPostprocess(score_threshold=1.5)
    with pytest.raises(specs.SpecError, match=r"^cls_weight"):
        specs.RoIHead(cls_weight=-1.0)
    with pytest.raises(specs.SpecError, match=r"^box_loss"):
        specs.RoIHead(box_loss=specs.SigmoidFocalLoss())  # type: ignore[arg-type]


def test_spec_json_round_trip() -> None:
    spec = specs.RoIHead(
        roi_align=specs.RoIAlign(levels=(3, 4), output_size=5, aligned=True, sampling_ratio=0),
        box_head=specs.BoxHead(kind="4conv1fc", norm=specs.GroupNorm(groups=16)),
        class_agnostic=True,
        assigner=specs.MaxIoUAssigner(pos_iou=0.7, neg_iou=0.7, low_quality_matches=False),
        coder=specs.DeltaXYWHCoder(stds=(0.033, 0.033, 0.067, 0.067)),
        box_loss=specs.GIoULoss(weight=2.0),
        postprocess=specs.RoIPostprocess(max_detections=300),
    )
    text = specs.to_json(spec)
    assert specs.from_json(text) == spec and specs.to_json(specs.from_json(text)) == text
    assert specs.from_json(specs.to_json(specs.RoIHead())) == specs.RoIHead()


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    """Targets, head, loss and postprocess in one fullgraph (aot_eager: RoI Align and NMS are
    operators with fake kernels), and the loss alone under inductor."""
    torch.manual_seed(0)
    spec = _spec("2fc")
    heads = build(spec, in_channels=CHANNELS, num_classes=K)
    features, boxes, valid, gt_boxes, gt_labels, gt_valid, g = _batch(5)
    keys = torch.rand(2, boxes.shape[1] + gt_boxes.shape[1], generator=g)

    def step(features, boxes, valid, gt_boxes, gt_labels, gt_valid, keys):
        sampled = roi_targets(boxes, valid, gt_boxes, gt_labels, gt_valid, spec=spec, keys=keys)
        terms = roi_loss(heads(features, sampled.boxes), sampled, spec=spec)
        dets = roi_postprocess(heads(features, boxes), boxes, valid, (IMAGE, IMAGE), spec=spec)
        return {name: term.value() for name, term in terms.items()}, dets

    args = (features, boxes, valid, gt_boxes, gt_labels, gt_valid, keys)
    eager = step(*args)
    assert eager[1].valid.any()
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), eager, rtol=1e-5, atol=1e-5)

    sampled = roi_targets(boxes, valid, gt_boxes, gt_labels, gt_valid, spec=spec, keys=keys)
    outputs = RoIOutputs(torch.randn(2, S, K + 1), torch.randn(2, S, K + 1, 4))

    def loss(outputs, sampled):
        return {name: term.value() for name, term in roi_loss(outputs, sampled, spec=spec).items()}

    inductor = torch.compile(loss, fullgraph=True, dynamic=False)
    torch.testing.assert_close(inductor(outputs, sampled), loss(outputs, sampled))
