"""The GFL detector: spec, head, objective on padded batches, postprocess, the compiler."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import attrs
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fdet import build, specs
from fdet.data.sample import Batch
from fdet.models.detectors.atss import atss_assign
from fdet.models.detectors.base import Term, total_loss
from fdet.models.detectors.gfl import GFL, gfl_loss, gfl_strides
from fdet.models.detectors.retinanet import retinanet_anchors
from fdet.models.heads.gfl import GFLHead, GFLHeadOutputs
from fdet.ops.assign import POSITIVE
from fdet.ops.boxes import aligned_box_iou
from fdet.ops.coding import encode_distances
from fdet.ops.losses import distribution_focal_loss, giou_loss, quality_focal_loss
from fdet.specs import SpecError
from tests.specs.test_serde import spec_instances
from tests.strategies import random_boxes

ROOT = Path(__file__).resolve().parents[2]
IMAGE = 64
K = 3
REG_MAX = 7
ANCHORS = specs.Anchors(
    strides=(8, 16, 32),
    base_sizes=(16, 32, 64),
    octave_scales=(1.0,),
    ratios=(1.0,),
    truncate_sizes=False,
    round_offsets=False,
)
FEATURE_SIZES = tuple((IMAGE // s, IMAGE // s) for s in ANCHORS.strides)
COUNTS = [h * w for h, w in FEATURE_SIZES]


def tiny_spec(**kw) -> specs.GFL:
    return specs.GFL(
        backbone=specs.ResNet(depth=18, out_levels=(3, 4, 5), width=16, norm=specs.BatchNorm()),
        neck=specs.FPN(channels=32, out_levels=(3, 4, 5)),
        head=specs.GFLHead(
            num_classes=K, num_convs=1, channels=32, norm=specs.GroupNorm(groups=8), reg_max=REG_MAX
        ),
        anchors=ANCHORS,
        **kw,
    )


def anchors() -> torch.Tensor:
    return retinanet_anchors(FEATURE_SIZES, spec=ANCHORS)


def strides() -> torch.Tensor:
    return gfl_strides(FEATURE_SIZES, spec=ANCHORS)


def split(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(flat.split(COUNTS, dim=1))


def random_outputs(g: torch.Generator, batch: int) -> GFLHeadOutputs:
    a = sum(COUNTS)
    logits = torch.randn(batch, a, K, generator=g) * 2 - 1
    dists = torch.randn(batch, a, 4, REG_MAX + 1, generator=g) * 2
    return GFLHeadOutputs(split(logits), split(dists), FEATURE_SIZES)


class Gts(NamedTuple):
    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    crowd: torch.Tensor


def random_gts(g: torch.Generator, counts: list[int], crowd_fraction: float = 0.0) -> Gts:
    """Padded gts; padded slots hold garbage (NaN boxes, out-of-range labels, crowd flags)."""
    m = max(counts, default=0)
    boxes = random_boxes(g, (len(counts), m), image_size=IMAGE - 8, min_size=8, max_size=40)
    labels = torch.randint(0, K, (len(counts), m), generator=g)
    valid = torch.arange(m)[None, :] < torch.tensor(counts)[:, None]
    crowd = (torch.rand(len(counts), m, generator=g) < crowd_fraction) & valid
    boxes = torch.where(valid[..., None], boxes, math.nan)
    labels = torch.where(valid, labels, -7)
    crowd = crowd | (~valid & (torch.rand(len(counts), m, generator=g) < 0.5))
    return Gts(boxes, labels, valid, crowd)


def loss_of(outputs: GFLHeadOutputs, gts: Gts, **kw) -> dict[str, Term]:
    return gfl_loss(outputs, anchors(), strides(), *gts, **kw)


def assert_terms_equal(a: dict[str, Term], b: dict[str, Term], **tol) -> None:
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name].total, b[name].total, msg=name, **tol)
        torch.testing.assert_close(a[name].count, b[name].count, msg=name, **tol)
        assert a[name].weight == b[name].weight


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


def expected_boxes(dists: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Boxes ``[P, 4]`` of anchors ``index`` from distributions ``[P, 4, N]``, written out:
    Σ i softmax_i per side, times the stride, laid off from the anchor centre."""
    a = anchors()[index]
    centre = torch.cat(((a[:, :2] + a[:, 2:]) / 2,) * 2, dim=1)  # [P, 4] (cx, cy, cx, cy)
    mean = (dists.softmax(-1) * torch.arange(REG_MAX + 1.0)).sum(-1)  # [P, 4]
    return centre + mean * strides()[index, None] * torch.tensor([-1.0, -1.0, 1.0, 1.0])


