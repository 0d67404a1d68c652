"""What each detector declares for semi-supervised training: ``box_terms`` (the loss terms that
learn box geometry from the gt boxes; checked against the terms ``loss`` returns and against
how they respond when only the gt boxes move) and, for the R-CNN family, ``refine_boxes`` (the
RoI head's refinement of given boxes; checked against the decoding of the RoI postprocess,
against the stages run by hand, and with the regressors zeroed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch

from fdet import build, specs
from fdet.data.sample import Batch
from fdet.models.detectors.base import Detector
from fdet.models.detectors.two_stage.cascade_rcnn import CascadeRCNN
from fdet.models.detectors.two_stage.faster_rcnn import FasterRCNN
from fdet.models.detectors.two_stage.roi_heads import roi_postprocess
from fdet.ops.coding import decode_deltas
from tests.models import (
    test_atss,
    test_cascade_rcnn,
    test_centernet,
    test_detector,
    test_faster_rcnn,
    test_fcos,
    test_gfl,
    test_mask_rcnn,
)
from tests.strategies import random_boxes

# --------------------------------------------------------------------------------------------
# The families on tiny models and batches


def _dense_batch(size: int, seed: int = 0) -> Batch:
    """Two images with three and two objects (continuous coordinates, so that a sub-pixel move
    puts no box edge on a grid point), one padded slot holding garbage."""
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(g, (2, 3), image_size=size * 0.6, min_size=size / 6, max_size=size / 3)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    return Batch(
        images=torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g),
        image_sizes=torch.full((2, 2), size),
        gt_boxes=torch.where(valid[..., None], boxes, math.nan),
        gt_labels=torch.where(valid, torch.tensor([[0, 1, 2], [2, 0, 0]]), -7),
        gt_valid=valid,
        gt_crowd=torch.zeros(2, 3, dtype=torch.bool),
        image_ids=torch.arange(2),
        scales=torch.ones(2, 2),
    )


Case = tuple[Detector, Batch, Callable[[Batch], dict[str, Any]]]


def _dense(spec_fn: Callable[[], specs.Detector], size: int) -> Callable[[], Case]:
    def make() -> Case:
        torch.manual_seed(0)
        return build(spec_fn()), _dense_batch(size), lambda batch: {}

    return make


def _faster() -> Case:
    batch = test_faster_rcnn._batch()
    return test_faster_rcnn._model(), batch, test_faster_rcnn._keys


def _mask() -> Case:
    batch = test_mask_rcnn._mask_batch()
    return test_mask_rcnn._model(), batch, test_faster_rcnn._keys


def _cascade(spec: specs.CascadeRCNN) -> Callable[[], Case]:
    def make() -> Case:
        return (
            test_cascade_rcnn._model(spec=spec),
            test_cascade_rcnn._batch(),
            test_cascade_rcnn._keys,
        )

    return make


CASCADE_BOX = {"rpn_box", "roi0_box", "roi1_box"}  # the tiny cascade has two stages
FAMILIES: dict[str, tuple[Callable[[], Case], set[str], set[str]]] = {
    # name: (tiny model and batch, box_terms, terms that a sub-pixel move leaves unchanged)
    "retinanet": (_dense(test_detector.tiny_spec, 64), {"box"}, {"cls"}),
    "fcos": (_dense(test_fcos.tiny_spec, 128), {"box", "centerness"}, {"cls"}),
    "atss": (_dense(test_atss.tiny_spec, 64), {"box", "centerness"}, {"cls"}),
    "gfl": (_dense(test_gfl.tiny_spec, 64), {"box", "dfl"}, set()),  # QFL's target is an IoU
    "centernet": (_dense(test_centernet.tiny_spec, 128), {"size", "offset"}, set()),
    "faster_rcnn": (_faster, {"rpn_box", "roi_box"}, {"rpn_cls"}),
    "mask_rcnn": (_mask, {"rpn_box", "roi_box", "mask"}, {"rpn_cls"}),
    "cascade_rcnn": (_cascade(test_cascade_rcnn.TINY), CASCADE_BOX, {"rpn_cls"}),
    "cascade_mask_rcnn": (
        _cascade(test_cascade_rcnn.TINY_MASK),
        CASCADE_BOX | {"mask"},
        {"rpn_cls"},
    ),
}


def _moved(batch: Batch, offset: tuple[float, float, float, float]) -> Batch:
    """The batch with every gt box's coordinates moved by ``offset``, nothing else changed."""
    return batch._replace(gt_boxes=batch.gt_boxes + torch.tensor(offset))


