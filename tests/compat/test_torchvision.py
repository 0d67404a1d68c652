"""torchvision's RetinaNet converted to fdet: spec, weights, and the same detections and losses."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import attrs
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import (
    RetinaNet as TVRetinaNet,
)
from torchvision.models.detection import (
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
)
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d, box_iou
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from fdet import build, specs
from fdet.compat.torchvision import (
    UnsupportedModelError,
    load_torchvision,
    spec_from_torchvision,
    state_dict_from_torchvision,
)
from fdet.models import RetinaNet
from fdet.models.detectors.base import total_loss
from fdet.models.detectors.retinanet import retinanet_anchors, retinanet_loss
from fdet.models.heads.retina import RetinaHeadOutputs

S = 256  # a multiple of 128: no padding, and torchvision's strides are 2**level on every level
# sizes whose coarse levels torchvision lays out with strides other than 2**level (P6 57 and P7
# 96 at 288²; P6 (64, 60) and P7 (106, 120) at 320 × 480): converted models follow it
OFF_GRID = [(288, 288), (320, 480)]
K = 5
ZOO = Path(__file__).resolve().parents[2] / "specs/retinanet"
CTORS = {"v1": retinanet_resnet50_fpn, "v2": retinanet_resnet50_fpn_v2}


def randomize_norms(model: nn.Module, g: torch.Generator, var: tuple[float, float]) -> None:
    """Batch-norm statistics and affine terms far from the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(var[0] + torch.rand(c, generator=g) * (var[1] - var[0]))
                m.weight.copy_(0.2 + torch.rand(c, generator=g) * 0.4)
                m.bias.copy_((torch.rand(c, generator=g) - 0.5) * 0.4)


def make_nontrivial(tv: TVRetinaNet, images: torch.Tensor) -> None:
    """Random norms, and predictor scales such that logits spread around -3 with std 1.5 and
    deltas with std 0.5: hundreds of distinct detections above the threshold."""
    randomize_norms(tv, torch.Generator().manual_seed(0), (0.5, 2.0))
    tv.eval()
    with torch.no_grad():
        x = tv.transform(list(images))[0].tensors
        out = tv.head(list(tv.backbone(x).values()))
        cls, reg = tv.head.classification_head, tv.head.regression_head
        cls.cls_logits.weight.mul_(1.5 / out["cls_logits"].std())
        cls.cls_logits.bias.fill_(-3.0)
        reg.bbox_reg.weight.mul_(0.5 / out["bbox_regression"].std())


class Pair(NamedTuple):
    tv: TVRetinaNet
    fdet: RetinaNet
    images: torch.Tensor  # [B, 3, S, S] in [0, 1]
    outputs: RetinaHeadOutputs  # fdet's head outputs for images, eval mode


@pytest.fixture(scope="module")
def pairs() -> dict[str, Pair]:
    torch.manual_seed(0)
    out = {}
    for name, ctor in CTORS.items():
        tv = ctor(weights=None, weights_backbone=None, num_classes=K, min_size=S, max_size=S)
        images = torch.rand(3, 3, S, S)
        make_nontrivial(tv, images)
        det = load_torchvision(tv)
        assert not det.training
        with torch.no_grad():
            outputs = det(images)
        out[name] = Pair(tv, det, images, outputs)
    return out


def match_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, reference: dict
) -> tuple[float, float]:
    """Pair every reference detection with one of ours: same label, score within 1e-4, the
    nearest box; fail unless that box is within 1e-3. Both sides are sorted by score, so ties
    (equal scores, different boxes) pair up whatever order they came in. Returns the largest
    box and score differences."""
    ref_boxes, ref_scores, ref_labels = reference["boxes"], reference["scores"], reference["labels"]
    assert len(scores) == len(ref_scores)
    assert (scores[:-1] >= scores[1:]).all() and (ref_scores[:-1] >= ref_scores[1:]).all()
    box_diff = (ref_boxes[:, None, :] - boxes[None, :, :]).abs().amax(-1)  # [N, N]
    score_diff = (ref_scores[:, None] - scores[None, :]).abs()  # [N, N]
    candidate = (score_diff <= 1e-4) & (ref_labels[:, None] == labels[None, :])
    used = torch.zeros(len(scores), dtype=torch.bool)
    worst_box = worst_score = 0.0
    for i in range(len(ref_scores)):
        cost = torch.where(candidate[i] & ~used, box_diff[i], math.inf)
        j = int(cost.argmin())
        assert cost[j] <= 1e-3, f"reference detection {i} has no counterpart"
        used[j] = True
        worst_box = max(worst_box, float(box_diff[i, j]))
        worst_score = max(worst_score, float(score_diff[i, j]))
    return worst_box, worst_score


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_detections_match_torchvision(pairs, version) -> None:
    tv, det, images, _ = pairs[version]
    with torch.no_grad():
        reference = tv(list(images))
    worst = assert_same_detections(det.predict(images), reference)
    print(f"{version} detections: max |Δbox| {worst[0]:.2e}, max |Δscore| {worst[1]:.2e}")


