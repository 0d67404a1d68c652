"""Hypothesis strategies shared by the op tests.

Tensors are drawn as (seed, shape) and materialised with a torch.Generator: hypothesis explores
shapes, sizes and degenerate cases, torch fills in the numbers quickly.
"""

from __future__ import annotations

import hypothesis.strategies as st
import torch


def random_boxes(
    generator: torch.Generator,
    shape: tuple[int, ...],
    *,
    image_size: float = 256.0,
    min_size: float = 0.0,
    max_size: float = 128.0,
    degenerate_fraction: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[*shape, 4]`` xyxy boxes inside ``[0, image_size]²``; a fraction are degenerate."""
    xy = torch.rand(*shape, 2, generator=generator, dtype=torch.float64) * image_size
    wh = min_size + torch.rand(*shape, 2, generator=generator, dtype=torch.float64) * (
        max_size - min_size
    )
    if degenerate_fraction > 0:
        flat = torch.rand(*shape, 2, generator=generator, dtype=torch.float64)
        wh = torch.where(flat < degenerate_fraction / 2, torch.zeros_like(wh), wh)
    return torch.cat((xy, xy + wh), dim=-1).to(dtype)


@st.composite
def boxes(
    draw: st.DrawFn,
    *,
    leading: tuple[int, ...] | None = None,
    max_leading_dims: int = 2,
    max_n: int = 12,
    min_n: int = 0,
    degenerate: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A tensor of boxes ``[*leading, N, 4]`` with random leading dims (or the given ones)."""
    seed = draw(st.integers(0, 2**31 - 1))
    if leading is None:
        leading = tuple(draw(st.lists(st.integers(1, 3), max_size=max_leading_dims)))
    n = draw(st.integers(min_n, max_n))
    frac = draw(st.sampled_from([0.0, 0.0, 0.3])) if degenerate else 0.0
    g = torch.Generator().manual_seed(seed)
    return random_boxes(g, (*leading, n), degenerate_fraction=frac, dtype=dtype)


seeds = st.integers(0, 2**31 - 1)