@pytest.mark.parametrize("family", FAMILIES)
def test_box_terms_are_terms_of_the_loss_and_follow_the_gt_boxes(family: str) -> None:
    make, declared, invariant = FAMILIES[family]
    model, batch, keys = make()
    assert model.box_terms == frozenset(declared)
    # off the integer lattice, so that no anchor ties with another for a gt's best match
    batch = _moved(batch, (0.37, 0.41, 0.29, 0.33))
    model.train()
    with torch.no_grad():
        outputs = model(batch.images)
        terms = model.loss(outputs, batch, **keys(batch))
        moved = model.loss(outputs, _moved(batch, (3.0, 2.0, 5.0, 4.0)), **keys(batch))
        nudged = model.loss(outputs, _moved(batch, (0.02, 0.02, 0.02, 0.02)), **keys(batch))
    assert model.box_terms <= set(terms), (model.box_terms, set(terms))
    assert model.box_terms < set(terms)  # some term (classification) learns from all labels
    for name in model.box_terms:
        # a box term depends on the gt boxes' coordinates: a few pixels change it
        assert terms[name].total.isfinite() and terms[name].total > 0, name
        assert moved[name].total != terms[name].total, name
    # the nudge reaches the loss: some box term follows it
    assert any(not torch.equal(nudged[n].total, terms[n].total) for n in model.box_terms)
    for name in invariant:
        # the classification of these families reads the boxes only through the assignment
        # (and the sampling, whose keys are fixed), which a fiftieth of a pixel does not change
        assert name not in model.box_terms
        assert torch.equal(nudged[name].total, terms[name].total), name
        assert torch.equal(nudged[name].count, terms[name].count), name


def test_atss_without_centerness_declares_the_box_only() -> None:
    torch.manual_seed(0)
    model = build(test_atss.tiny_spec(centerness_branch=False))
    batch = _dense_batch(64)
    terms = model.loss(model(batch.images), batch)
    assert model.box_terms == frozenset({"box"}) and set(terms) == {"cls", "box"}
    assert build(test_atss.tiny_spec()).box_terms == frozenset({"box", "centerness"})


def test_the_base_declares_no_box_terms() -> None:
    assert Detector.box_terms == frozenset()


# --------------------------------------------------------------------------------------------
# refine_boxes


SIZES = torch.tensor([[64, 64], [60, 52]])  # (height, width) of the two images


