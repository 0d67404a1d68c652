"""Mask R-CNN (fdet.models.detectors.two_stage.mask_rcnn): the spec and its checks, the zoo and
shapes files, the contract on a tiny model (the mask term wired to the mask head's functions on
the RoI head's sampled RoIs, images without objects, padding, batched against per image,
gradients, autocast, a missing gt_masks), the two mask output formats, the training step, the
data loading with masks, the prediction grid and the compiler."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
import torch

from fdet import build, specs
from fdet.data.sample import Batch, Sample
from fdet.models.detectors.base import total_loss
from fdet.models.detectors.two_stage.faster_rcnn import FasterRCNN
from fdet.models.detectors.two_stage.mask_head import (
    MaskHead,
    mask_loss_term,
    mask_postprocess,
    mask_training_rois,
    pack_mask_rois,
)
from fdet.models.detectors.two_stage.mask_rcnn import MaskRCNN
from fdet.ops.masks import paste_masks
from fdet.ops.roi import multiscale_roi_align
from fdet.specs import SpecError
from fdet.train.step import supervised_step
from tests.models.test_faster_rcnn import SIZE, TINY, _batch, _keys, _values

ROOT = Path(__file__).resolve().parents[2]
K = TINY.num_classes
MASK_ROI = 7  # 14×14 masks: cheap on CPU
P = 8  # mask RoIs an image

TINY_MASK = specs.MaskRCNN(
    **attrs.asdict(TINY, recurse=False),
    mask_head=specs.MaskHead(
        roi_align=attrs.evolve(TINY.roi_head.roi_align, output_size=MASK_ROI),
        num_convs=2,
        channels=8,
        max_rois=P,
    ),
)


def _model(seed: int = 0, spec: specs.MaskRCNN = TINY_MASK, **kwargs) -> MaskRCNN:
    torch.manual_seed(seed)
    model = build(spec, **kwargs)
    assert isinstance(model, MaskRCNN)
    with torch.no_grad():  # livelier predictors: proposals and detections vary
        for p in (*model.rpn.head.parameters(), *model.roi_heads.box_predictor.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _gt_masks(batch: Batch) -> torch.Tensor:
    """Each gt's mask: its box less its top-right quarter (so the mask is not its box); padded
    slots are empty."""
    b, m = batch.gt_valid.shape
    ys = torch.arange(SIZE).view(1, 1, SIZE, 1) + 0.5
    xs = torch.arange(SIZE).view(1, 1, 1, SIZE) + 0.5
    box = torch.nan_to_num(batch.gt_boxes)[..., None, None]  # [B, M, 4, 1, 1]
    x0, y0, x1, y1 = box[:, :, 0], box[:, :, 1], box[:, :, 2], box[:, :, 3]
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    corner = (xs >= (x0 + x1) / 2) & (ys < (y0 + y1) / 2)
    masks = inside & ~corner & batch.gt_valid[..., None, None]
    return masks.to(torch.uint8).reshape(b, m, SIZE, SIZE)


def _mask_batch(**kwargs) -> Batch:
    batch = _batch(**kwargs)
    return batch._replace(gt_masks=_gt_masks(batch))


# --------------------------------------------------------------------------------------------
# Spec and files


def test_spec_round_trips_and_defaults_are_torchvisions() -> None:
    spec = specs.MaskRCNN(num_classes=80)
    assert isinstance(spec, specs.FasterRCNN)
    assert specs.from_json(specs.to_json(spec), specs.Detector) == spec
    assert specs.from_json(specs.to_json(TINY_MASK), specs.Detector) == TINY_MASK
    assert '"MaskRCNN"' in specs.to_json(spec)
    assert spec.mask_head == specs.MaskHead()
    assert spec.mask_head.roi_align.levels == (2, 3, 4, 5)
    assert spec.mask_head.roi_align.output_size == 14 and spec.mask_head.mask_size == 28


def test_spec_rejects_mask_levels_outside_the_pyramid() -> None:
    with pytest.raises(SpecError, match=r"mask_head\.roi_align\.levels"):
        specs.MaskRCNN(
            num_classes=3,
            mask_head=specs.MaskHead(roi_align=specs.RoIAlign(levels=(4, 5, 6, 7))),
        )
    with pytest.raises(SpecError, match=r"mask_head"):
        specs.from_json(
            '{"type": "MaskRCNN", "num_classes": 3, "mask_head": {"max_rois": 0}}',
            specs.Detector,
        )
    # Faster R-CNN's checks still apply
    with pytest.raises(SpecError, match=r"roi_head\.roi_align\.levels"):
        specs.MaskRCNN(
            num_classes=3, roi_head=specs.RoIHead(roi_align=specs.RoIAlign(levels=(3, 4, 5, 6, 7)))
        )


@pytest.mark.parametrize(
    "file", ["specs/shapes/mask_rcnn_r18_fpn.py", "specs/mask_rcnn/r50_fpn_1x_coco.py"]
)
def test_spec_files_load_round_trip_and_build(file: str) -> None:
    exp = specs.load(ROOT / file, specs.Experiment)
    assert isinstance(exp.model, specs.MaskRCNN)
    assert specs.from_json(specs.to_json(exp), specs.Experiment) == exp
    with torch.device("meta"):
        model = build(exp.model)
    assert isinstance(model, MaskRCNN) and model.num_classes == exp.model.num_classes
    assert not model.paste_masks


def test_spec_files_are_their_faster_rcnn_with_a_mask_head() -> None:
    for mask_file, box_file in (
        ("specs/shapes/mask_rcnn_r18_fpn.py", "specs/shapes/faster_rcnn_r18_fpn.py"),
        ("specs/mask_rcnn/r50_fpn_1x_coco.py", "specs/faster_rcnn/r50_fpn_1x_coco.py"),
    ):
        mask = specs.load(ROOT / mask_file, specs.Experiment)
        box = specs.load(ROOT / box_file, specs.Experiment)
        fields = attrs.asdict(mask.model, recurse=False)
        del fields["mask_head"]
        assert specs.FasterRCNN(**fields) == box.model
        assert attrs.evolve(mask, model=box.model) == box
    shapes = specs.load(ROOT / "specs/shapes/mask_rcnn_r18_fpn.py", specs.Experiment).model
    head, box_align = shapes.mask_head, shapes.roi_head.roi_align
    assert head.roi_align == attrs.evolve(box_align, output_size=14, aligned=True)
    sampler = shapes.roi_head.sampler
    assert head.max_rois >= int(sampler.num_samples * sampler.positive_fraction)


def test_zoo_model_has_torchvisions_parameters() -> None:
    """As many weights as torchvision's maskrcnn_resnet50_fpn with 81 classes, part by part
    (fdet's mask logits leave out the background channel)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    exp = specs.load(ROOT / "specs/mask_rcnn/r50_fpn_1x_coco.py", specs.Experiment)
    with torch.device("meta"):
        ours = build(exp.model).state_dict()
        theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    theirs_sd = {k: v for k, v in theirs.state_dict().items() if "num_batches_tracked" not in k}
    background = 256 + 1  # the predictor's channel-0 weights and bias
    want = sum(
        v.numel() for k, v in theirs_sd.items() if k.startswith("roi_heads.mask_")
    )  # mask_head + mask_predictor
    got = sum(v.numel() for k, v in ours.items() if k.startswith("mask_head."))
    assert got == want - background
    assert (
        sum(v.numel() for v in ours.values())
        == sum(v.numel() for v in theirs_sd.values()) - background
    )


# --------------------------------------------------------------------------------------------
# The mask head as a module


def test_mask_head_pools_its_own_levels_from_the_pyramid() -> None:
    model = _model()
    head = model.mask_head
    assert isinstance(head, MaskHead)
    assert head.levels == (2, 3, 4, 5) and head.feature_levels == (2, 3, 4, 5, 6)
    assert (head.output_size, head.max_rois) == (MASK_ROI, P)
    features = tuple(torch.randn(2, 16, SIZE >> lvl, SIZE >> lvl) for lvl in range(2, 7))
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0], [0.0, 0.0, 64.0, 64.0]]]).expand(2, 2, 4)
    pooled = head.pool(features, boxes)
    want = multiscale_roi_align(
        features[:4],
        boxes,
        levels=(2, 3, 4, 5),
        output_size=MASK_ROI,
        sampling_ratio=2,
        canonical_scale=56.0,
        canonical_level=4,
    )
    torch.testing.assert_close(pooled, want, rtol=0, atol=0)
    logits = head.mask_logits(features, boxes)
    assert logits.shape == (2, 2, K, 2 * MASK_ROI, 2 * MASK_ROI)
    torch.testing.assert_close(logits, head(want), rtol=0, atol=0)
    with pytest.raises(ValueError, match="feature maps"):
        head.pool(features[:4], boxes)