@contextmanager
def input_size(tv: nn.Module, size: tuple[int, int]) -> Iterator[None]:
    """torchvision's transform set to take ``size`` images as they are (no resize)."""
    transform = tv.transform
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (min(size),), max(size)
    try:
        yield
    finally:
        transform.min_size, transform.max_size = saved


@contextmanager
def low_threshold(tv: nn.Module, det: nn.Module, threshold: float) -> Iterator[None]:
    """Both models keep every detection scoring above ``threshold`` (up to 5000 an image), so
    that boxes of every level, P6 and P7 too, are among them."""
    saved = tv.score_thresh, tv.detections_per_img, det.postprocess_spec
    tv.score_thresh, tv.detections_per_img = threshold, 5000
    det.postprocess_spec = attrs.evolve(
        det.postprocess_spec, score_threshold=threshold, max_detections=5000
    )
    try:
        yield
    finally:
        tv.score_thresh, tv.detections_per_img, det.postprocess_spec = saved


def assert_same_detections(ours, reference, *, minimum: int = 100) -> tuple[float, float]:
    """Every image has torchvision's detections (more than ``minimum``); the largest box and
    score differences."""
    worst = [0.0, 0.0]
    for b, ref in enumerate(reference):
        count = int(ours.valid[b].sum())
        assert count == len(ref["scores"]) > minimum  # non-trivial: many detections
        assert ours.valid[b, :count].all()
        diffs = match_detections(
            ours.boxes[b, :count], ours.scores[b, :count], ours.labels[b, :count], ref
        )
        worst = [max(w, d) for w, d in zip(worst, diffs)]
    return worst[0], worst[1]


