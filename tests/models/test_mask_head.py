"""The mask head of Mask R-CNN (fdet.models.detectors.two_stage.mask_head): parity with
torchvision's MaskRCNNHeads + MaskRCNNPredictor (v1 and v2), its loss with maskrcnn_loss, its
postprocess with maskrcnn_inference + paste_masks_in_image, the spec and the compiler."""

from __future__ import annotations

import attrs
import pytest
import torch
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    maskrcnn_inference,
    maskrcnn_loss,
    paste_masks_in_image,
)

from fdet import specs
from fdet.models.detectors.two_stage.mask_head import (
    MaskHead,
    build_mask_head,
    mask_loss_term,
    mask_postprocess,
    mask_training_rois,
    rename_torchvision_keys,
)
from fdet.ops.postprocess import Detections
from fdet.ops.roi import SampledRoIs
from fdet.registry import build
from fdet.specs import SpecError

CHANNELS = 16
K = 3  # fdet classes; torchvision's predictor has K + 1


def torchvision_mask_branch(norm: bool, seed: int = 0) -> tuple[MaskRCNNHeads, MaskRCNNPredictor]:
    """torchvision's mask head and predictor at a small width (v2 with batch norm), with
    perturbed biases and norm statistics so that every parameter matters."""
    torch.manual_seed(seed)
    head = MaskRCNNHeads(
        CHANNELS, [CHANNELS] * 4, 1, norm_layer=torch.nn.BatchNorm2d if norm else None
    )
    predictor = MaskRCNNPredictor(CHANNELS, CHANNELS, K + 1)
    with torch.no_grad():
        for name, p in [*head.named_parameters(), *predictor.named_parameters()]:
            if "bias" in name or p.ndim == 1:
                p.normal_(0.0, 0.2)
        for module in head.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return head.eval(), predictor.eval()


def fdet_from(head: MaskRCNNHeads, predictor: MaskRCNNPredictor, norm: bool) -> MaskHead:
    ours = MaskHead(
        in_channels=CHANNELS,
        num_classes=K,
        channels=CHANNELS,
        norm=specs.BatchNorm() if norm else None,
    )
    state = {f"roi_heads.mask_head.{k}": v for k, v in head.state_dict().items()}
    state |= {f"roi_heads.mask_predictor.{k}": v for k, v in predictor.state_dict().items()}
    renamed = rename_torchvision_keys({k.removeprefix("roi_heads."): v for k, v in state.items()})
    ours.load_state_dict(renamed, strict=True)
    return ours.eval()


