"""Faster R-CNN (fdet.models.detectors.two_stage.faster_rcnn): the spec and its checks, the zoo
and shapes files, the contract's three methods on a tiny model (shapes, the four terms wired to
the RPN and RoI functions, images without objects, padding, batched against per image,
gradients and the detached proposals, autocast), the training step, and the compiler."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fdet import build, specs
from fdet.data.sample import Batch
from fdet.models.detectors.base import total_loss
from fdet.models.detectors.two_stage.faster_rcnn import (
    FasterRCNN,
    FasterRCNNOutputs,
    max_pool_levels,
)
from fdet.models.detectors.two_stage.roi_heads import roi_loss, roi_targets
from fdet.models.detectors.two_stage.rpn import rpn_loss
from fdet.specs import SpecError
from fdet.train.step import supervised_step

ROOT = Path(__file__).resolve().parents[2]
K = 3
SIZE = 64
R_TRAIN = 64  # proposals an image in training
S = 32  # sampled RoIs an image

TINY = specs.FasterRCNN(
    num_classes=K,
    backbone=specs.ResNet(depth=18, width=16, norm=specs.FrozenBatchNorm(), frozen_stages=-1),
    neck=specs.FPN(in_levels=(2, 3, 4, 5), out_levels=(2, 3, 4, 5), channels=16),
    max_pool_levels=1,
    rpn=specs.RPN(
        anchors=specs.Anchors(
            strides=(4, 8, 16, 32, 64),
            base_sizes=(8.0, 16.0, 32.0, 64.0, 128.0),
            octave_scales=(1.0,),
            ratios=(0.5, 1.0, 2.0),
        ),
        sampler=specs.Sampler(num_samples=64, positive_fraction=0.5),
        pre_nms_topk_train=128,
        post_nms_topk_train=R_TRAIN,
        pre_nms_topk_test=64,
        post_nms_topk_test=32,
    ),
    roi_head=specs.RoIHead(
        roi_align=specs.RoIAlign(canonical_scale=56.0),
        box_head=specs.BoxHead(fc_channels=32),
        sampler=specs.Sampler(num_samples=S, positive_fraction=0.25),
    ),
)
NUM_ANCHORS = 3 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)  # P2–P6 of a 64² input


def _model(seed: int = 0, spec: specs.FasterRCNN = TINY) -> FasterRCNN:
    torch.manual_seed(seed)
    model = build(spec)
    assert isinstance(model, FasterRCNN)
    with torch.no_grad():  # livelier predictors: proposals and detections vary
        for p in (*model.rpn.head.parameters(), *model.roi_heads.box_predictor.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(*, empty: bool = False, extra_slots: int = 0, batch: int = 2) -> Batch:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    boxes = torch.tensor(
        [
            [[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]],
            [[10.0, 8.0, 26.0, 20.0], [0, 0, 0, 0]],
        ]
    )[:batch]
    labels = torch.tensor([[0, 2], [1, 0]])[:batch]
    valid = torch.tensor([[True, True], [True, False]])[:batch]
    if empty:
        valid = torch.zeros_like(valid)
    if extra_slots:
        boxes = torch.cat((boxes, torch.full((batch, extra_slots, 4), float("nan"))), dim=1)
        labels = torch.cat((labels, torch.full((batch, extra_slots), 7)), dim=1)
        valid = torch.cat((valid, torch.zeros(batch, extra_slots, dtype=torch.bool)), dim=1)
    m = boxes.shape[1]
    return Batch(
        images=images,
        image_sizes=torch.tensor([[SIZE, SIZE], [60, 52]])[:batch],
        gt_boxes=boxes,
        gt_labels=labels,
        gt_valid=valid,
        gt_crowd=torch.zeros(batch, m, dtype=torch.bool),
        image_ids=torch.arange(batch),
        scales=torch.ones(batch, 2),
    )


def _keys(batch: Batch, seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, m = batch.gt_valid.shape
    return {
        "rpn_keys": torch.rand(b, NUM_ANCHORS, generator=g),
        "roi_keys": torch.rand(b, R_TRAIN + m, generator=g),
    }


def _values(terms: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (t.total, t.count) for name, t in terms.items()}


# --------------------------------------------------------------------------------------------
# Spec and files


def test_spec_round_trips_and_defaults_are_torchvisions() -> None:
    spec = specs.FasterRCNN(num_classes=80)
    assert specs.from_json(specs.to_json(spec), specs.Detector) == spec
    assert specs.from_json(specs.to_json(TINY), specs.Detector) == TINY
    assert spec.pyramid_levels == (2, 3, 4, 5, 6)
    assert spec.num_classes == 80
    assert spec.rpn.anchors.strides == (4, 8, 16, 32, 64)
    assert spec.roi_head.roi_align.levels == (2, 3, 4, 5)


def test_spec_rejects_parts_that_do_not_fit() -> None:
    with pytest.raises(SpecError, match=r"rpn\.anchors\.strides"):
        specs.FasterRCNN(num_classes=3, max_pool_levels=0)  # anchors on P2–P6, pyramid P2–P5
    with pytest.raises(SpecError, match=r"roi_head\.roi_align\.levels"):
        specs.FasterRCNN(
            num_classes=3, roi_head=specs.RoIHead(roi_align=specs.RoIAlign(levels=(3, 4, 5, 6, 7)))
        )
    with pytest.raises(SpecError, match="max_pool_levels"):
        specs.FasterRCNN(
            num_classes=3, neck=specs.FPN(in_levels=(2, 3, 4, 5), out_levels=(2, 3, 4, 5, 6))
        )
    with pytest.raises(SpecError, match=r"neck\.in_levels"):
        specs.FasterRCNN(num_classes=3, backbone=specs.ResNet(out_levels=(3, 4, 5)))
    with pytest.raises(SpecError, match="num_classes"):
        specs.from_json('{"type": "FasterRCNN", "num_classes": 0}', specs.Detector)
    # a conv P6 made by the neck instead of the max-pool works too
    conv_p6 = specs.FasterRCNN(
        num_classes=3,
        neck=specs.FPN(in_levels=(2, 3, 4, 5), out_levels=(2, 3, 4, 5, 6)),
        max_pool_levels=0,
    )
    assert conv_p6.pyramid_levels == (2, 3, 4, 5, 6)


@pytest.mark.parametrize(
    "file", ["specs/shapes/faster_rcnn_r18_fpn.py", "specs/faster_rcnn/r50_fpn_1x_coco.py"]
)
def test_spec_files_load_round_trip_and_build(file: str) -> None:
    exp = specs.load(ROOT / file, specs.Experiment)
    assert isinstance(exp.model, specs.FasterRCNN)
    assert specs.from_json(specs.to_json(exp), specs.Experiment) == exp
    model = build(exp.model)
    assert isinstance(model, FasterRCNN) and model.num_classes == exp.model.num_classes


def test_zoo_model_has_torchvisions_parameters() -> None:
    """The R50-FPN zoo model holds as many weights as torchvision's fasterrcnn_resnet50_fpn with
    81 classes (80 + background), part by part. (Without pretrained weights torchvision builds
    plain batch norm, whose ``num_batches_tracked`` counters are left out.)"""
    exp = specs.load(ROOT / "specs/faster_rcnn/r50_fpn_1x_coco.py", specs.Experiment)
    ours = build(exp.model).state_dict()
    theirs = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    theirs_sd = {k: v for k, v in theirs.state_dict().items() if "num_batches_tracked" not in k}
    parts = {
        "backbone.body.": "backbone.",
        "backbone.fpn.": "neck.",
        "rpn.": "rpn.",
        "roi_heads.": "roi_heads.",
    }
    for theirs_prefix, ours_prefix in parts.items():
        want = sum(v.numel() for k, v in theirs_sd.items() if k.startswith(theirs_prefix))
        got = sum(v.numel() for k, v in ours.items() if k.startswith(ours_prefix))
        assert got == want, theirs_prefix
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in theirs_sd.values())


def test_max_pool_levels_is_torchvisions_last_level_max_pool() -> None:
    p5 = torch.randn(2, 4, 7, 10)
    ours = max_pool_levels([p5], 1)
    theirs, names = LastLevelMaxPool()([p5], [p5], ["p5"])
    assert names == ["p5", "pool"]
    assert ours[0] is p5 and ours[1].shape == (2, 4, 4, 5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], p5[:, :, ::2, ::2], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The contract on a tiny model


def test_forward_loss_postprocess_shapes() -> None:
    model = _model().train()
    batch = _batch()
    outputs = model(batch.images)
    assert isinstance(outputs, FasterRCNNOutputs)
    assert [tuple(f.shape) for f in outputs.features] == [
        (2, 16, 16, 16),
        (2, 16, 8, 8),
        (2, 16, 4, 4),
        (2, 16, 2, 2),
        (2, 16, 1, 1),
    ]
    assert outputs.rpn.objectness.shape == (2, NUM_ANCHORS)
    assert outputs.image_size == (SIZE, SIZE)

    terms = model.loss(outputs, batch)
    assert list(terms) == ["rpn_cls", "rpn_box", "roi_cls", "roi_box"]
    assert terms["rpn_cls"].count is terms["rpn_box"].count
    assert terms["roi_cls"].count is terms["roi_box"].count
    assert terms["rpn_cls"].count.item() == 2 * 64  # enough negatives to fill every sample
    assert terms["roi_cls"].count.item() == 2 * S
    for term in terms.values():
        assert term.total.dtype == torch.float32 and term.total.isfinite()
        assert term.total.item() > 0

    second = model.training_outputs(outputs, batch)
    assert second.proposals.boxes.shape == (2, R_TRAIN, 4)
    assert second.sampled.boxes.shape == (2, S, 4)
    assert second.roi.class_logits.shape == (2, S, K + 1)
    assert second.roi.box_deltas.shape == (2, S, K + 1, 4)
    # proposals are clipped to each image's own size
    proposals = second.proposals
    assert (proposals.boxes[1, :, 2] <= 52).all() and (proposals.boxes[1, :, 3] <= 60).all()

    model.eval()
    with torch.no_grad():
        eval_outputs = model(batch.images)
        detections = model.postprocess(eval_outputs, batch.image_sizes)
    assert detections.boxes.shape == (2, 100, 4)
    assert detections.labels.shape == (2, 100) and detections.valid.shape == (2, 100)
    assert detections.valid.any()
    kept = detections.labels[detections.valid]
    assert ((kept >= 0) & (kept < K)).all()
    assert (detections.boxes[1, :, 2][detections.valid[1]] <= 52).all()
    predicted = model.predict(batch.images, batch.image_sizes)
    torch.testing.assert_close(predicted.boxes, detections.boxes)


def test_loss_is_the_rpn_loss_and_the_roi_loss_of_its_proposals() -> None:
    """The four terms are rpn_loss of the RPN's outputs and roi_loss of the RoI head on the
    RoIs sampled from the training proposals, with the same keys."""
    model = _model().train()
    batch = _batch()
    keys = _keys(batch)
    outputs = model(batch.images)
    terms = model.loss(outputs, batch, **keys)

    rpn_terms = rpn_loss(
        outputs.rpn,
        batch.gt_boxes,
        batch.gt_valid,
        batch.gt_crowd,
        spec=TINY.rpn,
        keys=keys["rpn_keys"],
    )
    proposals = model.rpn.proposals(outputs.rpn, batch.image_sizes)
    sampled = roi_targets(
        proposals.boxes,
        proposals.valid,
        batch.gt_boxes,
        batch.gt_labels,
        batch.gt_valid,
        batch.gt_crowd,
        spec=TINY.roi_head,
        keys=keys["roi_keys"],
    )
    roi_terms = roi_loss(
        model.roi_heads(outputs.features, sampled.boxes), sampled, spec=TINY.roi_head
    )
    want = _values({**rpn_terms, **roi_terms})
    got = _values(terms)
    assert list(got) == list(want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the gts join the proposals: every gt is a positive RoI of its image
    assert sampled.positive.sum(dim=1).tolist()[1] >= 1
    assert (sampled.roi_index[sampled.valid] < R_TRAIN + 2).all()


def test_images_without_objects_give_finite_losses() -> None:
    model = _model().train()
    batch = _batch(empty=True)
    terms = model.loss(model(batch.images), batch)
    for name, term in terms.items():
        assert term.total.isfinite(), name
    assert terms["rpn_box"].total.item() == 0.0 and terms["roi_box"].total.item() == 0.0
    assert terms["rpn_cls"].total.item() > 0 and terms["roi_cls"].total.item() > 0
    assert terms["roi_cls"].count.item() == 2 * S  # background fills the sample
    loss = total_loss(terms)
    loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    # no gt slots at all
    none = _batch()._replace(
        gt_boxes=torch.zeros(2, 0, 4),
        gt_labels=torch.zeros(2, 0, dtype=torch.int64),
        gt_valid=torch.zeros(2, 0, dtype=torch.bool),
        gt_crowd=torch.zeros(2, 0, dtype=torch.bool),
    )
    terms = model.loss(model(none.images), none)
    assert all(term.total.isfinite() for term in terms.values())


def test_padded_gt_slots_are_invisible() -> None:
    model = _model().train()
    batch, padded = _batch(), _batch(extra_slots=3)
    keys = _keys(batch)
    padded_keys = {
        "rpn_keys": keys["rpn_keys"],
        # the appended gt candidates come after the proposals: the padded slots' keys go last
        "roi_keys": torch.cat((keys["roi_keys"], torch.rand(2, 3)), dim=1),
    }
    outputs = model(batch.images)
    torch.testing.assert_close(
        _values(model.loss(outputs, padded, **padded_keys)),
        _values(model.loss(outputs, batch, **keys)),
        rtol=0,
        atol=0,
    )


def test_batched_equals_per_image() -> None:
    """With frozen batch norm nothing mixes the images: the batch's totals and counts are the
    sums of each image's, and each image's detections are its own."""
    model = _model().train()
    batch = _batch()
    keys = _keys(batch)
    whole = _values(model.loss(model(batch.images), batch, **keys))
    parts = []
    for i in range(2):
        one = Batch(*(t[i : i + 1] if isinstance(t, torch.Tensor) else t for t in batch))
        one_keys = {k: v[i : i + 1] for k, v in keys.items()}
        parts.append(_values(model.loss(model(one.images), one, **one_keys)))
    for name, (total, count) in whole.items():
        torch.testing.assert_close(
            total, parts[0][name][0] + parts[1][name][0], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(count, parts[0][name][1] + parts[1][name][1], rtol=0, atol=0)

    model.eval()
    both = model.predict(batch.images, batch.image_sizes)
    for i in range(2):
        one = model.predict(batch.images[i : i + 1], batch.image_sizes[i : i + 1])
        n = int(one.valid.sum())
        assert int(both.valid[i].sum()) == n
        torch.testing.assert_close(both.boxes[i, :n], one.boxes[0, :n], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(both.scores[i, :n], one.scores[0, :n], rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_part_and_not_through_the_proposals() -> None:
    model = _model().train()
    batch = _batch()
    outputs = model(batch.images)
    terms = model.loss(outputs, batch)
    total_loss(terms).backward()
    first_backbone = next(p for p in model.backbone.parameters() if p.requires_grad)
    parts = {
        "backbone": first_backbone,
        "neck": model.neck.inner_blocks[0][0].weight,
        "rpn head": model.rpn.head.cls_logits.weight,
        "rpn deltas": model.rpn.head.bbox_pred.weight,
        "box head": model.roi_heads.box_head.fcs[0].weight,
        "classifier": model.roi_heads.box_predictor.cls_score.weight,
        "regressor": model.roi_heads.box_predictor.bbox_pred.weight,
    }
    for name, p in parts.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # the RoI terms alone give the RPN's predictors no gradient: the proposals are detached
    model.zero_grad(set_to_none=True)
    outputs = model(batch.images)
    terms = model.loss(outputs, batch)
    (terms["roi_cls"].total + terms["roi_box"].total).backward()
    for p in (model.rpn.head.cls_logits.weight, model.rpn.head.bbox_pred.weight):
        assert p.grad is None or p.grad.abs().sum() == 0
    assert model.roi_heads.box_head.fcs[0].weight.grad.abs().sum() > 0
    assert first_backbone.grad is not None and first_backbone.grad.abs().sum() > 0


def test_loss_outside_autocast_of_half_precision_features() -> None:
    """The training step runs forward under autocast and loss outside it: the RoI head then
    runs under an autocast of the features' dtype, and the terms are float32."""
    model = _model().train()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch.images)
    assert outputs.features[0].dtype == torch.bfloat16
    terms = model.loss(outputs, batch)
    for term in terms.values():
        assert term.total.dtype == torch.float32 and term.total.isfinite()
    total_loss(terms).backward()
    assert model.roi_heads.box_head.fcs[0].weight.grad is not None
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eval_outputs = model(batch.images)
    detections = model.postprocess(eval_outputs, batch.image_sizes)
    assert detections.boxes.shape == (2, 100, 4) and detections.scores.isfinite().all()