def _boxes_and_labels(seed: int, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of two images, some reaching outside the image, and random classes."""
    g = torch.Generator().manual_seed(seed)
    boxes = random_boxes(g, (2, n), image_size=60.0, min_size=4.0, max_size=30.0) - 4.0
    return boxes, torch.randint(0, test_faster_rcnn.K, (2, n), generator=g)


def _clipped(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    out = boxes.clone()
    for b, (height, width) in enumerate(sizes.tolist()):
        out[b, :, 0::2] = out[b, :, 0::2].clamp(0, width)
        out[b, :, 1::2] = out[b, :, 1::2].clamp(0, height)
    return out


def test_faster_rcnn_refines_as_the_roi_postprocess_decodes() -> None:
    """Each (proposal, class) box that ``roi_postprocess`` decodes (before NMS: a threshold of
    0, NMS at IoU 1 and room for every candidate) is ``refine_boxes`` of that proposal and
    class; a detection is traced back to its proposal by its score."""
    model = test_faster_rcnn._model(seed=3).eval()
    k = model.num_classes
    with torch.no_grad():
        outputs = model(test_faster_rcnn._batch().images)
        proposals = model.rpn.proposals(outputs.rpn, SIZES)
        roi = model.roi_heads(outputs.features, proposals.boxes)
        num_rois = proposals.boxes.shape[1]
        keep_all = specs.RoIPostprocess(
            score_threshold=0.0, nms_iou=1.0, max_detections=num_rois * k, min_box_size=0.0
        )
        spec = attrs.evolve(model.roi_spec, postprocess=keep_all)
        detections = roi_postprocess(roi, proposals.boxes, proposals.valid, SIZES, spec=spec)
        per_class = [
            model.refine_boxes(outputs, proposals.boxes, torch.full((2, num_rois), c), SIZES)
            for c in range(k)
        ]  # K × [B, R, 4]
        probs = torch.softmax(roi.class_logits.float(), dim=-1)  # [B, R, K + 1]
    assert detections.valid.sum() == proposals.valid.sum() * k  # every candidate survived
    assert proposals.valid.sum() > 10
    for b in range(2):
        for n in detections.valid[b].nonzero().flatten().tolist():
            c = int(detections.labels[b, n])
            rois = proposals.valid[b] & (probs[b, :, 1 + c] == detections.scores[b, n])
            rois = rois.nonzero().flatten().tolist()
            assert rois, (b, n)
            assert any(
                torch.allclose(per_class[c][b, r], detections.boxes[b, n], rtol=0, atol=1e-4)
                for r in rois
            ), (b, n)
    # mixed classes: each box takes its own class's deltas
    labels = torch.randint(0, k, (2, num_rois), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model.refine_boxes(outputs, proposals.boxes, labels, SIZES)
    stacked = torch.stack(per_class, dim=2)  # [B, R, K, 4]
    want = stacked.gather(2, labels[:, :, None, None].expand(-1, -1, 1, 4)).squeeze(2)
    torch.testing.assert_close(mixed, want, rtol=0, atol=1e-5)
    assert not torch.equal(per_class[0], per_class[1])  # the classes' deltas differ


def test_faster_rcnn_with_zeroed_regression_returns_the_boxes_clipped() -> None:
    model = test_faster_rcnn._model(seed=1).eval()
    with torch.no_grad():
        model.roi_heads.box_predictor.bbox_pred.weight.zero_()
        model.roi_heads.box_predictor.bbox_pred.bias.zero_()
        outputs = model(test_faster_rcnn._batch().images)
        boxes, labels = _boxes_and_labels(0)
        refined = model.refine_boxes(outputs, boxes, labels, SIZES)
    assert refined.shape == boxes.shape and refined.dtype == torch.float32
    assert (boxes != _clipped(boxes, SIZES)).any()  # some boxes do reach outside
    torch.testing.assert_close(refined, _clipped(boxes, SIZES), rtol=0, atol=1e-4)


def test_mask_rcnn_refines_as_faster_rcnn() -> None:
    model = test_mask_rcnn._model().eval()
    assert isinstance(model, FasterRCNN)
    with torch.no_grad():
        outputs = model(test_faster_rcnn._batch().images)
        boxes, labels = _boxes_and_labels(2)
        refined = model.refine_boxes(outputs, boxes, labels, SIZES)
        want = FasterRCNN.refine_boxes(model, outputs, boxes, labels, SIZES)
    assert torch.equal(refined, want) and refined.isfinite().all()


def test_cascade_refines_through_every_stage() -> None:
    """The stages by hand: each head on the boxes, its class-agnostic deltas decoded with the
    stage's coder, clipped; the last stage's boxes."""
    model = test_cascade_rcnn._model(seed=4).eval()
    assert isinstance(model, CascadeRCNN) and model.num_stages == 2
    with torch.no_grad():
        outputs = model(test_cascade_rcnn._batch().images)
        boxes, labels = _boxes_and_labels(1)
        refined = model.refine_boxes(outputs, boxes, labels, SIZES)
        want = boxes
        for head, spec in zip(model.roi_heads, model.stage_specs):
            deltas = head(outputs.features, want).box_deltas  # [B, N, 1, 4]
            assert deltas.shape[2] == 1
            decoded = decode_deltas(
                want, deltas[:, :, 0], means=spec.coder.means, stds=spec.coder.stds
            )
            want = _clipped(decoded, SIZES)
        one_stage = model.roi_heads[0](outputs.features, boxes).box_deltas[:, :, 0]
    torch.testing.assert_close(refined, want, rtol=0, atol=1e-4)
    first = _clipped(decode_deltas(boxes, one_stage, stds=model.stage_specs[0].coder.stds), SIZES)
    assert not torch.allclose(refined, first, atol=1e-3)  # the second stage did move them


def test_cascade_with_zeroed_regression_returns_the_boxes_clipped() -> None:
    model = test_cascade_rcnn._model(seed=0).eval()
    with torch.no_grad():
        for head in model.roi_heads:
            head.box_predictor.bbox_pred.weight.zero_()
            head.box_predictor.bbox_pred.bias.zero_()
        outputs = model(test_cascade_rcnn._batch().images)
        boxes, labels = _boxes_and_labels(3)
        refined = model.refine_boxes(outputs, boxes, labels, SIZES)
    torch.testing.assert_close(refined, _clipped(boxes, SIZES), rtol=0, atol=1e-4)


def test_refine_runs_under_the_features_autocast() -> None:
    """Features from a bfloat16 forward: the RoI head runs in bfloat16 (as in postprocess),
    the refined boxes come back float32, close to the float32 ones."""
    model = test_faster_rcnn._model(seed=1).eval()
    images = test_faster_rcnn._batch().images
    boxes, labels = _boxes_and_labels(4)
    with torch.no_grad():
        full = model.refine_boxes(model(images), boxes, labels, SIZES)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half_outputs = model(images)
        assert half_outputs.features[0].dtype == torch.bfloat16
        half = model.refine_boxes(half_outputs, boxes, labels, SIZES)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=1.0)