@pytest.mark.parametrize("size", OFF_GRID, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_detections_match_torchvision_off_the_nominal_grid(pairs, version, size) -> None:
    """At sizes that are not multiples of 128 a converted model lays its anchors as
    torchvision does and gives its detections; with fdet's nominal strides it would not."""
    tv, det, _, _ = pairs[version]
    assert det.anchor_spec.placement == "image_ratio"
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with input_size(tv, size), torch.no_grad():
        reference = tv(list(images))
    worst = assert_same_detections(det.predict(images), reference)
    print(f"{version} {size} detections: max |Δbox| {worst[0]:.2e}, max |Δscore| {worst[1]:.2e}")
    # at a low threshold P6 and P7 boxes are among the detections: still torchvision's, and not
    # with fdet's nominal placement
    with low_threshold(tv, det, 0.01), input_size(tv, size), torch.no_grad():
        reference = tv(list(images))
        assert_same_detections(det.predict(images), reference, minimum=500)
        nominal = attrs.evolve(det.anchor_spec, placement="nominal")
        saved, det.anchor_spec = det.anchor_spec, nominal
        try:
            with pytest.raises(AssertionError):
                assert_same_detections(det.predict(images), reference)
        finally:
            det.anchor_spec = saved


@pytest.mark.parametrize(
    "size", [(S, S), *OFF_GRID, (800, 1216), (1344, 800)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_anchors_match_torchvision_at_any_size(pairs, size) -> None:
    """The anchors of a converted model on the feature sizes of ResNet + FPN at ``size``
    (two COCO sizes among them: P7 is 114 pixels apart at 800) are torchvision's."""
    tv, det, _, _ = pairs["v1"]
    height, width = size
    sizes = []
    for level in range(1, 8):
        height, width = (height + 1) // 2, (width + 1) // 2
        if level >= 3:
            sizes.append((height, width))
    images = ImageList(torch.zeros(1, 3, *size), [size])
    theirs = tv.anchor_generator(images, [torch.zeros(1, 1, h, w) for h, w in sizes])[0]
    ours = retinanet_anchors(sizes, spec=det.anchor_spec, image_size=size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def tv_anchors(
    tv: TVRetinaNet, outputs: RetinaHeadOutputs, batch: int, size: tuple[int, int] = (S, S)
) -> list[torch.Tensor]:
    """torchvision's anchors for maps of the outputs' sizes on images of ``size``."""
    images = ImageList(torch.zeros(batch, 3, *size), [size] * batch)
    features = [torch.zeros(batch, 1, h, w) for h, w in outputs.feature_sizes]
    return tv.anchor_generator(images, features)


def random_targets(g: torch.Generator, count: int) -> dict[str, torch.Tensor]:
    xy = torch.rand(count, 2, generator=g) * (S - 40)
    wh = 8 + torch.rand(count, 2, generator=g) * 150
    boxes = torch.cat((xy, (xy + wh).clamp(max=S)), dim=1)
    return {"boxes": boxes, "labels": torch.randint(0, K, (count,), generator=g)}


def pad_targets(targets: list[dict[str, torch.Tensor]], extra: int = 1):
    """fdet's padded gts for torchvision's per-image targets, with garbage in the padding."""
    m = max(len(t["labels"]) for t in targets) + extra
    boxes = torch.full((len(targets), m, 4), math.nan)
    labels = torch.full((len(targets), m), 123)
    valid = torch.zeros(len(targets), m, dtype=torch.bool)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n], labels[i, :n], valid[i, :n] = t["boxes"], t["labels"], True
    return boxes, labels, valid, torch.zeros_like(valid)


def slice_outputs(outputs: RetinaHeadOutputs, index: slice) -> RetinaHeadOutputs:
    return RetinaHeadOutputs(
        tuple(x[index] for x in outputs.cls_logits),
        tuple(x[index] for x in outputs.box_deltas),
        outputs.feature_sizes,
        outputs.image_size,
    )


class Losses(NamedTuple):
    """fdet's objective of one batch, read off its loss terms."""

    loss: torch.Tensor
    cls_loss: torch.Tensor
    box_loss: torch.Tensor
    num_pos: torch.Tensor


def summarize(terms) -> Losses:
    return Losses(total_loss(terms), terms["cls"].value(), terms["box"].value(), terms["cls"].count)


def fdet_loss(spec: specs.RetinaNet, outputs: RetinaHeadOutputs, targets) -> Losses:
    anchors = retinanet_anchors(
        outputs.feature_sizes, spec=spec.anchors, image_size=outputs.image_size
    )
    terms = retinanet_loss(
        outputs,
        anchors,
        *pad_targets(targets),
        assigner=spec.assigner,
        coder=spec.coder,
        cls_loss=spec.cls_loss,
        box_loss=spec.box_loss,
    )
    return summarize(terms)


def test_anchors_match_torchvision(pairs) -> None:
    tv, det, _, outputs = pairs["v1"]
    ours = det.anchors_for(outputs)
    for theirs in tv_anchors(tv, outputs, 2):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("version", "loss_type"), [("v1", "l1"), ("v1", "smooth_l1"), ("v2", "giou")]
)
def test_one_image_loss_matches_torchvision_training_mode(pairs, version, loss_type) -> None:
    """torchvision's own training forward (batch norms kept in eval mode, so that both see the
    same features) against ``detector.loss`` on a batch of one image."""
    tv, _, images, outputs = pairs[version]
    targets = [random_targets(torch.Generator().manual_seed(7), 6)]
    regression = tv.head.regression_head
    saved = regression._loss_type
    regression._loss_type = loss_type
    try:
        spec = spec_from_torchvision(tv)
        tv.train()
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        with torch.no_grad():
            theirs = tv(list(images[:1]), targets)
    finally:
        regression._loss_type = saved
        tv.eval()
    expected_type = {"l1": specs.L1Loss, "smooth_l1": specs.SmoothL1Loss, "giou": specs.GIoULoss}
    assert isinstance(spec.box_loss, expected_type[loss_type])
    ours = fdet_loss(spec, slice_outputs(outputs, slice(0, 1)), targets)
    assert ours.num_pos > 6
    assert ours.cls_loss > 0.1 and ours.box_loss > 0.1
    torch.testing.assert_close(ours.cls_loss, theirs["classification"], rtol=1e-4, atol=0)
    torch.testing.assert_close(ours.box_loss, theirs["bbox_regression"], rtol=1e-4, atol=0)
    rel = max(
        float((ours.cls_loss / theirs["classification"] - 1).abs()),
        float((ours.box_loss / theirs["bbox_regression"] - 1).abs()),
    )
    print(f"{version} {loss_type} loss: max relative |Δ| {rel:.2e}")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_padded_batch_loss_is_the_per_image_sums_over_all_positives(pairs, version) -> None:
    """Three images (one without objects), gts padded with garbage: fdet's batched loss equals
    torchvision's per-image losses, each times its positive count, summed, over the total."""
    tv, det, _, outputs = pairs[version]
    g = torch.Generator().manual_seed(8)
    targets = [random_targets(g, 4), random_targets(g, 0), random_targets(g, 2)]
    anchors = tv_anchors(tv, outputs, 1)
    sums = {"classification": 0.0, "bbox_regression": 0.0}
    total_pos = 0
    for i, target in enumerate(targets):
        one = slice_outputs(outputs, slice(i, i + 1))
        head = {
            "cls_logits": torch.cat(one.cls_logits, dim=1),
            "bbox_regression": torch.cat(one.box_deltas, dim=1),
        }
        losses = tv.compute_loss([target], head, anchors)
        if len(target["labels"]):
            num_pos = int((tv.proposal_matcher(box_iou(target["boxes"], anchors[0])) >= 0).sum())
        else:
            num_pos = 0
        total_pos += num_pos
        for key in sums:
            sums[key] += float(losses[key]) * max(num_pos, 1)
    ours = fdet_loss(spec_from_torchvision(tv), outputs, targets)
    assert int(ours.num_pos) == total_pos > 0
    torch.testing.assert_close(
        ours.cls_loss, torch.tensor(sums["classification"] / total_pos), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        ours.box_loss, torch.tensor(sums["bbox_regression"] / total_pos), rtol=1e-4, atol=0
    )
    # and the module method reads the same gts from a batch-like object
    batch = NamedTupleBatch(*pad_targets(targets))
    assert_losses_equal(summarize(det.loss(outputs, batch)), ours)


def test_loss_matches_torchvision_off_the_nominal_grid(pairs) -> None:
    """One 320 × 480 image: the loss of the converted model (anchors placed as torchvision
    places them) is torchvision's ``compute_loss`` on the same head outputs."""
    tv, det, _, _ = pairs["v1"]
    size = OFF_GRID[1]
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outputs = det(images)
    assert outputs.image_size == size
    g = torch.Generator().manual_seed(9)
    # small boxes for P3–P5, large ones (matching anchors of 256 pixels and more) for P6 and P7
    wh = torch.cat((8 + torch.rand(4, 2, generator=g) * 150, torch.full((3, 2), 300.0)))
    wh[-3:, 0] += torch.tensor([0.0, 120.0, 170.0])  # up to 470 × 300 on the 480-wide image
    xy = torch.rand(7, 2, generator=g) * (torch.tensor([size[1], size[0]]) - wh)
    target = {
        "boxes": torch.cat((xy, xy + wh), dim=1),
        "labels": torch.randint(0, K, (7,), generator=g),
    }
    head = {
        "cls_logits": torch.cat(outputs.cls_logits, dim=1),
        "bbox_regression": torch.cat(outputs.box_deltas, dim=1),
    }
    theirs = tv.compute_loss([target], head, tv_anchors(tv, outputs, 1, size))
    ours = fdet_loss(spec_from_torchvision(tv), outputs, [target])
    assert ours.num_pos > 6
    torch.testing.assert_close(ours.cls_loss, theirs["classification"], rtol=1e-4, atol=0)
    torch.testing.assert_close(ours.box_loss, theirs["bbox_regression"], rtol=1e-4, atol=0)
    spec = spec_from_torchvision(tv)
    nominal = attrs.evolve(spec, anchors=attrs.evolve(spec.anchors, placement="nominal"))
    off = fdet_loss(nominal, outputs, [target])
    assert not torch.allclose(off.box_loss, theirs["bbox_regression"], rtol=1e-3, atol=0)


class NamedTupleBatch(NamedTuple):
    gt_boxes: torch.Tensor
    gt_labels: torch.Tensor
    gt_valid: torch.Tensor
    gt_crowd: torch.Tensor


def assert_losses_equal(a, b) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "zoo_file"), [("v1", "r50_fpn_1x_coco.py"), ("v2", "r50_fpn_v2_coco.py")]
)
def test_spec_is_the_zoo_recipe(version, zoo_file) -> None:
    with torch.device("meta"):
        tv = CTORS[version](weights=None, weights_backbone=None, num_classes=80)
    zoo = specs.load(ZOO / zoo_file, specs.RetinaNet, name="MODEL")
    expected = attrs.evolve(
        zoo,
        # torchvision's untrained models: trainable batch norm, nothing frozen
        backbone=attrs.evolve(zoo.backbone, norm=specs.BatchNorm(), frozen_stages=-1),
        normalize=attrs.evolve(zoo.normalize, input_range=1.0),
        # torchvision's anchor placement, so that detections agree at any input size
        anchors=attrs.evolve(zoo.anchors, placement="image_ratio"),
    )
    assert spec_from_torchvision(tv) == expected
    frozen = specs.FrozenBatchNorm()
    assert spec_from_torchvision(tv, batch_norm=frozen).backbone.norm == frozen
    with pytest.raises(TypeError, match="batch_norm must be"):
        spec_from_torchvision(tv, batch_norm="frozen_bn")  # type: ignore[arg-type]


