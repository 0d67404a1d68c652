from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdet.viz import PALETTE, draw_boxes, label_color, prediction_grid
from fdet.viz.draw import draw_masks

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ("cat", "dog", "bird")


def noise_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(60, 120, (3, height, width), generator=g, dtype=torch.uint8)


def test_draw_boxes_draws_on_the_edges_only() -> None:
    image = noise_image(80, 100)
    before = image.clone()
    out = draw_boxes(image, torch.tensor([[20.0, 30.0, 70.0, 60.0]]), colors=(255, 0, 0))
    assert out.dtype == torch.uint8 and out.shape == image.shape
    assert torch.equal(image, before)  # the input is left alone
    assert out[:, 45, 20].tolist() == [255, 0, 0]  # left edge
    assert out[:, 30, 50].tolist() == [255, 0, 0]  # top edge
    assert torch.equal(out[:, 40:50, 30:60], image[:, 40:50, 30:60])  # inside: not filled
    assert torch.equal(out[:, :, 80:], image[:, :, 80:])  # right of the box: untouched


def test_draw_boxes_colors_by_label_and_captions() -> None:
    image = noise_image(120, 160)
    boxes = torch.tensor([[10.0, 40.0, 60.0, 100.0], [80.0, 40.0, 150.0, 110.0]])
    labels = torch.tensor([1, 25])
    plain = draw_boxes(image, boxes, labels=labels)
    assert plain[:, 70, 10].tolist() == list(label_color(1))
    assert plain[:, 70, 80].tolist() == list(label_color(25)) == list(PALETTE[25 % len(PALETTE)])
    captioned = draw_boxes(
        image, boxes, labels=labels, scores=torch.tensor([0.9, 0.4]), names=NAMES
    )
    no_caption = draw_boxes(image, boxes, colors=[label_color(1), label_color(25)])
    # Same boxes and colors; the label numbers are the captions of `plain`.
    assert torch.equal(no_caption[:, 70], plain[:, 70])
    # The captions sit inside each box, at its top-left corner: more pixels change with them.
    changed_with = (captioned != image).any(0).sum()
    changed_without = (no_caption != image).any(0).sum()
    assert changed_with > changed_without
    assert not torch.equal(captioned[:, 41:55, 11:60], no_caption[:, 41:55, 11:60])
    assert not torch.equal(captioned[:, 41:55, 11:60], plain[:, 41:55, 11:60])  # "dog 0.90" vs "1"


def test_draw_boxes_without_boxes_and_with_reversed_corners() -> None:
    image = noise_image(40, 40)
    out = draw_boxes(image, torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
    assert torch.equal(out, image) and out is not image
    reversed_box = draw_boxes(image, torch.tensor([[30.0, 30.0, 10.0, 10.0]]), colors="white")
    ordered_box = draw_boxes(image, torch.tensor([[10.0, 10.0, 30.0, 30.0]]), colors="white")
    assert torch.equal(reversed_box, ordered_box)
    with pytest.raises(ValueError, match="2 scores"):
        draw_boxes(image, torch.tensor([[1.0, 1.0, 5.0, 5.0]]), scores=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="uint8"):
        draw_boxes(image.float(), torch.zeros(0, 4))


def _read(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def _grid_inputs(seed: int = 0):  # type: ignore[no-untyped-def]
    sizes = [(90, 120), (120, 80), (64, 64), (100, 150), (70, 70)]
    images = [noise_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    gt = [
        (torch.tensor([[5.0, 5.0, 50.0, 40.0], [20.0, 30.0, 60.0, 60.0]]), torch.tensor([0, 2])),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),  # no ground truth
        (torch.tensor([[10.0, 10.0, 40.0, 40.0]]), torch.tensor([1])),
        (torch.tensor([[0.0, 0.0, 149.0, 99.0]]), torch.tensor([0])),
        (torch.tensor([[3.0, 3.0, 9.0, 9.0]]), torch.tensor([2])),
    ]
    predictions = [
        (boxes + 3.0, labels, torch.linspace(0.95, 0.5, len(labels))) for boxes, labels in gt
    ]
    predictions[2] = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    return images, predictions, gt


def test_prediction_grid_writes_a_png(tmp_path: Path) -> None:
    images, predictions, gt = _grid_inputs()
    path = tmp_path / "out" / "grid.png"
    returned = prediction_grid(
        images, predictions, gt, names=NAMES, path=path, columns=2, cell_size=100
    )
    assert returned == path
    pixels = _read(path)
    height, width, _ = pixels.shape
    assert 3 * 100 <= height <= 3 * 160 and 2 * 200 <= width <= 2 * 240  # 3 rows of 2 cells
    assert 1_000 < path.stat().st_size < 2_000_000
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left


def test_prediction_grid_shows_boxes_and_thresholds_scores(tmp_path: Path) -> None:
    images, predictions, gt = _grid_inputs()
    empty_gt = [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)) for _ in images]
    empty_pred = [(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0))] * len(
        images
    )
    low_pred = [(b, l, torch.full_like(s, 0.1)) for b, l, s in predictions]

    def grid(name: str, preds, truth) -> np.ndarray:  # type: ignore[no-untyped-def]
        path = prediction_grid(
            images, preds, truth, names=NAMES, path=tmp_path / name, columns=3, cell_size=96
        )
        return _read(path)

    bare = grid("bare.png", empty_pred, empty_gt)
    with_gt = grid("gt.png", empty_pred, gt)
    with_pred = grid("pred.png", predictions, empty_gt)
    below_threshold = grid("low.png", low_pred, empty_gt)
    assert bare.shape == with_gt.shape == with_pred.shape
    changed_gt = (with_gt != bare).any(-1)
    changed_pred = (with_pred != bare).any(-1)
    assert changed_gt.sum() > 200 and changed_pred.sum() > 200
    # Ground truth is drawn in the left panel of a cell, predictions in the right one.
    gt_cols = np.nonzero(changed_gt.any(0))[0]
    pred_cols = np.nonzero(changed_pred.any(0))[0]
    assert gt_cols.min() < pred_cols.min()
    # Predictions below score_threshold are not drawn: only the header counts differ (none).
    np.testing.assert_array_equal(below_threshold, bare)


