"""Cascade R-CNN and Cascade Mask R-CNN (fdet.models.detectors.two_stage.cascade_rcnn): the spec
and its checks, the spec files, the refinement between stages by hand, the loss wired stage by
stage, a one-stage cascade against Faster R-CNN, the test-time score ensemble by hand, images
without objects, gradients, batched against per image, autocast, the mask head, the compiler."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from fdet import build, specs
from fdet.data.sample import Batch
from fdet.models.detectors.base import total_loss
from fdet.models.detectors.two_stage.cascade_rcnn import (
    CascadeRCNN,
    cascade_scores,
    next_candidates,
    refine_rois,
)
from fdet.models.detectors.two_stage.faster_rcnn import FasterRCNN, FasterRCNNOutputs
from fdet.models.detectors.two_stage.roi_heads import (
    RoIOutputs,
    roi_loss,
    roi_postprocess,
    roi_targets,
)
from fdet.models.detectors.two_stage.rpn import rpn_loss
from fdet.ops.coding import decode_deltas
from fdet.ops.roi import SampledRoIs
from fdet.specs import SpecError
from fdet.specs.cascade import cascade_stage
from tests.specs.test_serde import spec_instances
from tests.strategies import random_boxes, seeds

ROOT = Path(__file__).resolve().parents[2]
K = 3
SIZE = 64
R_TRAIN = 64  # proposals an image in training
S = 32  # sampled RoIs an image, every stage
M = 2  # gt slots

STAGE = specs.RoIHead(
    roi_align=specs.RoIAlign(canonical_scale=56.0),
    box_head=specs.BoxHead(fc_channels=32),
    sampler=specs.Sampler(num_samples=S, positive_fraction=0.25),
)
STAGES = tuple(
    cascade_stage(STAGE, iou=iou, stds=stds)
    for iou, stds in ((0.5, (0.1, 0.1, 0.2, 0.2)), (0.6, (0.05, 0.05, 0.1, 0.1)))
)
TINY = specs.CascadeRCNN(
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
    stages=STAGES,
    stage_weights=(1.0, 0.5),
)
TINY_MASK = attrs.evolve(
    TINY,
    mask_head=specs.MaskHead(
        roi_align=specs.RoIAlign(output_size=7, canonical_scale=56.0),
        num_convs=1,
        channels=8,
        max_rois=8,
    ),
)
NUM_ANCHORS = 3 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)  # P2–P6 of a 64² input


def _model(seed: int = 0, spec: specs.CascadeRCNN = TINY) -> CascadeRCNN:
    torch.manual_seed(seed)
    model = build(spec)
    assert isinstance(model, CascadeRCNN)
    with torch.no_grad():  # livelier predictors: proposals, refinements and detections vary
        predictors = [p for head in model.roi_heads for p in head.box_predictor.parameters()]
        for p in (*model.rpn.head.parameters(), *predictors):
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(*, empty: bool = False, batch: int = 2) -> Batch:
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
    masks = torch.zeros(batch, M, SIZE, SIZE, dtype=torch.uint8)
    for i in range(batch):
        for j in range(M):
            x1, y1, x2, y2 = boxes[i, j].long().tolist()
            masks[i, j, y1 : (y1 + y2) // 2 + 1, x1:x2] = 1  # the box's upper half
    return Batch(
        images=images,
        image_sizes=torch.tensor([[SIZE, SIZE], [60, 52]])[:batch],
        gt_boxes=boxes,
        gt_labels=labels,
        gt_valid=valid,
        gt_crowd=torch.zeros(batch, M, dtype=torch.bool),
        image_ids=torch.arange(batch),
        scales=torch.ones(batch, 2),
        gt_masks=masks,
    )


def _keys(batch: Batch, seed: int = 2, stages: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, m = batch.gt_valid.shape
    sizes = [R_TRAIN] + [S] * (stages - 1)  # stage t > 0 samples from S refined slots
    return {
        "rpn_keys": torch.rand(b, NUM_ANCHORS, generator=g),
        "roi_keys": [torch.rand(b, r + m, generator=g) for r in sizes],
    }


def _values(terms: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    return {name: (t.total, t.count, t.weight) for name, t in terms.items()}


# --------------------------------------------------------------------------------------------
# Spec and files


def test_spec_defaults_are_the_papers_and_round_trip() -> None:
    spec = specs.CascadeRCNN(num_classes=80)
    assert spec.pyramid_levels == (2, 3, 4, 5, 6) and spec.num_stages == 3
    assert [s.assigner.pos_iou for s in spec.stages] == [0.5, 0.6, 0.7]
    assert [s.assigner.neg_iou for s in spec.stages] == [0.5, 0.6, 0.7]
    assert [s.coder.stds for s in spec.stages] == [
        (0.1, 0.1, 0.2, 0.2),
        (0.05, 0.05, 0.1, 0.1),
        (0.033, 0.033, 0.067, 0.067),
    ]
    for stage in spec.stages:
        assert stage.class_agnostic and not stage.assigner.low_quality_matches
        assert (stage.sampler.num_samples, stage.sampler.positive_fraction) == (512, 0.25)
        assert stage.roi_align == specs.RoIAlign() and stage.box_head == specs.BoxHead()
    assert spec.stage_weights == (1.0, 0.5, 0.25)
    assert spec.mask_head is None and spec.score_rois == "last"
    for s in (spec, TINY, TINY_MASK, attrs.evolve(TINY, score_rois="own")):
        assert specs.from_json(specs.to_json(s), specs.Detector) == s
    # lists from Python become tuples (hashable, equal after JSON)
    listed = attrs.evolve(TINY, stages=list(STAGES), stage_weights=[1, 2])
    assert listed.stages == STAGES and listed.stage_weights == (1.0, 2.0)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=st.data())
def test_spec_json_round_trip_is_exact(data: st.DataObject) -> None:
    """Any stages (drawn RoI heads, pooling from the pyramid), weights, ensemble and mask head
    come back from JSON equal, and print the same JSON again."""
    n = data.draw(st.integers(1, 3))
    stages = [
        attrs.evolve(data.draw(spec_instances(specs.RoIHead)), roi_align=specs.RoIAlign())
        for _ in range(n)
    ]
    weights = data.draw(st.lists(st.floats(0, 10), min_size=n, max_size=n))
    spec = specs.CascadeRCNN(
        num_classes=data.draw(st.integers(1, 100)),
        stages=stages,
        stage_weights=weights,
        score_rois=data.draw(st.sampled_from(["last", "own"])),
        mask_head=data.draw(st.one_of(st.none(), spec_instances(specs.MaskHead))),
    )
    text = specs.to_json(spec)
    assert specs.from_json(text, specs.Detector) == spec
    assert specs.to_json(specs.from_json(text)) == text


def test_spec_rejects_parts_that_do_not_fit() -> None:
    with pytest.raises(SpecError, match=r"^stage_weights: has 2 weights for 3 stages"):
        specs.CascadeRCNN(num_classes=3, stage_weights=(1.0, 0.5))
    with pytest.raises(SpecError, match=r"^stages: must be a non-empty"):
        specs.CascadeRCNN(num_classes=3, stages=(), stage_weights=())
    with pytest.raises(SpecError, match=r"^stages\[1\]: expected a RoIHead"):
        specs.CascadeRCNN(num_classes=3, stages=(STAGE, specs.RoIAlign()), stage_weights=(1, 1))
    with pytest.raises(SpecError, match=r"^stage_weights\[2\]: must be >= 0"):
        specs.CascadeRCNN(num_classes=3, stage_weights=(1.0, 0.5, -1.0))
    far = attrs.evolve(STAGE, roi_align=specs.RoIAlign(levels=(4, 5, 6, 7)))
    with pytest.raises(SpecError, match=r"^stages\[2\]\.roi_align\.levels: .*\[7\]"):
        specs.CascadeRCNN(num_classes=3, stages=(STAGE, STAGE, far))
    with pytest.raises(SpecError, match=r"^mask_head\.roi_align\.levels"):
        specs.CascadeRCNN(
            num_classes=3, mask_head=specs.MaskHead(roi_align=specs.RoIAlign(levels=(6, 7)))
        )
    with pytest.raises(SpecError, match=r"^score_rois"):
        specs.CascadeRCNN(num_classes=3, score_rois="first")  # type: ignore[arg-type]
    # Faster R-CNN's checks of the pyramid apply
    with pytest.raises(SpecError, match=r"^rpn\.anchors\.strides"):
        specs.CascadeRCNN(num_classes=3, max_pool_levels=0)
    with pytest.raises(SpecError, match=r"^max_pool_levels"):
        specs.CascadeRCNN(
            num_classes=3, neck=specs.FPN(in_levels=(2, 3, 4, 5), out_levels=(2, 3, 4, 5, 6))
        )
    with pytest.raises(SpecError, match=r"^neck\.in_levels"):
        specs.CascadeRCNN(num_classes=3, backbone=specs.ResNet(out_levels=(3, 4, 5)))
    # from JSON, errors name their path inside the tuple of stages
    tree = json.loads(specs.to_json(TINY))
    tree["spec"]["stages"][1]["assigner"]["pos_io"] = 0.7
    with pytest.raises(SpecError, match=r"stages\[1\]\.assigner\.pos_io"):
        specs.from_json(json.dumps(tree), specs.Detector)
    tree = json.loads(specs.to_json(TINY))
    tree["spec"]["stages"][0]["sampler"]["num_samples"] = 0
    with pytest.raises(SpecError, match=r"stages\[0\]\.sampler\.num_samples"):
        specs.from_json(json.dumps(tree), specs.Detector)


SPEC_FILES = [
    "specs/shapes/cascade_rcnn_r18_fpn.py",
    "specs/shapes/cascade_mask_rcnn_r18_fpn.py",
    "specs/cascade_rcnn/r50_fpn_1x_coco.py",
    "specs/cascade_mask_rcnn/r50_fpn_1x_coco.py",
]


@pytest.mark.parametrize("file", SPEC_FILES)
def test_spec_files_load_round_trip_and_build(file: str) -> None:
    exp = specs.load(ROOT / file, specs.Experiment)
    assert isinstance(exp.model, specs.CascadeRCNN)
    assert specs.from_json(specs.to_json(exp), specs.Experiment) == exp
    assert (exp.model.mask_head is not None) == ("mask" in file)
    with torch.device("meta"):
        model = build(exp.model)
    assert isinstance(model, CascadeRCNN) and model.num_stages == 3
    # derived from the Faster R-CNN file of the same data: same backbone, neck and RPN
    base = specs.load(
        ROOT
        / file.replace("cascade_mask_rcnn", "faster_rcnn").replace("cascade_rcnn", "faster_rcnn"),
        specs.Experiment,
    )
    for field in ("backbone", "neck", "max_pool_levels", "rpn", "normalize", "num_classes"):
        assert getattr(exp.model, field) == getattr(base.model, field), field
    assert exp.data == base.data and exp.optimizer == base.optimizer
    if exp.model.mask_head is not None:  # Mask R-CNN's mask branch of the same data
        mask = specs.load(ROOT / file.replace("cascade_mask_rcnn", "mask_rcnn"), specs.Experiment)
        assert exp.model.mask_head == mask.model.mask_head
    for stage, iou in zip(exp.model.stages, (0.5, 0.6, 0.7)):
        assert stage.class_agnostic and stage.assigner.pos_iou == iou
        assert stage.roi_align == base.model.roi_head.roi_align
        assert stage.sampler == base.model.roi_head.sampler


def test_builder_names_and_checks() -> None:
    model = _model(spec=TINY_MASK)
    names = [n for n, _ in model.named_parameters()]
    for t in range(2):
        assert f"roi_heads.{t}.box_predictor.bbox_pred.weight" in names
        # class-agnostic: 4 deltas an RoI
        assert model.roi_heads[t].box_predictor.bbox_pred.out_features == 4
    assert "roi_heads.2.box_head.fcs.0.weight" not in names
    assert any(n.startswith("mask_head.convs.0.") for n in names)
    kwargs = {
        "backbone": model.backbone,
        "neck": model.neck,
        "rpn": model.rpn,
        "roi_heads": list(model.roi_heads),
        "stage_specs": STAGES,
        "stage_weights": (1.0, 0.5),
    }
    with pytest.raises(ValueError, match="classes"):
        CascadeRCNN(**kwargs, num_classes=K + 1)
    with pytest.raises(ValueError, match="stage"):
        CascadeRCNN(**{**kwargs, "stage_weights": (1.0,)}, num_classes=K)


# --------------------------------------------------------------------------------------------
# The refinement between stages, by hand


def test_refine_rois_by_hand() -> None:
    """Known deltas: ``dx = 1`` with ``stds[0] = 0.1`` moves a box by a tenth of its width,
    ``dw = log 2 / 0.2`` doubles its width about its centre; the result is clipped."""
    spec = attrs.evolve(STAGES[0], coder=specs.DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2)))
    boxes = torch.tensor([[[10.0, 10.0, 30.0, 50.0], [40.0, 0.0, 60.0, 10.0]]])  # [1, 2, 4]
    deltas = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.6931471805599453 / 0.2, 0.0]])
    outputs = RoIOutputs(class_logits=torch.zeros(1, 2, K + 1), box_deltas=deltas[None, :, None])
    refined = refine_rois(outputs, boxes, torch.tensor([[64, 64]]), spec=spec)
    want = torch.tensor([[[12.0, 10.0, 32.0, 50.0], [30.0, 0.0, 64.0, 10.0]]])  # 70 clipped
    torch.testing.assert_close(refined, want, rtol=0, atol=1e-5)
    # class-specific deltas: the given class, else the best foreground class
    specific = torch.zeros(1, 2, K + 1, 4)
    specific[0, :, 2, 0] = 1.0  # class 2 moves right
    specific[0, :, 3, 0] = -1.0  # class 3 moves left
    logits = torch.tensor([[[5.0, 0.0, 0.0, 1.0], [0.0, 0.0, 3.0, 1.0]]])
    outputs = RoIOutputs(class_logits=logits, box_deltas=specific)
    best = refine_rois(outputs, boxes, (64, 64), spec=spec)  # classes 3 then 2
    torch.testing.assert_close(best[0, 0, 0], torch.tensor(8.0))
    torch.testing.assert_close(best[0, 1, 0], torch.tensor(42.0))
    given = refine_rois(outputs, boxes, (64, 64), spec=spec, labels=torch.tensor([[2, 1]]))
    torch.testing.assert_close(given[0, :, 0], torch.tensor([12.0, 40.0]))


def test_next_candidates_drop_the_appended_gts() -> None:
    sampled = SampledRoIs(
        boxes=torch.zeros(1, 4, 4),
        labels=torch.tensor([[1, 0, 2, 0]]),
        gt_index=torch.zeros(1, 4, dtype=torch.int64),
        valid=torch.tensor([[True, True, True, False]]),
        target_boxes=torch.zeros(1, 4, 4),
        box_targets=torch.zeros(1, 4, 4),
        roi_index=torch.tensor([[3, 7, 10, 0]]),  # candidates 0..9, then gt slots
    )
    refined = torch.arange(16.0).reshape(1, 4, 4) + 1
    boxes, valid = next_candidates(sampled, refined, num_candidates=10)
    assert valid.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(boxes[0, :2], refined[0, :2], rtol=0, atol=0)
    assert (boxes[0, 2:] == 0).all()


@st.composite
def refine_cases(draw: st.DrawFn) -> tuple:
    """RoI outputs on random RoIs of a random batch: class-agnostic or class-specific deltas,
    image sizes smaller than the boxes' range so that clipping happens."""
    g = torch.Generator().manual_seed(draw(seeds))
    batch, rois = draw(st.integers(1, 3)), draw(st.integers(0, 9))
    columns = draw(st.sampled_from([1, K + 1]))
    boxes = random_boxes(g, (batch, rois), image_size=64.0, max_size=48.0)
    outputs = RoIOutputs(
        class_logits=torch.randn(batch, rois, K + 1, generator=g),
        box_deltas=torch.randn(batch, rois, columns, 4, generator=g) * 2,
    )
    sizes = torch.randint(16, 96, (batch, 2), generator=g)
    spec = STAGES[draw(st.integers(0, 1))]
    return outputs, boxes, sizes, spec