def test_every_setting_is_read() -> None:
    with torch.device("meta"):
        tv = retinanet_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=7,
            score_thresh=0.3,
            nms_thresh=0.4,
            detections_per_img=77,
            topk_candidates=123,
            fg_iou_thresh=0.6,
            bg_iou_thresh=0.3,
            image_mean=[0.5, 0.4, 0.3],
            image_std=[0.1, 0.2, 0.3],
            anchor_generator=AnchorGenerator(
                tuple((s, s * 2) for s in (16, 32, 64, 128, 256)), ((1.0, 2.0),) * 5
            ),
        )
    spec = spec_from_torchvision(tv)
    assert spec.num_classes == 7
    assert spec.postprocess == specs.DensePostprocess(
        score_threshold=0.3, nms_iou=0.4, max_detections=77, topk_per_level=123
    )
    assert spec.assigner == specs.MaxIoUAssigner(pos_iou=0.6, neg_iou=0.3)
    assert spec.normalize == specs.Normalize(
        mean=(0.5, 0.4, 0.3), std=(0.1, 0.2, 0.3), input_range=1.0
    )
    assert spec.anchors.base_sizes == (16, 32, 64, 128, 256)
    assert spec.anchors.ratios == (1.0, 2.0)
    assert spec.anchors.octave_scales == (1.0, 2.0)  # not octaves 2^(j/2): those give 22


