"""torchvision's FCOS converted to fdet: spec, weights, and the same detections and losses, at
sizes on and off the nominal stride grid."""

from __future__ import annotations

import math
from typing import NamedTuple

import attrs
import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection import fcos_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from fdet import build, specs
from fdet.compat.torchvision import (
    UnsupportedModelError,
    load_torchvision,
    spec_from_torchvision,
    state_dict_from_torchvision,
)
from fdet.models import FCOS
from fdet.models.detectors.fcos import fcos_loss
from fdet.models.heads.fcos import FCOSHeadOutputs
from tests.compat.test_torchvision import (
    assert_same_detections,
    input_size,
    low_threshold,
    randomize_norms,
)

S = 256  # a multiple of 128: torchvision's strides are 2**level on every level
OFF_GRID = [(288, 288), (320, 480)]  # P6 and P7 are laid out 57 and 96 apart at 288, ...
K = 5


def make_nontrivial(tv: TVFCOS, images: torch.Tensor) -> None:
    """Random norms, and predictor scales such that class logits spread around -3 with std
    1.5, centerness logits around 0 with std 1 and distances around 1 stride: hundreds of
    distinct detections above torchvision's threshold (0.2 on sqrt(class · centerness))."""
    randomize_norms(tv, torch.Generator().manual_seed(0), (0.5, 2.0))
    tv.eval()
    with torch.no_grad():
        x = tv.transform(list(images))[0].tensors
        out = tv.head(list(tv.backbone(x).values()))
        cls, reg = tv.head.classification_head, tv.head.regression_head
        cls.cls_logits.weight.mul_(1.5 / out["cls_logits"].std())
        cls.cls_logits.bias.fill_(-3.0)
        reg.bbox_reg.weight.mul_(1.0 / out["bbox_regression"].std())
        reg.bbox_reg.bias.fill_(1.0)
        reg.bbox_ctrness.weight.mul_(1.0 / out["bbox_ctrness"].std())
        for m in tv.head.modules():  # group norms away from the identity too
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


class Pair(NamedTuple):
    tv: TVFCOS
    fdet: FCOS
    images: torch.Tensor  # [B, 3, S, S] in [0, 1]
    outputs: FCOSHeadOutputs  # fdet's head outputs for images, eval mode


@pytest.fixture(scope="module")
def pair() -> Pair:
    torch.manual_seed(0)
    tv = fcos_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=K,
        min_size=S,
        max_size=S,
        detections_per_img=2000,
    )
    images = torch.rand(2, 3, S, S)
    make_nontrivial(tv, images)
    det = load_torchvision(tv)
    assert isinstance(det, FCOS) and not det.training
    with torch.no_grad():
        outputs = det(images)
    return Pair(tv, det, images, outputs)


# ---------------------------------------------------------------------------------------------
# Detections
# ---------------------------------------------------------------------------------------------


def test_detections_match_torchvision(pair) -> None:
    tv, det, images, _ = pair
    with torch.no_grad():
        reference = tv(list(images))
    worst = assert_same_detections(det.predict(images), reference, minimum=200)
    print(f"fcos {S}² detections: max |Δbox| {worst[0]:.2e}, max |Δscore| {worst[1]:.2e}")


@pytest.mark.parametrize("size", OFF_GRID, ids=lambda s: f"{s[0]}x{s[1]}")
def test_detections_match_torchvision_off_the_nominal_grid(pair, size) -> None:
    """Points placed as torchvision places them give its detections; fdet's nominal placement
    would not."""
    tv, det, _, _ = pair
    assert det.points_spec.placement == "image_ratio"
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with input_size(tv, size), torch.no_grad():
        reference = tv(list(images))
    worst = assert_same_detections(det.predict(images), reference, minimum=200)
    print(f"fcos {size} detections: max |Δbox| {worst[0]:.2e}, max |Δscore| {worst[1]:.2e}")
    # at a low threshold P6 and P7 boxes are among the detections: still torchvision's, and not
    # with fdet's nominal placement
    with low_threshold(tv, det, 0.05), input_size(tv, size), torch.no_grad():
        reference = tv(list(images))
        assert_same_detections(det.predict(images), reference, minimum=500)
        saved = det.points_spec
        det.points_spec = attrs.evolve(saved, placement="nominal")
        try:
            with pytest.raises(AssertionError):
                assert_same_detections(det.predict(images), reference)
        finally:
            det.points_spec = saved


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def random_targets(g: torch.Generator, count: int, size: tuple[int, int]) -> dict:
    height, width = size
    xy = torch.rand(count, 2, generator=g) * torch.tensor([width - 40.0, height - 40.0])
    wh = 8 + torch.rand(count, 2, generator=g) * 150
    limit = torch.tensor([float(width), float(height)])
    boxes = torch.cat((xy, torch.minimum(xy + wh, limit)), dim=1)
    return {"boxes": boxes, "labels": torch.randint(0, K, (count,), generator=g)}


