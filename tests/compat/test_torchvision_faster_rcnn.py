"""torchvision's Faster R-CNN (``fasterrcnn_resnet50_fpn`` and its v2) converted to fdet: the
spec, the weights, and the same detections (eval mode, perturbed predictors and norms, so that
hundreds of detections of several classes survive)."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection import fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from fdet import specs
from fdet.compat.torchvision import (
    load_torchvision,
    spec_from_torchvision,
    state_dict_from_torchvision,
)
from fdet.models.detectors.two_stage.faster_rcnn import FasterRCNN
from tests.compat.test_torchvision import assert_same_detections, input_size, randomize_norms

SIZE = (224, 320)  # multiples of 32: torchvision pads nothing
K = 5


def make_nontrivial(tv: TVFasterRCNN, images: torch.Tensor) -> None:
    """Random norms; RPN logits spread with std 2 (so proposals of every level survive) and
    deltas with std 0.3; each RoI class logit centred with std 1.5 over the proposals, each
    delta with std 0.5 (so many classes score above the threshold)."""
    randomize_norms(tv, torch.Generator().manual_seed(0), (0.5, 2.0))
    tv.eval()
    with torch.no_grad():
        image_list = tv.transform(list(images))[0]
        named = tv.backbone(image_list.tensors)
        logits, deltas = tv.rpn.head(list(named.values()))
        head = tv.rpn.head
        head.cls_logits.weight.mul_(2.0 / torch.cat([t.flatten() for t in logits]).std())
        head.bbox_pred.weight.mul_(0.3 / torch.cat([t.flatten() for t in deltas]).std())
        # standardize each class logit and delta over the proposals of the images
        proposals, _ = tv.rpn(image_list, named)
        pooled = tv.roi_heads.box_roi_pool(named, proposals, image_list.image_sizes)
        hidden = tv.roi_heads.box_head(pooled)  # [B * 1000, 1024]
        predictor = tv.roi_heads.box_predictor
        for layer, std in ((predictor.cls_score, 1.5), (predictor.bbox_pred, 0.5)):
            out = layer(hidden)  # [B * 1000, outputs]
            scale = std / out.std(dim=0).clamp(min=1e-6)
            layer.weight.mul_(scale[:, None])
            layer.bias.copy_((layer.bias - out.mean(dim=0)) * scale)


class Pair(NamedTuple):
    tv: TVFasterRCNN
    fdet: FasterRCNN
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]


@pytest.fixture(scope="module", params=["v1", "v2"])
def pair(request: pytest.FixtureRequest) -> Pair:
    torch.manual_seed(0)
    make = fasterrcnn_resnet50_fpn if request.param == "v1" else fasterrcnn_resnet50_fpn_v2
    tv = make(
        weights=None,
        weights_backbone=None,
        num_classes=K + 1,
        min_size=min(SIZE),
        max_size=max(SIZE),
        box_detections_per_img=300,
    )
    images = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    make_nontrivial(tv, images)
    return Pair(tv, load_torchvision(tv), images)


def test_spec_is_torchvisions_recipe(pair: Pair) -> None:
    spec = spec_from_torchvision(pair.tv)
    assert isinstance(spec, specs.FasterRCNN)
    assert spec.num_classes == K
    assert spec.neck.out_levels == (2, 3, 4, 5) and spec.max_pool_levels == 1
    assert spec.rpn.anchors.base_sizes == (32.0, 64.0, 128.0, 256.0, 512.0)
    assert spec.rpn.anchors.placement == "image_ratio"
    assert (spec.rpn.pre_nms_topk_train, spec.rpn.post_nms_topk_train) == (2000, 2000)
    assert (spec.rpn.pre_nms_topk_test, spec.rpn.post_nms_topk_test) == (1000, 1000)
    assert spec.roi_head.roi_align.levels == (2, 3, 4, 5)
    if isinstance(pair.tv.roi_heads.box_head, TwoMLPHead):  # v1
        assert spec.roi_head.box_head == specs.BoxHead(kind="2fc", fc_channels=1024)
        assert spec.rpn.num_convs == 1 and spec.neck.norm is None
    else:  # v2: batch norm in the FPN and the box head, two convs in the RPN head
        assert spec.roi_head.box_head == specs.BoxHead(
            kind="4conv1fc",
            fc_channels=1024,
            num_convs=4,
            conv_channels=256,
            norm=specs.BatchNorm(),
        )
        assert spec.rpn.num_convs == 2 and spec.neck.norm == specs.BatchNorm()
    assert spec.roi_head.coder.stds == pytest.approx((0.1, 0.1, 0.2, 0.2))
    assert spec.roi_head.postprocess.max_detections == 300
    assert specs.from_json(specs.to_json(spec), specs.Detector) == spec
    # the zoo recipe is torchvision's, up to the classes, the norm, the input range and the
    # anchor layout
    default = specs.FasterRCNN(num_classes=K)
    assert spec.rpn.assigner == default.rpn.assigner and spec.rpn.sampler == default.rpn.sampler
    assert spec.roi_head.assigner == default.roi_head.assigner
    assert spec.roi_head.sampler == default.roi_head.sampler


def test_state_dict_loads_every_tensor(pair: Pair) -> None:
    state = state_dict_from_torchvision(pair.tv.state_dict())
    ours = pair.fdet.state_dict()
    assert set(state) == set(ours)
    for key, value in state.items():
        assert ours[key].shape == value.shape, key
    torch.testing.assert_close(
        ours["roi_heads.box_predictor.bbox_pred.weight"],
        pair.tv.roi_heads.box_predictor.bbox_pred.weight,
    )


def test_detections_match_torchvision(pair: Pair) -> None:
    tv, det, images = pair
    assert not det.training
    with input_size(tv, SIZE), torch.no_grad():
        reference = tv(list(images))
    # torchvision counts the background as class 0; fdet's classes start at 0
    reference = [{**ref, "labels": ref["labels"] - 1} for ref in reference]
    for ref in reference:
        assert len(set(ref["labels"].tolist())) >= 3  # detections of several classes
    worst = assert_same_detections(det.predict(images), reference, minimum=100)
    counts = [len(ref["scores"]) for ref in reference]
    print(f"{counts} detections: max |Δbox| {worst[0]:.2e}, max |Δscore| {worst[1]:.2e}")
    assert worst[0] <= 1e-3 and worst[1] <= 1e-4
