"""Drawing detections: boxes and instance masks on one image, and a PNG grid of ground truth
next to predictions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, UInt8
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from fdet.atomic import atomic_write
from fdet.ops.masks import paste_masks

__all__ = [
    "PALETTE",
    "GroundTruth",
    "Prediction",
    "draw_boxes",
    "draw_masks",
    "label_color",
    "prediction_grid",
]

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

Prediction = (
    tuple[Float[Tensor, "N 4"], Int[Tensor, " N"], Float[Tensor, " N"]]
    | tuple[Float[Tensor, "N 4"], Int[Tensor, " N"], Float[Tensor, " N"], Bool[Tensor, "N H W"]]
)
"""Boxes, labels, scores and optionally masks of one image's detections: boolean, over the
image or a padded input whose top-left part is the image; or float box-frame probabilities
``[N, m, m]``, pasted on the boxes when drawn."""
GroundTruth = (
    tuple[Float[Tensor, "M 4"], Int[Tensor, " M"]]
    | tuple[Float[Tensor, "M 4"], Int[Tensor, " M"], Bool[Tensor, "M H W"]]
)
"""Boxes, labels and optionally masks of one image's ground truth."""


def label_color(label: int) -> tuple[int, int, int]:
    """The palette color of a label."""
    return PALETTE[label % len(PALETTE)]


def _mask_colors(
    colors: Color | Sequence[Color] | None, labels: Tensor | None, count: int
) -> list[Color]:
    """One color an instance: ``colors`` as :func:`draw_boxes` reads it."""
    if colors is None:
        if labels is None:
            return [label_color(0)] * count
        return [label_color(int(x)) for x in labels.reshape(-1).tolist()]
    if isinstance(colors, (str, tuple)):
        return [colors] * count
    return list(colors)


def draw_masks(
    image: UInt8[Tensor, "3 H W"],
    masks: Bool[Tensor, "N h w"],
    *,
    labels: Int[Tensor, " N"] | None = None,
    colors: Color | Sequence[Color] | None = None,
    alpha: float = 0.5,
) -> UInt8[Tensor, "3 H W"]:
    """A copy of ``image`` with each mask's pixels blended with its color:
    ``(1 - alpha) · pixel + alpha · color`` (overlaps: the later mask's color on top). Pixels
    outside every mask are unchanged.

    ``masks`` may be larger than the image (a padded input's masks): their top-left
    ``H × W`` is the image's. ``colors`` as :func:`draw_boxes` (default: the palette color of
    each label).
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"draw_masks: image must be uint8 [3, H, W], got {image.dtype} {list(image.shape)}"
        )
    height, width = image.shape[-2:]
    masks = masks.detach().cpu()
    if masks.ndim != 3 or masks.shape[-2] < height or masks.shape[-1] < width:
        raise ValueError(
            f"draw_masks: masks must be [N, h, w] with h >= {height} and w >= {width}, "
            f"got {list(masks.shape)}"
        )
    image = image.detach().cpu()
    if masks.shape[0] == 0:
        return image.clone()
    mask_colors = _mask_colors(colors, labels, masks.shape[0])
    if len(mask_colors) != masks.shape[0]:
        raise ValueError(f"draw_masks: {masks.shape[0]} masks but {len(mask_colors)} colors")
    return draw_segmentation_masks(
        image,
        masks[:, :height, :width].bool(),
        alpha=alpha,
        colors=mask_colors,  # type: ignore[arg-type]
    )


def draw_boxes(
    image: UInt8[Tensor, "3 H W"],
    boxes: Float[Tensor, "N 4"],
    *,
    labels: Int[Tensor, " N"] | None = None,
    scores: Float[Tensor, " N"] | None = None,
    names: Sequence[str] | None = None,
    colors: Color | Sequence[Color] | None = None,
    width: int = 2,
    masks: Bool[Tensor, "N h w"] | None = None,
    mask_alpha: float = 0.5,
) -> UInt8[Tensor, "3 H W"]:
    """A copy of ``image`` with xyxy ``boxes`` drawn, each captioned with its class name
    (``names[label]``, or the label number) and score when given.

    ``colors``: one color for every box, one a box, or None for the palette color of each label
    (the first palette color without labels). Degenerate boxes (``x2 < x1``) are drawn as lines;
    no boxes give an unchanged copy. With ``masks`` (one a box) each mask is first blended in
    with its box's color at ``mask_alpha`` (:func:`draw_masks`), then the boxes are drawn.
    ``masks`` are boolean image masks ``[N, h, w]`` or, as float, mask probabilities
    ``[N, m, m]`` in each box's frame (``Detections.masks`` not yet pasted), which are pasted
    on the boxes and binarized at ``> 0.5`` first.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"draw_boxes: image must be uint8 [3, H, W], got {image.dtype} {list(image.shape)}"
        )
    boxes = boxes.detach().cpu().float().reshape(-1, 4)
    image = image.detach().cpu()
    num_boxes = boxes.shape[0]
    if masks is not None:
        if masks.shape[0] != num_boxes:
            raise ValueError(f"draw_boxes: {num_boxes} boxes but {masks.shape[0]} masks")
        if masks.is_floating_point():  # box-frame probabilities: pasted on the boxes
            masks = _paste(masks, boxes, (int(image.shape[-2]), int(image.shape[-1])))
        image = draw_masks(image, masks, labels=labels, colors=colors, alpha=mask_alpha)
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