@settings(max_examples=40, deadline=None)
@given(case=refine_cases())
def test_refine_rois_properties(case: tuple) -> None:
    """Inside each image; the decoding of the chosen column; batched equals per image."""
    outputs, boxes, sizes, spec = case
    refined = refine_rois(outputs, boxes, sizes, spec=spec)
    assert refined.shape == boxes.shape and not refined.requires_grad
    assert (refined >= 0).all()
    assert (refined[..., 0::2] <= sizes[:, None, 1:].float()).all()
    assert (refined[..., 1::2] <= sizes[:, None, :1].float()).all()
    column = outputs.class_logits[..., 1:].argmax(-1) + 1 if outputs.box_deltas.shape[2] > 1 else 0
    chosen = outputs.box_deltas.gather(
        2, torch.as_tensor(column).expand(boxes.shape[:2])[..., None, None].expand(-1, -1, 1, 4)
    )[:, :, 0]
    decoded = decode_deltas(boxes, chosen, means=spec.coder.means, stds=spec.coder.stds)
    hw = sizes[:, None].float()
    want = torch.stack(
        [
            decoded[..., 0].clamp(min=0).minimum(hw[..., 1]),
            decoded[..., 1].clamp(min=0).minimum(hw[..., 0]),
            decoded[..., 2].clamp(min=0).minimum(hw[..., 1]),
            decoded[..., 3].clamp(min=0).minimum(hw[..., 0]),
        ],
        dim=-1,
    )
    torch.testing.assert_close(refined, want, rtol=1e-6, atol=1e-5)
    for i in range(boxes.shape[0]):
        one = RoIOutputs(outputs.class_logits[i : i + 1], outputs.box_deltas[i : i + 1])
        alone = refine_rois(one, boxes[i : i + 1], sizes[i : i + 1], spec=spec)
        torch.testing.assert_close(alone[0], refined[i], rtol=0, atol=0)


