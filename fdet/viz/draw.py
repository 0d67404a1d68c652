"""Drawing detections: boxes on one image, and a PNG grid of ground truth next to predictions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int, UInt8
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from fdet.atomic import atomic_write

__all__ = ["PALETTE", "GroundTruth", "Prediction", "draw_boxes", "label_color", "prediction_grid"]

Color = str | tuple[int, int, int]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)
"""Distinct colors; label ``k`` is drawn in ``PALETTE[k % len(PALETTE)]``."""

Prediction = tuple[Float[Tensor, "N 4"], Int[Tensor, " N"], Float[Tensor, " N"]]
GroundTruth = tuple[Float[Tensor, "M 4"], Int[Tensor, " M"]]


def label_color(label: int) -> tuple[int, int, int]:
    """The palette color of a label."""
    return PALETTE[label % len(PALETTE)]


def draw_boxes(
    image: UInt8[Tensor, "3 H W"],
    boxes: Float[Tensor, "N 4"],
    *,
    labels: Int[Tensor, " N"] | None = None,
    scores: Float[Tensor, " N"] | None = None,
    names: Sequence[str] | None = None,
    colors: Color | Sequence[Color] | None = None,
    width: int = 2,
) -> UInt8[Tensor, "3 H W"]:
    """A copy of ``image`` with xyxy ``boxes`` drawn, each captioned with its class name
    (``names[label]``, or the label number) and score when given.

    ``colors``: one color for every box, one a box, or None for the palette color of each label
    (the first palette color without labels). Degenerate boxes (``x2 < x1``) are drawn as lines;
    no boxes give an unchanged copy.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"draw_boxes: image must be uint8 [3, H, W], got {image.dtype} {list(image.shape)}"
        )
    boxes = boxes.detach().cpu().float().reshape(-1, 4)
    image = image.detach().cpu()
    num_boxes = boxes.shape[0]
    if num_boxes == 0:
        return image.clone()
    label_list = None if labels is None else [int(x) for x in labels.reshape(-1).tolist()]
    score_list = None if scores is None else [float(x) for x in scores.reshape(-1).tolist()]
    for what, values in (("labels", label_list), ("scores", score_list)):
        if values is not None and len(values) != num_boxes:
            raise ValueError(f"draw_boxes: {num_boxes} boxes but {len(values)} {what}")
    captions: list[str] | None = None
    if label_list is not None or score_list is not None:
        captions = []
        for i in range(num_boxes):
            parts = []
            if label_list is not None:
                label = label_list[i]
                in_names = names is not None and 0 <= label < len(names)
                parts.append(names[label] if names is not None and in_names else str(label))
            if score_list is not None:
                parts.append(f"{score_list[i]:.2f}")
            captions.append(" ".join(parts))
    box_colors: Color | list[Color]
    if colors is None:
        box_colors = (
            [label_color(x) for x in label_list] if label_list is not None else label_color(0)
        )
    elif isinstance(colors, (str, tuple)):
        box_colors = colors
    else:
        box_colors = list(colors)
    # draw_bounding_boxes rejects x2 < x1: order each pair of coordinates.
    ordered = torch.cat(
        (torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])), 1
    )  # [N, 4]
    return draw_bounding_boxes(
        image,
        ordered,
        labels=captions,
        colors=box_colors,  # type: ignore[arg-type]
        width=width,
        fill_labels=True,
    )


def _fit(
    image: UInt8[Tensor, "3 H W"], boxes: Float[Tensor, "N 4"], size: int
) -> tuple[UInt8[Tensor, "3 h w"], Float[Tensor, "N 4"]]:
    """``image`` resized so that its longer side is ``size``, and ``boxes`` with it."""
    height, width = image.shape[-2:]
    factor = size / max(height, width, 1)
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    resized = F.interpolate(
        image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=True
    )[0]
    resized = resized.round().clamp(0, 255).to(torch.uint8)
    scale = torch.tensor([new_w / width, new_h / height] * 2)
    return resized, boxes.detach().cpu().float().reshape(-1, 4) * scale


def _panel(
    image: UInt8[Tensor, "3 H W"],
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None,
    names: Sequence[str],
    size: int,
) -> Image.Image:
    small, small_boxes = _fit(image.detach().cpu(), boxes, size)
    drawn = draw_boxes(small, small_boxes, labels=labels.reshape(-1), scores=scores, names=names)
    canvas = Image.new("RGB", (size, size), (32, 32, 32))
    canvas.paste(Image.fromarray(drawn.permute(1, 2, 0).numpy()), (0, 0))
    return canvas


def _write_png_atomic(image: Image.Image, path: Path) -> None:
    """Save ``image`` as a PNG at ``path`` atomically (:func:`fdet.atomic.atomic_write`)."""
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def prediction_grid(
    images: Sequence[UInt8[Tensor, "3 H W"]],
    predictions: Sequence[Prediction],
    ground_truth: Sequence[GroundTruth],
    *,
    names: Sequence[str],
    path: str | os.PathLike[str],
    score_threshold: float = 0.3,
    columns: int = 4,
    cell_size: int = 320,
) -> Path:
    """Write a PNG grid, ``columns`` images a row: each cell shows the image with its ground
    truth (left) and its predictions scoring at least ``score_threshold`` (right), boxes colored
    by class and captioned with the class name (and score). Each panel is the image resized to
    fit ``cell_size`` pixels. The file is written atomically (temporary file, then rename).
    Returns the path."""
    if not len(images) == len(predictions) == len(ground_truth):
        raise ValueError(
            f"prediction_grid: {len(images)} images, {len(predictions)} predictions and "
            f"{len(ground_truth)} ground truths"
        )
    if columns < 1 or cell_size < 16:
        raise ValueError(
            f"prediction_grid: columns must be >= 1 and cell_size >= 16, got {columns}, {cell_size}"
        )
    out = Path(path)
    header, inner, gap = 16, 4, 16  # gap: between cells; inner: between a cell's two panels
    cell_w, cell_h = 2 * cell_size + inner, cell_size + header
    num = len(images)
    cols = max(1, min(columns, num))
    rows = max(1, -(-num // cols))
    grid = Image.new(
        "RGB", (cols * cell_w + (cols + 1) * gap, rows * cell_h + (rows + 1) * gap), (255, 255, 255)
    )
    draw = ImageDraw.Draw(grid)
    for i, (image, (p_boxes, p_labels, p_scores), (g_boxes, g_labels)) in enumerate(
        zip(images, predictions, ground_truth)
    ):
        keep = p_scores.detach().cpu().reshape(-1) >= score_threshold  # [N]
        x0 = gap + (i % cols) * (cell_w + gap)
        y0 = gap + (i // cols) * (cell_h + gap)
        gt_panel = _panel(image, g_boxes, g_labels, None, names, cell_size)
        pred_panel = _panel(
            image,
            p_boxes.detach().cpu().reshape(-1, 4)[keep],
            p_labels.detach().cpu().reshape(-1)[keep],
            p_scores.detach().cpu().reshape(-1)[keep],
            names,
            cell_size,
        )
        grid.paste(gt_panel, (x0, y0 + header))
        grid.paste(pred_panel, (x0 + cell_size + inner, y0 + header))
        num_gt = g_labels.numel()
        draw.text((x0 + 2, y0 + 2), f"ground truth ({num_gt})", fill=(0, 0, 0))
        draw.text(
            (x0 + cell_size + inner + 2, y0 + 2),
            f"predictions >= {score_threshold:g} ({int(keep.sum())})",
            fill=(0, 0, 0),
        )
    _write_png_atomic(grid, out)
    return out