def test_prediction_grid_overwrites_atomically_and_checks_lengths(tmp_path: Path) -> None:
    images, predictions, gt = _grid_inputs()
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    prediction_grid(images[:1], predictions[:1], gt[:1], names=NAMES, path=path)
    assert _read(path).shape[0] > 100
    with pytest.raises(ValueError, match="2 images, 1 predictions"):
        prediction_grid(images[:2], predictions[:1], gt[:2], names=NAMES, path=path)


# --- masks ----------------------------------------------------------------------------------


def test_draw_masks_blends_inside_and_leaves_outside_alone() -> None:
    image = noise_image(40, 50)
    masks = torch.zeros(2, 48, 56, dtype=torch.bool)  # a padded input's masks
    masks[0, 5:15, 5:20] = True
    masks[1, 20:30, 30:45] = True
    masks[1, 42:, :] = True  # in the padding: not the image's
    out = draw_masks(image, masks, labels=torch.tensor([0, 3]), alpha=0.5)
    inside = masks[:, :40, :50].any(0)
    assert (out != image).any(0)[inside].float().mean() > 0.95
    assert torch.equal(out[:, ~inside], image[:, ~inside])
    # (1 - alpha) · pixel + alpha · color, in the label's color.
    expected = (0.5 * image[:, 25, 35].float() + 0.5 * torch.tensor(label_color(3))).round()
    assert (out[:, 25, 35].float() - expected).abs().max() <= 1
    assert torch.equal(draw_masks(image, masks[:0]), image)
    with pytest.raises(ValueError, match="h >= 40"):
        draw_masks(image, torch.zeros(1, 30, 50, dtype=torch.bool))


def test_draw_boxes_with_masks_fills_the_mask_and_outlines_the_box() -> None:
    image = noise_image(60, 60)
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    masks = torch.zeros(1, 60, 60, dtype=torch.bool)
    masks[0, 20:30, 20:30] = True
    plain = draw_boxes(image, boxes, colors=(255, 0, 0))
    filled = draw_boxes(image, boxes, colors=(255, 0, 0), masks=masks)
    assert not torch.equal(filled[:, 20:30, 20:30], image[:, 20:30, 20:30])  # the mask
    assert torch.equal(filled[:, 32:38, 32:38], image[:, 32:38, 32:38])  # in the box, not mask
    assert filled[:, 25, 10].tolist() == [255, 0, 0] == plain[:, 25, 10].tolist()  # the edge
    assert torch.equal(filled[:, :, 45:], image[:, :, 45:])
    with pytest.raises(ValueError, match="1 boxes but 2 masks"):
        draw_boxes(image, boxes, masks=masks.repeat(2, 1, 1))


def test_prediction_grid_draws_masks_of_predictions_and_ground_truth(tmp_path: Path) -> None:
    images, predictions, gt = _grid_inputs()

    def box_masks(boxes: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        masks = torch.zeros(len(boxes), h + 8, w + 8, dtype=torch.bool)  # padded
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = True
        return masks

    gt_masks = [(b, lab, box_masks(b, im)) for (b, lab), im in zip(gt, images)]
    pred_masks = [(b, lab, s, box_masks(b, im)) for (b, lab, s), im in zip(predictions, images)]
    plain = _read(
        prediction_grid(images, predictions, gt, names=NAMES, path=tmp_path / "a.png", cell_size=96)
    )
    with_masks = _read(
        prediction_grid(
            images, pred_masks, gt_masks, names=NAMES, path=tmp_path / "b.png", cell_size=96
        )
    )
    assert plain.shape == with_masks.shape
    assert (plain != with_masks).any(-1).sum() > 500


def test_box_frame_probabilities_are_pasted_on_their_boxes() -> None:
    image = noise_image(60, 60)
    boxes = torch.tensor([[10.0, 20.0, 40.0, 50.0]])
    probs = torch.ones(1, 28, 28)  # the whole box (and its padding, partly)
    drawn = draw_boxes(image, boxes, colors=(0, 0, 255), masks=probs, width=1)
    pasted = torch.zeros(1, 60, 60, dtype=torch.bool)
    pasted[0, 20:50, 10:40] = True
    expected = draw_boxes(image, boxes, colors=(0, 0, 255), masks=pasted, width=1)
    assert torch.equal(drawn[:, 22:48, 12:38], expected[:, 22:48, 12:38])
    assert torch.equal(drawn[:, :, 45:], image[:, :, 45:])
    assert torch.equal(drawn[:, :15], image[:, :15])
