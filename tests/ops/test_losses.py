from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given

from fdet.ops.losses import (
    giou_loss,
    l1_loss,
    masked_mean,
    masked_sum,
    normalize,
    sigmoid_focal_loss,
    sigmoid_focal_loss_labels,
    smooth_l1_loss,
    softmax_cross_entropy,
)
from tests.strategies import boxes, random_boxes, seeds

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
alphas = st.sampled_from([0.25, 0.5, 0.0, 1.0, -1.0])
gammas = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5])


def _logits(g: torch.Generator, shape: tuple[int, ...], scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _binary(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.rand(*shape, generator=g) < 0.3).float()


# ------------------------------------------------------------------------------------------------
# sigmoid_focal_loss
# ------------------------------------------------------------------------------------------------


@given(seed=seeds, shape=shapes, alpha=alphas, gamma=gammas)
def test_focal_matches_torchvision(seed, shape, alpha, gamma):
    g = torch.Generator().manual_seed(seed)
    logits, targets = _logits(g, shape), _binary(g, shape)
    ours = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    ref = torchvision.ops.sigmoid_focal_loss(
        logits, targets, alpha=alpha, gamma=gamma, reduction="none"
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@given(seed=seeds, shape=shapes, gamma=st.floats(0.01, 5.0))
def test_focal_is_at_most_bce_and_nonnegative(seed, shape, gamma):
    g = torch.Generator().manual_seed(seed)
    logits, targets = _logits(g, shape, scale=10.0), torch.rand(*shape, generator=g)
    loss = sigmoid_focal_loss(logits, targets, alpha=-1.0, gamma=gamma)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert (loss >= 0).all()
    assert (loss <= bce).all()


def test_focal_gamma_zero_is_weighted_bce():
    g = torch.Generator().manual_seed(0)
    logits, targets = _logits(g, (50,)), _binary(g, (50,))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weight = 0.25 * targets + 0.75 * (1 - targets)
    torch.testing.assert_close(
        sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=0.0), weight * bce
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_focal_finite_for_extreme_logits(alpha, gamma):
    values = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4])
    logits = values.repeat_interleave(3).requires_grad_()
    targets = torch.tensor([0.0, 1.0, 0.5]).repeat(len(values))
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert (loss >= 0).all()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # A confidently wrong hard prediction costs about |logit|; a confidently right one about 0.
    hard_wrong = loss[::3][-1]  # logit 1e4, target 0
    assert hard_wrong > 1e3
    assert loss[1::3][-1] == 0  # logit 1e4, target 1


@given(seed=seeds, alpha=alphas, gamma=gammas)
def test_focal_broadcast_equals_per_slice(seed, alpha, gamma):
    g = torch.Generator().manual_seed(seed)
    logits, targets = _logits(g, (3, 7, 4)), _binary(g, (7, 4))
    batched = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    assert batched.shape == (3, 7, 4)
    for b in range(3):
        torch.testing.assert_close(
            batched[b], sigmoid_focal_loss(logits[b], targets, alpha=alpha, gamma=gamma)
        )


