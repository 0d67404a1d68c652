"""Generalized Focal Loss pieces: quality focal loss, distribution focal loss and the integral
decoding of distributions (fdet.ops.losses, fdet.ops.coding)."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from fdet.ops.coding import distribution_to_distances, encode_distances
from fdet.ops.losses import (
    distribution_focal_loss,
    quality_focal_loss,
    quality_focal_loss_labels,
    sigmoid_focal_loss,
)
from tests.strategies import seeds

betas = st.sampled_from([0.0, 1.0, 1.5, 2.0, 3.0])


def _qfl_by_hand(x: float, y: float, beta: float) -> float:
    s = 1 / (1 + math.exp(-x))
    bce = -(y * math.log(s) + (1 - y) * math.log(1 - s))
    return abs(y - s) ** beta * bce


@pytest.mark.parametrize(
    ("x", "y"), [(0.3, 0.6), (-2.0, 0.0), (1.5, 1.0), (-0.7, 0.85), (4.0, 0.1), (0.0, 0.5)]
)
@pytest.mark.parametrize("beta", [2.0, 1.0, 0.5])
def test_qfl_is_modulated_bce_by_hand(x: float, y: float, beta: float) -> None:
    """QFL = -|y - σ|^β ((1 - y) log(1 - σ) + y log σ), written out with math."""
    x_, y_ = torch.tensor([x], dtype=torch.float64), torch.tensor([y], dtype=torch.float64)
    got = quality_focal_loss(x_, y_, beta=beta)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_qfl_by_hand(x, y, beta), rel=1e-12, abs=1e-15)


@given(seed=seeds, beta=betas)
def test_qfl_is_bce_times_distance_power(seed: int, beta: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64) * 4
    y = torch.rand(5, 7, generator=g, dtype=torch.float64)
    y[0] = 0.0
    y[1] = 1.0
    want = F.binary_cross_entropy_with_logits(x, y, reduction="none") * (
        (y - torch.sigmoid(x)).abs() ** beta
    )
    torch.testing.assert_close(quality_focal_loss(x, y, beta=beta), want, rtol=1e-12, atol=1e-14)


@given(seed=seeds, beta=betas)
def test_qfl_at_hard_targets_is_the_focal_loss_without_alpha(seed: int, beta: float) -> None:
    """y = 1: -(1 - σ)^β log σ; y = 0: -σ^β log(1 - σ): the focal loss with gamma = β."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, generator=g, dtype=torch.float64) * 5
    y = (torch.rand(64, generator=g) < 0.5).double()
    torch.testing.assert_close(
        quality_focal_loss(x, y, beta=beta),
        sigmoid_focal_loss(x, y, alpha=-1, gamma=beta),
        rtol=1e-7,
        atol=1e-12,
    )


@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_qfl_gradients_by_finite_differences(beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, generator=g, dtype=torch.float64) * 2).requires_grad_()
    y = torch.rand(4, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: quality_focal_loss(a, b, beta=beta), (x, y))
    assert torch.autograd.gradgradcheck(lambda a, b: quality_focal_loss(a, b, beta=beta), (x, y))


def test_qfl_is_smallest_at_the_target() -> None:
    """For a soft target y the loss is minimal where σ = y (there both the BCE gradient
    σ - y and the modulation vanish)."""
    y = torch.tensor(0.37, dtype=torch.float64)
    x = torch.logit(y).requires_grad_()
    loss = quality_focal_loss(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == pytest.approx(0.0, abs=1e-15) and grad.item() == pytest.approx(0.0)
    others = quality_focal_loss(torch.logit(y) + torch.linspace(-2, 2, 9, dtype=torch.float64), y)
    assert others.argmin() == 4


@given(seed=seeds, beta=betas)
def test_qfl_labels_equals_dense_targets(seed: int, beta: float) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 11, 4, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 4, (2, 11), generator=g)
    positive = torch.rand(2, 11, generator=g) < 0.4
    valid = torch.rand(2, 11, generator=g) < 0.8
    scores = torch.where(positive, torch.rand(2, 11, generator=g), math.nan)  # garbage elsewhere
    labels = torch.where(positive, labels, -3)
    targets = (
        F.one_hot(labels.clamp(min=0), 4).float() * torch.where(positive, scores, 0)[..., None]
    )
    want = torch.where(valid[..., None], quality_focal_loss(logits, targets, beta=beta), 0.0)
    got = quality_focal_loss_labels(logits, labels, scores, positive, valid=valid, beta=beta)
    torch.testing.assert_close(got, want)
    (grad_want,) = torch.autograd.grad(want.sum(), logits)
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(grad_got, grad_want)
    assert grad_got[~valid].abs().sum() == 0


def test_qfl_is_float32_for_low_precision_logits() -> None:
    x = torch.randn(3, 4).bfloat16()
    assert quality_focal_loss(x, torch.rand(3, 4)).dtype == torch.float32
    assert distribution_focal_loss(x, torch.rand(3) * 3).dtype == torch.float32
    assert distribution_to_distances(x, reg_max=3).dtype == torch.float32


# --- distribution focal loss and the integral ---------------------------------------------------