@pytest.mark.parametrize("norm", [False, True], ids=["v1", "v2"])
def test_logits_equal_torchvision(norm: bool) -> None:
    head, predictor = torchvision_mask_branch(norm)
    ours = fdet_from(head, predictor, norm)
    pooled = torch.randn(2, 5, CHANNELS, 14, 14, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = predictor(head(pooled.flatten(0, 1)))  # [10, K + 1, 28, 28]
        logits = ours(pooled)
        flat = ours(pooled.flatten(0, 1))
    assert logits.shape == (2, 5, K, 28, 28)
    torch.testing.assert_close(logits.flatten(0, 1), ref[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat, logits.flatten(0, 1), rtol=0, atol=0)
    print(
        f"max |logits - torchvision| ({'v2' if norm else 'v1'}):", (flat - ref[:, 1:]).abs().max()
    )


def test_old_torchvision_key_names_load() -> None:
    head, predictor = torchvision_mask_branch(False)
    old = {
        f"mask_head.mask_fcn{i + 1}.{kind}": head.state_dict()[f"{i}.0.{kind}"]
        for i in range(4)
        for kind in ("weight", "bias")
    }
    old |= {f"mask_predictor.{k}": v for k, v in predictor.state_dict().items()}
    old["box_head.fc6.weight"] = torch.zeros(1)  # another part's key: left out
    ours = MaskHead(in_channels=CHANNELS, num_classes=K, channels=CHANNELS)
    ours.load_state_dict(rename_torchvision_keys(old), strict=True)
    torch.testing.assert_close(ours.logits.weight, predictor.mask_fcn_logits.weight[1:])


def random_gt(g: torch.Generator, b: int, m: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    masks = (torch.rand(b, m, size // 8, size // 8, generator=g) < 0.5).to(torch.uint8)
    masks = masks.repeat_interleave(8, 2).repeat_interleave(8, 3)  # blocky masks [B, M, H, W]
    labels = torch.randint(0, K, (b, m), generator=g)
    return masks, labels


@pytest.mark.parametrize("max_rois", [None, 4])
def test_loss_term_equals_torchvision_maskrcnn_loss(max_rois: int | None) -> None:
    """The sampler's RoIs (classifier targets ``1 + label`` for positives, 0 for background)
    through ``mask_training_rois`` and ``mask_loss_term``: the term's value is torchvision's
    loss on the positive RoIs; with ``max_rois`` the head runs on the positives only."""
    g = torch.Generator().manual_seed(2)
    b, s, m, size = 2, 9, 4, 64
    gt_masks, gt_labels = random_gt(g, b, m, size)
    xy = torch.rand(b, s, 2, generator=g) * 40
    boxes = torch.cat((xy, xy + 4 + torch.rand(b, s, 2, generator=g) * 20), dim=-1)
    gt_index = torch.randint(0, m, (b, s), generator=g)
    positive = torch.rand(b, s, generator=g) < 0.4
    positive[:, 0] = True
    sampler_labels = torch.where(positive, 1 + gt_labels.gather(1, gt_index), 0)
    rois = mask_training_rois(
        boxes, sampler_labels - 1, gt_index, sampler_labels > 0, max_rois=max_rois
    )
    p = s if max_rois is None else max_rois
    assert rois.boxes.shape == (b, p, 4)
    assert (rois.positive.sum(1) == positive.sum(1).clamp(max=p)).all()

    head, predictor = torchvision_mask_branch(False, seed=3)
    ours = fdet_from(head, predictor, False)
    pooled = torch.randn(b, p, CHANNELS, 14, 14, generator=g)
    term = mask_loss_term(ours(pooled), gt_masks, rois, weight=1.0)
    assert term.count == rois.positive.sum() * 28 * 28

    keep = rois.positive
    with torch.no_grad():
        tv_logits = predictor(head(pooled[keep]))
    ref = maskrcnn_loss(
        tv_logits,
        [rois.boxes[i][keep[i]] for i in range(b)],
        [gt_masks[i] for i in range(b)],
        [gt_labels[i] + 1 for i in range(b)],
        [rois.gt_index[i][keep[i]] for i in range(b)],
    )
    torch.testing.assert_close(term.value().detach(), ref, rtol=1e-5, atol=1e-6)
    print(f"|mask loss - torchvision| (max_rois={max_rois}):", (term.value() - ref).abs().item())


def test_loss_term_without_positives_is_zero_with_a_zero_count() -> None:
    rois = mask_training_rois(
        torch.zeros(1, 3, 4),
        torch.zeros(1, 3, dtype=torch.long),
        torch.zeros(1, 3, dtype=torch.long),
        torch.zeros(1, 3, dtype=torch.bool),
        max_rois=2,
    )
    logits = torch.randn(1, 2, K, 28, 28, requires_grad=True)
    term = mask_loss_term(logits, torch.ones(1, 2, 32, 32, dtype=torch.uint8), rois)
    assert term.total == 0 and term.count == 0 and term.value() == 0
    term.value().backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_postprocess_equals_torchvision_inference_and_paste() -> None:
    """Each detection's label channel, sigmoid, pasted, binarized at > 0.5: torchvision's
    maskrcnn_inference + paste_masks_in_image; padded slots and the padded area are empty."""
    g = torch.Generator().manual_seed(4)
    b, n, padded = 2, 6, (64, 80)
    image_sizes = torch.tensor([[64, 80], [50, 60]])
    xy = torch.rand(b, n, 2, generator=g) * 40
    boxes = torch.cat((xy, xy + 5 + torch.rand(b, n, 2, generator=g) * 30), dim=-1)
    boxes = torch.minimum(boxes, image_sizes.flip(1).repeat(1, 2)[:, None].float())
    labels = torch.randint(0, K, (b, n), generator=g)
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    detections = Detections(boxes, torch.rand(b, n, generator=g), labels, valid)
    logits = torch.randn(b, n, K, 28, 28, generator=g) * 3
    out = mask_postprocess(logits, detections, image_sizes, padded_size=padded)
    assert out.masks is not None and out.masks.dtype == torch.bool
    assert out.masks.shape == (b, n, *padded)
    assert torch.equal(out.boxes, boxes)
    assert not out.masks[1, 4:].any()
    assert not out.masks[1, :, 50:].any() and not out.masks[1, :, :, 60:].any()

    tv_logits = torch.cat((torch.zeros(b * n, 1, 28, 28), logits.flatten(0, 1)), dim=1)
    probs = maskrcnn_inference(tv_logits, [labels[i] + 1 for i in range(b)])
    for i in range(b):
        h, w = image_sizes[i].tolist()
        ref = paste_masks_in_image(probs[i], boxes[i], (h, w))[:, 0] > 0.5  # [N, h, w]
        ours = out.masks[i, :, :h, :w]
        v = valid[i]
        assert torch.equal(ours[v], ref[v])


def test_postprocess_without_paste_keeps_box_frame_probabilities() -> None:
    g = torch.Generator().manual_seed(6)
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 30.0], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0]])
    detections = Detections(boxes, torch.ones(1, 2), labels, torch.tensor([[True, False]]))
    logits = torch.randn(1, 2, K, 28, 28, generator=g)
    out = mask_postprocess(
        logits, detections, torch.tensor([[40, 40]]), padded_size=(40, 40), paste=False
    )
    assert out.masks is not None and out.masks.shape == (1, 2, 28, 28)
    assert out.masks.is_floating_point()
    torch.testing.assert_close(out.masks[0, 0], torch.sigmoid(logits[0, 0, 2]))
    assert (out.masks[0, 1] == 0).all()


def test_spec_defaults_json_and_validation() -> None:
    spec = specs.MaskHead()
    assert spec.mask_size == 28 and spec.roi_align.output_size == 14
    assert spec.roi_align.sampling_ratio == 2 and spec.norm is None
    v2 = attrs.evolve(spec, norm=specs.BatchNorm(), max_rois=128)
    assert specs.from_json(specs.to_json(v2)) == v2
    with pytest.raises(SpecError, match="max_rois"):
        specs.MaskHead(max_rois=0)
    with pytest.raises(SpecError, match="norm"):
        specs.MaskHead(channels=24, norm=specs.GroupNorm(groups=16))
    with pytest.raises(SpecError, match="threshold"):
        specs.MaskHead(threshold=1.5)


def test_builder_is_registered() -> None:
    spec = specs.MaskHead(channels=8, num_convs=2, norm=specs.GroupNorm(groups=4))
    head = build(spec, in_channels=CHANNELS, num_classes=K)
    assert isinstance(head, MaskHead)
    assert build_mask_head(spec, in_channels=CHANNELS, num_classes=K).logits.out_channels == K
    assert [name for name, _ in head.named_parameters()] == [
        "convs.0.0.weight",
        "convs.0.1.weight",
        "convs.0.1.bias",
        "convs.1.0.weight",
        "convs.1.1.weight",
        "convs.1.1.bias",
        "upsample.weight",
        "upsample.bias",
        "logits.weight",
        "logits.bias",
    ]
    out = head(torch.randn(3, CHANNELS, 7, 7))
    assert out.shape == (3, K, 14, 14)


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    head = MaskHead(in_channels=CHANNELS, num_classes=K, channels=8, num_convs=2)

    def run(pooled, gt_masks, boxes, labels, gt_index, positive, image_sizes):
        rois = mask_training_rois(boxes, labels, gt_index, positive, max_rois=3)
        logits = head(pooled)
        term = mask_loss_term(logits, gt_masks, rois)
        detections = Detections(boxes[:, :3], torch.ones(2, 3), labels[:, :3], positive[:, :3])
        out = mask_postprocess(logits, detections, image_sizes, padded_size=(32, 40))
        return term.total, term.count, out.masks

    compiled = torch.compile(run, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(5)
    gt_masks, _ = random_gt(g, 2, 2, 32)
    gt_masks = torch.nn.functional.pad(gt_masks, (0, 8))
    xy = torch.rand(2, 5, 2, generator=g) * 20
    boxes = torch.cat((xy, xy + 3 + torch.rand(2, 5, 2, generator=g) * 12), dim=-1)
    args = (
        torch.randn(2, 3, CHANNELS, 7, 7, generator=g),
        gt_masks,
        boxes,
        torch.randint(0, K, (2, 5), generator=g),
        torch.randint(0, 2, (2, 5), generator=g),
        torch.rand(2, 5, generator=g) < 0.6,
        torch.tensor([[32, 40], [30, 33]]),
    )
    with torch.no_grad():
        eager = run(*args)
        total, count, masks = compiled(*args)
    torch.testing.assert_close(total, eager[0], rtol=1e-5, atol=1e-4)
    assert count == eager[1]
    assert (masks != eager[2]).float().mean() < 1e-3


def test_builder_keeps_the_spec_settings_and_pools_from_the_pyramid() -> None:
    align = specs.RoIAlign(levels=(3, 4), output_size=5, sampling_ratio=0, canonical_scale=64.0)
    spec = specs.MaskHead(
        roi_align=align, channels=8, num_convs=1, max_rois=2, loss_weight=0.5, threshold=0.4
    )
    head = build(spec, in_channels=CHANNELS, num_classes=K, feature_levels=(2, 3, 4, 5))
    assert head.levels == (3, 4) and head.feature_levels == (2, 3, 4, 5)
    assert (head.output_size, head.sampling_ratio, head.canonical_scale) == (5, 0, 64.0)
    assert (head.max_rois, head.loss_weight, head.threshold, head.paste_padding) == (2, 0.5, 0.4, 1)
    g = torch.Generator().manual_seed(7)
    features = [torch.randn(2, CHANNELS, 32 >> i, 32 >> i, generator=g) for i in range(4)]
    boxes = torch.tensor([[[1.0, 2.0, 9.0, 12.0], [0.0, 0.0, 31.0, 30.0]]]).expand(2, 2, 4)
    # the maps of levels 3 and 4 only: a head built for them alone pools the same
    alone = build(spec, in_channels=CHANNELS, num_classes=K)
    assert alone.feature_levels == (3, 4)
    torch.testing.assert_close(head.pool(features, boxes), alone.pool(features[1:3], boxes))
    assert head.mask_logits(features, boxes).shape == (2, 2, K, 10, 10)
    with pytest.raises(ValueError, match="feature levels"):
        build(spec, in_channels=CHANNELS, num_classes=K, feature_levels=(2, 3))


def _sampled(g: torch.Generator, b: int, s: int, m: int) -> SampledRoIs:
    xy = torch.rand(b, s, 2, generator=g) * 30
    boxes = torch.cat((xy, xy + 4 + torch.rand(b, s, 2, generator=g) * 20), dim=-1)
    valid = torch.rand(b, s, generator=g) < 0.8
    labels = torch.where(valid, torch.randint(0, K + 1, (b, s), generator=g), 0)
    gt_index = torch.randint(0, m, (b, s), generator=g)
    return SampledRoIs(boxes, labels, gt_index, valid, boxes, torch.zeros_like(boxes), gt_index)


def test_module_loss_is_the_functions_on_the_sampled_positives() -> None:
    g = torch.Generator().manual_seed(8)
    head = MaskHead(
        in_channels=CHANNELS,
        num_classes=K,
        channels=8,
        num_convs=2,
        max_rois=3,
        loss_weight=2.0,
        levels=(2, 3),
        output_size=7,
        canonical_scale=32.0,
    )
    features = [torch.randn(2, CHANNELS, 16 >> i, 16 >> i, generator=g) for i in range(2)]
    sampled = _sampled(g, 2, 9, 2)
    gt_masks, _ = random_gt(g, 2, 2, 64)
    term = head.loss(features, sampled, gt_masks)
    rois = mask_training_rois(
        sampled.boxes,
        sampled.labels - 1,
        sampled.gt_index,
        sampled.valid & (sampled.labels > 0),
        max_rois=3,
    )
    want = mask_loss_term(head(head.pool(features, rois.boxes)), gt_masks, rois, weight=2.0)
    assert term.weight == 2.0
    torch.testing.assert_close((term.total, term.count), (want.total, want.count), rtol=0, atol=0)
    assert term.count > 0
    with pytest.raises(ValueError, match="gt_masks is None"):
        head.loss(features, sampled, None)