def small_tv_retinanet(*, frozen: bool, trainable_layers: int) -> TVRetinaNet:
    """The layout of torchvision's pretrained models on a ResNet-18: frozen batch norm, the
    first stages frozen, 128-pixel images."""
    norm = FrozenBatchNorm2d if frozen else nn.BatchNorm2d
    body = torchvision.models.resnet18(weights=None, norm_layer=norm)
    backbone = _resnet_fpn_extractor(
        body, trainable_layers, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )
    return TVRetinaNet(backbone, num_classes=K, min_size=128, max_size=128)


def test_frozen_batch_norm_with_another_eps_converts_exactly() -> None:
    torch.manual_seed(0)
    tv = small_tv_retinanet(frozen=True, trainable_layers=3)
    # tiny variances, so that eps matters: torchvision's COCO v1 weights use eps=0
    randomize_norms(tv, torch.Generator().manual_seed(1), (1e-5, 1e-3))
    overwrite_eps(tv, 0.0)
    tv.eval()
    det = load_torchvision(tv)
    spec = spec_from_torchvision(tv)
    assert spec.backbone.depth == 18 and spec.backbone.norm == specs.FrozenBatchNorm()
    assert spec.backbone.frozen_stages == 1  # trainable layers 3: stem and layer1 frozen
    assert not any(p.requires_grad for p in det.backbone.layer1.parameters())
    assert all(p.requires_grad for p in det.backbone.layer2.parameters())

    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        x = tv.transform(list(images))[0].tensors
        theirs = tv.head(list(tv.backbone(x).values()))
        ours = det(images)
        naive = build(spec)
        naive.load_state_dict(state_dict_from_torchvision(tv.state_dict()))
        unshifted = naive.eval()(images)
    for key, mine, other in (
        ("cls_logits", ours.cls_logits, unshifted.cls_logits),
        ("bbox_regression", ours.box_deltas, unshifted.box_deltas),
    ):
        reference = theirs[key]
        scale = float(reference.abs().max())
        err = float((torch.cat(mine, dim=1) - reference).abs().max()) / scale
        assert err < 1e-4, key
        print(f"frozen bn, eps 0 -> 1e-5: {key} max |Δ| / max |output| {err:.2e}")
        # without the shift of the running variances the outputs would be far off
        assert float((torch.cat(other, dim=1) - reference).abs().max()) / scale > 1e-2