def pad_targets(targets: list[dict], extra: int = 2):
    """fdet's padded gts for torchvision's per-image targets, with garbage in the padding."""
    m = max(len(t["labels"]) for t in targets) + extra
    boxes = torch.full((len(targets), m, 4), math.nan)
    boxes[:, -1] = torch.tensor([0.0, 0.0, 1e4, 1e4])  # a huge box, not a valid one
    labels = torch.full((len(targets), m), 123)
    valid = torch.zeros(len(targets), m, dtype=torch.bool)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n], labels[i, :n], valid[i, :n] = t["boxes"], t["labels"], True
    return boxes, labels, valid, torch.zeros_like(valid)


def fdet_losses(det: FCOS, outputs: FCOSHeadOutputs, targets: list[dict]) -> dict:
    terms = fcos_loss(
        outputs,
        det.points_for(outputs),
        *pad_targets(targets),
        assigner=det.assigner_spec,
        coder=det.coder_spec,
        cls_loss=det.cls_loss_spec,
        box_loss=det.box_loss_spec,
        centerness_weight=det.centerness_weight,
        box_weight_by_centerness=det.box_weight_by_centerness,
    )
    assert terms["cls"].count is terms["box"].count is terms["centerness"].count
    names = {"cls": "classification", "box": "bbox_regression", "centerness": "bbox_ctrness"}
    out = {names[k]: t.value() for k, t in terms.items()}
    out["num_pos"] = terms["cls"].count
    return out


def assert_losses_match(ours: dict, theirs: dict, *, min_pos: int) -> None:
    assert ours["num_pos"] >= min_pos
    for key, value in theirs.items():
        assert value > 0.05, key  # non-trivial terms
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=0, msg=key)


def test_one_image_loss_matches_torchvision_training_mode(pair) -> None:
    """torchvision's own training forward (batch norms kept in eval mode, so that both see the
    same features) against ``detector.loss`` on one image."""
    tv, det, images, outputs = pair
    targets = [random_targets(torch.Generator().manual_seed(7), 6, (S, S))]
    tv.train()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    try:
        with torch.no_grad():
            theirs = tv(list(images[:1]), targets)
    finally:
        tv.eval()
    one = FCOSHeadOutputs(*(tuple(x[:1] for x in part) for part in outputs[:3]), *outputs[3:])
    ours = fdet_losses(det, one, targets)
    assert_losses_match(ours, theirs, min_pos=10)
    batch = Targets(*pad_targets(targets))
    module = {k: t.value() for k, t in det.loss(one, batch).items()}
    torch.testing.assert_close(module["box"], ours["bbox_regression"], rtol=0, atol=0)


class Targets(NamedTuple):
    gt_boxes: torch.Tensor
    gt_labels: torch.Tensor
    gt_valid: torch.Tensor
    gt_crowd: torch.Tensor


def tv_compute_loss(tv: TVFCOS, outputs: FCOSHeadOutputs, targets: list[dict], size) -> dict:
    """torchvision's ``FCOS.compute_loss`` on fdet's head outputs (same weights, same inputs),
    with its own anchors for the padded ``size``."""
    batch = outputs.cls_logits[0].shape[0]
    images = ImageList(torch.zeros(batch, 3, *size), [size] * batch)
    features = [torch.zeros(batch, 1, h, w) for h, w in outputs.feature_sizes]
    anchors = tv.anchor_generator(images, features)
    head = {
        "cls_logits": torch.cat(outputs.cls_logits, dim=1),
        "bbox_regression": torch.cat(outputs.box_ltrb, dim=1),
        "bbox_ctrness": torch.cat(outputs.centerness, dim=1)[..., None],
    }
    counts = [h * w for h, w in outputs.feature_sizes]
    return tv.compute_loss(targets, head, anchors, counts)


def test_padded_batch_loss_matches_torchvision(pair) -> None:
    """Two images, gts padded with garbage, against torchvision's loss of the batch (which, like
    fdet's, normalizes once by the positives of the whole batch)."""
    tv, det, _, outputs = pair
    g = torch.Generator().manual_seed(8)
    targets = [random_targets(g, 5, (S, S)), random_targets(g, 2, (S, S))]
    theirs = tv_compute_loss(tv, outputs, targets, (S, S))
    assert_losses_match(fdet_losses(det, outputs, targets), theirs, min_pos=10)


