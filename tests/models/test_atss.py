"""The ATSS detector: spec, head, objective on padded batches, postprocess, the compiler."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import attrs
import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

from fdet import build, specs
from fdet.data.sample import Batch
from fdet.models.detectors.atss import ATSS, atss_assign, atss_loss, atss_scores
from fdet.models.detectors.base import Term, total_loss
from fdet.models.detectors.retinanet import retinanet_anchors
from fdet.models.heads.atss import ATSSHeadOutputs
from fdet.ops.assign import POSITIVE
from fdet.ops.coding import centerness, decode_deltas, encode_distances
from fdet.ops.losses import giou_loss, sigmoid_focal_loss
from fdet.specs import SpecError
from tests.specs.test_serde import spec_instances
from tests.strategies import random_boxes

ROOT = Path(__file__).resolve().parents[2]
IMAGE = 64
K = 3
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


def tiny_spec(*, centerness_branch: bool = True, **kw) -> specs.ATSS:
    return specs.ATSS(
        backbone=specs.ResNet(depth=18, out_levels=(3, 4, 5), width=16, norm=specs.BatchNorm()),
        neck=specs.FPN(channels=32, out_levels=(3, 4, 5)),
        head=specs.ATSSHead(
            num_classes=K,
            num_convs=1,
            channels=32,
            norm=specs.GroupNorm(groups=8),
            centerness=centerness_branch,
        ),
        anchors=ANCHORS,
        **kw,
    )


def anchors() -> torch.Tensor:
    return retinanet_anchors(FEATURE_SIZES, spec=ANCHORS)


def split(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(flat.split(COUNTS, dim=1))


def random_outputs(g: torch.Generator, batch: int, *, ctr: bool = True) -> ATSSHeadOutputs:
    a = sum(COUNTS)
    logits = torch.randn(batch, a, K, generator=g) * 2 - 2
    deltas = torch.randn(batch, a, 4, generator=g) * 0.5
    centerness_logits = torch.randn(batch, a, generator=g)
    return ATSSHeadOutputs(
        split(logits), split(deltas), split(centerness_logits) if ctr else None, FEATURE_SIZES
    )


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


def loss_of(outputs: ATSSHeadOutputs, gts: Gts, **kw) -> dict[str, Term]:
    return atss_loss(outputs, anchors(), *gts, **kw)


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


# --- spec and module --------------------------------------------------------------------------


def test_build_and_forward_shapes() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec())
    assert isinstance(model, ATSS) and model.num_classes == K
    assert model.head.scales.shape == (3,) and (model.head.scales == 1).all()
    out = model(torch.zeros(2, 3, IMAGE, IMAGE))
    assert out.feature_sizes == FEATURE_SIZES and out.image_size == (IMAGE, IMAGE)
    assert [tuple(x.shape) for x in out.cls_logits] == [(2, n, K) for n in COUNTS]
    assert [tuple(x.shape) for x in out.box_deltas] == [(2, n, 4) for n in COUNTS]
    assert out.centerness is not None
    assert [tuple(x.shape) for x in out.centerness] == [(2, n) for n in COUNTS]
    plain = build(tiny_spec(centerness_branch=False))
    assert (
        plain.head.centerness is None and plain(torch.zeros(1, 3, IMAGE, IMAGE)).centerness is None
    )


def test_scales_multiply_the_deltas_of_their_level() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).eval()
    images = torch.randint(0, 256, (1, 3, IMAGE, IMAGE)).float()
    with torch.no_grad():
        before = model(images)
        model.head.scales[1] = 3.0
        after = model(images)
    torch.testing.assert_close(after.box_deltas[1], 3 * before.box_deltas[1])
    torch.testing.assert_close(after.box_deltas[0], before.box_deltas[0])
    torch.testing.assert_close(after.cls_logits[1], before.cls_logits[1])


def test_spec_errors_name_the_field() -> None:
    with pytest.raises(SpecError, match="num_classes"):
        specs.ATSSHead(num_classes=0)
    with pytest.raises(SpecError, match="topk"):
        specs.ATSSAssigner(topk=0)
    with pytest.raises(SpecError, match=r"norm\.groups"):
        specs.ATSSHead(num_classes=3, channels=20, norm=specs.GroupNorm(groups=8))
    with pytest.raises(SpecError, match=r"anchors\.strides"):
        attrs.evolve(tiny_spec(), anchors=specs.Anchors())
    with pytest.raises(SpecError, match="centerness_weight"):
        tiny_spec(centerness_weight=-1.0)


@pytest.mark.parametrize(
    "path", ["specs/atss/r50_fpn_1x_coco.py", "specs/shapes/atss_r18_fpn.py"], ids=str
)
def test_spec_files_round_trip_and_build(path: str) -> None:
    exp = specs.load(ROOT / path)
    assert isinstance(exp.model, specs.ATSS)
    assert specs.from_json(specs.to_json(exp)) == exp
    with torch.device("meta"):
        model = build(exp.model)
    assert isinstance(model, ATSS)


@pytest.mark.parametrize("cls", [specs.ATSSAssigner, specs.ATSSHead], ids=lambda c: c.__name__)
@settings(max_examples=30, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_leaf_specs_round_trip_exactly(cls: type, data: st.DataObject) -> None:
    spec = data.draw(spec_instances(cls))
    text = specs.to_json(spec)
    assert specs.from_json(text) == spec and specs.to_json(specs.from_json(text)) == text


def test_json_round_trip() -> None:
    spec = tiny_spec(
        assigner=specs.ATSSAssigner(topk=5, unbiased_std=False),
        box_loss=specs.L1Loss(weight=0.5),
        centerness_weight=0.5,
    )
    assert specs.from_json(specs.to_json(spec)) == spec
    assert specs.to_dict(spec)["spec"]["type"] == "ATSS"


# --- the objective ----------------------------------------------------------------------------


def test_terms_counts_and_targets_by_hand() -> None:
    """ "cls" counts the positives; "box" is Σ ctr* · GIoU loss over the positives with count
    Σ ctr*; "centerness" is the BCE against ctr* with the positives' count (the same tensor as
    "cls")."""
    g = torch.Generator().manual_seed(0)
    outputs = random_outputs(g, 2)
    gts = random_gts(g, [3, 2])
    terms = loss_of(outputs, gts)
    assert list(terms) == ["cls", "box", "centerness"]
    assert terms["cls"].count is terms["centerness"].count
    assert all(t.total.dtype == t.count.dtype == torch.float32 for t in terms.values())
    assert [t.weight for t in terms.values()] == [1.0, 2.0, 1.0]

    a = anchors()
    assignment = atss_assign(
        a, COUNTS, gts.boxes, gts.valid, gts.crowd, assigner=specs.ATSSAssigner()
    )
    pos = assignment.label == POSITIVE
    assert terms["cls"].count == pos.sum() > 3
    b, i = pos.nonzero(as_tuple=True)
    gt = gts.boxes[b, assignment.gt_index[b, i]]  # [P, 4]
    centre = (a[i, :2] + a[i, 2:]) / 2
    ctr = centerness(encode_distances(centre, gt))  # [P]
    assert (ctr > 0).all()
    torch.testing.assert_close(terms["box"].count, ctr.sum())
    deltas = torch.cat(outputs.box_deltas, 1)[b, i]
    boxes = decode_deltas(a[i], deltas, stds=(0.1, 0.1, 0.2, 0.2))
    torch.testing.assert_close(terms["box"].total, (ctr * giou_loss(boxes, gt)).sum())
    ctr_logits = torch.cat(outputs.centerness, 1)[b, i]
    torch.testing.assert_close(
        terms["centerness"].total,
        F.binary_cross_entropy_with_logits(ctr_logits, ctr, reduction="sum"),
    )
    # classification: the focal loss of one-hot targets on every anchor (no crowd: none ignored)
    logits = torch.cat(outputs.cls_logits, 1)
    targets = torch.zeros_like(logits)
    targets[b, i, gts.labels[b, assignment.gt_index[b, i]]] = 1.0
    torch.testing.assert_close(terms["cls"].total, sigmoid_focal_loss(logits, targets).sum())


def test_without_centerness_box_terms_count_positives() -> None:
    g = torch.Generator().manual_seed(1)
    outputs = random_outputs(g, 2, ctr=False)
    gts = random_gts(g, [3, 1])
    terms = loss_of(outputs, gts)
    assert list(terms) == ["cls", "box"]
    assert terms["box"].count is terms["cls"].count
    with_ctr = loss_of(outputs._replace(centerness=random_outputs(g, 2).centerness), gts)
    assert with_ctr["box"].count < terms["box"].count  # centerness targets are below 1
    torch.testing.assert_close(with_ctr["cls"].total, terms["cls"].total)


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
    # totals and counts are plain sums over the batch: one image at a time adds up to them
    parts = [
        loss_of(
            ATSSHeadOutputs(
                *(tuple(x[i : i + 1] for x in field) for field in outputs[:3]), FEATURE_SIZES
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
    background = sigmoid_focal_loss(logits, torch.zeros_like(logits)).sum()
    for empty in (gts._replace(valid=torch.zeros_like(gts.valid)), Gts(*(x[:, :0] for x in gts))):
        terms = loss_of(outputs, empty)
        assert all(t.count == 0 for t in terms.values())
        assert terms["box"].total == 0 and terms["centerness"].total == 0
        torch.testing.assert_close(terms["cls"].total, background)
        assert total_loss(terms).isfinite()


def test_gradients_are_finite_with_empty_images_crowds_and_garbage() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).train()
    batch = tiny_batch(torch.Generator().manual_seed(4), [3, 0])
    terms = model.loss(model(batch.images), batch)
    assert terms["cls"].count > 0
    total_loss(terms).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:  # (the stem is frozen)
            assert p.grad is not None and p.grad.isfinite().all(), name
    assert model.head.centerness.weight.grad.abs().sum() > 0
    assert model.head.scales.grad.abs().sum() > 0
    assert model.head.box_deltas.weight.grad.abs().sum() > 0


def test_losses_are_float32_under_autocast() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).eval()
    batch = tiny_batch(torch.Generator().manual_seed(5), [2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch.images)
        assert outputs.cls_logits[0].dtype == torch.bfloat16
        low = model.loss(outputs, batch)
    assert all(t.total.dtype == t.count.dtype == torch.float32 for t in low.values())
    as_float = ATSSHeadOutputs(
        *(tuple(x.float() for x in field) for field in outputs[:3]), outputs.feature_sizes
    )
    assert_terms_equal(low, model.loss(as_float, batch), rtol=0, atol=0)


# --- inference --------------------------------------------------------------------------------


def test_postprocess_scores_are_cls_times_centerness() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).eval()
    g = torch.Generator().manual_seed(6)
    outputs = random_outputs(g, 2)
    logits = torch.cat(outputs.cls_logits, 1).clone()
    logits[0, 5, 1] = 6.0  # one confident anchor on level 0 of image 0
    ctr = torch.cat(outputs.centerness, 1).clone()
    ctr[0, 5] = 5.0
    outputs = outputs._replace(
        cls_logits=split(logits), centerness=split(ctr), image_size=(IMAGE, IMAGE)
    )
    sizes = torch.tensor([[IMAGE, IMAGE], [40, 50]])
    det = model.postprocess(outputs, sizes)
    n = model.postprocess_spec.max_detections
    assert det.boxes.shape == (2, n, 4) and det.valid.shape == (2, n)
    assert det.valid[0, 0] and det.labels[0, 0] == 1
    want = torch.sigmoid(logits[0, 5, 1]) * torch.sigmoid(torch.cat(outputs.centerness, 1)[0, 5])
    torch.testing.assert_close(det.scores[0, 0], want)
    for i in range(2):  # valid first, by score; padding zeroed; boxes inside the image
        v = det.valid[i]
        k = int(v.sum())
        assert v[:k].all() and not v[k:].any()
        assert (det.scores[i, :k].diff() <= 0).all() and (det.scores[i, k:] == 0).all()
        assert (det.boxes[i, :k, 2] <= sizes[i, 1]).all() and (
            det.boxes[i, :k, 3] <= sizes[i, 0]
        ).all()
    scores = atss_scores(outputs)
    assert (scores[0] <= torch.sigmoid(outputs.cls_logits[0])).all()
    plain = atss_scores(outputs._replace(centerness=None))
    torch.testing.assert_close(plain[1], torch.sigmoid(outputs.cls_logits[1]))


def test_predict_gives_padded_detections() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).train()
    det = model.predict(torch.randint(0, 256, (2, 3, IMAGE, IMAGE)).float())
    assert model.training
    assert det.boxes.shape == (2, 100, 4) and det.valid.dtype == torch.bool
    assert det.scores.dtype == torch.float32


@pytest.mark.compile
def test_compiled_objective_equals_eager() -> None:
    """The whole objective traces into one graph (no break, no host sync) and the traced graph
    gives the eager terms. The AOT-eager backend keeps this test cheap; inductor's code for
    the ATSS assigner (tests/ops/test_atss.py) is compared with eager there."""
    spec = tiny_spec()

    def objective(cls_logits, deltas, ctr, boxes, labels, valid, crowd):
        outputs = ATSSHeadOutputs(split(cls_logits), split(deltas), split(ctr), FEATURE_SIZES)
        return atss_loss(
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
            centerness_weight=spec.centerness_weight,
        )

    compiled = torch.compile(objective, fullgraph=True, dynamic=False, backend="aot_eager")
    g = torch.Generator().manual_seed(7)
    for counts in ([4, 0, 2], [1, 3, 0]):  # the same shapes: one graph, two batches
        outputs = random_outputs(g, 3)
        gts = random_gts(g, counts, crowd_fraction=0.3)
        args = (*(torch.cat(x, 1) for x in outputs[:3]), *gts)
        eager = objective(*args)
        assert eager["cls"].count > 0
        assert_terms_equal(compiled(*args), eager, rtol=1e-5, atol=1e-5)