# --- spec and module --------------------------------------------------------------------------


def test_build_and_forward_shapes() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec())
    assert isinstance(model, GFL) and model.num_classes == K
    out = model(torch.zeros(2, 3, IMAGE, IMAGE))
    assert out.feature_sizes == FEATURE_SIZES and out.image_size == (IMAGE, IMAGE)
    assert [tuple(x.shape) for x in out.cls_logits] == [(2, n, K) for n in COUNTS]
    assert [tuple(x.shape) for x in out.box_dists] == [(2, n, 4, REG_MAX + 1) for n in COUNTS]
    assert torch.equal(strides(), torch.tensor([8.0] * 64 + [16.0] * 16 + [32.0] * 4))


def test_head_layout_matches_the_conv_channels() -> None:
    """Channel ``(a, side, bin)`` of the predictor at location (y, x) lands at row
    ``(y W + x) a_count + a`` of the flattened level, ``[side, bin]``."""
    head = GFLHead(
        in_channels=4, num_anchors=2, num_classes=K, num_levels=1, num_convs=0, reg_max=2
    )
    with torch.no_grad():
        head.box_dists.weight.zero_()
        head.box_dists.bias.copy_(torch.arange(2 * 4 * 3, dtype=torch.float32))
    out = head([torch.zeros(1, 4, 2, 3)])
    dists = out.box_dists[0]  # [1, 2*3*2, 4, 3]
    assert dists.shape == (1, 12, 4, 3)
    for row in range(12):
        a = row % 2
        assert torch.equal(dists[0, row].flatten(), torch.arange(12.0) + 12 * a)


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(SpecError, match="reg_max"):
        specs.GFLHead(num_classes=3, reg_max=0)
    with pytest.raises(SpecError, match="eps"):
        specs.DistributionFocalLoss(eps=1.5)
    with pytest.raises(SpecError, match="beta"):
        specs.QualityFocalLoss(beta=-1.0)
    with pytest.raises(SpecError, match=r"neck\.in_levels"):
        attrs.evolve(tiny_spec(), backbone=specs.ResNet(depth=18, out_levels=(4, 5)))


@pytest.mark.parametrize(
    "path", ["specs/gfl/r50_fpn_1x_coco.py", "specs/shapes/gfl_r18_fpn.py"], ids=str
)
def test_spec_files_round_trip_and_build(path: str) -> None:
    exp = specs.load(ROOT / path)
    assert isinstance(exp.model, specs.GFL)
    assert specs.from_json(specs.to_json(exp)) == exp
    with torch.device("meta"):
        model = build(exp.model)
    assert isinstance(model, GFL)