# --------------------------------------------------------------------------------------------
# Training step


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_training_step(accumulate: int) -> None:
    """fdet's supervised step (one update; with 2 micro-batches the RPN and RoI terms, which
    have different counts, back-propagate as separate groups)."""
    model = _model().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = iter([_batch(), _batch(empty=True)] * 2)
    ctx = SimpleNamespace(
        exp=SimpleNamespace(accumulate=accumulate, grad_clip_norm=10.0),
        precision="fp32",
        model=model,
        raw=model,
        optimizer=optimizer,
        scaler=None,
        batches=batches,
        device=torch.device("cpu"),
        forward=model,
        loss_fn=model.loss,
        world_size=1,
    )
    values = supervised_step(ctx)()
    for name in ("rpn_cls", "rpn_box", "roi_cls", "roi_box", "loss"):
        assert values[name].isfinite(), name
    total = sum(values[n] for n in ("rpn_cls", "rpn_box", "roi_cls", "roi_box"))
    torch.testing.assert_close(values["loss"], total)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    for prefix in (
        "backbone.",
        "neck.",
        "rpn.head.",
        "roi_heads.box_head.",
        "roi_heads.box_predictor.",
    ):
        assert any(n.startswith(prefix) for n in changed), prefix


# --------------------------------------------------------------------------------------------
# Compiler


