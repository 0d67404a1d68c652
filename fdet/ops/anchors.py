"""Anchor grids: per-location base anchors, their tiling over pyramid levels, location centres.

Every level is laid out the same way: row-major over the ``H × W`` feature locations, and at each
location the level's base anchors in the order :func:`anchor_offsets` makes them. Levels are
concatenated, so a flat anchor dim ``A = Σ_l H_l · W_l · anchors_per_location_l`` lines up with
head outputs flattened the same way (``[B, H, W, a, ·] -> [B, H·W·a, ·]`` per level, then ``cat``).

Feature sizes are Python ints, so every shape here is static and the functions trace cleanly under
``torch.compile(fullgraph=True)``. The arithmetic follows torchvision's ``AnchorGenerator``: the
anchors are equal, element for element, to the ones its RetinaNet and Faster R-CNN recipes make.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "anchor_offsets",
    "grid_anchors",
    "grid_points",
    "image_strides",
    "level_counts",
    "level_index",
    "level_sizes",
]

Stride = float | tuple[float, float]


def level_sizes(
    base_size: float, octave_scales: Sequence[float], *, truncate: bool
) -> tuple[float, ...]:
    """Anchor sizes of one level: ``base_size * scale`` for each octave scale.

    With ``truncate=True`` each size is cut to an integer like torchvision's RetinaNet recipe
    (``32`` with scales ``2**(0/3), 2**(1/3), 2**(2/3)`` gives ``32, 40, 50``); otherwise the exact
    products are kept (``32, 40.32, 50.80``), as MMDetection does.
    """
    if truncate:
        return tuple(float(int(base_size * s)) for s in octave_scales)
    return tuple(float(base_size * s) for s in octave_scales)


def anchor_offsets(
    sizes: Sequence[float],
    ratios: Sequence[float],
    *,
    round_to_int: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Float[Tensor, "RS 4"]:
    """Zero-centred base anchors ``(-w/2, -h/2, w/2, h/2)`` of one level, ``[R·S, 4]``.

    ``R = len(ratios)``, ``S = len(sizes)``. A ratio is height / width: ``h = size · √ratio``,
    ``w = size / √ratio``, so every anchor of a given size has area ``size²``. The order is
    ratio-major: row ``r · S + s`` holds ``ratios[r]`` with ``sizes[s]``. With ``round_to_int``
    the half-extents are rounded to whole pixels (half to even), as torchvision does; without it
    they are exact.
    """
    scales = torch.as_tensor(sizes, dtype=dtype, device=device)  # [S]
    aspect = torch.as_tensor(ratios, dtype=dtype, device=device)  # [R]
    h_ratios = torch.sqrt(aspect)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # [R*S]
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)  # [R*S]
    offsets = torch.stack((-ws, -hs, ws, hs), dim=1) / 2  # [R*S, 4]
    return offsets.round() if round_to_int else offsets


def image_strides(
    image_size: tuple[int, int], feature_sizes: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Strides ``(stride_y, stride_x)`` of each level taken from the padded input size, as
    torchvision's ``AnchorGenerator`` takes them: ``(H // H_l, W // W_l)``, per axis.

    A level's nominal stride ``2**level`` is what these are only when the padded size is a
    multiple of the coarsest stride: at 288 × 288 the levels of ResNet + FPN P3–P7 have 36, 18,
    9, 5 and 3 locations a side, so the strides are 8, 16, 32, 57 and 96 (not 64 and 128); at
    800 × 1216, P7 (7 × 10) gets ``(114, 121)``. Python ints in, Python ints out: no tensor, no
    host sync, so the grids stay static under ``torch.compile``.

    Args:
        image_size: ``(H, W)``, the padded size of the batch the feature maps were computed from.
        feature_sizes: ``(H_l, W_l)`` of each level.
    """
    height, width = image_size
    return [(height // h, width // w) for h, w in feature_sizes]


def _stride_hw(stride: Stride) -> tuple[float, float]:
    if isinstance(stride, tuple):
        return stride
    return stride, stride


def _shifts(
    feature_size: tuple[int, int],
    stride: Stride,
    offset: float,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> tuple[Float[Tensor, " HW"], Float[Tensor, " HW"]]:
    """x and y of every location of one level, row-major: ``((j + offset)·sx, (i + offset)·sy)``."""
    height, width = feature_size
    stride_y, stride_x = _stride_hw(stride)
    xs = torch.arange(width, dtype=dtype, device=device)  # [W]
    ys = torch.arange(height, dtype=dtype, device=device)  # [H]
    if offset != 0:
        xs, ys = xs + offset, ys + offset
    xs, ys = xs * stride_x, ys * stride_y
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")  # [H, W]
    return shift_x.reshape(-1), shift_y.reshape(-1)


def grid_anchors(
    offsets: Sequence[Float[Tensor, "a 4"]],
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[Stride],
) -> Float[Tensor, "A 4"]:
    """Anchors of all levels, ``[A, 4]`` with ``A = Σ_l H_l · W_l · a_l``.

    Args:
        offsets: per level, the zero-centred base anchors ``[a_l, 4]`` (see :func:`anchor_offsets`).
        feature_sizes: per level, ``(H_l, W_l)`` as Python ints.
        strides: per level, one stride or ``(stride_y, stride_x)`` in pixels.

    Location ``(i, j)`` of a level is shifted by ``(j · stride_x, i · stride_y)`` (no half-stride
    offset, as in torchvision). Within a level the layout is ``[H, W, a]`` flattened.
    """
    if not len(offsets) == len(feature_sizes) == len(strides):
        raise ValueError(
            f"grid_anchors: got {len(offsets)} offsets, {len(feature_sizes)} feature sizes and "
            f"{len(strides)} strides; need one of each per level"
        )
    levels = []
    for base, size, stride in zip(offsets, feature_sizes, strides):
        shift_x, shift_y = _shifts(size, stride, 0.0, base.dtype, base.device)  # [HW]
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)  # [HW, 4]
        levels.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))  # [HW*a, 4]
    return torch.cat(levels, dim=0)


