from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from fdet.ops.anchors import (
    anchor_offsets,
    grid_anchors,
    grid_points,
    image_strides,
    level_counts,
    level_index,
    level_sizes,
)

OCTAVES = tuple(2 ** (i / 3) for i in range(3))
RATIOS = (0.5, 1.0, 2.0)
RETINANET_BASES = (32, 64, 128, 256, 512)

feature_sizes = st.lists(
    st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=5
).map(tuple)
sizes_st = st.lists(st.integers(1, 600), min_size=1, max_size=3).map(tuple)
ratios_st = st.lists(st.floats(0.125, 8.0), min_size=1, max_size=3).map(tuple)
stride_st = st.one_of(st.integers(1, 64), st.tuples(st.integers(1, 64), st.integers(1, 64)))


def _stride_hw(stride: int | tuple[int, int]) -> tuple[int, int]:
    return stride if isinstance(stride, tuple) else (stride, stride)


# --------------------------------------------------------------------------------------------
# Sizes and base anchors


@given(base=st.integers(1, 1024))
def test_truncated_level_sizes_follow_torchvision_retinanet_recipe(base):
    expected = (base, int(base * 2 ** (1.0 / 3)), int(base * 2 ** (2.0 / 3)))
    assert level_sizes(base, OCTAVES, truncate=True) == expected


@given(base=st.floats(1.0, 1024.0), scales=st.lists(st.floats(0.25, 4.0), max_size=4))
def test_exact_level_sizes_are_products(base, scales):
    assert level_sizes(base, scales, truncate=False) == tuple(base * s for s in scales)


def test_level_sizes_example():
    assert level_sizes(32, OCTAVES, truncate=True) == (32.0, 40.0, 50.0)


@given(sizes=sizes_st, ratios=ratios_st)
def test_offsets_are_ratio_major_with_exact_size_and_ratio(sizes, ratios):
    off = anchor_offsets(sizes, ratios, round_to_int=False, dtype=torch.float64)
    assert off.shape == (len(ratios) * len(sizes), 4)
    off = off.reshape(len(ratios), len(sizes), 4)  # [R, S, 4]
    torch.testing.assert_close(off[..., :2], -off[..., 2:], rtol=0, atol=0)  # zero-centred
    w = off[..., 2] - off[..., 0]
    h = off[..., 3] - off[..., 1]
    size = torch.tensor(sizes, dtype=torch.float64)[None, :].expand_as(w)
    ratio = torch.tensor(ratios, dtype=torch.float64)[:, None].expand_as(w)
    torch.testing.assert_close(h / w, ratio, rtol=1e-6, atol=0)
    torch.testing.assert_close(w * h, size**2, rtol=1e-6, atol=0)


@given(sizes=sizes_st, ratios=ratios_st)
def test_rounded_offsets_are_whole_and_within_half_a_pixel(sizes, ratios):
    exact = anchor_offsets(sizes, ratios, round_to_int=False)
    rounded = anchor_offsets(sizes, ratios)
    assert torch.equal(rounded, rounded.round())
    assert (rounded - exact).abs().max() <= 0.5


@given(sizes=sizes_st, ratios=ratios_st)
def test_offsets_equal_torchvision_generate_anchors(sizes, ratios):
    expected = AnchorGenerator((sizes,), (ratios,)).cell_anchors[0]
    assert torch.equal(anchor_offsets(sizes, ratios), expected)


# --------------------------------------------------------------------------------------------
# Grids