@pytest.mark.compile
def test_compiled_loss_and_postprocess_equal_eager() -> None:
    model = _model().train()
    batch = _batch()
    keys = _keys(batch)
    outputs = model(batch.images)

    def loss(outputs: FasterRCNNOutputs, batch: Batch, rpn_keys, roi_keys):
        return _values(model.loss(outputs, batch, rpn_keys=rpn_keys, roi_keys=roi_keys))

    compiled = torch.compile(loss, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.testing.assert_close(
        compiled(outputs, batch, **keys), loss(outputs, batch, **keys), rtol=1e-5, atol=1e-5
    )

    model.eval()
    with torch.no_grad():
        eval_outputs = model(batch.images)
        post = torch.compile(model.postprocess, fullgraph=True, dynamic=False, backend="aot_eager")
        want = model.postprocess(eval_outputs, batch.image_sizes)
        got = post(eval_outputs, batch.image_sizes)
    assert torch.equal(got.valid, want.valid) and torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.boxes, want.boxes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)


def test_builder_checks_classes() -> None:
    model = _model()
    with pytest.raises(ValueError, match="classes"):
        FasterRCNN(
            backbone=model.backbone,
            neck=model.neck,
            rpn=model.rpn,
            roi_heads=model.roi_heads,
            roi_spec=TINY.roi_head,
            num_classes=K + 1,
        )