@pytest.mark.compile
def test_refine_rois_compiled_equals_eager() -> None:
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(g, (2, 6), image_size=64.0, max_size=48.0)
    outputs = RoIOutputs(
        torch.randn(2, 6, K + 1, generator=g), torch.randn(2, 6, K + 1, 4, generator=g)
    )
    sizes = torch.tensor([[64, 48], [40, 64]])

    def run(outputs: RoIOutputs, boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        return refine_rois(outputs, boxes, sizes, spec=STAGES[1])

    compiled = torch.compile(run, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.testing.assert_close(compiled(outputs, boxes, sizes), run(outputs, boxes, sizes))


def test_each_stage_samples_from_the_boxes_the_stage_before_refined() -> None:
    """Stage 0's regressor set to constant deltas (weights 0, bias ``dx = 1``): every RoI it
    hands on is its sampled RoI moved right by a tenth of its width (stds 0.1), clipped; the
    appended gts are not handed on; stage 1 samples from exactly those boxes (and the gts)."""
    model = _model().train()
    with torch.no_grad():
        predictor = model.roi_heads[0].box_predictor.bbox_pred
        predictor.weight.zero_()
        predictor.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    batch = _batch()
    keys = _keys(batch)
    outputs = model(batch.images)
    second = model.training_outputs(outputs, batch, roi_keys=keys["roi_keys"])
    first, then = second.stages
    torch.testing.assert_close(first.candidates, second.proposals.boxes, rtol=0, atol=0)
    sampled = first.sampled
    from_proposals = sampled.valid & (sampled.roi_index < R_TRAIN)
    assert (sampled.valid & ~from_proposals).any()  # some gts were sampled, and dropped
    torch.testing.assert_close(then.candidate_valid, from_proposals, rtol=0, atol=0)
    widths = sampled.boxes[..., 2] - sampled.boxes[..., 0]
    shifted = sampled.boxes + torch.stack((widths, 0 * widths, widths, 0 * widths), -1) * 0.1
    limit = batch.image_sizes[:, 1].float()[:, None]  # widths 64 and 52
    shifted[..., 0] = torch.minimum(shifted[..., 0], limit)
    shifted[..., 2] = torch.minimum(shifted[..., 2], limit)
    want = torch.where(from_proposals[..., None], shifted, 0.0)
    torch.testing.assert_close(then.candidates, want, rtol=1e-6, atol=1e-4)
    # stage 1 sampled its RoIs from those candidates and the gts, with its own IoU 0.6
    again = roi_targets(
        then.candidates,
        then.candidate_valid,
        batch.gt_boxes,
        batch.gt_labels,
        batch.gt_valid,
        batch.gt_crowd,
        spec=STAGES[1],
        keys=keys["roi_keys"][1],
    )
    for got, expected in zip(then.sampled, again):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# The loss


def test_forward_loss_postprocess_shapes_and_weights() -> None:
    spec = attrs.evolve(
        TINY,
        stages=(
            attrs.evolve(STAGES[0], cls_weight=2.0),
            attrs.evolve(STAGES[1], box_loss=specs.SmoothL1Loss(beta=1.0 / 9.0, weight=3.0)),
        ),
        stage_weights=(0.5, 0.25),
    )
    model = _model(spec=spec).train()
    batch = _batch()
    outputs = model(batch.images)
    assert isinstance(outputs, FasterRCNNOutputs)
    terms = model.loss(outputs, batch)
    assert list(terms) == ["rpn_cls", "rpn_box", "roi0_cls", "roi0_box", "roi1_cls", "roi1_box"]
    weights = {name: term.weight for name, term in terms.items()}
    assert weights == {
        "rpn_cls": 1.0,
        "rpn_box": 1.0,
        "roi0_cls": 2.0 * 0.5,
        "roi0_box": 1.0 * 0.5,
        "roi1_cls": 1.0 * 0.25,
        "roi1_box": 3.0 * 0.25,
    }
    for t in range(2):
        assert terms[f"roi{t}_cls"].count is terms[f"roi{t}_box"].count
        assert terms[f"roi{t}_cls"].count.item() == 2 * S
    for term in terms.values():
        assert term.total.dtype == torch.float32 and term.total.isfinite()
        assert term.total.item() > 0

    model.eval()
    with torch.no_grad():
        detections = model.postprocess(model(batch.images), batch.image_sizes)
    assert detections.boxes.shape == (2, 100, 4) and detections.valid.any()
    assert detections.masks is None
    kept = detections.labels[detections.valid]
    assert ((kept >= 0) & (kept < K)).all()
    assert (detections.boxes[1, :, 2][detections.valid[1]] <= 52).all()
    predicted = model.predict(batch.images, batch.image_sizes)
    torch.testing.assert_close(predicted.boxes, detections.boxes)


def test_loss_is_the_rpn_loss_and_each_stages_roi_loss() -> None:
    model = _model().train()
    batch = _batch()
    keys = _keys(batch)
    outputs = model(batch.images)
    terms = model.loss(outputs, batch, **keys)
    want = dict(
        rpn_loss(
            outputs.rpn,
            batch.gt_boxes,
            batch.gt_valid,
            batch.gt_crowd,
            spec=TINY.rpn,
            keys=keys["rpn_keys"],
        )
    )
    second = model.training_outputs(outputs, batch, roi_keys=keys["roi_keys"])
    for t, stage in enumerate(second.stages):
        roi = model.roi_heads[t](outputs.features, stage.sampled.boxes)
        for name, term in roi_loss(roi, stage.sampled, spec=STAGES[t], prefix=f"roi{t}").items():
            want[name] = term._replace(weight=term.weight * TINY.stage_weights[t])
    assert list(terms) == list(want)
    torch.testing.assert_close(_values(terms), _values(want), rtol=0, atol=0)


def test_one_stage_is_faster_rcnn() -> None:
    """A cascade of one class-agnostic stage weighted 1 is Faster R-CNN with that RoI head:
    the same terms (``roi0_*`` for ``roi_*``) and the same detections, from the same weights."""
    stage = STAGES[0]
    cascade_spec = attrs.evolve(TINY, stages=(stage,), stage_weights=(1.0,))
    faster_spec = specs.FasterRCNN(
        num_classes=K,
        backbone=TINY.backbone,
        neck=TINY.neck,
        max_pool_levels=TINY.max_pool_levels,
        rpn=TINY.rpn,
        roi_head=stage,
    )
    cascade = _model(spec=cascade_spec).train()
    torch.manual_seed(0)
    faster = build(faster_spec).train()
    assert isinstance(faster, FasterRCNN)
    state = {k.replace("roi_heads.0.", "roi_heads."): v for k, v in cascade.state_dict().items()}
    faster.load_state_dict(state)
    batch = _batch()
    keys = _keys(batch, stages=1)
    ours = cascade.loss(cascade(batch.images), batch, **keys)
    theirs = faster.loss(
        faster(batch.images), batch, rpn_keys=keys["rpn_keys"], roi_keys=keys["roi_keys"][0]
    )
    renamed = {name.replace("roi_", "roi0_"): term for name, term in theirs.items()}
    assert list(ours) == list(renamed)
    torch.testing.assert_close(_values(ours), _values(renamed), rtol=0, atol=0)

    cascade.eval(), faster.eval()
    ours_det = cascade.predict(batch.images, batch.image_sizes)
    theirs_det = faster.predict(batch.images, batch.image_sizes)
    assert ours_det.valid.sum() > 10
    assert torch.equal(ours_det.valid, theirs_det.valid)
    assert torch.equal(ours_det.labels, theirs_det.labels)
    torch.testing.assert_close(ours_det.boxes, theirs_det.boxes, rtol=0, atol=0)
    torch.testing.assert_close(ours_det.scores, theirs_det.scores, rtol=1e-6, atol=1e-7)


def test_images_without_objects_give_finite_losses() -> None:
    model = _model().train()
    batch = _batch(empty=True)
    terms = model.loss(model(batch.images), batch)
    for name, term in terms.items():
        assert term.total.isfinite(), name
    for t in range(2):
        assert terms[f"roi{t}_box"].total.item() == 0.0
        assert terms[f"roi{t}_cls"].total.item() > 0
    # stage 1 samples from stage 0's S refined RoIs: all of them, background
    assert terms["roi1_cls"].count.item() == 2 * S
    total_loss(terms).backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    none = _batch()._replace(
        gt_boxes=torch.zeros(2, 0, 4),
        gt_labels=torch.zeros(2, 0, dtype=torch.int64),
        gt_valid=torch.zeros(2, 0, dtype=torch.bool),
        gt_crowd=torch.zeros(2, 0, dtype=torch.bool),
        gt_masks=None,
    )
    terms = model.loss(model(none.images), none)
    assert all(term.total.isfinite() for term in terms.values())


def test_padded_gt_slots_are_invisible() -> None:
    """More gt slots, all padding (NaN boxes, any label): the same terms, stage after stage
    (each stage's keys get the padded slots' keys at the end, where the gts are appended)."""
    model = _model().train()
    batch = _batch()
    extra = 3
    padded = batch._replace(
        gt_boxes=torch.cat((batch.gt_boxes, torch.full((2, extra, 4), float("nan"))), 1),
        gt_labels=torch.cat((batch.gt_labels, torch.full((2, extra), 7)), 1),
        gt_valid=torch.cat((batch.gt_valid, torch.zeros(2, extra, dtype=torch.bool)), 1),
        gt_crowd=torch.zeros(2, M + extra, dtype=torch.bool),
        gt_masks=None,
    )
    keys = _keys(batch)
    padded_keys = {
        "rpn_keys": keys["rpn_keys"],
        "roi_keys": [torch.cat((k, torch.rand(2, extra)), 1) for k in keys["roi_keys"]],
    }
    outputs = model(batch.images)
    torch.testing.assert_close(
        _values(model.loss(outputs, padded, **padded_keys)),
        _values(model.loss(outputs, batch, **keys)),
        rtol=0,
        atol=0,
    )


def test_gradients_reach_every_stage_and_not_through_the_refinement() -> None:
    model = _model().train()
    batch = _batch()
    terms = model.loss(model(batch.images), batch)
    total_loss(terms).backward()
    first_backbone = next(p for p in model.backbone.parameters() if p.requires_grad)
    parts = {"backbone": first_backbone, "rpn": model.rpn.head.cls_logits.weight}
    for t, head in enumerate(model.roi_heads):
        parts[f"stage {t} box head"] = head.box_head.fcs[0].weight
        parts[f"stage {t} classifier"] = head.box_predictor.cls_score.weight
        parts[f"stage {t} regressor"] = head.box_predictor.bbox_pred.weight
    for name, p in parts.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # stage 1's terms alone: nothing reaches stage 0's head (its boxes are detached)
    model.zero_grad(set_to_none=True)
    terms = model.loss(model(batch.images), batch)
    (terms["roi1_cls"].total + terms["roi1_box"].total).backward()
    for p in model.roi_heads[0].parameters():
        assert p.grad is None or p.grad.abs().sum() == 0
    assert model.roi_heads[1].box_head.fcs[0].weight.grad.abs().sum() > 0
    assert first_backbone.grad is not None and first_backbone.grad.abs().sum() > 0


def test_batched_equals_per_image() -> None:
    model = _model().train()
    batch = _batch()
    keys = _keys(batch)
    whole = model.loss(model(batch.images), batch, **keys)
    parts = []
    for i in range(2):
        one = Batch(*(t[i : i + 1] if isinstance(t, torch.Tensor) else t for t in batch))
        one_keys = {
            "rpn_keys": keys["rpn_keys"][i : i + 1],
            "roi_keys": [k[i : i + 1] for k in keys["roi_keys"]],
        }
        parts.append(model.loss(model(one.images), one, **one_keys))
    for name, term in whole.items():
        torch.testing.assert_close(
            term.total, parts[0][name].total + parts[1][name].total, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(term.count, parts[0][name].count + parts[1][name].count)

    model.eval()
    both = model.predict(batch.images, batch.image_sizes)
    for i in range(2):
        one = model.predict(batch.images[i : i + 1], batch.image_sizes[i : i + 1])
        n = int(one.valid.sum())
        assert n > 0 and int(both.valid[i].sum()) == n
        assert torch.equal(both.labels[i, :n], one.labels[0, :n])
        torch.testing.assert_close(both.boxes[i, :n], one.boxes[0, :n], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(both.scores[i, :n], one.scores[0, :n], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Inference: the score ensemble


def test_scores_are_the_mean_of_the_stages_probabilities_by_hand() -> None:
    """Two stages with constant classifiers (weights 0, biases ``b_t``): every detection of
    class ``c`` scores ``(softmax(b_0) + softmax(b_1))[1 + c] / 2``, whatever the RoIs."""
    model = _model().eval()
    biases = (torch.tensor([0.0, 2.0, -1.0, 0.5]), torch.tensor([1.0, -1.0, 3.0, 0.0]))
    with torch.no_grad():
        for head, bias in zip(model.roi_heads, biases):
            head.box_predictor.cls_score.weight.zero_()
            head.box_predictor.cls_score.bias.copy_(bias)
    want = (torch.softmax(biases[0], 0) + torch.softmax(biases[1], 0)) / 2  # [K + 1]
    batch = _batch()
    detections = model.predict(batch.images, batch.image_sizes)
    assert detections.valid.sum() > 10
    got = detections.scores[detections.valid]
    expected = want[1 + detections.labels[detections.valid]]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cascade_scores([b[None, None] for b in biases])[0, 0], want)


@pytest.mark.parametrize("score_rois", ["last", "own"])
def test_postprocess_is_the_stages_in_sequence(score_rois: str) -> None:
    """The detections are roi_postprocess of the last stage's deltas on its RoIs (stage 0's
    refinement of the proposals) with the mean probabilities of stage 0 and stage 1 on those
    RoIs (``"last"``) or on each stage's own RoIs (``"own"``)."""
    model = _model(spec=attrs.evolve(TINY, score_rois=score_rois)).eval()
    batch = _batch()
    with torch.no_grad():
        outputs = model(batch.images)
        detections = model.postprocess(outputs, batch.image_sizes)
        proposals = model.rpn.proposals(outputs.rpn, batch.image_sizes)
        first = model.roi_heads[0](outputs.features, proposals.boxes)
        refined = refine_rois(first, proposals.boxes, batch.image_sizes, spec=STAGES[0])
        assert (refined - proposals.boxes)[proposals.valid].abs().max() > 0.1
        second = model.roi_heads[1](outputs.features, refined)
        again = model.roi_heads[0](outputs.features, refined) if score_rois == "last" else first
        probs = (torch.softmax(again.class_logits, -1) + torch.softmax(second.class_logits, -1)) / 2
        want = roi_postprocess(
            RoIOutputs(probs.log(), second.box_deltas),
            refined,
            proposals.valid,
            batch.image_sizes,
            spec=STAGES[1],
        )
    assert detections.valid.sum() > 10
    for got, expected in zip(detections[:4], want[:4]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_loss_and_postprocess_outside_autocast_of_half_precision_features() -> None:
    model = _model().train()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch.images)
    assert outputs.features[0].dtype == torch.bfloat16
    terms = model.loss(outputs, batch)
    for term in terms.values():
        assert term.total.dtype == torch.float32 and term.total.isfinite()
    total_loss(terms).backward()
    assert model.roi_heads[1].box_head.fcs[0].weight.grad is not None
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eval_outputs = model(batch.images)
    detections = model.postprocess(eval_outputs, batch.image_sizes)
    assert detections.boxes.dtype == torch.float32 and detections.scores.isfinite().all()


# --------------------------------------------------------------------------------------------
# Cascade Mask R-CNN


def test_cascade_mask_rcnn_trains_on_the_last_stage_and_masks_the_detections() -> None:
    model = _model(spec=TINY_MASK).train()
    batch = _batch()
    keys = _keys(batch)
    outputs = model(batch.images)
    terms = model.loss(outputs, batch, **keys)
    assert list(terms)[-1] == "mask"
    last = model.training_outputs(outputs, batch, roi_keys=keys["roi_keys"]).stages[-1]
    want = model.mask_head.loss(outputs.features, last.sampled, batch.gt_masks)
    assert want.count.item() > 0
    torch.testing.assert_close(
        _values({"mask": terms["mask"]}), _values({"mask": want}), rtol=0, atol=0
    )
    total_loss(terms).backward()
    assert model.mask_head.logits.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gt_masks"):
        model.loss(outputs, batch._replace(gt_masks=None))

    model.eval()
    with torch.no_grad():
        eval_outputs = model(batch.images)
        detections = model.postprocess(eval_outputs, batch.image_sizes)
        plain = attrs.evolve(TINY_MASK, mask_head=None)
        boxes_only = CascadeRCNN(
            backbone=model.backbone,
            neck=model.neck,
            rpn=model.rpn,
            roi_heads=list(model.roi_heads),
            stage_specs=plain.stages,
            stage_weights=plain.stage_weights,
            num_classes=K,
        ).eval()
        without = boxes_only.postprocess(eval_outputs, batch.image_sizes)
        model.paste_masks = True
        pasted = model.postprocess(eval_outputs, batch.image_sizes)
    for got, expected in zip(detections[:4], without[:4]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert detections.masks.shape == (2, 100, 14, 14) and detections.masks.is_floating_point()
    assert (detections.masks[~detections.valid] == 0).all()
    assert pasted.masks.shape == (2, 100, SIZE, SIZE) and pasted.masks.dtype == torch.bool


# --------------------------------------------------------------------------------------------
# Compiler


@pytest.mark.compile
def test_compiled_loss_and_postprocess_equal_eager() -> None:
    model = _model().train()
    batch = _batch()
    keys = _keys(batch)
    outputs = model(batch.images)

    def loss(outputs: FasterRCNNOutputs, batch: Batch, rpn_keys, roi_keys):
        values = _values(model.loss(outputs, batch, rpn_keys=rpn_keys, roi_keys=roi_keys))
        return {name: (total, count) for name, (total, count, _) in values.items()}

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
    assert want.valid.sum() > 10
    assert torch.equal(got.valid, want.valid) and torch.equal(got.labels, want.labels)
    torch.testing.assert_close(got.boxes, want.boxes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-5)