def test_focal_computes_in_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    logits, targets = _logits(g, (64,)).bfloat16(), _binary(g, (64,)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sigmoid_focal_loss(logits, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, sigmoid_focal_loss(logits.float(), targets.float()))


@given(seed=seeds, shape=shapes, alpha=alphas, gamma=gammas)
def test_focal_gradients_match_torchvision(seed, shape, alpha, gamma):
    g = torch.Generator().manual_seed(seed)
    logits, targets = _logits(g, shape), torch.rand(*shape, generator=g)  # soft targets
    weight = torch.randn(*shape, generator=g)
    grads = []
    for focal in (sigmoid_focal_loss, torchvision.ops.sigmoid_focal_loss):
        x, t = logits.clone().requires_grad_(), targets.clone().requires_grad_()
        kwargs = {} if focal is sigmoid_focal_loss else {"reduction": "none"}
        (focal(x, t, alpha=alpha, gamma=gamma, **kwargs) * weight).sum().backward()
        grads.append((x.grad, t.grad))
    (ours_x, ours_t), (ref_x, ref_t) = grads
    torch.testing.assert_close(ours_x, ref_x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_t, ref_t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_focal_gradcheck(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 8, generator=g, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.rand(8, generator=g, dtype=torch.float64).requires_grad_()  # broadcast

    def focal(x, t):
        return sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma)

    assert torch.autograd.gradcheck(focal, (logits, targets))
    assert torch.autograd.gradgradcheck(focal, (logits, targets))


def test_focal_gradient_only_where_asked():
    logits = torch.randn(5, requires_grad=True)
    targets = torch.rand(5)
    sigmoid_focal_loss(logits, targets).sum().backward()
    assert logits.grad is not None and targets.grad is None
    logits = torch.randn(5)
    targets = torch.rand(5, requires_grad=True)
    sigmoid_focal_loss(logits, targets).sum().backward()
    assert targets.grad is not None


def test_focal_under_autocast_gives_float32_loss_and_finite_gradients():
    g = torch.Generator().manual_seed(0)
    logits = (_logits(g, (64,)) * 100).bfloat16().requires_grad_()
    targets = _binary(g, (64,)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sigmoid_focal_loss(logits, targets)
        assert loss.dtype == torch.float32
        loss.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad).all()


def test_focal_rejects_bad_hyperparameters():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss(x, x, alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss(x, x, gamma=-1.0)


def _label_case(g: torch.Generator, shape: tuple[int, ...], k: int):
    logits = _logits(g, (*shape, k), scale=8.0).double()
    labels = torch.randint(-2, k + 2, shape, generator=g)  # out of range where not positive
    positive = (torch.rand(*shape, generator=g) < 0.4) & (labels >= 0) & (labels < k)
    valid = torch.rand(*shape, generator=g) < 0.8
    return logits, labels, positive, valid


def _label_reference(logits, labels, positive, valid, alpha, gamma):
    classes = torch.arange(logits.shape[-1])
    targets = ((labels[..., None] == classes) & positive[..., None]).to(logits.dtype)
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    return torch.where(valid[..., None], loss, torch.zeros_like(loss))


@given(seed=seeds, shape=shapes, k=st.integers(1, 6), alpha=alphas, gamma=gammas)
def test_focal_labels_equals_focal_of_one_hot_targets(seed, shape, k, alpha, gamma):
    """Values and gradients (first and second order) of the one-hot composition, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    logits, labels, positive, valid = _label_case(g, shape, k)
    weights = torch.rand(logits.shape, generator=g, dtype=logits.dtype)
    results = []
    for fn in (sigmoid_focal_loss_labels, None):
        x = logits.clone().requires_grad_()
        if fn is None:
            loss = _label_reference(x, labels, positive, valid, alpha, gamma)
        else:
            loss = fn(x, labels, positive, valid=valid, alpha=alpha, gamma=gamma)
        (grad,) = torch.autograd.grad((loss * weights).sum(), x, create_graph=True)
        (grad2,) = torch.autograd.grad((grad * weights).sum(), x)
        results.append((loss, grad, grad2))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.0)])
def test_focal_labels_gradcheck(alpha, gamma):
    g = torch.Generator().manual_seed(1)
    logits, labels, positive, valid = _label_case(g, (2, 5), 3)
    x = (logits / 4).requires_grad_()

    def fn(x):
        return sigmoid_focal_loss_labels(x, labels, positive, valid=valid, alpha=alpha, gamma=gamma)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_focal_labels_defaults_and_broadcasting():
    g = torch.Generator().manual_seed(2)
    logits, labels, positive, _ = _label_case(g, (2, 7), 4)
    everything = torch.ones(2, 7, dtype=torch.bool)
    torch.testing.assert_close(
        sigmoid_focal_loss_labels(logits, labels, positive),
        _label_reference(logits, labels, positive, everything, 0.25, 2.0),
    )
    row = torch.tensor([True, False] * 3 + [True])  # [A], broadcast over the batch
    torch.testing.assert_close(
        sigmoid_focal_loss_labels(logits, labels, positive, valid=row),
        _label_reference(logits, labels, positive, row.expand(2, 7), 0.25, 2.0),
    )
    with pytest.raises(ValueError, match="gamma"):
        sigmoid_focal_loss_labels(logits, labels, positive, gamma=-1.0)


def test_focal_labels_float32_under_autocast():
    g = torch.Generator().manual_seed(3)
    logits, labels, positive, valid = _label_case(g, (3, 6), 4)
    x = logits.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sigmoid_focal_loss_labels(x, labels, positive, valid=valid)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.compile
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.5)])
def test_focal_labels_compiled_equals_eager(alpha, gamma):
    g = torch.Generator().manual_seed(4)
    logits, labels, positive, valid = _label_case(g, (2, 30), 5)
    logits = logits.float()

    def objective(x):
        return sigmoid_focal_loss_labels(
            x, labels, positive, valid=valid, alpha=alpha, gamma=gamma
        ).sum()

    results = []
    for fn in (torch.compile(objective, fullgraph=True), objective):
        x = logits.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss, x.grad))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# softmax_cross_entropy
# ------------------------------------------------------------------------------------------------


@given(
    seed=seeds,
    shape=shapes,
    k=st.integers(1, 6),
    smoothing=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_cross_entropy_matches_torch(seed, shape, k, smoothing):
    g = torch.Generator().manual_seed(seed)
    logits = _logits(g, (*shape, k))
    labels = torch.randint(0, k, shape, generator=g)
    ours = softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
    ref = F.cross_entropy(
        logits.reshape(-1, k), labels.reshape(-1), reduction="none", label_smoothing=smoothing
    ).reshape(shape)
    assert ours.shape == shape
    torch.testing.assert_close(ours, ref)
    assert (ours >= 0).all()


def test_cross_entropy_valid_mask_zeroes_rows_and_their_gradients():
    g = torch.Generator().manual_seed(0)
    logits = _logits(g, (2, 5, 4)).requires_grad_()
    labels = torch.randint(0, 4, (2, 5), generator=g)
    valid = torch.rand(2, 5, generator=g) < 0.5
    valid[0, 0], valid[1, 1] = True, False
    labels = torch.where(valid, labels, torch.tensor(-1))  # out-of-range where invalid: ignored
    loss = softmax_cross_entropy(logits, labels, valid=valid, label_smoothing=0.1)
    loss.sum().backward()
    assert (loss[~valid] == 0).all()
    assert logits.grad is not None and (logits.grad[~valid] == 0).all()
    ref = F.cross_entropy(logits[valid], labels[valid], reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(loss[valid], ref)


def test_cross_entropy_broadcasts_labels():
    g = torch.Generator().manual_seed(1)
    logits = _logits(g, (3, 6, 5))
    labels = torch.randint(0, 5, (6,), generator=g)
    loss = softmax_cross_entropy(logits, labels)
    assert loss.shape == (3, 6)
    for b in range(3):
        torch.testing.assert_close(loss[b], softmax_cross_entropy(logits[b], labels))


def test_cross_entropy_finite_for_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], requires_grad=True)
    loss = softmax_cross_entropy(logits, torch.tensor([1, 2]), label_smoothing=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------------------------
# L1, smooth L1, GIoU
# ------------------------------------------------------------------------------------------------


@given(seed=seeds, shape=shapes, beta=st.sampled_from([0.0, 1.0 / 9, 0.5, 1.0, 3.0]))
def test_smooth_l1_matches_torch(seed, shape, beta):
    g = torch.Generator().manual_seed(seed)
    pred, target = _logits(g, shape), _logits(g, shape)
    target.view(-1)[0] = pred.view(-1)[0]  # an exact zero difference
    ours = smooth_l1_loss(pred, target, beta=beta)
    torch.testing.assert_close(ours, F.smooth_l1_loss(pred, target, reduction="none", beta=beta))
    assert (ours >= 0).all()
    assert ours.view(-1)[0] == 0
    torch.testing.assert_close(l1_loss(pred, target), F.l1_loss(pred, target, reduction="none"))


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_box_regression_losses_have_finite_gradients_at_zero(beta):
    pred = torch.tensor([0.0, 1.0, -2.0, 0.05], requires_grad=True)
    target = torch.tensor([0.0, 1.0, 2.0, 0.0])
    smooth_l1_loss(pred, target, beta=beta).sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert pred.grad[0] == 0 and pred.grad[1] == 0


def test_smooth_l1_rejects_negative_beta():
    with pytest.raises(ValueError, match="beta"):
        smooth_l1_loss(torch.zeros(1), torch.zeros(1), beta=-1.0)


@given(pred=boxes(degenerate=False, leading=(), max_n=20), seed=seeds)
def test_giou_loss_matches_torchvision(pred, seed):
    g = torch.Generator().manual_seed(seed)
    target = random_boxes(g, (pred.shape[0],), min_size=1.0)
    ours = giou_loss(pred, target)
    ref = torchvision.ops.generalized_box_iou_loss(pred, target, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@given(seed=seeds, shape=shapes)
def test_giou_loss_is_zero_on_target_and_bounded(seed, shape):
    g = torch.Generator().manual_seed(seed)
    pred = random_boxes(g, shape, min_size=1.0)
    target = random_boxes(g, shape, degenerate_fraction=0.3)
    torch.testing.assert_close(giou_loss(pred, pred), torch.zeros(shape), rtol=0, atol=1e-6)
    loss = giou_loss(pred, target)
    assert ((loss >= 0) & (loss <= 2 + 1e-6)).all()


@given(seed=seeds, shape=shapes)
def test_giou_loss_finite_with_degenerate_boxes(seed, shape):
    g = torch.Generator().manual_seed(seed)
    pred = random_boxes(g, shape, degenerate_fraction=1.0).requires_grad_()
    corner = pred.detach()[..., :2]
    target = torch.cat((corner, corner), dim=-1)  # points on the predictions' corners
    zeros = torch.zeros_like(pred.detach()).requires_grad_()  # all-zero padding slots
    loss = giou_loss(pred, target) + giou_loss(zeros, zeros)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert zeros.grad is not None and torch.isfinite(zeros.grad).all()


def test_giou_loss_broadcast_equals_per_slice():
    g = torch.Generator().manual_seed(3)
    pred = random_boxes(g, (4, 9), min_size=1.0)
    target = random_boxes(g, (9,), min_size=1.0)
    loss = giou_loss(pred, target)
    assert loss.shape == (4, 9)
    for b in range(4):
        torch.testing.assert_close(loss[b], giou_loss(pred[b], target))


# ------------------------------------------------------------------------------------------------
# Masked reductions
# ------------------------------------------------------------------------------------------------


@given(seed=seeds, shape=shapes)
def test_masked_mean_equals_mean_of_selected(seed, shape):
    g = torch.Generator().manual_seed(seed)
    values = _logits(g, shape)
    mask = torch.rand(*shape, generator=g) < 0.5
    mean = masked_mean(values, mask)
    expected = values[mask].mean() if mask.any() else torch.tensor(0.0)
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(masked_sum(values, mask), values[mask].sum())


def test_masked_reductions_ignore_nan_outside_the_mask():
    values = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    mask = torch.tensor([True, False, True, False])
    assert masked_sum(values, mask) == 4.0
    assert masked_mean(values, mask) == 2.0


def test_masked_mean_broadcasts_mask_and_takes_a_normalizer():
    values = torch.arange(24.0).reshape(2, 3, 4)  # [B, A, 4]
    pos = torch.tensor([[True, False, True], [False, False, False]])  # [B, A]
    num_pos = pos.sum()
    per_coordinate = masked_mean(values, pos[..., None])
    per_box = masked_mean(values, pos[..., None], normalizer=num_pos)
    total = values[0, 0].sum() + values[0, 2].sum()
    torch.testing.assert_close(per_coordinate, total / 8)
    torch.testing.assert_close(per_box, total / 2)
    per_image = masked_mean(values, pos[..., None], dim=(1, 2))
    torch.testing.assert_close(per_image, torch.stack((total / 8, torch.tensor(0.0))))


def test_empty_mask_gives_zero_loss_and_finite_gradients():
    logits = torch.randn(2, 5, 3, requires_grad=True)
    targets = torch.zeros(2, 5, 3)
    pos = torch.zeros(2, 5, dtype=torch.bool)
    focal = sigmoid_focal_loss(logits, targets)
    loss = masked_sum(focal, pos[..., None]) / pos.sum().clamp(min=1)
    loss = loss + normalize(masked_sum(focal, pos[..., None]), pos.sum())
    loss = loss + masked_mean(focal, pos[..., None])
    loss.backward()
    assert loss == 0
    assert logits.grad is not None and (logits.grad == 0).all()


def test_normalize_keeps_tensor_counts_and_clamps():
    total = torch.tensor([6.0, 0.0])
    torch.testing.assert_close(normalize(total, torch.tensor([3, 0])), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(normalize(total, 0.5, min_count=0.5), torch.tensor([12.0, 0.0]))


# ------------------------------------------------------------------------------------------------
# Compiled
# ------------------------------------------------------------------------------------------------


def _all_losses(logits, targets, cls_logits, labels, valid, pred, target, mask):
    return (
        masked_sum(sigmoid_focal_loss(logits, targets), mask[..., None]) / mask.sum().clamp(min=1),
        softmax_cross_entropy(cls_logits, labels, valid=valid, label_smoothing=0.1),
        smooth_l1_loss(pred, target, beta=1.0 / 9),
        smooth_l1_loss(pred, target, beta=0.0),
        l1_loss(pred, target),
        giou_loss(pred, target),
        masked_mean(giou_loss(pred, target), mask, normalizer=mask.sum()),
    )


@pytest.mark.compile
def test_compiled_equals_eager():
    g = torch.Generator().manual_seed(0)
    args = (
        _logits(g, (2, 30, 4)),
        _binary(g, (2, 30, 4)),
        _logits(g, (2, 30, 5)),
        torch.randint(0, 5, (2, 30), generator=g),
        torch.rand(2, 30, generator=g) < 0.7,
        random_boxes(g, (2, 30), degenerate_fraction=0.3),
        random_boxes(g, (2, 30), degenerate_fraction=0.3),
        torch.rand(2, 30, generator=g) < 0.3,
    )
    compiled = torch.compile(_all_losses, fullgraph=True)
    for ours, ref in zip(compiled(*args), _all_losses(*args), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.compile
@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (-1.0, 0.5)])
def test_focal_compiled_gradients_equal_eager(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits, targets = _logits(g, (2, 30, 4), scale=8.0), torch.rand(2, 30, 4, generator=g)
    mask = torch.rand(2, 30, generator=g) < 0.8

    def objective(x, t):
        return masked_sum(sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma), mask[..., None])

    results = []
    for fn in (torch.compile(objective, fullgraph=True), objective):
        x, t = logits.clone().requires_grad_(), targets.clone().requires_grad_()
        loss = fn(x, t)
        loss.backward()
        results.append((loss, x.grad, t.grad))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