@pytest.mark.parametrize(
    "cls",
    [specs.GFLHead, specs.QualityFocalLoss, specs.DistributionFocalLoss],
    ids=lambda c: c.__name__,
)
@settings(max_examples=30, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_leaf_specs_round_trip_exactly(cls: type, data: st.DataObject) -> None:
    spec = data.draw(spec_instances(cls))
    text = specs.to_json(spec)
    assert specs.from_json(text) == spec and specs.to_json(specs.from_json(text)) == text


def test_json_round_trip() -> None:
    spec = tiny_spec(
        cls_loss=specs.QualityFocalLoss(beta=1.5, weight=2.0),
        dfl=specs.DistributionFocalLoss(weight=0.5, eps=0.01),
        assigner=specs.ATSSAssigner(topk=4),
    )
    assert specs.from_json(specs.to_json(spec)) == spec
    assert specs.to_dict(spec)["spec"]["dfl"]["type"] == "DistributionFocalLoss"


# --- the objective ----------------------------------------------------------------------------


def test_terms_counts_and_targets_by_hand() -> None:
    """ "cls": QFL against IoU(predicted box, gt) at the gt's class of each positive (0
    elsewhere), count N_pos; "box": Σ w · GIoU loss with w = max_k σ(cls), count Σ w; "dfl":
    Σ w · mean over the sides of DFL against the clamped distances, the same count tensor."""
    g = torch.Generator().manual_seed(0)
    outputs = random_outputs(g, 2)
    gts = random_gts(g, [3, 2])
    terms = loss_of(outputs, gts)
    assert list(terms) == ["cls", "box", "dfl"]
    assert terms["box"].count is terms["dfl"].count
    assert [t.weight for t in terms.values()] == [1.0, 2.0, 0.25]
    assert all(t.total.dtype == t.count.dtype == torch.float32 for t in terms.values())

    a = anchors()
    assignment = atss_assign(
        a, COUNTS, gts.boxes, gts.valid, gts.crowd, assigner=specs.ATSSAssigner()
    )
    pos = assignment.label == POSITIVE
    assert terms["cls"].count == pos.sum() > 3
    b, i = pos.nonzero(as_tuple=True)
    gt = gts.boxes[b, assignment.gt_index[b, i]]  # [P, 4]
    logits = torch.cat(outputs.cls_logits, 1)
    dists = torch.cat(outputs.box_dists, 1)[b, i]  # [P, 4, N]
    boxes = expected_boxes(dists, i)
    iou = aligned_box_iou(boxes, gt)
    assert (iou > 0).any()
    targets = torch.zeros_like(logits)
    targets[b, i, gts.labels[b, assignment.gt_index[b, i]]] = iou
    torch.testing.assert_close(terms["cls"].total, quality_focal_loss(logits, targets).sum())

    w = torch.sigmoid(logits[b, i]).amax(-1)  # [P]
    torch.testing.assert_close(terms["box"].count, w.sum())
    torch.testing.assert_close(terms["box"].total, (w * giou_loss(boxes, gt)).sum())
    centre = (a[i, :2] + a[i, 2:]) / 2
    target = encode_distances(centre, gt, stride=strides()[i], max_distance=REG_MAX, eps=0.1)
    assert target.max() <= REG_MAX - 0.1 + 1e-6 and target.min() >= 0
    dfl = distribution_focal_loss(dists, target).mean(-1)
    torch.testing.assert_close(terms["dfl"].total, (w * dfl).sum())


def test_padding_is_invisible_and_batches_add_up() -> None:
    g = torch.Generator().manual_seed(2)
    outputs = random_outputs(g, 3)
    gts = random_gts(g, [4, 0, 2], crowd_fraction=0.3)
    base = loss_of(outputs, gts)
    extra = 3
    padded = Gts(
        torch.cat((gts.boxes, torch.full((3, extra, 4), math.nan)), 1),
        torch.cat((gts.labels, torch.full((3, extra), 99)), 1),
        torch.cat((gts.valid, torch.zeros(3, extra, dtype=torch.bool)), 1),
        torch.cat((gts.crowd, torch.ones(3, extra, dtype=torch.bool)), 1),
    )
    assert_terms_equal(loss_of(outputs, padded), base, rtol=0, atol=0)
    parts = [
        loss_of(
            GFLHeadOutputs(
                *(tuple(x[i : i + 1] for x in field) for field in outputs[:2]), FEATURE_SIZES
            ),
            Gts(*(x[i : i + 1] for x in gts)),
        )
        for i in range(3)
    ]
    for name, term in base.items():
        torch.testing.assert_close(term.total, sum(p[name].total for p in parts))
        torch.testing.assert_close(term.count, sum(p[name].count for p in parts))


def test_empty_batches_are_finite_with_zero_counts() -> None:
    g = torch.Generator().manual_seed(3)
    outputs = random_outputs(g, 2)
    gts = random_gts(g, [2, 1])
    logits = torch.cat(outputs.cls_logits, 1)
    background = quality_focal_loss(logits, torch.zeros_like(logits)).sum()
    for empty in (gts._replace(valid=torch.zeros_like(gts.valid)), Gts(*(x[:, :0] for x in gts))):
        terms = loss_of(outputs, empty)
        assert all(t.count == 0 for t in terms.values())
        assert terms["box"].total == 0 and terms["dfl"].total == 0
        torch.testing.assert_close(terms["cls"].total, background)
        assert total_loss(terms).isfinite()


def test_gradients_are_finite_and_reach_every_branch() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).train()
    batch = tiny_batch(torch.Generator().manual_seed(4), [3, 0])
    outputs = model(batch.images)
    terms = model.loss(outputs, batch)
    assert terms["cls"].count > 0
    total_loss(terms).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:  # (the stem is frozen)
            assert p.grad is not None and p.grad.isfinite().all(), name
    assert model.head.box_dists.weight.grad.abs().sum() > 0
    assert model.head.scales.grad.abs().sum() > 0
    # the IoU target and the weights are constants: no gradient flows to the cls logits
    # through the box terms
    logits = [x.detach().requires_grad_() for x in outputs.cls_logits]
    dists = [x.detach().requires_grad_() for x in outputs.box_dists]
    again = model.loss(outputs._replace(cls_logits=tuple(logits), box_dists=tuple(dists)), batch)
    box_terms = again["box"].total + again["dfl"].total
    grads = torch.autograd.grad(box_terms, [*logits, *dists], allow_unused=True)
    assert all(gr is None for gr in grads[: len(logits)])
    assert all(gr is not None for gr in grads[len(logits) :])