def _paste(
    probs: Float[Tensor, "N m m"], boxes: Float[Tensor, "N 4"], size: tuple[int, int]
) -> Bool[Tensor, "N H W"]:
    """Box-frame mask probabilities pasted on ``boxes`` into an image of ``size``, > 0.5."""
    probs = probs.detach().cpu().float()
    return paste_masks(probs[None], boxes.detach().cpu().float()[None], size, threshold=0.5)[0]


def _fit_masks(
    masks: Bool[Tensor, "N h w"], image_size: tuple[int, int], size: tuple[int, int]
) -> Bool[Tensor, "N h2 w2"]:
    """The image's part of ``masks`` (their top-left ``image_size``), resized to ``size``
    (nearest pixel)."""
    height, width = image_size
    masks = masks.detach().cpu()[:, :height, :width]
    if masks.shape[0] == 0:
        return torch.zeros(0, *size, dtype=torch.bool)
    return F.interpolate(masks[None].float(), size=size, mode="nearest-exact")[0] > 0.5


def _panel(
    image: UInt8[Tensor, "3 H W"],
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None,
    names: Sequence[str],
    size: int,
    masks: Tensor | None = None,
) -> Image.Image:
    small, small_boxes = _fit(image.detach().cpu(), boxes, size)
    small_masks = None
    if masks is not None:
        small_size = (int(small.shape[-2]), int(small.shape[-1]))
        if masks.is_floating_point():  # box-frame probabilities: pasted on the resized boxes
            small_masks = _paste(masks, small_boxes, small_size)
        else:
            image_size = (int(image.shape[-2]), int(image.shape[-1]))
            small_masks = _fit_masks(masks, image_size, small_size)
    drawn = draw_boxes(
        small,
        small_boxes,
        labels=labels.reshape(-1),
        scores=scores,
        names=names,
        masks=small_masks,
    )
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
    by class and captioned with the class name (and score); instance masks, where a prediction
    or ground truth carries them, are blended in with their box's color. Each panel is the
    image resized to fit ``cell_size`` pixels. The file is written atomically (temporary file,
    then rename). Returns the path."""
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
    for i, (image, prediction, truth) in enumerate(zip(images, predictions, ground_truth)):
        p_boxes, p_labels, p_scores = prediction[:3]
        p_masks = prediction[3] if len(prediction) > 3 else None
        g_boxes, g_labels = truth[:2]
        g_masks = truth[2] if len(truth) > 2 else None
        keep = p_scores.detach().cpu().reshape(-1) >= score_threshold  # [N]
        x0 = gap + (i % cols) * (cell_w + gap)
        y0 = gap + (i // cols) * (cell_h + gap)
        gt_panel = _panel(image, g_boxes, g_labels, None, names, cell_size, g_masks)
        pred_panel = _panel(
            image,
            p_boxes.detach().cpu().reshape(-1, 4)[keep],
            p_labels.detach().cpu().reshape(-1)[keep],
            p_scores.detach().cpu().reshape(-1)[keep],
            names,
            cell_size,
            None if p_masks is None else p_masks.detach().cpu()[keep],
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
