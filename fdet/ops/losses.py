"""Detection losses and the masked reductions that normalize them.

Every loss is elementwise and unreduced: it broadcasts its inputs and returns one value per
element (per box for box losses, per row for softmax cross-entropy). Reduction is the caller's
choice, with tensors as normalizers so nothing syncs with the host::

    focal = sigmoid_focal_loss(cls_logits, cls_targets, alpha=0.25, gamma=2.0)  # [B, A, K]
    cls_loss = masked_sum(focal, ~ignore[..., None]) / num_pos.clamp(min=1)
    box_loss = normalize(masked_sum(l1_loss(deltas, target_deltas), pos[..., None]), num_pos)

Classification losses compute in (at least) float32, also under autocast.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fdet.ops.boxes import aligned_generalized_box_iou

__all__ = [
    "distribution_focal_loss",
    "giou_loss",
    "l1_loss",
    "masked_mean",
    "masked_sum",
    "normalize",
    "quality_focal_loss",
    "quality_focal_loss_labels",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_labels",
    "smooth_l1_loss",
    "softmax_cross_entropy",
]


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _focal_parts(x: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``p = sigmoid(x)``, ``ce = BCE(x, t)`` and ``q = 1 - p_t``: three fresh tensors.

    ``ce = relu(x) - x t + log(1 + exp(-|x|))``. ``log1p`` would be more precise where
    ``exp(-|x|) < 1e-7`` (by less than ``1e-7`` absolute), but inductor's CPU code does not
    vectorize it, and ``log`` is vectorized. ``q = p + t - 2 p t`` is exactly ``p`` for
    ``t = 0``. Each full-size tensor is written in place once allocated: on CPU a tensor of the
    size of a ``[B, A, K]`` classification map is a fresh, zero-filled ``mmap`` every time.
    ``t = None`` stands for all-zero targets: the terms with ``t`` are skipped, which changes no
    value (they add zeros).
    """
    ce = x.clamp(min=0)
    if t is not None:
        ce.addcmul_(x, t, value=-1)  # relu(x) - x t
    q = x.abs().neg_().exp_().add_(1).log_()  # log(1 + exp(-|x|))
    ce.add_(q)
    p = torch.sigmoid(x)
    q.copy_(p)
    if t is not None:
        q.addcmul_(p, t, value=-2).add_(t)  # 1 - p_t
    return p, ce, q


def _focal_forward(x: Tensor, t: Tensor | None, alpha: float, gamma: float) -> Tensor:
    """The focal loss in the buffers of ``_focal_parts``; ``t = None``: all-zero targets, in
    two buffers (``1 - p_t`` is then ``p``, written over ``log(1 + exp(-|x|))``)."""
    if t is None:
        loss = x.clamp(min=0)  # ce = relu(x) + log(1 + exp(-|x|))
        q = x.abs().neg_().exp_().add_(1).log_()
        loss.add_(q)
        if gamma != 0:
            q = torch.sigmoid(x, out=q).clamp_(min=torch.finfo(x.dtype).tiny).pow_(gamma)
            loss.mul_(q)  # ce * p ** gamma
        return loss.mul_(1 - alpha) if alpha >= 0 else loss  # alpha_t = 1 - alpha
    p, loss, q = _focal_parts(x, t)
    if gamma != 0:
        tiny = torch.finfo(x.dtype).tiny
        loss.mul_(q.clamp_(min=tiny).pow_(gamma))  # ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss.mul_(p.copy_(t).mul_(2 * alpha - 1).add_(1 - alpha))  # * alpha_t
    return loss


