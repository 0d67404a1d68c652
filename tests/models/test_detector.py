"""The single-stage detector module built from a RetinaNet spec."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch
import torchvision

from fdet import build, specs
from fdet.models import DenseDetector, Detector, RetinaNet
from fdet.models.detectors.retinanet import retinanet_anchors
from fdet.ops.anchors import anchor_offsets, grid_anchors, level_sizes
from fdet.ops.postprocess import Detections

_BN_STATS = {"running_mean", "running_var", "num_batches_tracked"}
ZOO = Path(__file__).resolve().parents[2] / "specs/retinanet"


def tiny_spec(num_classes: int = 3) -> specs.RetinaNet:
    return specs.RetinaNet(
        backbone=specs.ResNet(depth=18, out_levels=(3, 4, 5), width=16, norm=specs.BatchNorm()),
        neck=specs.FPN(channels=32),
        head=specs.RetinaHead(num_classes=num_classes, num_convs=1, channels=32),
    )


def test_outputs_line_up_with_anchors() -> None:
    spec = tiny_spec()
    model = build(spec).eval()
    assert isinstance(model, Detector) and isinstance(model, DenseDetector)
    assert isinstance(model, RetinaNet)
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


@pytest.mark.parametrize(
    ("zoo_file", "ctor"),
    [
        ("r50_fpn_1x_coco.py", torchvision.models.detection.retinanet_resnet50_fpn),
        ("r50_fpn_v2_coco.py", torchvision.models.detection.retinanet_resnet50_fpn_v2),
    ],
)
def test_parameter_count_matches_torchvision_retinanet(zoo_file, ctor) -> None:
    spec = specs.load(ZOO / zoo_file, specs.RetinaNet, name="MODEL")
    # torchvision's untrained model uses trainable batch norm (its affine terms are parameters)
    spec = attrs.evolve(spec, backbone=attrs.evolve(spec.backbone, norm=specs.BatchNorm()))
    with torch.device("meta"):
        ours = build(spec)
        theirs = ctor(weights=None, weights_backbone=None, num_classes=80)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)


def test_module_keeps_the_spec_settings_and_no_state_but_parameters() -> None:
    spec = attrs.evolve(
        tiny_spec(),
        box_loss=specs.GIoULoss(weight=2.0),
        postprocess=specs.DensePostprocess(max_detections=7),
    )
    model = build(spec)
    assert model.box_loss_spec == spec.box_loss and model.postprocess_spec == spec.postprocess
    assert model.anchor_spec == spec.anchors and model.assigner_spec == spec.assigner
    # the state dict is the parameters and the batch-norm statistics, nothing derived
    stats = {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in _BN_STATS}
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()} | stats


def test_head_must_match_the_anchors() -> None:
    model = build(tiny_spec())
    with pytest.raises(ValueError, match="anchors a location"):
        RetinaNet(
            backbone=model.backbone,
            neck=model.neck,
            head=model.head,
            anchors=specs.Anchors(ratios=(1.0,)),
        )


def test_predict_returns_padded_detections_and_restores_the_mode() -> None:
    torch.manual_seed(0)
    spec = attrs.evolve(
        tiny_spec(), postprocess=specs.DensePostprocess(score_threshold=0.0, max_detections=50)
    )
    model = build(spec).train()
    images = torch.rand(2, 3, 64, 96) * 255
    sizes = torch.tensor([[64, 96], [40, 50]])
    dets = model.predict(images, sizes)
    assert model.training  # restored
    assert isinstance(dets, Detections)
    assert dets.boxes.shape == (2, 50, 4) and dets.valid.shape == (2, 50)
    assert dets.valid.all()  # threshold 0: every candidate scores above it
    assert not dets.boxes.requires_grad
    # clipped to each image's own size; scores sorted
    assert (dets.boxes[1, :, 0::2] <= 50).all() and (dets.boxes[1, :, 1::2] <= 40).all()
    assert (dets.scores[:, :-1] >= dets.scores[:, 1:]).all()
    # the default size is the padded one
    default = model.predict(images)
    model.eval()
    with torch.no_grad():
        again = model.postprocess(model(images), torch.tensor([[64, 96], [64, 96]]))
    for a, b in zip(default, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_anchors_follow_the_spec_and_the_outputs() -> None:
    spec = tiny_spec()
    model = build(spec).eval()
    out = model(torch.zeros(1, 3, 64, 64))
    anchors = model.anchors_for(out)
    assert anchors.shape == (sum(x.shape[1] for x in out.cls_logits), 4)
    torch.testing.assert_close(
        anchors, retinanet_anchors(out.feature_sizes, spec=spec.anchors), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="anchor levels"):
        retinanet_anchors(out.feature_sizes[:2], spec=spec.anchors)


def test_min_box_size_drops_small_boxes_before_nms() -> None:
    torch.manual_seed(0)
    base = attrs.evolve(
        tiny_spec(), postprocess=specs.DensePostprocess(score_threshold=0.0, max_detections=400)
    )
    model = build(base).eval()
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        out = model(images)
    sizes = torch.tensor([[64, 64]])
    plain = model.postprocess(out, sizes)
    wh = plain.boxes[..., 2:] - plain.boxes[..., :2]
    min_size = float(wh.amin(-1)[plain.valid].median())  # some boxes on each side of it
    model.postprocess_spec = attrs.evolve(base.postprocess, min_box_size=min_size)
    filtered = model.postprocess(out, sizes)
    kept_wh = filtered.boxes[..., 2:] - filtered.boxes[..., :2]
    assert filtered.valid.any()
    assert (kept_wh[filtered.valid] >= min_size).all()
    # the survivors of the plain run that are large enough are all kept
    large = plain.valid & (wh >= min_size).all(-1)
    assert filtered.valid.sum() >= large.sum()
    # a tiny size drops exactly the empty boxes (clipped away at the border), which overlap
    # nothing and so never suppressed anything
    model.postprocess_spec = attrs.evolve(base.postprocess, min_box_size=1e-6)
    tiny = model.postprocess(out, sizes)
    nonempty = plain.valid & (wh > 0).all(-1)
    assert 0 < nonempty.sum() < plain.valid.sum()
    assert tiny.valid.sum() == nonempty.sum()
    for a, b in zip(tiny[:4], plain[:4]):  # boxes, scores, labels, valid (no masks)
        torch.testing.assert_close(a[tiny.valid], b[nonempty], rtol=0, atol=0)
