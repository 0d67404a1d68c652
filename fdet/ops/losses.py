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

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from fdet.ops.boxes import aligned_generalized_box_iou

__all__ = [
    "giou_loss",
    "l1_loss",
    "masked_mean",
    "masked_sum",
    "normalize",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "softmax_cross_entropy",
]


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


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

    Args:
        logits: raw scores, any shape.
        targets: same shape (or broadcastable), in ``[0, 1]``; soft targets are allowed.
        alpha: weight of the positive term in ``[0, 1]``; a negative value disables weighting.
        gamma: focusing exponent, ``>= 0``; ``gamma = 0`` gives (alpha-weighted) BCE.

    Returns:
        The broadcast shape of the inputs, in float32 (float64 for float64 inputs). Finite with
        finite gradients for any finite logits, including saturated ones (``|logits| ~ 1e4``) and
        any ``gamma >= 0``.
    """
    if alpha > 1:
        raise ValueError(f"alpha must be in [0, 1] or negative to disable it, got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    logits = _at_least_float32(logits)
    logits, targets = torch.broadcast_tensors(logits, targets.to(logits.dtype))
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    one_minus_p_t = targets * (1 - p) + (1 - targets) * p
    # Where 1 - p_t rounds to 0 the true gradient of the modulating factor is 0; the clamp
    # keeps pow's derivative (infinite at 0 for gamma < 1) out of the chain rule there.
    modulating = one_minus_p_t.clamp(min=torch.finfo(logits.dtype).tiny) ** gamma
    loss = ce * modulating
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
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