def grid_points(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[Stride],
    *,
    offset: float = 0.5,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Float[Tensor, "A 2"]:
    """Location centres ``(x, y)`` of all levels, ``[A, 2]`` with ``A = Σ_l H_l · W_l``.

    Location ``(i, j)`` sits at ``((j + offset) · stride_x, (i + offset) · stride_y)``; levels are
    row-major and concatenated like :func:`grid_anchors`. ``offset=0`` gives the anchor centres.
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(
            f"grid_points: got {len(feature_sizes)} feature sizes and {len(strides)} strides; "
            "need one of each per level"
        )
    levels = []
    for size, stride in zip(feature_sizes, strides):
        shift_x, shift_y = _shifts(size, stride, offset, dtype, device)  # [HW]
        levels.append(torch.stack((shift_x, shift_y), dim=1))  # [HW, 2]
    return torch.cat(levels, dim=0)


def _per_level(anchors_per_location: int | Sequence[int], num_levels: int) -> list[int]:
    if isinstance(anchors_per_location, int):
        return [anchors_per_location] * num_levels
    if len(anchors_per_location) != num_levels:
        raise ValueError(
            f"anchors_per_location has {len(anchors_per_location)} entries for {num_levels} levels"
        )
    return list(anchors_per_location)


def level_counts(
    feature_sizes: Sequence[tuple[int, int]], anchors_per_location: int | Sequence[int] = 1
) -> list[int]:
    """Number of anchors (or points, with the default 1) on each level: ``H_l · W_l · a_l``."""
    per_loc = _per_level(anchors_per_location, len(feature_sizes))
    return [h * w * a for (h, w), a in zip(feature_sizes, per_loc)]


def level_index(
    feature_sizes: Sequence[tuple[int, int]],
    anchors_per_location: int | Sequence[int] = 1,
    *,
    device: torch.device | str | None = None,
) -> Int[Tensor, " A"]:
    """Level of each flattened anchor, ``[A]`` int64: ``0`` for the first ``count_0``, and so on."""
    counts = level_counts(feature_sizes, anchors_per_location)
    if not counts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(
        [torch.full((n,), lvl, dtype=torch.int64, device=device) for lvl, n in enumerate(counts)]
    )