def _fdet_recipe(recipe: str, num_levels: int, data: st.DataObject):
    if recipe == "retinanet":
        tv_sizes = tuple(
            (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in RETINANET_BASES
        )[:num_levels]
        sizes = [level_sizes(x, OCTAVES, truncate=True) for x in RETINANET_BASES[:num_levels]]
        ratios = [RATIOS] * num_levels
        tv_ratios = (RATIOS,) * num_levels
    elif recipe == "faster_rcnn":
        tv_sizes = tuple((x,) for x in RETINANET_BASES)[:num_levels]
        sizes = [(float(x),) for x in RETINANET_BASES[:num_levels]]
        ratios = [RATIOS] * num_levels
        tv_ratios = (RATIOS,) * num_levels
    else:
        tv_sizes = tuple(data.draw(sizes_st) for _ in range(num_levels))
        tv_ratios = tuple(data.draw(ratios_st) for _ in range(num_levels))
        sizes, ratios = list(tv_sizes), list(tv_ratios)
    return tv_sizes, tv_ratios, sizes, ratios


@pytest.mark.parametrize("recipe", ["retinanet", "faster_rcnn", "random"])
@given(data=st.data(), fsizes=feature_sizes, batch=st.integers(1, 2))
def test_grid_anchors_equal_torchvision(recipe, data, fsizes, batch):
    max_h = max(h for h, _ in fsizes)
    max_w = max(w for _, w in fsizes)
    image_h = data.draw(st.integers(max_h, 800), label="image_h")
    image_w = data.draw(st.integers(max_w, 800), label="image_w")
    tv_sizes, tv_ratios, sizes, ratios = _fdet_recipe(recipe, len(fsizes), data)

    images = ImageList(torch.zeros(batch, 3, image_h, image_w), [(image_h, image_w)] * batch)
    feature_maps = [torch.zeros(batch, 1, h, w) for h, w in fsizes]
    expected = AnchorGenerator(tv_sizes, tv_ratios)(images, feature_maps)

    strides = [(image_h // h, image_w // w) for h, w in fsizes]
    offsets = [anchor_offsets(s, r) for s, r in zip(sizes, ratios)]
    anchors = grid_anchors(offsets, fsizes, strides)
    assert len(expected) == batch
    for per_image in expected:
        assert per_image.dtype == anchors.dtype
        assert torch.equal(anchors, per_image)


@given(
    data=st.data(),
    fsizes=feature_sizes,
    round_to_int=st.booleans(),
)
def test_grid_anchors_layout_and_geometry(data, fsizes, round_to_int):
    num_levels = len(fsizes)
    sizes = [data.draw(sizes_st) for _ in range(num_levels)]
    ratios = [data.draw(ratios_st) for _ in range(num_levels)]
    strides = [data.draw(stride_st) for _ in range(num_levels)]
    offsets = [
        anchor_offsets(s, r, round_to_int=round_to_int, dtype=torch.float64)
        for s, r in zip(sizes, ratios)
    ]
    per_loc = [len(s) * len(r) for s, r in zip(sizes, ratios)]

    anchors = grid_anchors(offsets, fsizes, strides)
    counts = level_counts(fsizes, per_loc)
    assert counts == [h * w * a for (h, w), a in zip(fsizes, per_loc)]
    assert anchors.shape == (sum(counts), 4)
    assert anchors.dtype == torch.float64

    centres = grid_points(fsizes, strides, offset=0.0, dtype=torch.float64)
    for level, chunk in enumerate(anchors.split(counts)):
        h, w = fsizes[level]
        sy, sx = _stride_hw(strides[level])
        grid = chunk.reshape(h, w, len(ratios[level]), len(sizes[level]), 4)  # [H, W, R, S, 4]
        # every location holds the same base anchors, shifted by (j * sx, i * sy)
        jj = (torch.arange(w, dtype=torch.float64) * sx)[None, :].expand(h, w)
        ii = (torch.arange(h, dtype=torch.float64) * sy)[:, None].expand(h, w)
        shift = torch.stack((jj, ii, jj, ii), dim=-1)[:, :, None, None, :].expand_as(grid)
        base = offsets[level].reshape(1, 1, len(ratios[level]), len(sizes[level]), 4)
        torch.testing.assert_close(grid - shift, base.expand_as(grid), rtol=0, atol=1e-9)
        # sizes and ratios of the level
        bw = grid[..., 2] - grid[..., 0]
        bh = grid[..., 3] - grid[..., 1]
        size = torch.tensor(sizes[level], dtype=torch.float64)
        ratio = torch.tensor(ratios[level], dtype=torch.float64)[:, None]
        ideal_w = (size / ratio.sqrt()).expand_as(bw)
        ideal_h = (size * ratio.sqrt()).expand_as(bh)
        tol = 1.0 + 1e-9 if round_to_int else 1e-6 * float(size.max())
        assert (bw - ideal_w).abs().max() <= tol
        assert (bh - ideal_h).abs().max() <= tol
        # centres are the offset-0 grid points, repeated per anchor
        start = sum(hh * ww for hh, ww in fsizes[:level])
        level_centres = centres[start : start + h * w].reshape(h, w, 1, 1, 2)
        box_centres = (grid[..., :2] + grid[..., 2:]) / 2
        torch.testing.assert_close(
            box_centres, level_centres.expand_as(box_centres), rtol=0, atol=1e-9
        )


@given(
    fsizes=feature_sizes,
    data=st.data(),
    offset=st.sampled_from([0.0, 0.5, 0.25]),
)
def test_grid_points_are_row_major_location_centres(fsizes, data, offset):
    strides = [data.draw(stride_st) for _ in fsizes]
    points = grid_points(fsizes, strides, offset=offset)
    expected = []
    for (h, w), stride in zip(fsizes, strides):
        sy, sx = _stride_hw(stride)
        expected += [((j + offset) * sx, (i + offset) * sy) for i in range(h) for j in range(w)]
    assert points.dtype == torch.float32
    assert torch.equal(points, torch.tensor(expected, dtype=torch.float32))
    assert points.shape[0] == sum(level_counts(fsizes))


@given(fsizes=feature_sizes, data=st.data())
def test_level_index_tells_the_level(fsizes, data):
    per_loc = data.draw(
        st.one_of(
            st.integers(1, 9),
            st.lists(st.integers(1, 9), min_size=len(fsizes), max_size=len(fsizes)),
        )
    )
    counts = level_counts(fsizes, per_loc)
    index = level_index(fsizes, per_loc)
    assert index.dtype == torch.int64
    assert index.shape == (sum(counts),)
    assert torch.equal(torch.bincount(index, minlength=len(fsizes)), torch.tensor(counts))
    assert bool((index[1:] >= index[:-1]).all())


def _pyramid_sizes(height: int, width: int, levels: int = 5) -> list[tuple[int, int]]:
    """Feature sizes of ResNet + FPN P3–P7 on a padded ``height × width`` input: every 3×3
    stride-2 conv (and the stem's pool) halves a side, rounding up."""
    sizes = []
    h, w = height, width
    for level in range(1, 3 + levels):
        h, w = (h + 1) // 2, (w + 1) // 2
        if level >= 3:
            sizes.append((h, w))
    return sizes


def test_image_strides_examples():
    # the strides a torchvision model lays its P3–P7 anchors with
    assert image_strides((256, 256), _pyramid_sizes(256, 256)) == [
        (8, 8), (16, 16), (32, 32), (64, 64), (128, 128)
    ]  # fmt: skip
    assert image_strides((288, 288), _pyramid_sizes(288, 288)) == [
        (8, 8), (16, 16), (32, 32), (57, 57), (96, 96)
    ]  # fmt: skip
    assert image_strides((320, 480), _pyramid_sizes(320, 480)) == [
        (8, 8), (16, 16), (32, 32), (64, 60), (106, 120)
    ]  # fmt: skip
    assert image_strides((800, 1216), _pyramid_sizes(800, 1216))[3:] == [(61, 64), (114, 121)]


@given(
    height=st.integers(1, 60).map(lambda n: 32 * n),
    width=st.integers(1, 60).map(lambda n: 32 * n),
    batch=st.integers(1, 2),
)
def test_image_strides_are_torchvision_anchor_strides(height, width, batch):
    """Anchors on image strides equal torchvision's, for any padded size a model sees; the
    nominal strides do only where every level divides the size evenly."""
    fsizes = _pyramid_sizes(height, width)
    sizes = tuple((s,) for s in (32, 64, 128, 256, 512))
    generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    images = ImageList(torch.zeros(batch, 3, height, width), [(height, width)] * batch)
    expected = generator(images, [torch.zeros(batch, 1, h, w) for h, w in fsizes])[0]
    offsets = [anchor_offsets(s, (0.5, 1.0, 2.0)) for s in sizes]
    assert torch.equal(
        grid_anchors(offsets, fsizes, image_strides((height, width), fsizes)), expected
    )
    nominal = grid_anchors(offsets, fsizes, [8, 16, 32, 64, 128])
    # a level with more than one location on an axis is placed nominally iff the size divides
    same = all(
        (n == 1 or size % (n * stride) == 0)
        for (h, w), stride in zip(fsizes, (8, 16, 32, 64, 128))
        for n, size in ((h, height), (w, width))
    )
    assert torch.equal(nominal, expected) == same
    if height % 128 == 0 and width % 128 == 0:
        assert same


def test_mismatched_levels_are_errors():
    off = anchor_offsets((32,), RATIOS)
    with pytest.raises(ValueError, match="one of each per level"):
        grid_anchors([off, off], [(2, 2)], [8, 16])
    with pytest.raises(ValueError, match="one of each per level"):
        grid_points([(2, 2)], [8, 16])
    with pytest.raises(ValueError, match="anchors_per_location"):
        level_counts([(2, 2), (1, 1)], [9])


# --------------------------------------------------------------------------------------------
# Compiler

COMPILE_FSIZES = ((13, 17), (7, 9), (4, 5), (2, 3), (1, 2))
COMPILE_STRIDES = (8, 16, (32, 30), 64, 128)


def _all_priors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offsets = [
        anchor_offsets(level_sizes(x, OCTAVES, truncate=t), RATIOS, round_to_int=t)
        for x, t in zip(RETINANET_BASES, (True, False, True, False, True))
    ]
    anchors = grid_anchors(offsets, COMPILE_FSIZES, COMPILE_STRIDES)
    points = grid_points(COMPILE_FSIZES, COMPILE_STRIDES)
    return anchors, points, level_index(COMPILE_FSIZES, 9)


@pytest.mark.compile
def test_compiled_equals_eager():
    compiled = torch.compile(_all_priors, fullgraph=True)
    for got, want in zip(compiled(), _all_priors()):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)
    assert math.prod(_all_priors()[0].shape) == 4 * 9 * sum(h * w for h, w in COMPILE_FSIZES)
