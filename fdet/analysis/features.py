"""Feature maps of a detector: what each pyramid level of its neck responds to on one image.

:func:`feature_summary` runs ``model.neck(model.backbone(model.normalize(x)))`` (the features
every family's head reads: FPN levels for RetinaNet, FCOS, ATSS, GFL and the R-CNNs, CenterNet's
one up-sampled map; the R-CNNs' extra level, max-pooled from the last one after the neck, is not
among them) and reduces each level to its channel-mean activation and the channels of
highest mean activation. :func:`feature_maps` draws them over the image as heat maps, one row a
level. The image is zero-padded at the bottom and right to a multiple of ``pad_divisor`` (as the
collate pads a batch) and each map is cropped to the image's part before it is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, UInt8
from torch import Tensor, nn

from fdet.atomic import atomic_write

__all__ = ["LevelSummary", "feature_maps", "feature_summary"]


@attrs.frozen(kw_only=True)
class LevelSummary:
    """One level of the neck's output for one image: its index in the neck's output, its
    stride (input pixels a cell), the channel-mean map ``[h, w]`` over the whole padded input,
    and the ``top_channels`` channels of highest mean activation with their maps ``[k, h, w]``
    (highest first)."""

    level: int
    stride: int
    mean_map: Float[Tensor, "h w"]
    top_channels: tuple[int, ...]
    top_maps: Float[Tensor, "k h w"]


def _levels(output: Any) -> list[Tensor]:
    """The neck's output as a list of ``[1, C, h, w]`` maps (one map, or a tuple/list of them,
    or a NamedTuple whose fields are maps)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and all(isinstance(x, Tensor) for x in output):
        return list(output)
    raise TypeError(
        f"feature_summary: the neck returned {type(output).__name__}; expected a tensor "
        f"[1, C, h, w] or a tuple of them"
    )


def _check_image(image: Tensor, where: str) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"{where}: image must be uint8 [3, H, W], got {image.dtype} {list(image.shape)}"
        )


def feature_summary(
    model: nn.Module,
    image: UInt8[Tensor, "3 H W"],
    *,
    top_channels: int = 3,
    pad_divisor: int = 32,
) -> list[LevelSummary]:
    """Each level of ``model.neck``'s output for ``image`` (uint8 ``[3, H, W]``, sized as the
    validation transforms size it), summarized by :class:`LevelSummary`. The image is padded to
    a multiple of ``pad_divisor`` and run through ``model.normalize``, ``model.backbone`` and
    ``model.neck`` in eval mode under ``torch.inference_mode`` on the model's device (the
    model's training flag is restored). A model without ``backbone`` and ``neck`` raises
    ``TypeError``."""
    _check_image(image, "feature_summary")
    if top_channels < 0:
        raise ValueError(f"feature_summary: top_channels must be >= 0, got {top_channels}")
    if pad_divisor < 1:
        raise ValueError(f"feature_summary: pad_divisor must be >= 1, got {pad_divisor}")
    missing = [name for name in ("backbone", "neck") if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"feature_summary: {type(model).__name__} has no {' or '.join(missing)}; "
            f"feature maps need a detector with a backbone and a neck"
        )
    height, width = image.shape[-2:]
    padded_h = -(-height // pad_divisor) * pad_divisor
    padded_w = -(-width // pad_divisor) * pad_divisor
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = F.pad(image.float(), (0, padded_w - width, 0, padded_h - height))[None].to(device)
    normalize = getattr(model, "normalize", None)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            features = model.backbone(normalize(x) if normalize is not None else x)
            levels = _levels(model.neck(features))
    finally:
        model.train(was_training)
    out = []
    for index, level in enumerate(levels):
        maps = level[0].detach().float().cpu()  # [C, h, w]
        stride = max(1, round(padded_h / maps.shape[-2]))
        channel_means = maps.mean(dim=(1, 2))  # [C]
        k = min(top_channels, maps.shape[0])
        top = torch.topk(channel_means, k).indices if k else torch.zeros(0, dtype=torch.long)
        out.append(
            LevelSummary(
                level=index,
                stride=stride,
                mean_map=maps.mean(dim=0),
                top_channels=tuple(int(c) for c in top.tolist()),
                top_maps=maps[top],
            )
        )
    return out


def _overlay(
    image: np.ndarray, activation: Tensor, stride: int, size: tuple[int, int], cmap: Any
) -> np.ndarray:
    """``activation [h, w]`` cropped to the image's cells, scaled to ``[0, 1]``, up-sampled
    to ``size`` and blended as a heat map over ``image [H, W, 3]`` (floats in ``[0, 1]``)."""
    height, width = size
    cells_h, cells_w = -(-height // stride), -(-width // stride)
    crop = activation[:cells_h, :cells_w].float()
    low, high = float(crop.min()), float(crop.max())
    scaled = (crop - low) / (high - low) if high > low else torch.zeros_like(crop)
    up = F.interpolate(
        scaled[None, None], size=(cells_h * stride, cells_w * stride), mode="bilinear"
    )[0, 0, :height, :width]
    heat = cmap(up.numpy())[..., :3]
    return 0.5 * image + 0.5 * heat


def feature_maps(
    model: nn.Module,
    image: UInt8[Tensor, "3 H W"],
    out_path: str | os.PathLike[str],
    *,
    top_channels: int = 3,
    pad_divisor: int = 32,
    names: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid of ``model``'s neck features on ``image`` (:func:`feature_summary`):
    one row a pyramid level, titled with its index and stride; the first column the
    channel-mean activation, the next ``top_channels`` the channels of highest mean activation
    (titled with the channel index). Each map is min–max scaled on its own and drawn as a heat
    map (``inferno``) blended half and half with the image. ``names`` (one a level) replace the
    ``level i`` titles. The file is written atomically. Returns the path."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    summaries = feature_summary(model, image, top_channels=top_channels, pad_divisor=pad_divisor)
    if names is not None and len(names) != len(summaries):
        raise ValueError(f"feature_maps: {len(names)} names for the neck's {len(summaries)} levels")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    base = image.detach().cpu().permute(1, 2, 0).float().numpy() / 255.0
    cmap = colormaps["inferno"]
    rows, cols = len(summaries), 1 + top_channels
    aspect = width / max(height, 1)
    fig = Figure(figsize=(2.2 * cols * aspect + 0.4, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, summary in enumerate(summaries):
        label = names[r] if names is not None else f"level {summary.level}"
        maps = [("mean", summary.mean_map)] + [
            (f"channel {c}", m) for c, m in zip(summary.top_channels, summary.top_maps)
        ]
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(maps):
                continue
            title, activation = maps[c]
            ax.imshow(_overlay(base, activation, summary.stride, (height, width), cmap))
            ax.set_title(f"{label} (stride {summary.stride})\n{title}", fontsize=8)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    return out
