"""torchvision's Mask R-CNN (``maskrcnn_resnet50_fpn`` and its v2) converted to fdet: the spec,
the weights, the same detections and masks (eval mode, perturbed predictors and norms, so that
many detections of several classes survive), and the same mask loss on the same RoIs."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.roi_heads import maskrcnn_loss

from fdet import specs
from fdet.compat.torchvision import (
    UnsupportedModelError,
    load_torchvision,
    spec_from_torchvision,
    state_dict_from_torchvision,
)
from fdet.data.sample import Batch
from fdet.models.detectors.two_stage.mask_rcnn import MaskRCNN
from fdet.ops.masks import paste_masks
from tests.compat.test_torchvision import assert_same_detections, input_size
from tests.compat.test_torchvision_faster_rcnn import make_nontrivial

SIZE = (160, 224)  # multiples of 32: torchvision pads nothing
K = 4
DETECTIONS = 100


class Pair(NamedTuple):
    tv: TVMaskRCNN
    fdet: MaskRCNN
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]


@pytest.fixture(scope="module", params=["v1", "v2"])
def pair(request: pytest.FixtureRequest) -> Pair:
    torch.manual_seed(0)
    make = maskrcnn_resnet50_fpn if request.param == "v1" else maskrcnn_resnet50_fpn_v2
    tv = make(
        weights=None,
        weights_backbone=None,
        num_classes=K + 1,
        min_size=min(SIZE),
        max_size=max(SIZE),
        box_detections_per_img=DETECTIONS,
    )
    images = torch.rand(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    make_nontrivial(tv, images)
    calibrate_mask_logits(tv, images)
    return Pair(tv, load_torchvision(tv), images)


def calibrate_mask_logits(tv: TVMaskRCNN, images: torch.Tensor) -> None:
    """Each mask logit channel centred with std 2 over the detections' mask pixels, so that
    masks have edges inside their boxes (neither empty nor full)."""
    layer = tv.roi_heads.mask_predictor.mask_fcn_logits
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        with input_size(tv, SIZE), torch.no_grad():
            tv(list(images))
    finally:
        handle.remove()
    with torch.no_grad():
        out = layer(seen[0]).transpose(0, 1).flatten(1)  # [K + 1, N·m·m]
        scale = 2.0 / out.std(dim=1).clamp(min=1e-6)
        layer.weight.mul_(scale[:, None, None, None])
        layer.bias.copy_((layer.bias - out.mean(dim=1)) * scale)


def test_spec_is_torchvisions_recipe(pair: Pair) -> None:
    spec = spec_from_torchvision(pair.tv)
    assert isinstance(spec, specs.MaskRCNN) and spec.num_classes == K
    head = spec.mask_head
    assert head.roi_align == specs.RoIAlign(levels=(2, 3, 4, 5), output_size=14, sampling_ratio=2)
    assert (head.num_convs, head.channels, head.dilation) == (4, 256, 1)
    v2 = pair.tv.roi_heads.mask_head[0][1].__class__ is torch.nn.BatchNorm2d
    assert head.norm == (specs.BatchNorm() if v2 else None)
    # every positive the RoI sampler can draw (512 a quarter positive) keeps a slot
    assert (head.threshold, head.paste_padding, head.max_rois) == (0.5, 1, 128)
    # fdet's defaults are torchvision's v1; v2 adds batch norm
    assert head == specs.MaskHead(norm=specs.BatchNorm() if v2 else None)
    assert specs.from_json(specs.to_json(spec), specs.Detector) == spec
    assert isinstance(pair.fdet, MaskRCNN) and not pair.fdet.paste_masks


def test_state_dict_loads_every_tensor(pair: Pair) -> None:
    state = state_dict_from_torchvision(pair.tv.state_dict())
    ours = pair.fdet.state_dict()
    assert set(state) == set(ours)
    for key, value in state.items():
        assert ours[key].shape == value.shape, key
    torch.testing.assert_close(
        ours["mask_head.logits.weight"], pair.tv.roi_heads.mask_predictor.mask_fcn_logits.weight[1:]
    )
    with pytest.raises(KeyError, match=r"mask_predictor\.extra"):
        state_dict_from_torchvision(
            {**pair.tv.state_dict(), "roi_heads.mask_predictor.extra.weight": torch.zeros(1)}
        )


def _pairing(ours, ref: dict, b: int) -> list[tuple[int, int]]:
    """(reference index, our index) pairs: same label, score within 1e-4, the nearest box."""
    count = len(ref["scores"])
    boxes, scores, labels = ours.boxes[b, :count], ours.scores[b, :count], ours.labels[b, :count]
    box_diff = (ref["boxes"][:, None] - boxes[None]).abs().amax(-1)
    fits = ((ref["scores"][:, None] - scores[None]).abs() <= 1e-4) & (
        ref["labels"][:, None] == labels[None]
    )
    used = torch.zeros(count, dtype=torch.bool)
    pairs = []
    for i in range(count):
        cost = torch.where(fits[i] & ~used, box_diff[i], math.inf)
        j = int(cost.argmin())
        assert cost[j] <= 1e-3
        used[j] = True
        pairs.append((i, j))
    return pairs


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def test_detections_and_masks_match_torchvision(pair: Pair) -> None:
    tv, det, images = pair
    assert not det.training
    with input_size(tv, SIZE), torch.no_grad():
        reference = tv(list(images))
    reference = [{**ref, "labels": ref["labels"] - 1} for ref in reference]
    for ref in reference:
        assert len(set(ref["labels"].tolist())) >= 3
    sizes = torch.tensor([list(SIZE)] * len(images))
    with torch.no_grad():
        outputs = det(images)
        ours = det.postprocess(outputs, sizes)
    worst = assert_same_detections(ours, reference, minimum=50)
    assert worst[0] <= 1e-3 and worst[1] <= 1e-4
    assert ours.masks.shape == (2, DETECTIONS, 28, 28) and ours.masks.is_floating_point()

    pasted = paste_masks(ours.masks, ours.boxes, SIZE, padding=1, threshold=0.5)  # [B, N, H, W]
    det.paste_masks = True
    try:
        with torch.no_grad():
            direct = det.postprocess(outputs, sizes).masks  # bool [B, N, H, W]
    finally:
        det.paste_masks = False
    assert direct.dtype == torch.bool and torch.equal(direct, pasted & ours.valid[..., None, None])
    worst_iou, worst_prob, foreground = 1.0, 0.0, []
    for b, ref in enumerate(reference):
        pairs = _pairing(ours, ref, b)
        i, j = (torch.tensor(x) for x in zip(*pairs))
        theirs = ref["masks"][i, 0]  # [n, H, W] probabilities
        ious = _iou(theirs > 0.5, pasted[b, j])
        worst_iou = min(worst_iou, float(ious.min()))
        soft = paste_masks(ours.masks[b : b + 1, j], ours.boxes[b : b + 1, j], SIZE)[0]
        worst_prob = max(worst_prob, float((soft - theirs).abs().max()))
        foreground.append((theirs > 0.5).flatten(1).float().mean(1))
    share = torch.cat(foreground)
    print(
        f"masks: min IoU {worst_iou:.4f}, max |Δprobability| {worst_prob:.2e}, "
        f"foreground share {float(share.min()):.3f}..{float(share.max()):.3f}"
    )
    assert worst_iou >= 0.99 and worst_prob <= 1e-4
    assert (share > 0).float().mean() > 0.9  # non-trivial masks


def _targets(images: torch.Tensor) -> Batch:
    """Three objects an image: boxes less a quarter, with their masks; one padded slot."""
    b, _, h, w = images.shape
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(b, 4, 2, generator=g) * torch.tensor([w / 2, h / 2])
    wh = 16 + torch.rand(b, 4, 2, generator=g) * torch.tensor([w / 2, h / 2])
    boxes = torch.cat((xy, xy + wh), dim=-1).floor()
    valid = torch.tensor([True, True, True, False]).expand(b, 4)
    ys = torch.arange(h).view(1, 1, h, 1) + 0.5
    xs = torch.arange(w).view(1, 1, 1, w) + 0.5
    x0, y0, x1, y1 = (boxes[..., k, None, None] for k in range(4))
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    corner = (xs >= (x0 + x1) / 2) & (ys >= (y0 + y1) / 2)
    masks = (inside & ~corner & valid[..., None, None]).to(torch.uint8)
    return Batch(
        images=images,
        image_sizes=torch.tensor([list(SIZE)] * b),
        gt_boxes=boxes,
        gt_labels=torch.randint(0, K, (b, 4), generator=g),
        gt_valid=valid,
        gt_crowd=torch.zeros(b, 4, dtype=torch.bool),
        image_ids=torch.arange(b),
        scales=torch.ones(b, 2),
        gt_masks=masks,
    )


def test_mask_loss_matches_torchvision_on_the_same_rois(pair: Pair) -> None:
    """fdet's "mask" term on the RoIs its RoI head sampled equals torchvision's maskrcnn_loss of
    its own mask branch (pool, head, predictor) on the positives among them, on the same
    pyramid (the detections' test shows it is torchvision's), with eval-mode norms."""
    tv, det, images = pair
    batch = _targets(images)
    with torch.no_grad():
        outputs = det(images)
        sampled = det.training_outputs(outputs, batch).sampled
        term = det.mask_head.loss(outputs.features, sampled, batch.gt_masks)
        features = dict(zip(("0", "1", "2", "3", "pool"), outputs.features))
        positive = sampled.valid & (sampled.labels > 0)
        proposals = [sampled.boxes[b][positive[b]] for b in range(2)]
        heads = tv.roi_heads
        pooled = heads.mask_roi_pool(features, proposals, [SIZE] * 2)
        logits = heads.mask_predictor(heads.mask_head(pooled))
        ref = maskrcnn_loss(
            logits,
            proposals,
            [batch.gt_masks[b] for b in range(2)],
            [batch.gt_labels[b] + 1 for b in range(2)],
            [sampled.gt_index[b][positive[b]] for b in range(2)],
        )
    assert int(positive.sum()) >= 6
    assert term.count == positive.sum() * 28 * 28
    print(f"mask loss {float(ref):.5f}, |Δ| {abs(float(term.value()) - float(ref)):.2e}")
    torch.testing.assert_close(term.value(), ref, rtol=1e-4, atol=1e-5)


def test_keypoint_rcnn_is_refused() -> None:
    from torchvision.models.detection import keypointrcnn_resnet50_fpn

    tv = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    with pytest.raises(UnsupportedModelError, match="keypoint"):
        spec_from_torchvision(tv)