def test_trainable_layers_map_to_frozen_stages() -> None:
    for trainable, frozen_stages in ((5, -1), (4, 0), (3, 1), (0, 4)):
        with torch.device("meta"):
            tv = small_tv_retinanet(frozen=False, trainable_layers=trainable)
        assert spec_from_torchvision(tv).backbone.frozen_stages == frozen_stages


def test_unsupported_models_are_rejected_with_the_part_named() -> None:
    with pytest.raises(TypeError, match=r"torchvision\.models\.detection\.RetinaNet"):
        spec_from_torchvision(nn.Linear(2, 2))
    with torch.device("meta"):
        tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
        maxpool = TVRetinaNet(
            _resnet_fpn_extractor(torchvision.models.resnet18(), 5, returned_layers=[2, 3, 4]),
            num_classes=3,
            anchor_generator=AnchorGenerator(((32,), (64,), (128,), (256,)), ((1.0,),) * 4),
        )
        resnext = TVRetinaNet(
            _resnet_fpn_extractor(
                torchvision.models.resnext50_32x4d(),
                5,
                returned_layers=[2, 3, 4],
                extra_blocks=LastLevelP6P7(256, 256),
            ),
            num_classes=3,
        )
    with pytest.raises(UnsupportedModelError, match="LastLevelMaxPool"):
        spec_from_torchvision(maxpool)
    with pytest.raises(UnsupportedModelError, match=r"layer1\.0.*grouped"):
        spec_from_torchvision(resnext)
    tv.head.regression_head._loss_type = "ciou"
    with pytest.raises(UnsupportedModelError, match=r"_loss_type.*ciou"):
        spec_from_torchvision(tv)
    tv.head.regression_head._loss_type = "l1"
    # sizes that are not one base size times the same scales on every level
    sizes = ((32, 41, 50), (64, 80, 100), (128, 161, 203), (256, 322, 406), (512, 645, 812))
    tv.anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    with pytest.raises(UnsupportedModelError, match=r"anchor_generator\.sizes"):
        spec_from_torchvision(tv)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_state_dict_names_are_fdet_names(version) -> None:
    with torch.device("meta"):
        tv = CTORS[version](weights=None, weights_backbone=None, num_classes=K)
        det = build(spec_from_torchvision(tv))
    converted = state_dict_from_torchvision(tv.state_dict())
    assert set(converted) == set(det.state_dict())
    shapes = {k: v.shape for k, v in det.state_dict().items()}
    assert all(v.shape == shapes[k] for k, v in converted.items())
    assert "head.cls_tower.3.0.weight" in converted and "head.box_deltas.bias" in converted

    if version == "v1":
        # the flat towers saved by torchvision < 0.13, (conv, relu) * 4, map to the same names
        old = {}
        for key, value in tv.state_dict().items():
            parts = key.split(".")
            if parts[1] in ("classification_head", "regression_head") and parts[2] == "conv":
                key = ".".join([*parts[:3], str(2 * int(parts[3])), parts[-1]])
            old[key] = value
        assert old.keys() != tv.state_dict().keys()
        assert state_dict_from_torchvision(old).keys() == converted.keys()

    with pytest.raises(KeyError, match=r"anchor_generator\.cell"):
        state_dict_from_torchvision({**tv.state_dict(), "anchor_generator.cell": torch.zeros(1)})
