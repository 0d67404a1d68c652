"""Test-time augmentation: views mapped back to the input's pixels, merging by NMS and by weighted
box fusion (against the reference package ``ensemble-boxes``), and ``fdet eval --tta``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from ensemble_boxes import weighted_boxes_fusion as reference_wbf
from hypothesis import given, settings

import fdet
from fdet import specs
from fdet.data.loader import make_loader
from fdet.eval.evaluate import evaluate_model
from fdet.inference.tta import (
    TTAModel,
    flip_boxes,
    flip_images,
    predict_tta,
    tta_views,
    view_size,
    weighted_box_fusion,
)
from fdet.ops.boxes import box_area
from fdet.ops.postprocess import Detections, top_detections
from fdet.train import load_run
from fdet.train.engine import make_datasets

from .conftest import MakeTinyRun

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ROOT / "specs" / "shapes"
TTA_FILES = ROOT / "specs" / "tta"


# --- models -----------------------------------------------------------------------------------


def random_detector(file: str = "retinanet_r18_fpn.py", seed: int = 0) -> torch.nn.Module:
    """A shapes model of width 16 with random weights, in eval mode. RetinaNet's classifier
    prior is raised to 0.3 so that its scores spread above the threshold (distinct scores, many
    detections) rather than sitting at the 0.01 prior; it keeps 100 candidates a level."""
    model_spec = specs.load(SHAPES / file, specs.Experiment).model
    model_spec = attrs.evolve(model_spec, backbone=attrs.evolve(model_spec.backbone, width=16))
    if isinstance(model_spec, specs.RetinaNet):
        model_spec = attrs.evolve(
            model_spec,
            head=attrs.evolve(model_spec.head, prior_prob=0.3),
            postprocess=attrs.evolve(model_spec.postprocess, topk_per_level=100, max_detections=50),
        )
    torch.manual_seed(seed)
    return fdet.build(model_spec).eval()


class BrightBox:
    """A stand-in detector whose answer is known: one detection an image, the box of the pixels
    of channel 0 brighter than 127 inside the image's size, score 0.9, label 1 (invalid when
    there are none)."""

    def predict(self, images: torch.Tensor, image_sizes: torch.Tensor) -> Detections:
        height, width = images.shape[-2:]
        rows = torch.arange(height, dtype=torch.float32)
        cols = torch.arange(width, dtype=torch.float32)
        inside = (rows[None, :, None] < image_sizes[:, 0, None, None]) & (
            cols[None, None, :] < image_sizes[:, 1, None, None]
        )  # [B, H, W]
        bright = (images[:, 0].float() > 127) & inside
        in_col, in_row = bright.any(1), bright.any(2)  # [B, W], [B, H]
        x1 = torch.where(in_col, cols, float(width)).amin(1)
        x2 = torch.where(in_col, cols + 1, 0.0).amax(1)
        y1 = torch.where(in_row, rows, float(height)).amin(1)
        y2 = torch.where(in_row, rows + 1, 0.0).amax(1)
        valid = bright.flatten(1).any(1)[:, None]  # [B, 1]
        boxes = torch.stack((x1, y1, x2, y2), -1)[:, None] * valid[..., None]  # [B, 1, 4]
        return Detections(
            boxes=boxes,
            scores=torch.where(valid, 0.9, 0.0),
            labels=torch.where(valid, 1, 0),
            valid=valid,
        )


def padded_batch(
    sizes: list[tuple[int, int]], rects: list[tuple[int, int, int, int]], divisor: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``[B, 3, H, W]`` zero-padded at the bottom and right (as collation pads),
    black with one white rectangle each (xyxy, whole pixels), and their sizes ``[B, 2]``."""
    height = -(-max(h for h, _ in sizes) // divisor) * divisor
    width = -(-max(w for _, w in sizes) // divisor) * divisor
    images = torch.zeros(len(sizes), 3, height, width, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(rects):
        images[i, :, y1:y2, x1:x2] = 255
    return images, torch.tensor(sizes)


def noise_batch(sizes: list[tuple[int, int]], seed: int, divisor: int = 32) -> torch.Tensor:
    """Random uint8 images of ``sizes`` in one zero-padded batch."""
    g = torch.Generator().manual_seed(seed)
    height = -(-max(h for h, _ in sizes) // divisor) * divisor
    width = -(-max(w for _, w in sizes) // divisor) * divisor
    images = torch.zeros(len(sizes), 3, height, width, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return images


def assert_same_detections(a: Detections, b: Detections, *, atol: float = 0.0) -> None:
    assert torch.equal(a.valid, b.valid)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)


# --- the spec ---------------------------------------------------------------------------------


def test_spec_round_trips_and_validates() -> None:
    tta = specs.TTA(scales=[0.8, 1, 1.2], merge="wbf", conf_type="max")
    assert tta.scales == (0.8, 1.0, 1.2) and tta.num_views == 6
    assert specs.from_json(specs.to_json(tta)) == tta
    for bad, field in [
        ({"scales": ()}, "scales"),
        ({"scales": (1.0, -0.5)}, "scales[1]"),
        ({"merge": "mean"}, "merge"),
        ({"iou_threshold": 1.0}, "iou_threshold"),
        ({"max_detections": 0}, "max_detections"),
        ({"skip_score": 1.5}, "skip_score"),
        ({"flip": "yes"}, "flip"),
    ]:
        with pytest.raises(specs.SpecError, match="^" + re.escape(f"{field}: ")):
            specs.TTA(**bad)


@pytest.mark.parametrize("file", ["flip.py", "flip_multiscale.py"])
def test_spec_files_load(file: str) -> None:
    tta = specs.load(TTA_FILES / file, specs.TTA, name="TTA")
    assert tta.flip
    assert specs.from_json(specs.to_json(tta)) == tta


def test_view_sizes_round_to_the_divisor() -> None:
    assert view_size(128, 96, 1.0, 32) == (128, 96)
    assert view_size(128, 96, 0.8, 32) == (96, 64)  # 102.4 -> 96, 76.8 -> 64
    assert view_size(128, 96, 1.2, 32) == (160, 128)  # 153.6 -> 160, 115.2 -> 128
    assert view_size(64, 64, 0.1, 32) == (32, 32)  # never below one divisor
    assert view_size(100, 50, 1.5, 1) == (150, 75)


# --- geometry ---------------------------------------------------------------------------------


@st.composite
def rect_batches(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[tuple[int, int, int, int]]]:
    """Image sizes of a mixed batch and one rectangle (whole pixels) inside each image."""
    n = draw(st.integers(1, 4))
    sizes, rects = [], []
    for _ in range(n):
        h, w = draw(st.integers(4, 70)), draw(st.integers(4, 70))
        x1 = draw(st.integers(0, w - 1))
        y1 = draw(st.integers(0, h - 1))
        x2 = draw(st.integers(x1 + 1, w))
        y2 = draw(st.integers(y1 + 1, h))
        sizes.append((h, w))
        rects.append((x1, y1, x2, y2))
    return sizes, rects


@settings(max_examples=40)
@given(batch=rect_batches(), divisor=st.sampled_from([1, 8, 32]))
def test_flipping_images_moves_what_the_flipped_boxes_frame(
    batch: tuple[list[tuple[int, int]], list[tuple[int, int, int, int]]], divisor: int
) -> None:
    sizes, rects = batch
    images, image_sizes = padded_batch(sizes, rects, divisor)
    widths = image_sizes[:, 1]
    boxes = torch.tensor(rects, dtype=torch.float32)[:, None]  # [B, 1, 4]
    flipped = flip_images(images, widths)
    # what the flipped images show is where the flipped boxes say
    seen = BrightBox().predict(flipped, image_sizes)
    assert seen.valid.all()
    torch.testing.assert_close(seen.boxes, flip_boxes(boxes, widths), atol=0, rtol=0)
    # the padding stays where it was, and both flips are their own inverse
    for i, (h, w) in enumerate(sizes):
        assert not flipped[i, :, h:].any() and not flipped[i, :, :, w:].any()
        assert torch.equal(flipped[i, :, :h, :w], images[i, :, :h, :w].flip(-1))
    assert torch.equal(flip_images(flipped, widths), images)
    assert torch.equal(flip_boxes(flip_boxes(boxes, widths), widths), boxes)


@settings(max_examples=30)
@given(batch=rect_batches(), scales=st.sampled_from([(1.0,), (0.8, 1.0, 1.2), (0.5, 1.7)]))
def test_every_view_maps_back_to_the_input_pixels(
    batch: tuple[list[tuple[int, int]], list[tuple[int, int, int, int]]],
    scales: tuple[float, ...],
) -> None:
    sizes, rects = batch
    images, image_sizes = padded_batch(sizes, rects, 32)
    tta = specs.TTA(flip=True, scales=scales)
    views = tta_views(BrightBox(), images, image_sizes, tta, size_divisor=32)
    assert len(views) == tta.num_views
    expected = torch.tensor(rects, dtype=torch.float32)[:, None]  # [B, 1, 4]
    height, width = images.shape[-2:]
    for k, view in enumerate(views):
        new_h, new_w = view_size(height, width, scales[k // 2], 32)
        # a step edge resampled and thresholded moves by at most one pixel of the view
        atol = max(height / new_h, width / new_w) + 1e-4
        if new_h == height and new_w == width:
            atol = 0.0  # no resampling: exact
        assert view.valid.all()
        torch.testing.assert_close(view.boxes, expected, atol=atol, rtol=0)


def test_the_flipped_view_is_the_model_on_the_mirrored_images() -> None:
    model = random_detector()
    sizes = [(64, 48), (40, 64), (64, 64)]
    images = noise_batch(sizes, seed=1)
    image_sizes = torch.tensor(sizes)
    views = tta_views(model, images, image_sizes, specs.TTA(flip=True), size_divisor=32)
    # mirror each image by hand inside a canvas of the same padded size
    mirrored = torch.zeros_like(images)
    for i, (h, w) in enumerate(sizes):
        mirrored[i, :, :h, :w] = images[i, :, :h, :w].flip(-1)
    direct = model.predict(mirrored, image_sizes)
    assert direct.valid.sum() > 10
    widths = image_sizes[:, 1, None].float()
    x1, y1, x2, y2 = direct.boxes.unbind(-1)
    by_hand = torch.stack((widths - x2, y1, widths - x1, y2), -1)
    by_hand = torch.where(direct.valid[..., None], by_hand, 0.0)
    assert_same_detections(views[1], direct._replace(boxes=by_hand), atol=1e-5)
    assert_same_detections(views[0], model.predict(images, image_sizes))


# --- the merged result ------------------------------------------------------------------------


@pytest.mark.parametrize("file", ["retinanet_r18_fpn.py", "faster_rcnn_r18_fpn.py"])
def test_identity_tta_is_the_model(file: str) -> None:
    model = random_detector(file)
    sizes = [(64, 48), (40, 64)]
    images, image_sizes = noise_batch(sizes, seed=2), torch.tensor(sizes)
    plain = model.predict(images, image_sizes)
    assert plain.valid.sum() > 10
    for merge in ("nms", "wbf"):
        # the model's own NMS ran at 0.5 (or 0.7 for Faster R-CNN's RPN and 0.5 for its boxes):
        # no two detections of a class overlap more than the merge's threshold
        tta = specs.TTA(flip=False, scales=(1.0,), merge=merge, iou_threshold=0.5)
        tta = attrs.evolve(tta, max_detections=plain.scores.shape[1])
        merged = predict_tta(model, images, image_sizes, tta)
        if merge == "nms":
            assert_same_detections(merged, plain)
        else:  # fusion leaves boxes of zero area out (clipped to a border), as ensemble-boxes does
            kept = plain.valid & (box_area(plain.boxes) > 0)
            expected = top_detections(*plain[:3], kept, max_detections=kept.shape[1])
            assert_same_detections(merged, expected, atol=1e-5)


def test_a_batch_gives_each_image_its_own_result() -> None:
    model = random_detector()
    sizes = [(64, 40), (36, 64)]
    images, image_sizes = noise_batch(sizes, seed=3), torch.tensor(sizes)
    for merge in ("nms", "wbf"):
        tta = specs.TTA(flip=True, scales=(0.8, 1.0, 1.2), merge=merge)
        batched = predict_tta(model, images, image_sizes, tta, size_divisor=32)
        assert batched.valid.sum(1).min() > 5
        for i in range(len(sizes)):
            alone = predict_tta(
                model, images[i : i + 1], image_sizes[i : i + 1], tta, size_divisor=32
            )
            assert_same_detections(
                Detections(*(t[i : i + 1] for t in batched[:4])), alone, atol=1e-4
            )


def test_merging_duplicates() -> None:
    rects = [(10, 12, 30, 40), (5, 5, 60, 20)]
    images, image_sizes = padded_batch([(64, 48), (40, 64)], rects)
    scales = (0.8, 1.0, 1.2)
    views = tta_views(BrightBox(), images, image_sizes, specs.TTA(flip=True, scales=scales))
    stacked = torch.stack([v.boxes[:, 0] for v in views], 1)  # [B, V, 4]
    nms = predict_tta(BrightBox(), images, image_sizes, specs.TTA(flip=True, scales=scales))
    wbf = predict_tta(
        BrightBox(), images, image_sizes, specs.TTA(flip=True, scales=scales, merge="wbf")
    )
    for merged in (nms, wbf):  # six views of one object: one detection an image
        assert merged.valid.sum(1).tolist() == [1, 1]
        assert merged.labels[:, 0].tolist() == [1, 1]
        torch.testing.assert_close(merged.scores[:, 0], torch.full((2,), 0.9))
    # NMS keeps one of the views' boxes (the first of equal scores); WBF averages them
    assert all(any(torch.equal(nms.boxes[i, 0], stacked[i, v]) for v in range(6)) for i in range(2))
    torch.testing.assert_close(wbf.boxes[:, 0], stacked.mean(1))


def test_masks_are_not_merged() -> None:
    model = random_detector("mask_rcnn_r18_fpn.py")
    sizes = [(64, 64)]
    images, image_sizes = noise_batch(sizes, seed=4), torch.tensor(sizes)
    assert model.predict(images, image_sizes).masks is not None
    merged = predict_tta(model, images, image_sizes, specs.TTA(flip=True))
    assert merged.masks is None and merged.valid.any()


# --- weighted box fusion against ensemble-boxes -----------------------------------------------

IMAGE_W, IMAGE_H = 400.0, 300.0


@st.composite
def fusion_cases(draw: st.DrawFn) -> dict:
    """Detections of ``views`` views on a batch of images: clusters of jittered boxes, each in
    its own 100 × 100 cell of a 400 × 300 image (clusters never overlap), any label, 1 to
    views + 2 members, scores in (0, 1]."""
    seed = draw(st.integers(0, 2**31 - 1))
    views = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 3))
    rng = np.random.default_rng(seed)
    per_image = []
    for _ in range(batch):
        cells = rng.permutation(12)[: draw(st.integers(0, 6))]
        dets: list[list[tuple[list[float], float, int]]] = [[] for _ in range(views)]
        for cell in cells:
            cx, cy = (cell % 4) * 100.0 + 50.0, (cell // 4) * 100.0 + 50.0
            w, h = rng.uniform(20, 80, size=2)
            label = int(rng.integers(0, 3))
            for _ in range(int(rng.integers(1, views + 3))):
                jitter = rng.uniform(-0.02, 0.02, size=4) * np.array([w, h, w, h])
                box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) + jitter
                score = float(rng.uniform(0.01, 1.0))
                dets[int(rng.integers(0, views))].append((box.tolist(), score, label))
        per_image.append(dets)
    return {
        "views": views,
        "per_image": per_image,
        "skip_score": draw(st.sampled_from([0.0, 0.3])),
        "conf_type": draw(st.sampled_from(["avg", "max"])),
        "allow_overflow": draw(st.booleans()),
        "iou_threshold": draw(st.sampled_from([0.3, 0.55, 0.8])),
    }


@settings(max_examples=60)
@given(case=fusion_cases())
def test_weighted_box_fusion_matches_ensemble_boxes(case: dict) -> None:
    views, per_image = case["views"], case["per_image"]
    options = {k: case[k] for k in ("skip_score", "conf_type", "allow_overflow")}
    # ours: every image's detections of all views in one padded batch
    flat = [[d for view in dets for d in view] for dets in per_image]
    c = max(1, *(len(f) for f in flat))
    boxes = torch.zeros(len(flat), c, 4)
    scores = torch.zeros(len(flat), c)
    labels = torch.zeros(len(flat), c, dtype=torch.long)
    valid = torch.zeros(len(flat), c, dtype=torch.bool)
    for i, f in enumerate(flat):
        for j, (box, score, label) in enumerate(f):
            boxes[i, j] = torch.tensor(box)
            scores[i, j], labels[i, j], valid[i, j] = score, label, True
    ours = weighted_box_fusion(
        boxes,
        scores,
        labels,
        valid,
        num_views=views,
        iou_threshold=case["iou_threshold"],
        max_detections=c,
        **options,
    )
    scale = np.array([IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H])
    for i, dets in enumerate(per_image):
        ref_boxes, ref_scores, ref_labels = reference_wbf(
            [np.array([d[0] for d in v]).reshape(-1, 4) / scale for v in dets],
            [np.array([d[1] for d in v]) for v in dets],
            [np.array([d[2] for d in v]) for v in dets],
            iou_thr=case["iou_threshold"],
            skip_box_thr=case["skip_score"],
            conf_type=case["conf_type"],
            allows_overflow=case["allow_overflow"],
        )
        n = int(ours.valid[i].sum())
        assert n == len(ref_scores)
        got = ours.boxes[i, :n].double().numpy() / scale
        got_scores = ours.scores[i, :n].double().numpy()
        got_labels = ours.labels[i, :n].numpy()
        # both sorted by score descending; compare in a canonical order all the same
        order = np.lexsort((got[:, 0], got_scores))
        ref_order = np.lexsort((ref_boxes[:, 0], ref_scores))
        np.testing.assert_allclose(got[order], ref_boxes[ref_order], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got_scores[order], ref_scores[ref_order], atol=1e-6, rtol=0)
        np.testing.assert_array_equal(got_labels[order], ref_labels[ref_order])


def test_weighted_box_fusion_keeps_the_padding_out() -> None:
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 1.0, 9.0]]])
    scores = torch.tensor([[0.6, 0.9, 0.9]])
    labels = torch.tensor([[0, 0, 0]])
    valid = torch.tensor([[True, False, True]])  # the second is padding; the third has no area
    fused = weighted_box_fusion(
        boxes, scores, labels, valid, num_views=2, iou_threshold=0.5, max_detections=3
    )
    assert fused.valid.tolist() == [[True, False, False]]
    torch.testing.assert_close(fused.scores[0, 0], torch.tensor(0.3))  # 0.6 / 2 views
    torch.testing.assert_close(fused.boxes[0, 0], boxes[0, 0])
    assert not fused.boxes[0, 1:].any() and not fused.scores[0, 1:].any()


# --- fdet eval --tta --------------------------------------------------------------------------


def run_fdet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    fdet_command = Path(sys.executable).with_name("fdet")
    command = [str(fdet_command)] if fdet_command.exists() else [sys.executable, "-m", "fdet"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def test_fdet_eval_with_tta(make_tiny_run: MakeTinyRun, tmp_path: Path) -> None:
    # scores above 0 only: a four-step run scores near its prior, and every image gets detections
    run = make_tiny_run(
        "retinanet_r18_fpn.py",
        {
            "model.postprocess.score_threshold": 0.0,
            "model.postprocess.topk_per_level": 100,
            "model.head.prior_prob": 0.3,
        },
    )
    out = tmp_path / "metrics.json"
    tta_file = TTA_FILES / "flip_multiscale.py"
    proc = run_fdet("eval", str(run), "--out", str(out), "--tta", str(tta_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "AP50" in proc.stdout and "fdet eval: test-time augmentation: TTA(" in proc.stderr
    from_command = json.loads(out.read_text())["bbox"]

    exp, model = load_run(run)
    dataset = make_datasets(exp, with_train=False).val
    loader = make_loader(
        dataset,
        batch_size=exp.batch_size,
        shuffle=False,
        seed=exp.seed,
        num_workers=0,
        pad_divisor=exp.val_transforms.pad_divisor,
        drop_last=False,
    )
    divisor = exp.val_transforms.pad_divisor
    tta = specs.load(tta_file, specs.TTA, name="TTA")
    metrics, results = evaluate_model(TTAModel(model, tta, size_divisor=divisor), loader, dataset)
    _, plain = evaluate_model(model, loader, dataset)
    # the command evaluates predict_tta's detections, which are not the model's own
    assert len(results) > 0 and results != plain
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert from_command[key] == pytest.approx(metrics.to_dict()[key], abs=1e-9)
    # and without augmentation, TTAModel is the model
    identity = specs.TTA(flip=False, scales=(1.0,), iou_threshold=0.5)
    _, same = evaluate_model(TTAModel(model, identity, size_divisor=divisor), loader, dataset)
    assert same == plain

    # a file that is not a TTA spec: one line naming it
    proc = run_fdet("eval", str(run), "--tta", str(SHAPES / "retinanet_r18_fpn.py"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fdet eval: error: "), proc.stderr
    assert "retinanet_r18_fpn.py" in lines[0] and "TTA" in lines[0]


@pytest.mark.compile
def test_weighted_box_fusion_compiles_without_graph_breaks() -> None:
    g = torch.Generator().manual_seed(5)
    centers = torch.rand(2, 40, 2, generator=g) * 200
    sizes = 10 + torch.rand(2, 40, 2, generator=g) * 30
    boxes = torch.cat((centers, centers + sizes), -1)
    boxes[:, 20:] = boxes[:, :20] + torch.rand(2, 20, 4, generator=g)  # near duplicates
    scores = torch.rand(2, 40, generator=g)
    labels = torch.randint(0, 3, (2, 40), generator=g)
    valid = torch.rand(2, 40, generator=g) > 0.2
    options = {"num_views": 2, "iou_threshold": 0.55, "max_detections": 30}
    compiled = torch.compile(weighted_box_fusion, fullgraph=True, dynamic=False)
    eager = weighted_box_fusion(boxes, scores, labels, valid, **options)
    assert eager.valid.sum() > 20
    assert_same_detections(compiled(boxes, scores, labels, valid, **options), eager, atol=1e-5)
