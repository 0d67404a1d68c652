"""Balanced sampling (fdet.ops.sample.sample_balanced): against a literal per-image reading of the
rule, counts, masks, padding, batching, uniformity and the compiler."""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from fdet.ops.sample import Sampled, sample_balanced
from tests.strategies import seeds


class Case(NamedTuple):
    positive: torch.Tensor  # [B, N]
    negative: torch.Tensor  # [B, N]
    keys: torch.Tensor  # [B, N]
    num_samples: int
    positive_fraction: float

    def sample(self, **changes) -> Sampled:
        case = self._replace(**changes)
        return sample_balanced(
            case.positive,
            case.negative,
            num_samples=case.num_samples,
            positive_fraction=case.positive_fraction,
            keys=case.keys,
        )


@st.composite
def sample_cases(draw: st.DrawFn) -> Case:
    """Small batches with few or many candidates; keys often tied (rounded to tenths), masks
    sometimes overlapping."""
    g = torch.Generator().manual_seed(draw(seeds))
    b = draw(st.integers(1, 3))
    n = draw(st.integers(0, 40))
    p_pos = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0]))
    p_neg = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    positive = torch.rand(b, n, generator=g) < p_pos
    negative = torch.rand(b, n, generator=g) < p_neg
    if not draw(st.booleans()):  # usually disjoint, as assigners give them
        negative &= ~positive
    keys = torch.rand(b, n, generator=g)
    if draw(st.booleans()):
        keys = (keys * 10).round() / 10
    num_samples = draw(st.integers(0, 24))
    fraction = draw(st.sampled_from([0.0, 0.25, 0.5, 0.7, 1.0]))
    return Case(positive, negative, keys, num_samples, fraction)


def reference(case: Case) -> Sampled:
    """The rule read literally, one image at a time: candidates sorted by key (larger first,
    ties to the lower index), the first num_pos positives and num_neg negatives taken."""
    pos_out = torch.zeros_like(case.positive)
    neg_out = torch.zeros_like(case.negative)
    for b in range(case.positive.shape[0]):
        keys = case.keys[b].tolist()
        pos = [i for i in range(len(keys)) if case.positive[b, i]]
        neg = [i for i in range(len(keys)) if case.negative[b, i] and not case.positive[b, i]]
        num_pos = min(len(pos), int(case.num_samples * case.positive_fraction))
        num_neg = min(len(neg), case.num_samples - num_pos)
        for chosen, out, count in ((pos, pos_out, num_pos), (neg, neg_out, num_neg)):
            for i in sorted(chosen, key=lambda i: (-keys[i], i))[:count]:
                out[b, i] = True
    return Sampled(pos_out, neg_out)


def assert_same(got: Sampled, want: Sampled) -> None:
    for name, g, w in zip(Sampled._fields, got, want):
        assert g.dtype == torch.bool and g.shape == w.shape, name
        assert torch.equal(g, w), (name, g, w)


@given(case=sample_cases())
def test_sample_is_the_literal_rule(case: Case) -> None:
    assert_same(case.sample(), reference(case))


@given(case=sample_cases())
def test_counts_fraction_and_masks(case: Case) -> None:
    out = case.sample()
    pos_avail = case.positive.sum(1)
    neg_avail = (case.negative & ~case.positive).sum(1)
    quota = int(case.num_samples * case.positive_fraction)
    num_pos, num_neg = out.positive.sum(1), out.negative.sum(1)
    assert torch.equal(num_pos, pos_avail.clamp(max=quota))
    assert torch.equal(num_neg, torch.minimum(neg_avail, case.num_samples - num_pos))
    assert (num_pos + num_neg <= case.num_samples).all()
    # enough positives: the fraction is met exactly; enough of both: the sample is full
    enough = pos_avail >= quota
    assert (num_pos[enough] == quota).all()
    full = enough & (neg_avail >= case.num_samples - quota)
    assert (num_pos[full] + num_neg[full] == case.num_samples).all()
    # never outside the masks, never both, overlap counted as positive
    assert not (out.positive & ~case.positive).any()
    assert not (out.negative & ~(case.negative & ~case.positive)).any()
    assert not (out.positive & out.negative).any()