def test_losses_are_float32_under_autocast() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).eval()
    batch = tiny_batch(torch.Generator().manual_seed(5), [2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch.images)
        assert outputs.cls_logits[0].dtype == torch.bfloat16
        low = model.loss(outputs, batch)
    assert all(t.total.dtype == t.count.dtype == torch.float32 for t in low.values())
    as_float = GFLHeadOutputs(
        *(tuple(x.float() for x in field) for field in outputs[:2]), outputs.feature_sizes
    )
    assert_terms_equal(low, model.loss(as_float, batch), rtol=0, atol=0)


# --- inference --------------------------------------------------------------------------------


def test_postprocess_scores_and_integral_boxes() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).eval()
    g = torch.Generator().manual_seed(6)
    outputs = random_outputs(g, 2)
    logits = torch.cat(outputs.cls_logits, 1).clone() - 4
    logits[0, 70, 2] = 5.0  # one confident anchor on level 1 of image 0
    dists = torch.cat(outputs.box_dists, 1)
    outputs = outputs._replace(cls_logits=split(logits), image_size=(IMAGE, IMAGE))
    sizes = torch.tensor([[IMAGE, IMAGE], [40, 50]])
    det = model.postprocess(outputs, sizes)
    n = model.postprocess_spec.max_detections
    assert det.boxes.shape == (2, n, 4) and det.valid.shape == (2, n)
    assert det.valid[0, 0] and det.labels[0, 0] == 2
    torch.testing.assert_close(det.scores[0, 0], torch.sigmoid(logits[0, 70, 2]))
    want = expected_boxes(dists[0, 70][None], torch.tensor([70]))[0]
    torch.testing.assert_close(det.boxes[0, 0], want.clamp(0, IMAGE))
    for i in range(2):
        v = det.valid[i]
        k = int(v.sum())
        assert v[:k].all() and not v[k:].any()
        assert (det.scores[i, :k].diff() <= 0).all() and (det.scores[i, k:] == 0).all()
        assert (det.boxes[i, :k, 2] <= sizes[i, 1]).all()
        assert (det.boxes[i, :k, 3] <= sizes[i, 0]).all()


def test_predict_gives_padded_detections() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).train()
    det = model.predict(torch.randint(0, 256, (2, 3, IMAGE, IMAGE)).float())
    assert model.training
    assert det.boxes.shape == (2, 100, 4) and det.scores.dtype == torch.float32


@pytest.mark.compile
def test_compiled_objective_equals_eager() -> None:
    """The whole objective traces into one graph (no break, no host sync) and the traced graph
    gives the eager terms. The AOT-eager backend keeps this test cheap; inductor's code for the
    GFL losses and the integral (tests/ops/test_gfl_losses.py) and for the ATSS assigner
    (tests/ops/test_atss.py) is compared with eager there."""
    spec = tiny_spec()

    def objective(cls_logits, dists, boxes, labels, valid, crowd):
        outputs = GFLHeadOutputs(split(cls_logits), split(dists), FEATURE_SIZES)
        device = cls_logits.device
        return gfl_loss(
            outputs,
            retinanet_anchors(FEATURE_SIZES, spec=spec.anchors, device=device),
            gfl_strides(FEATURE_SIZES, spec=spec.anchors, device=device),
            boxes,
            labels,
            valid,
            crowd,
            assigner=spec.assigner,
            cls_loss=spec.cls_loss,
            box_loss=spec.box_loss,
            dfl=spec.dfl,
        )

    compiled = torch.compile(objective, fullgraph=True, dynamic=False, backend="aot_eager")
    g = torch.Generator().manual_seed(7)
    for counts in ([4, 0, 2], [1, 3, 0]):  # the same shapes: one graph, two batches
        outputs = random_outputs(g, 3)
        gts = random_gts(g, counts, crowd_fraction=0.3)
        args = (*(torch.cat(x, 1) for x in outputs[:2]), *gts)
        eager = objective(*args)
        assert eager["cls"].count > 0
        assert_terms_equal(compiled(*args), eager, rtol=1e-5, atol=1e-5)