# --------------------------------------------------------------------------------------------
# The contract on a tiny model


def test_loss_adds_the_mask_term_of_the_sampled_positive_rois() -> None:
    """Faster R-CNN's four terms unchanged, and "mask": mask_training_rois of the RoI head's
    sampled RoIs (positives, labels - 1, max_rois), packed, the head on them,
    mask_loss_term."""
    model = _model().train()
    batch = _mask_batch()
    keys = _keys(batch)
    outputs = model(batch.images)
    terms = model.loss(outputs, batch, **keys)
    assert list(terms) == ["rpn_cls", "rpn_box", "roi_cls", "roi_box", "mask"]

    box_terms = FasterRCNN.loss(model, outputs, batch, **keys)
    torch.testing.assert_close(
        {k: v for k, v in _values(terms).items() if k != "mask"},
        _values(box_terms),
        rtol=0,
        atol=0,
    )
    sampled = model.training_outputs(outputs, batch, roi_keys=keys["roi_keys"]).sampled
    rois = mask_training_rois(
        sampled.boxes, sampled.labels - 1, sampled.gt_index, sampled.labels > 0, max_rois=P
    )
    rois = pack_mask_rois(rois, multiple=TINY_MASK.mask_head.slot_multiple)  # eager training
    logits = model.mask_head(model.mask_head.pool(outputs.features, rois.boxes, rois.image))
    want = mask_loss_term(logits, batch.gt_masks, rois, weight=1.0)
    mask = terms["mask"]
    torch.testing.assert_close((mask.total, mask.count), (want.total, want.count), rtol=0, atol=0)
    num_pos = sampled.positive.sum(1).clamp(max=P).sum()
    assert mask.count == num_pos * (2 * MASK_ROI) ** 2 and num_pos >= 3  # every gt is a positive
    assert mask.total.dtype == torch.float32 and mask.total > 0 and mask.weight == 1.0