@settings(max_examples=30)
@given(case=sample_cases(), extra=st.integers(1, 6), seed=seeds)
def test_padding_is_invisible(case: Case, extra: int, seed: int) -> None:
    """Columns in neither mask, wherever they sit and whatever their keys (even the largest or
    ties with real ones), change nothing."""
    b, n = case.positive.shape
    g = torch.Generator().manual_seed(seed)
    pad_keys = torch.where(torch.rand(b, extra, generator=g) < 0.5, math.inf, 0.5)
    where = torch.randperm(n + extra, generator=g)  # padded columns scattered among the real ones
    real, pads = where[:n].sort().values, where[n:]

    def spread(x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        out = torch.empty(b, n + extra, dtype=x.dtype)
        out[:, real] = x
        out[:, pads] = fill
        return out

    no = torch.zeros(b, extra, dtype=torch.bool)
    padded = case._replace(
        positive=spread(case.positive, no),
        negative=spread(case.negative, no),
        keys=spread(case.keys, pad_keys),
    ).sample()
    assert not padded.positive[:, pads].any() and not padded.negative[:, pads].any()
    assert_same(Sampled(padded.positive[:, real], padded.negative[:, real]), case.sample())


@settings(max_examples=30)
@given(case=sample_cases())
def test_batched_equals_per_image(case: Case) -> None:
    whole = case.sample()
    for i in range(case.positive.shape[0]):
        one = case.sample(
            positive=case.positive[i : i + 1],
            negative=case.negative[i : i + 1],
            keys=case.keys[i : i + 1],
        )
        assert_same(Sampled(*(x[i : i + 1] for x in whole)), one)


def test_overlap_counts_as_positive() -> None:
    both = torch.ones(1, 4, dtype=torch.bool)
    out = sample_balanced(both, both, num_samples=4, positive_fraction=0.5)
    assert out.positive.sum() == 2 and not out.negative.any()


def test_drawn_keys_follow_the_generator() -> None:
    pos = torch.rand(4, 50, generator=torch.Generator().manual_seed(0)) < 0.3

    def draw(seed: int) -> Sampled:
        g = torch.Generator().manual_seed(seed)
        return sample_balanced(pos, ~pos, num_samples=16, positive_fraction=0.25, generator=g)

    assert_same(draw(1), draw(1))
    assert not torch.equal(draw(1).negative, draw(2).negative)


def _chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_uniform_over_subsets() -> None:
    """6 positives, 2 taken, 9000 images: each of the 15 pairs should appear ~600 times. The
    chi-square statistic (14 degrees of freedom) stays far below 50 (p < 1e-5) for a uniform
    sampler; always preferring low indices or low keys is far above it. Negatives: 5 of 8, 56
    subsets, ~161 each, far below 110. Fixed seed: the check is deterministic."""
    g = torch.Generator().manual_seed(1234)
    b = 9000
    pos = torch.zeros(b, 14, dtype=torch.bool)
    pos[:, :6] = True
    neg = ~pos
    out = sample_balanced(pos, neg, num_samples=7, positive_fraction=2 / 7, generator=g)
    assert (out.positive.sum(1) == 2).all() and (out.negative.sum(1) == 5).all()

    def subset_counts(chosen: torch.Tensor, size: int, k: int) -> torch.Tensor:
        codes = (chosen.long() << torch.arange(size)).sum(1)  # each subset as a bit pattern
        bits = [sum(1 << i for i in s) for s in itertools.combinations(range(size), k)]
        return torch.bincount(codes, minlength=1 << size)[bits].double()

    pos_counts = subset_counts(out.positive[:, :6], 6, 2)
    neg_counts = subset_counts(out.negative[:, 6:], 8, 5)
    assert _chi_square(pos_counts) < 50, pos_counts
    assert _chi_square(neg_counts) < 110, neg_counts
    # the check can fail: a sampler biased towards low indices
    biased = pos_counts.clone()
    biased[0] += 300
    biased[-1] -= 300
    assert _chi_square(biased) > 50
    # and the per-element marginals: every positive chosen 1/3 of the time
    marginals = out.positive[:, :6].double().mean(0)
    assert ((marginals - 1 / 3).abs() < 0.02).all(), marginals


def test_bad_arguments_are_errors() -> None:
    m = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="num_samples"):
        sample_balanced(m, m, num_samples=-1, positive_fraction=0.5)
    with pytest.raises(ValueError, match="positive_fraction"):
        sample_balanced(m, m, num_samples=4, positive_fraction=1.5)
    with pytest.raises(ValueError, match="keys"):
        sample_balanced(m, m, num_samples=4, positive_fraction=0.5, keys=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        sample_balanced(m, m[:, :2], num_samples=4, positive_fraction=0.5)


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_equals_eager(backend: str) -> None:
    def run(pos, neg, keys):
        return sample_balanced(pos, neg, num_samples=16, positive_fraction=0.25, keys=keys)

    compiled = torch.compile(run, fullgraph=True, dynamic=False, backend=backend)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # the same shapes: one graph, two batches
        pos = torch.rand(3, 64, generator=g) < 0.1
        neg = torch.rand(3, 64, generator=g) < 0.7
        keys = (torch.rand(3, 64, generator=g) * 8).round()  # many ties
        eager = run(pos, neg, keys)
        assert eager.negative.sum() > 20
        assert_same(compiled(pos, neg, keys), eager)


@pytest.mark.compile
def test_compiled_draws_its_own_keys() -> None:
    """Without keys the compiled sampler draws its own: counts still exact."""
    pos = torch.zeros(2, 40, dtype=torch.bool)
    pos[:, :10] = True
    compiled = torch.compile(
        lambda p, n: sample_balanced(p, n, num_samples=8, positive_fraction=0.5),
        fullgraph=True,
        backend="aot_eager",
    )
    out = compiled(pos, ~pos)
    assert (out.positive.sum(1) == 4).all() and (out.negative.sum(1) == 4).all()
    assert not (out.positive[:, 10:].any() or out.negative[:, :10].any())