def _modulation(q: Tensor, ce: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """``m = clamp(1 - p_t, tiny) ** gamma`` and ``dm/dq * ce``, clamping ``q`` in place.

    As for ``clamp(q, tiny) ** gamma``, there is no gradient through ``m`` where ``q < tiny``, so
    pow's derivative (infinite at 0 for ``gamma < 1``) never enters the product.
    """
    tiny = torch.finfo(q.dtype).tiny
    below = q < tiny
    q_c = q.clamp_(min=tiny)
    m = q_c.pow(gamma)
    return m, torch.div(m, q_c).mul_(gamma).masked_fill_(below, 0).mul_(ce)


def _focal_grad_logits(
    x: Tensor, t: Tensor | None, grad: Tensor, alpha: float, gamma: float
) -> Tensor:
    """``grad * dloss/dx`` of the focal loss, in the buffers of ``_focal_parts`` (see
    ``_SigmoidFocalLoss.backward``); ``t = None``: all-zero targets."""
    p, ce, q = _focal_parts(x, t)
    m: Tensor | None = None
    dm_ce: Tensor | None = None  # dm/dq * ce
    if gamma != 0:
        m, dm_ce = _modulation(q, ce, gamma)
    grad_w = grad  # grad * alpha_t
    if alpha >= 0:
        grad_w = (
            grad.mul(1 - alpha) if t is None else t.mul(2 * alpha - 1).add_(1 - alpha).mul_(grad)
        )
    if dm_ce is not None:
        dp = q.copy_(p).addcmul_(p, p, value=-1)  # dp/dx = p (1 - p)
        dm_ce.mul_(dp)  # dm/dq ce dq/dx
        if t is not None:
            dm_ce.addcmul_(dm_ce, t, value=-2)
    grad_x = p if t is None else p.sub_(t)  # dce/dx = p - t
    if m is not None:
        grad_x.mul_(m)
    if dm_ce is not None:
        grad_x.add_(dm_ce)
    return grad_x.mul_(grad_w)


def _focal_loss_composite(x: Tensor, t: Tensor, alpha: float, gamma: float) -> Tensor:
    """``_SigmoidFocalLoss`` in plain out-of-place steps, for autograd to differentiate twice."""
    p = torch.sigmoid(x)
    loss = x.clamp(min=0) - x * t + torch.log(1 + torch.exp(-x.abs()))
    if gamma != 0:
        loss = loss * (p + t - 2 * p * t).clamp(min=torch.finfo(x.dtype).tiny) ** gamma
    if alpha >= 0:
        loss = loss * (t * (2 * alpha - 1) + (1 - alpha))
    return loss


class _SigmoidFocalLoss(torch.autograd.Function):
    """The focal loss of same-shape float ``logits`` and ``targets``, with its gradient by hand.

    Autograd through the elementwise steps would allocate a full-size tensor for each of them
    and keep about half of them alive for the backward pass; this keeps only the inputs,
    recomputes ``p``, ``ce`` and ``1 - p_t`` there, and works in place in its own buffers
    (three forward, six backward). Under ``torch.compile`` each pass fuses into one kernel.
    """

    @staticmethod
    def forward(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
        return _focal_forward(logits, targets, alpha, gamma)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        logits, targets, alpha, gamma = inputs
        ctx.save_for_backward(logits, targets)
        ctx.alpha, ctx.gamma = alpha, gamma

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        # loss = w m ce, w = alpha_t, m = q ** gamma, q = 1 - p_t = p + t - 2 p t:
        #   dloss/dx = w (dm/dq (1 - 2t) p (1 - p) ce + m (p - t))
        #   dloss/dt = w (dm/dq (1 - 2p) ce - m x) + dw/dt m ce
        x, t = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            wanted = [v for v, need in zip((x, t), ctx.needs_input_grad) if need]
            loss = _focal_loss_composite(x, t, alpha, gamma)
            grads = iter(torch.autograd.grad(loss, wanted, grad, create_graph=True))
            need_x, need_t = ctx.needs_input_grad[:2]
            return next(grads) if need_x else None, next(grads) if need_t else None, None, None
        p, ce, q = _focal_parts(x, t)
        m: Tensor | float = 1.0
        dm_ce: Tensor | None = None  # dm/dq * ce
        if gamma != 0:
            m, dm_ce = _modulation(q, ce, gamma)
        grad_w = grad  # grad * alpha_t
        if alpha >= 0:
            grad_w = t.mul(2 * alpha - 1).add_(1 - alpha).mul_(grad)
        grad_t = None
        if ctx.needs_input_grad[1]:
            grad_t = -m * x
            if dm_ce is not None:
                grad_t = grad_t + dm_ce * (1 - 2 * p)
            grad_t = grad_t * grad_w
            if alpha >= 0:
                grad_t = grad_t + (2 * alpha - 1) * m * ce * grad
        grad_x = None
        if ctx.needs_input_grad[0]:  # in the buffers of p, q and dm_ce
            if dm_ce is not None:
                dp = q.copy_(p).addcmul_(p, p, value=-1)  # dp/dx = p (1 - p)
                dm_ce.mul_(dp).addcmul_(dm_ce, t, value=-2)  # dm/dq ce dq/dx
            grad_x = p.sub_(t)  # dce/dx = p - t
            if isinstance(m, Tensor):
                grad_x.mul_(m)
            if dm_ce is not None:
                grad_x.add_(dm_ce)
            grad_x.mul_(grad_w)
        return grad_x, grad_t, None, None


def sigmoid_focal_loss(
    logits: Float[Tensor, "*shape"],
    targets: Float[Tensor, "*shape"],
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Float[Tensor, "*shape"]:
    """Focal loss on independent sigmoid outputs (RetinaNet), unreduced.

    ``loss = alpha_t * (1 - p_t) ** gamma * BCE(logits, targets)`` with ``p = sigmoid(logits)``,
    ``p_t = p * t + (1 - p) * (1 - t)`` and ``alpha_t = alpha * t + (1 - alpha) * (1 - t)``.

    The elementwise steps run in a few reused buffers and the gradient is written out (see
    ``_SigmoidFocalLoss``), so a ``[B, A, K]`` loss costs three full-size tensors forward and
    keeps none for backward. Gradients flow to ``logits`` and to (soft) ``targets``.

    Args:
        logits: raw scores, any shape.
        targets: same shape (or broadcastable), in ``[0, 1]``; soft targets are allowed.
        alpha: weight of the positive term in ``[0, 1]``; a negative value disables weighting.
        gamma: focusing exponent, ``>= 0``; ``gamma = 0`` gives (alpha-weighted) BCE.

    Returns:
        The broadcast shape of the inputs, in float32 (float64 for float64 inputs), also under
        autocast. Finite with finite gradients for any finite logits, including saturated ones
        (``|logits| ~ 1e4``) and any ``gamma >= 0``.
    """
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1] or negative to disable it, got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    logits = _at_least_float32(logits)
    logits, targets = torch.broadcast_tensors(logits, targets.to(logits.dtype))
    loss: Tensor = _SigmoidFocalLoss.apply(logits, targets, float(alpha), float(gamma))
    return loss


class _SigmoidFocalLossLabels(torch.autograd.Function):
    """``_SigmoidFocalLoss`` of one-hot targets given as labels: no target tensor of the size of
    the logits is made. Every element is computed as a negative (``t = 0``) in place, then the
    positives' own class (one element a row) is recomputed with ``t = 1`` on a ``[..., 1]``
    gather and scattered back; rows outside ``valid`` are zeroed."""

    @staticmethod
    def forward(
        logits: Tensor,
        labels: Tensor,
        positive: Tensor,
        valid: Tensor,
        alpha: float,
        gamma: float,
    ) -> Tensor:
        index = labels[..., None]  # [..., 1]
        x_own = logits.gather(-1, index)  # [..., 1]
        loss = _focal_forward(logits, None, alpha, gamma)  # [..., K] all negatives
        own = _focal_forward(x_own, torch.ones_like(x_own), alpha, gamma)
        own = torch.where(positive[..., None], own, loss.gather(-1, index))
        loss.scatter_(-1, index, own)
        return loss.masked_fill_(~valid[..., None], 0.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        logits, labels, positive, valid, alpha, gamma = inputs
        ctx.save_for_backward(logits, labels, positive, valid)
        ctx.alpha, ctx.gamma = alpha, gamma

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        x, labels, positive, valid = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        index = labels[..., None]  # [..., 1]
        keep = valid[..., None]  # [..., 1]
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            classes = torch.arange(x.shape[-1], device=x.device)
            targets = ((index == classes) & positive[..., None]).to(x.dtype)  # [..., K]
            loss = _focal_loss_composite(x, targets, alpha, gamma)
            loss = torch.where(keep, loss, torch.zeros_like(loss))
            (grad_x,) = torch.autograd.grad(loss, [x], grad, create_graph=True)
            return grad_x, None, None, None, None, None
        grad = grad.expand_as(x)
        x_own = x.gather(-1, index)
        grad_own = grad.gather(-1, index)
        grad_x = _focal_grad_logits(x, None, grad, alpha, gamma)  # [..., K] all negatives
        own = _focal_grad_logits(x_own, torch.ones_like(x_own), grad_own, alpha, gamma)
        own = torch.where(positive[..., None], own, grad_x.gather(-1, index))
        grad_x.scatter_(-1, index, own)
        return grad_x.masked_fill_(~keep, 0.0), None, None, None, None, None


def sigmoid_focal_loss_labels(
    logits: Float[Tensor, "*batch K"],
    labels: Int[Tensor, "*batch"],
    positive: Bool[Tensor, "*batch"],
    *,
    valid: Bool[Tensor, "*batch"] | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Float[Tensor, "*batch K"]:
    """``sigmoid_focal_loss`` with one-hot targets given by class labels, unreduced.

    The target of row ``i`` is ``one_hot(labels[i], K)`` where ``positive[i]`` and all zeros
    elsewhere; rows outside ``valid`` get loss exactly 0 and no gradient. The values are those
    of ``torch.where(valid[..., None], sigmoid_focal_loss(logits, targets), 0)``, without
    building the float ``targets`` (nor the mask) of the size of ``logits``: in eager mode that
    saves two or three full-size tensors. Under ``torch.compile`` it is that
    composition, which inductor fuses into one pass. Gradients flow to ``logits`` only.

    Args:
        logits: ``[..., K]`` raw scores.
        labels: ``[...]`` classes in ``[0, K)`` where ``positive``; ignored elsewhere (any value).
        positive: ``[...]`` True for rows whose target is their label's one-hot vector.
        valid: ``[...]`` optional, False for rows to leave out (e.g. ignored anchors).
        alpha, gamma: as in ``sigmoid_focal_loss``.

    Returns:
        ``[..., K]``, float32 (float64 for float64 logits), also under autocast.
    """
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1] or negative to disable it, got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    logits = _at_least_float32(logits)
    rows = logits.shape[:-1]
    positive = positive.expand(rows)
    labels = torch.where(positive, labels.expand(rows), 0).long()  # in range everywhere
    valid = torch.ones_like(positive) if valid is None else valid.expand(rows)
    if torch.compiler.is_compiling():  # inductor fuses the one-hot targets away; no scatter
        classes = torch.arange(logits.shape[-1], device=logits.device)  # [K]
        targets = ((labels[..., None] == classes) & positive[..., None]).to(logits.dtype)
        focal: Tensor = _SigmoidFocalLoss.apply(logits, targets, float(alpha), float(gamma))
        return torch.where(valid[..., None], focal, torch.zeros_like(focal))
    loss: Tensor = _SigmoidFocalLossLabels.apply(
        logits, labels, positive, valid, float(alpha), float(gamma)
    )
    return loss


def softmax_cross_entropy(
    logits: Float[Tensor, "*batch K"],
    labels: Int[Tensor, "*batch"],
    *,
    valid: Bool[Tensor, "*batch"] | None = None,
    label_smoothing: float = 0.0,
) -> Float[Tensor, "*batch"]:
    """Cross-entropy of a softmax over the last dim, unreduced.

    With ``label_smoothing = ε`` the target is ``(1 - ε) * one_hot(label) + ε / K``, as in
    ``torch.nn.functional.cross_entropy``.

    Args:
        logits: ``[..., K]`` raw class scores.
        labels: ``[...]`` integer class indices in ``[0, K)`` wherever ``valid`` is True
            (broadcastable against ``logits[..., 0]``). Labels outside that range are an error;
            rows to skip are marked with ``valid`` rather than a sentinel label.
        valid: ``[...]`` optional mask; invalid rows get loss exactly 0 (and no gradient) whatever
            their label.
        label_smoothing: ``ε`` in ``[0, 1]``.

    Returns:
        ``[...]`` the loss per row, float32 (float64 for float64 logits).
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    logits = _at_least_float32(logits)
    shape = torch.broadcast_shapes(logits.shape[:-1], labels.shape)
    if valid is not None:
        shape = torch.broadcast_shapes(shape, valid.shape)
    logits = logits.expand(*shape, logits.shape[-1])
    labels = labels.expand(shape)
    if valid is not None:
        labels = torch.where(valid, labels, torch.zeros_like(labels))
    log_p = torch.log_softmax(logits, dim=-1)  # [..., K]
    loss = -log_p.gather(-1, labels[..., None].long()).squeeze(-1)  # [...]
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss - label_smoothing * log_p.mean(dim=-1)
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss


def l1_loss(
    pred: Float[Tensor, "*shape"], target: Float[Tensor, "*shape"]
) -> Float[Tensor, "*shape"]:
    """``|pred - target|`` elementwise, unreduced."""
    return (pred - target).abs()


def smooth_l1_loss(
    pred: Float[Tensor, "*shape"], target: Float[Tensor, "*shape"], *, beta: float
) -> Float[Tensor, "*shape"]:
    """Huber-style loss, unreduced: ``0.5 d² / beta`` for ``d < beta``, else ``d - 0.5 beta``.

    ``d = |pred - target|``. ``beta = 0`` is exactly the L1 loss (as in torch and torchvision).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    diff = (pred - target).abs()
    if beta == 0:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def giou_loss(
    pred_boxes: Float[Tensor, "*shape 4"],
    target_boxes: Float[Tensor, "*shape 4"],
    *,
    eps: float = 1e-7,
) -> Float[Tensor, "*shape"]:
    """``1 - GIoU`` of aligned pairs of xyxy boxes, unreduced, in ``[0, 2]``.

    Zero when ``pred_boxes == target_boxes`` (boxes with positive area). Finite, with finite
    gradients, for degenerate (zero-area) boxes; ``eps`` keeps the divisions defined.
    """
    return 1 - aligned_generalized_box_iou(pred_boxes, target_boxes, eps=eps)


def masked_sum(
    values: Float[Tensor, "*shape"],
    mask: Bool[Tensor, "*shape"],
    *,
    dim: int | tuple[int, ...] | None = None,
) -> Float[Tensor, "*reduced"]:
    """Sum of ``values`` where ``mask`` (broadcast to ``values``) is True.

    Masked-out entries contribute exactly 0 even if they are inf or NaN; they get zero gradient,
    so they must only be finite where computed (every loss here is). ``dim = None`` sums
    everything into a scalar tensor.
    """
    masked = torch.where(mask, values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def normalize(
    total: Float[Tensor, "*shape"], count: Tensor | float, *, min_count: float = 1.0
) -> Float[Tensor, "*shape"]:
    """``total / max(count, min_count)``: a zero count gives 0 (for a zero total), not NaN.

    ``count`` is a tensor (e.g. the number of positives, possibly a running average) or a number,
    broadcast against ``total``. No host sync.
    """
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return total / count.clamp(min=min_count)


def masked_mean(
    values: Float[Tensor, "*shape"],
    mask: Bool[Tensor, "*shape"],
    *,
    dim: int | tuple[int, ...] | None = None,
    normalizer: Tensor | float | None = None,
    min_count: float = 1.0,
) -> Float[Tensor, "*reduced"]:
    """Mean of ``values`` over the entries where ``mask`` (broadcast to ``values``) is True.

    The count is that of the selected elements (of the broadcast mask) unless ``normalizer``
    gives it, e.g. ``num_pos`` to average a ``[B, A, 4]`` box loss per positive rather than per
    coordinate. The count is clamped to ``min_count``, so an empty mask gives 0 with zero
    (finite) gradients.
    """
    total = masked_sum(values, mask, dim=dim)
    if normalizer is None:
        selected = mask.expand(torch.broadcast_shapes(mask.shape, values.shape))
        normalizer = selected.sum() if dim is None else selected.sum(dim=dim)
    return normalize(total, normalizer, min_count=min_count)


def quality_focal_loss(
    logits: Float[Tensor, "*shape"],
    targets: Float[Tensor, "*shape"],
    *,
    beta: float = 2.0,
) -> Float[Tensor, "*shape"]:
    """Quality focal loss (Generalized Focal Loss, Li et al., NeurIPS 2020), unreduced::

        QFL(σ) = -|y - σ|^β · ((1 - y) log(1 - σ) + y log σ),    σ = sigmoid(logits)

    i.e. binary cross-entropy against a soft target ``y`` in ``[0, 1]`` (GFL: the IoU of a
    positive's predicted box with its gt, 0 for negatives), modulated by the distance of the
    prediction from the target. At ``y = 1`` it is ``-(1 - σ)^β log σ`` and at ``y = 0``
    ``-σ^β log(1 - σ)``: the focal loss with ``gamma = β`` and no ``alpha`` balancing.

    Args:
        logits: raw scores, any shape.
        targets: soft targets in ``[0, 1]``, broadcastable against ``logits`` (a scalar 0 gives
            the loss of all-negative targets without a full-size target tensor).
        beta: modulating exponent, ``>= 0`` (2 in the paper); ``beta = 0`` is plain BCE.

    Returns:
        The broadcast shape, float32 (float64 for float64 logits), also under autocast.
        Gradients flow to ``logits`` through the BCE and the modulating factor (not detached,
        as in the paper's code), and to ``targets`` if they require them (detach IoU targets).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    logits = _at_least_float32(logits)
    logits, targets = torch.broadcast_tensors(logits, targets.to(logits.dtype))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if beta == 0:
        return bce
    distance = (targets - torch.sigmoid(logits)).abs()  # |y - σ|
    # as in the focal loss: no gradient through the power below `tiny`, where it would be
    # infinite for beta < 1
    return bce * distance.clamp(min=torch.finfo(logits.dtype).tiny).pow(beta)


def quality_focal_loss_labels(
    logits: Float[Tensor, "*batch K"],
    labels: Int[Tensor, "*batch"],
    scores: Float[Tensor, "*batch"],
    positive: Bool[Tensor, "*batch"],
    *,
    valid: Bool[Tensor, "*batch"] | None = None,
    beta: float = 2.0,
) -> Float[Tensor, "*batch K"]:
    """:func:`quality_focal_loss` of the targets ``scores[i] · one_hot(labels[i], K)`` on the
    ``positive`` rows and all zeros on the others, without building the target tensor.

    Every element is first computed as a negative (``y = 0``); the positives' own class (one
    element a row) is recomputed with ``y = scores`` on a ``[..., 1]`` gather and scattered
    back. Rows outside ``valid`` get loss exactly 0 and no gradient.

    Args:
        logits: ``[..., K]`` raw scores.
        labels: ``[...]`` classes in ``[0, K)`` where ``positive``; any value elsewhere.
        scores: ``[...]`` soft targets in ``[0, 1]`` where ``positive`` (finite); any value
            elsewhere.
        positive: ``[...]`` rows whose target is ``scores · one_hot(labels)``.
        valid: ``[...]`` optional, False for rows to leave out (e.g. ignored anchors).
        beta: as in :func:`quality_focal_loss`.

    Returns:
        ``[..., K]``, float32 (float64 for float64 logits), also under autocast.
    """
    logits = _at_least_float32(logits)
    rows = logits.shape[:-1]
    positive = positive.expand(rows)
    index = torch.where(positive, labels.expand(rows), 0).long()[..., None]  # [..., 1]
    target = torch.where(positive, scores.expand(rows).to(logits.dtype), 0.0)[..., None]
    negative = quality_focal_loss(logits, logits.new_zeros(()), beta=beta)  # [..., K], y = 0
    own = quality_focal_loss(logits.gather(-1, index), target, beta=beta)  # [..., 1]
    own = torch.where(positive[..., None], own, negative.gather(-1, index))
    loss = negative.scatter(-1, index, own)  # [..., K]
    if valid is None:
        return loss
    return torch.where(valid.expand(rows)[..., None], loss, torch.zeros_like(loss))


def distribution_focal_loss(
    logits: Float[Tensor, "*batch N"], targets: Float[Tensor, "*batch"]
) -> Float[Tensor, "*batch"]:
    """Distribution focal loss (Generalized Focal Loss, Li et al., NeurIPS 2020),
    unreduced: one value per distribution.

    A distance ``y`` (in stride units) between the bins ``y_i = i = floor(y)`` and
    ``y_{i+1} = i + 1`` is taught to the softmax ``S = softmax(logits)`` over the
    ``N = reg_max + 1`` bins as::

        DFL(S_i, S_{i+1}) = -((y_{i+1} - y) log S_i + (y - y_i) log S_{i+1})

    the cross-entropy against the two-bin distribution whose mean is ``y``
    (:func:`fdet.ops.coding.distribution_to_distances` integrates it back to ``y`` exactly).
    It is smallest, with zero gradient, when ``S`` is that distribution. ``y = reg_max`` (the
    last bin) is allowed: it puts all the weight on the last bin. GFL clamps targets into
    ``[0, reg_max - eps]`` (:func:`fdet.ops.coding.encode_distances` with ``max_distance``).

    Args:
        logits: ``[..., N]`` unnormalised log-probabilities of the bins, ``N >= 2``.
        targets: ``[...]`` distances in ``[0, N - 1]``; must be finite (use stand-ins where the
            loss is masked out: the bin index of a NaN is taken as 0, never out of range).

    Returns:
        ``[...]``, float32 (float64 for float64 logits), also under autocast.
    """
    bins = logits.shape[-1]
    if bins < 2:
        raise ValueError(f"distribution_focal_loss needs at least 2 bins, got {bins}")
    logits = _at_least_float32(logits)
    y = targets.to(logits.dtype)
    left = torch.nan_to_num(y.floor(), nan=0.0).clamp(0, bins - 2)  # [...] i = floor(y)
    weight_left = left + 1 - y  # y_{i+1} - y
    weight_right = y - left  # y - y_i
    index = left.long()[..., None]  # [..., 1]
    log_probs = torch.log_softmax(logits, dim=-1)  # [..., N]
    log_left = log_probs.gather(-1, index).squeeze(-1)  # log S_i
    log_right = log_probs.gather(-1, index + 1).squeeze(-1)  # log S_{i+1}
    return -(weight_left * log_left + weight_right * log_right)