def test_loss_with_an_empty_image_off_the_nominal_grid_matches_torchvision(pair) -> None:
    """320 × 480, one image without objects: points placed as torchvision places them."""
    tv, det, _, _ = pair
    size = OFF_GRID[1]
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outputs = det(images)
    assert outputs.image_size == size
    g = torch.Generator().manual_seed(9)
    targets = [random_targets(g, 5, size), random_targets(g, 0, size)]
    # two large boxes, whose far points (more than 256 pixels from a side) are P6's
    large = torch.tensor([[5.0, 10.0, 475.0, 310.0], [40.0, 0.0, 440.0, 290.0]])
    targets[0]["boxes"] = torch.cat((targets[0]["boxes"], large))
    targets[0]["labels"] = torch.cat((targets[0]["labels"], torch.tensor([1, 3])))
    theirs = tv_compute_loss(tv, outputs, targets, size)
    assert_losses_match(fdet_losses(det, outputs, targets), theirs, min_pos=10)
    saved, det.points_spec = det.points_spec, attrs.evolve(det.points_spec, placement="nominal")
    try:
        nominal = fdet_losses(det, outputs, targets)
    finally:
        det.points_spec = saved
    assert not torch.allclose(nominal["bbox_regression"], theirs["bbox_regression"], rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Specs and weights
# ---------------------------------------------------------------------------------------------


def test_spec_is_torchvision_recipe() -> None:
    """fdet's FCOS defaults are torchvision's recipe, apart from the placement of the points,
    the paper's closed regression ranges, and what the untrained model's backbone returns and
    normalizes with."""
    with torch.device("meta"):
        tv = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=80)
    spec = spec_from_torchvision(tv)
    defaults = specs.FCOS(head=specs.FCOSHead(num_classes=80))
    expected = attrs.evolve(
        defaults,
        # torchvision's untrained models: trainable batch norm, nothing frozen
        backbone=attrs.evolve(
            defaults.backbone, norm=specs.BatchNorm(), frozen_stages=-1, out_levels=(3, 4, 5)
        ),
        points=attrs.evolve(defaults.points, placement="image_ratio"),
        assigner=attrs.evolve(
            defaults.assigner,
            regress_ranges=((0, 64), (64, 128), (128, 256), (256, 512), (512, None)),
            closed_ranges=False,  # torchvision compares strictly
        ),
        normalize=attrs.evolve(defaults.normalize, input_range=1.0),
    )
    assert spec == expected
    assert specs.from_json(specs.to_json(spec)) == spec


def test_every_setting_is_read() -> None:
    with torch.device("meta"):
        tv = fcos_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=7,
            score_thresh=0.3,
            nms_thresh=0.4,
            detections_per_img=77,
            topk_candidates=123,
            center_sampling_radius=2.5,
            image_mean=[0.5, 0.4, 0.3],
            image_std=[0.1, 0.2, 0.3],
        )
    tv.box_coder.normalize_by_size = tv.head.box_coder.normalize_by_size = False
    spec = spec_from_torchvision(tv)
    assert spec.num_classes == 7
    assert spec.postprocess == specs.DensePostprocess(
        score_threshold=0.3, nms_iou=0.4, max_detections=77, topk_per_level=123
    )
    assert spec.assigner.center_radius == 2.5
    assert spec.coder == specs.DistanceCoder(normalize_by_stride=False)
    assert spec.normalize == specs.Normalize(
        mean=(0.5, 0.4, 0.3), std=(0.1, 0.2, 0.3), input_range=1.0
    )


def test_unsupported_models_are_rejected_with_the_part_named() -> None:
    with torch.device("meta"):
        tv = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    tv.anchor_generator = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((1.0,),) * 5)
    with pytest.raises(UnsupportedModelError, match="anchor_generator"):
        spec_from_torchvision(tv)
    tv.anchor_generator = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    spec_from_torchvision(tv)
    tv.head.classification_head.conv[1] = nn.BatchNorm2d(256)
    with pytest.raises(UnsupportedModelError, match=r"classification_head\.conv\.1.*BatchNorm"):
        spec_from_torchvision(tv)


def test_state_dict_names_are_fdet_names() -> None:
    with torch.device("meta"):
        tv = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K)
        det = build(spec_from_torchvision(tv))
    state = tv.state_dict()
    converted = state_dict_from_torchvision(state)
    assert set(converted) == set(det.state_dict())
    shapes = {k: v.shape for k, v in det.state_dict().items()}
    assert all(v.shape == shapes[k] for k, v in converted.items())
    # (conv, norm, relu) blocks: torchvision's conv.9 / conv.10 are block 3's conv and norm
    assert converted["head.cls_tower.3.0.weight"] is state["head.classification_head.conv.9.weight"]
    assert converted["head.box_tower.2.1.weight"] is state["head.regression_head.conv.7.weight"]
    assert "head.box_tower.3.1.bias" in converted and "head.centerness.weight" in converted
    with pytest.raises(KeyError, match=r"anchor_generator\.cell"):
        state_dict_from_torchvision({**tv.state_dict(), "anchor_generator.cell": torch.zeros(1)})