def test_mask_loss_weight_and_max_rois_come_from_the_spec() -> None:
    spec = attrs.evolve(
        TINY_MASK, mask_head=attrs.evolve(TINY_MASK.mask_head, loss_weight=0.5, max_rois=None)
    )
    model = _model(spec=spec).train()
    batch = _mask_batch()
    outputs = model(batch.images)
    keys = _keys(batch)
    term = model.loss(outputs, batch, **keys)["mask"]
    assert term.weight == 0.5
    # every sampled slot runs through the head; only the positives count, as with max_rois
    capped = _model(spec=attrs.evolve(spec, mask_head=attrs.evolve(spec.mask_head, max_rois=32)))
    capped.load_state_dict(model.state_dict())
    other = capped.train().loss(outputs, batch, **keys)["mask"]
    torch.testing.assert_close(term.total, other.total, rtol=1e-5, atol=1e-5)
    assert term.count == other.count


def test_slot_multiple_packs_the_positives_with_the_same_loss() -> None:
    """``slot_multiple`` packs the positives of all images into one row of a multiple of it
    in eager training; the term and the gradients are those of the static ``max_rois`` slots
    an image."""
    wide = attrs.evolve(TINY_MASK.mask_head, max_rois=32, slot_multiple=None)
    static = _model(spec=attrs.evolve(TINY_MASK, mask_head=wide)).train()
    packed = _model(
        spec=attrs.evolve(TINY_MASK, mask_head=attrs.evolve(wide, slot_multiple=4))
    ).train()
    packed.load_state_dict(static.state_dict())
    batch = _mask_batch()
    keys = _keys(batch)
    rows: dict[str, tuple[int, ...]] = {}
    terms = {}
    for name, model in (("static", static), ("packed", packed)):
        hook = model.mask_head.register_forward_hook(
            lambda module, args, out, name=name: rows.__setitem__(name, tuple(args[0].shape[:2]))
        )
        term = model.loss(model(batch.images), batch, **keys)["mask"]
        hook.remove()
        term.value().backward()
        terms[name] = term
    sampled = static.training_outputs(
        static(batch.images), batch, roi_keys=keys["roi_keys"]
    ).sampled
    count = int(sampled.positive.sum())
    assert count >= 3 and rows["static"] == (2, 32)
    assert rows["packed"] == (1, max(4, -(-count // 4) * 4))
    torch.testing.assert_close(terms["packed"].total, terms["static"].total, rtol=1e-5, atol=1e-6)
    assert terms["packed"].count == terms["static"].count > 0
    for (name, a), b in zip(
        static.mask_head.named_parameters(), packed.mask_head.parameters(), strict=True
    ):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_loss_without_gt_masks_says_what_is_missing() -> None:
    model = _model().train()
    batch = _batch()
    assert batch.gt_masks is None
    with pytest.raises(ValueError, match=r"gt_masks.*with_masks=True"):
        model.loss(model(batch.images), batch)


def test_images_without_objects_give_finite_losses() -> None:
    model = _model().train()
    batch = _mask_batch(empty=True)
    terms = model.loss(model(batch.images), batch)
    for name, term in terms.items():
        assert term.total.isfinite(), name
    assert terms["mask"].total == 0 and terms["mask"].count == 0
    total_loss(terms).backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    # no gt slots at all
    none = _batch()._replace(
        gt_boxes=torch.zeros(2, 0, 4),
        gt_labels=torch.zeros(2, 0, dtype=torch.int64),
        gt_valid=torch.zeros(2, 0, dtype=torch.bool),
        gt_crowd=torch.zeros(2, 0, dtype=torch.bool),
        gt_masks=torch.zeros(2, 0, SIZE, SIZE, dtype=torch.uint8),
    )
    terms = model.loss(model(none.images), none)
    assert all(term.total.isfinite() for term in terms.values())
    assert terms["mask"].count == 0


def test_padded_gt_slots_are_invisible() -> None:
    model = _model().train()
    batch, padded = _mask_batch(), _mask_batch(extra_slots=3)
    assert padded.gt_masks.shape[1] == batch.gt_masks.shape[1] + 3
    keys = _keys(batch)
    padded_keys = {
        "rpn_keys": keys["rpn_keys"],
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
    model = _model().train()
    batch = _mask_batch()
    keys = _keys(batch)
    whole = _values(model.loss(model(batch.images), batch, **keys))
    parts = []
    for i in range(2):
        one = Batch(*(t[i : i + 1] if isinstance(t, torch.Tensor) else t for t in batch))
        one_keys = {k: v[i : i + 1] for k, v in keys.items()}
        parts.append(_values(model.loss(model(one.images), one, **one_keys)))
    total, count = whole["mask"]
    torch.testing.assert_close(
        total, parts[0]["mask"][0] + parts[1]["mask"][0], rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(count, parts[0]["mask"][1] + parts[1]["mask"][1], rtol=0, atol=0)

    model.eval()
    both = model.predict(batch.images, batch.image_sizes)
    for i in range(2):
        one = model.predict(batch.images[i : i + 1], batch.image_sizes[i : i + 1])
        n = int(one.valid.sum())
        assert int(both.valid[i].sum()) == n
        torch.testing.assert_close(both.masks[i, :n], one.masks[0, :n], rtol=1e-4, atol=2e-4)


def test_gradients_of_the_mask_term_reach_the_head_and_the_features() -> None:
    model = _model().train()
    batch = _mask_batch()
    terms = model.loss(model(batch.images), batch)
    terms["mask"].total.backward()
    head = model.mask_head
    for name, p in (
        ("conv", head.convs[0][0].weight),
        ("upsample", head.upsample.weight),
        ("logits", head.logits.weight),
        ("neck", model.neck.inner_blocks[0][0].weight),
    ):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for p in (model.roi_heads.box_predictor.cls_score.weight, model.rpn.head.cls_logits.weight):
        assert p.grad is None or p.grad.abs().sum() == 0  # the RoIs carry no gradient


def test_postprocess_masks_box_frame_by_default_and_pasted_on_request() -> None:
    model = _model().eval()
    batch = _mask_batch()
    with torch.no_grad():
        outputs = model(batch.images)
        detections = model.postprocess(outputs, batch.image_sizes)
        boxes_only = FasterRCNN.postprocess(model, outputs, batch.image_sizes)
    m = 2 * MASK_ROI
    assert detections.masks.shape == (2, 100, m, m) and detections.masks.dtype == torch.float32
    for name in ("boxes", "scores", "labels", "valid"):
        assert torch.equal(getattr(detections, name), getattr(boxes_only, name)), name
    assert detections.valid.any() and not detections.valid.all()
    assert (detections.masks[~detections.valid] == 0).all()
    probs = detections.masks[detections.valid]
    assert ((probs >= 0) & (probs <= 1)).all() and probs.std() > 0.1
    # each detection's mask is the sigmoid of its label's channel at its box
    with torch.no_grad():
        logits = model.mask_head.mask_logits(outputs.features, detections.boxes)
    picked = logits.gather(
        2, detections.labels[..., None, None, None].expand(-1, -1, 1, m, m)
    ).squeeze(2)
    torch.testing.assert_close(
        detections.masks[detections.valid], picked.sigmoid()[detections.valid]
    )

    model.paste_masks = True
    with torch.no_grad():
        pasted = model.postprocess(outputs, batch.image_sizes)
    assert pasted.masks.shape == (2, 100, SIZE, SIZE) and pasted.masks.dtype == torch.bool
    want = paste_masks(detections.masks, detections.boxes, (SIZE, SIZE), threshold=0.5)
    assert not pasted.masks[1, :, 60:].any() and not pasted.masks[1, :, :, 52:].any()
    want[1, :, 60:] = False
    want[1, :, :, 52:] = False
    assert torch.equal(pasted.masks, want & detections.valid[..., None, None])
    assert pasted.masks.any()
    built = build(TINY_MASK, paste_masks=True)
    assert isinstance(built, MaskRCNN) and built.paste_masks


def test_loss_and_postprocess_outside_autocast_of_half_precision_features() -> None:
    model = _model().train()
    batch = _mask_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch.images)
    terms = model.loss(outputs, batch)
    assert terms["mask"].total.dtype == torch.float32 and terms["mask"].total.isfinite()
    total_loss(terms).backward()
    assert model.mask_head.logits.weight.grad is not None
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eval_outputs = model(batch.images)
    detections = model.postprocess(eval_outputs, batch.image_sizes)
    assert detections.masks.dtype == torch.float32 and detections.masks.isfinite().all()


def test_builder_checks_classes() -> None:
    model = _model()
    with pytest.raises(ValueError, match="mask head predicts"):
        MaskRCNN(
            backbone=model.backbone,
            neck=model.neck,
            rpn=model.rpn,
            roi_heads=model.roi_heads,
            roi_spec=TINY.roi_head,
            mask_head=MaskHead(in_channels=16, num_classes=K + 1),
            num_classes=K,
        )


# --------------------------------------------------------------------------------------------
# Training step, data and drawings


def test_one_training_step() -> None:
    model = _model().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ctx = SimpleNamespace(
        exp=SimpleNamespace(accumulate=2, grad_clip_norm=10.0),
        precision="fp32",
        model=model,
        raw=model,
        optimizer=optimizer,
        scaler=None,
        batches=iter([_mask_batch(), _mask_batch(empty=True)]),
        device=torch.device("cpu"),
        forward=model,
        loss_fn=model.loss,
        world_size=1,
    )
    values = supervised_step(ctx)()
    names = ("rpn_cls", "rpn_box", "roi_cls", "roi_box", "mask")
    for name in (*names, "loss"):
        assert values[name].isfinite(), name
    torch.testing.assert_close(values["loss"], sum(values[n] for n in names))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    for prefix in ("backbone.", "neck.", "roi_heads.", "mask_head.convs.", "mask_head.logits."):
        assert any(n.startswith(prefix) for n in changed), prefix


def test_training_data_has_masks_for_a_mask_head(tmp_path: Path) -> None:
    """fdet train's data sets carry instance masks for a Mask R-CNN and not for a Faster
    R-CNN; the collated batch's gt_masks line up with its boxes."""
    from fdet.data.collate import collate
    from fdet.train.data import make_datasets

    exp = specs.load(ROOT / "specs/shapes/mask_rcnn_r18_fpn.py", specs.Experiment)
    data = attrs.evolve(
        exp.data, train_images=4, val_images=2, image_size=64, cache_dir=str(tmp_path)
    )
    exp = attrs.evolve(exp, data=data)
    sets = make_datasets(exp)
    assert sets.train.with_masks and sets.val.with_masks
    samples = [sets.train[i] for i in range(2)]
    batch = collate(samples, pad_divisor=32)
    assert batch.gt_masks is not None
    assert batch.gt_masks.shape[:2] == batch.gt_valid.shape
    assert batch.gt_masks.shape[2:] == batch.images.shape[2:]
    area = batch.gt_masks.flatten(2).sum(-1)  # [B, M]
    assert (area[batch.gt_valid] > 0).all() and (area[~batch.gt_valid] == 0).all()
    box_model = specs.load(ROOT / "specs/shapes/faster_rcnn_r18_fpn.py", specs.Experiment).model
    box_exp = attrs.evolve(exp, model=box_model)
    assert not make_datasets(box_exp, with_train=False).val.with_masks


def test_prediction_grid_draws_masks(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from fdet.train.hooks import write_prediction_grid

    model = _model().eval()
    batch = _mask_batch()
    samples = [
        Sample(
            image=batch.images[i],
            boxes=batch.gt_boxes[i][batch.gt_valid[i]],
            labels=batch.gt_labels[i][batch.gt_valid[i]],
            crowd=batch.gt_crowd[i][batch.gt_valid[i]],
            image_id=i,
            orig_size=(SIZE, SIZE),
            masks=batch.gt_masks[i][batch.gt_valid[i]],
        )
        for i in range(2)
    ]

    class Samples(list):
        category_names = tuple(f"c{k}" for k in range(K))

    data = Samples(samples)
    path = write_prediction_grid(model, data, tmp_path / "grid.png", device=torch.device("cpu"))
    with_masks = np.asarray(Image.open(path))
    model.mask_head.postprocess = lambda features, detections, *a, **k: detections
    plain = write_prediction_grid(model, data, tmp_path / "plain.png", device=torch.device("cpu"))
    without = np.asarray(Image.open(plain))
    assert without.shape == with_masks.shape
    assert (without != with_masks).any()


# --------------------------------------------------------------------------------------------
# Compiler


@pytest.mark.compile
def test_compiled_loss_and_postprocess_equal_eager() -> None:
    model = _model().train()
    batch = _mask_batch()
    keys = _keys(batch)
    outputs = model(batch.images)

    def loss(outputs, batch: Batch, rpn_keys, roi_keys):
        return _values(model.loss(outputs, batch, rpn_keys=rpn_keys, roi_keys=roi_keys))

    compiled = torch.compile(loss, fullgraph=True, dynamic=False, backend="aot_eager")
    torch.testing.assert_close(
        compiled(outputs, batch, **keys), loss(outputs, batch, **keys), rtol=1e-5, atol=1e-4
    )

    model.eval()
    for paste in (False, True):
        model.paste_masks = paste
        torch._dynamo.reset()
        with torch.no_grad():
            eval_outputs = model(batch.images)
            post = torch.compile(
                model.postprocess, fullgraph=True, dynamic=False, backend="aot_eager"
            )
            want = model.postprocess(eval_outputs, batch.image_sizes)
            got = post(eval_outputs, batch.image_sizes)
        assert torch.equal(got.valid, want.valid) and torch.equal(got.labels, want.labels)
        torch.testing.assert_close(got.boxes, want.boxes, rtol=1e-5, atol=1e-4)
        if paste:
            assert (got.masks != want.masks).float().mean() < 1e-3
        else:
            torch.testing.assert_close(got.masks, want.masks, rtol=1e-5, atol=1e-5)


def test_mask_postprocess_of_the_module_is_the_function() -> None:
    model = _model().eval()
    batch = _mask_batch()
    with torch.no_grad():
        outputs = model(batch.images)
        detections = FasterRCNN.postprocess(model, outputs, batch.image_sizes)
        logits = model.mask_head.mask_logits(outputs.features, detections.boxes)
        for paste in (False, True):
            got = model.mask_head.postprocess(
                outputs.features,
                detections,
                batch.image_sizes,
                padded_size=(SIZE, SIZE),
                paste=paste,
            )
            want = mask_postprocess(
                logits, detections, batch.image_sizes, padded_size=(SIZE, SIZE), paste=paste
            )
            assert torch.equal(got.masks, want.masks)
