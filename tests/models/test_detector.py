"""The single-stage detector module built from a RetinaNet spec."""

from __future__ import annotations

from pathlib import Path

import torch

from fdet import build, specs
from fdet.models import SingleStageDetector
from fdet.ops.anchors import anchor_offsets, grid_anchors, level_sizes


def tiny_spec(num_classes: int = 3) -> specs.RetinaNet:
    return specs.RetinaNet(
        backbone=specs.ResNet(depth=18, out_levels=(3, 4, 5), width=16, norm="bn"),
        neck=specs.FPN(channels=32),
        head=specs.RetinaHead(num_classes=num_classes, num_convs=1, channels=32),
    )


def test_outputs_line_up_with_anchors() -> None:
    spec = tiny_spec()
    model = build(spec).eval()
    assert isinstance(model, SingleStageDetector)
    images = torch.rand(2, 3, 96, 128) * 255
    out = model(images)
    a = spec.anchors
    assert len(out.cls_logits) == len(a.strides)
    offsets = [
        anchor_offsets(level_sizes(base, a.octave_scales, truncate=a.truncate_sizes), a.ratios)
        for base in a.base_sizes
    ]
    anchors = grid_anchors(offsets, out.feature_sizes, a.strides)
    total = sum(x.shape[1] for x in out.cls_logits)
    assert total == anchors.shape[0]
    for cls, box, (h, w), stride in zip(
        out.cls_logits, out.box_deltas, out.feature_sizes, a.strides
    ):
        assert (h, w) == (-(-96 // stride), -(-128 // stride))
        assert cls.shape == (2, h * w * a.per_location, 3)
        assert box.shape == (2, h * w * a.per_location, 4)
    # prior probability initialisation of the classification bias
    probs = torch.cat(out.cls_logits, dim=1).sigmoid()
    assert abs(probs.mean().item() - spec.head.prior_prob) < 0.01


def test_normalization_matches_the_spec() -> None:
    spec = tiny_spec()
    model = build(spec)
    x = torch.rand(1, 3, 8, 8) * 255
    mean = torch.tensor(spec.normalize.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.normalize.std).view(1, 3, 1, 1)
    expected = (x / spec.normalize.input_range - mean) / std
    torch.testing.assert_close(model.normalize(x), expected, rtol=1e-5, atol=1e-5)


def test_images_must_be_rgb_batches() -> None:
    model = build(tiny_spec())
    try:
        model(torch.rand(3, 32, 32))
    except ValueError as e:
        assert "[B, 3, H, W]" in str(e)
    else:
        raise AssertionError("a 3-d input must be rejected")


def test_parameter_count_matches_torchvision_retinanet() -> None:
    import attrs
    import torchvision

    spec = specs.load(Path(__file__).resolve().parents[2] / "specs/retinanet/r50_fpn_1x_coco.py")
    # torchvision's untrained model uses trainable batch norm (its affine terms are parameters)
    spec = attrs.evolve(spec, backbone=attrs.evolve(spec.backbone, norm="bn"))
    with torch.device("meta"):
        ours = build(spec)
        theirs = torchvision.models.detection.retinanet_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=80
        )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