def test_dfl_by_hand() -> None:
    """Bins 0, 1, 2 with S = (1/4, 1/2, 1/4) (logits 0, ln 2, 0):

    - y = 0.25 lies in [0, 1]: -(0.75 log 1/4 + 0.25 log 1/2) = 1.75 log 2;
    - y = 1.5: -(0.5 log 1/2 + 0.5 log 1/4) = 1.5 log 2;
    - y = 2 (the last bin): -log 1/4 = 2 log 2;
    - y = 1 (a bin): -log 1/2 = log 2.
    """
    logits = torch.tensor([0.0, math.log(2), 0.0], dtype=torch.float64).expand(4, 3)
    y = torch.tensor([0.25, 1.5, 2.0, 1.0], dtype=torch.float64)
    want = torch.tensor([1.75, 1.5, 2.0, 1.0], dtype=torch.float64) * math.log(2)
    torch.testing.assert_close(distribution_focal_loss(logits, y), want, rtol=1e-14, atol=0)


def _split(y: torch.Tensor, bins: int) -> torch.Tensor:
    """The two-bin distribution of mean ``y``: ``i + 1 - y`` on ``i = floor(y)``, ``y - i`` on
    ``i + 1`` (``[..., bins]``, float64)."""
    i = y.floor().clamp(max=bins - 2)
    cols = torch.arange(bins, dtype=torch.float64)
    return torch.where(cols == i[..., None], (i + 1 - y)[..., None], 0.0) + torch.where(
        cols == (i + 1)[..., None], (y - i)[..., None], 0.0
    )


@given(seed=seeds, reg_max=st.sampled_from([1, 4, 16]))
def test_integral_inverts_the_discretisation(seed: int, reg_max: int) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(40, generator=g, dtype=torch.float64) * reg_max
    y[:3] = torch.tensor([0.0, float(reg_max), float(reg_max // 2)], dtype=torch.float64)
    split = _split(y, reg_max + 1)
    torch.testing.assert_close(split.sum(-1), torch.ones_like(y))
    got = distribution_to_distances(split.log(), reg_max=reg_max)  # zero mass: logit -inf
    torch.testing.assert_close(got, y, rtol=0, atol=1e-12)
    # a uniform distribution sits in the middle, and the result stays within [0, reg_max]
    assert distribution_to_distances(torch.zeros(reg_max + 1), reg_max=reg_max) == reg_max / 2
    wild = distribution_to_distances(
        torch.randn(50, reg_max + 1, generator=g) * 30, reg_max=reg_max
    )
    assert ((wild >= 0) & (wild <= reg_max)).all()


@settings(max_examples=30)
@given(seed=seeds, reg_max=st.sampled_from([1, 4, 16]))
def test_dfl_is_minimal_with_zero_gradient_at_the_split_distribution(seed: int, reg_max: int):
    """DFL is the cross-entropy against the split distribution q: its gradient in the logits
    is softmax - q, zero at q, where the loss is q's entropy; moving away only increases it."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(8, generator=g, dtype=torch.float64) * reg_max
    q = _split(y, reg_max + 1)
    logits = q.log().requires_grad_()
    loss = distribution_focal_loss(logits, y)
    entropy = -(q * q.log().nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(loss, entropy, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert grad.isfinite().all() and grad.abs().max() < 1e-12
    finite = q.clamp(min=1e-30).log()  # finite logits just off the minimum
    for _ in range(3):
        moved = finite + torch.randn(finite.shape, generator=g, dtype=torch.float64) * 0.5
        assert (distribution_focal_loss(moved, y) > loss.detach() - 1e-9).all()


def test_dfl_gradients_by_finite_differences() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.tensor([0.0, 0.3, 1.7, 2.5, 3.99, 4.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: distribution_focal_loss(x, y), (logits,))
    assert torch.autograd.gradcheck(
        lambda x: distribution_to_distances(x, reg_max=4), (logits.detach().requires_grad_(),)
    )


def test_dfl_targets_from_clamped_distances() -> None:
    """encode_distances with max_distance clamps each side into [0, reg_max - eps] (in strides):
    the far side of a big box lands just inside the last bin, a point outside its box at 0,
    and the DFL of those targets is finite with in-range bins."""
    points = torch.tensor([[8.0, 8.0], [100.0, 8.0]])
    boxes = torch.tensor([[0.0, 0.0, 400.0, 24.0], [0.0, 0.0, 40.0, 40.0]])
    ltrb = encode_distances(points, boxes, stride=8.0, max_distance=16, eps=0.1)
    torch.testing.assert_close(ltrb[0], torch.tensor([1.0, 1.0, 15.9, 2.0]))
    torch.testing.assert_close(ltrb[1], torch.tensor([12.5, 1.0, 0.0, 4.0]))
    loss = distribution_focal_loss(torch.zeros(2, 4, 17), ltrb)
    torch.testing.assert_close(loss, torch.full((2, 4), math.log(17)))


def test_shape_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="reg_max \\+ 1 = 17"):
        distribution_to_distances(torch.zeros(2, 16), reg_max=16)
    with pytest.raises(ValueError, match="at least 2 bins"):
        distribution_focal_loss(torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        quality_focal_loss(torch.zeros(2), torch.zeros(2), beta=-1.0)


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    def run(logits, labels, scores, positive, dists, target):
        qfl = quality_focal_loss_labels(logits, labels, scores, positive, beta=2.0)
        return (
            qfl,
            distribution_focal_loss(dists, target),
            distribution_to_distances(dists, reg_max=7),
        )

    compiled = torch.compile(run, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(2)
    args = (
        torch.randn(2, 30, 5, generator=g),
        torch.randint(0, 5, (2, 30), generator=g),
        torch.rand(2, 30, generator=g),
        torch.rand(2, 30, generator=g) < 0.3,
        torch.randn(2, 30, 4, 8, generator=g) * 3,
        torch.rand(2, 30, 4, generator=g) * 7,
    )
    for got, want in zip(compiled(*args), run(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
