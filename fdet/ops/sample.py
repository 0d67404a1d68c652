"""Sampling: which of the labelled anchors or proposals enter the classification loss.

Two-stage detectors label far more candidates than they train on: the RPN keeps a fixed number
of anchors an image (256 in Faster R-CNN), the RoI heads a fixed number of proposals (512), with
at most a given share of positives. :func:`sample_balanced` draws them for a whole padded batch at
once, with static shapes and no host syncs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = ["Sampled", "sample_balanced"]


class Sampled(NamedTuple):
    """The chosen elements of each image.

    Attributes:
        positive: ``[B, N]`` True for the chosen positives.
        negative: ``[B, N]`` True for the chosen negatives; never True where ``positive`` is.
    """

    positive: Bool[Tensor, "B N"]
    negative: Bool[Tensor, "B N"]


def sample_balanced(
    positive: Bool[Tensor, "B N"],
    negative: Bool[Tensor, "B N"],
    *,
    num_samples: int,
    positive_fraction: float,
    keys: Float[Tensor, "B N"] | None = None,
    generator: torch.Generator | None = None,
) -> Sampled:
    """Draw a balanced sample of positives and negatives in every image, uniformly at random.

    Per image, with ``P`` positives and ``Q`` negatives available::

        num_pos = min(P, floor(num_samples * positive_fraction))
        num_neg = min(Q, num_samples - num_pos)

    so an image short of positives fills its sample with negatives (the rule of Faster R-CNN's
    RPN and RoI heads), and an image short of both takes everything it has.

    The choice: every element gets a key (``keys``, or ``torch.rand`` drawn with ``generator``);
    the ``num_pos`` positives with the largest keys and the ``num_neg`` negatives with the largest
    keys are taken. Ties between equal keys go to the lower index. With independent uniform keys
    every subset of the right size is equally likely, as with a random permutation. Passing
    ``keys`` fixes the choice: tests and parity checks use it to reproduce another sampler's
    draw (give the elements to take larger keys than the rest). Keys may be any floats; the order
    of NaN keys is unspecified.

    ``positive`` and ``negative`` should be disjoint; where both are True the element counts as
    positive only (raising would need a host sync). Elements in neither mask (ignored anchors,
    padded columns) are never chosen, and they take no part in the counts, so appending columns
    that are in neither mask changes nothing, whatever their keys.

    Args:
        positive, negative: ``[B, N]`` candidate masks.
        num_samples: the sample size an image, ``>= 0``.
        positive_fraction: the largest share of positives, in ``[0, 1]``.
        keys: ``[B, N]`` sort keys, larger first; ``None`` draws uniform ones.
        generator: the random generator for the drawn keys (eager only: under ``torch.compile``
            pass ``keys`` or no generator).

    Returns:
        :class:`Sampled` masks of shape ``[B, N]``.

    One stable sort of ``[B, N]`` keys, then cumulative counts: static shapes, no host syncs,
    safe under ``torch.compile(fullgraph=True)``. Not differentiable (masks only).
    """
    if num_samples < 0:
        raise ValueError(f"sample_balanced: num_samples must be >= 0, got {num_samples}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(
            f"sample_balanced: positive_fraction must be in [0, 1], got {positive_fraction}"
        )
    if positive.shape != negative.shape or positive.dim() != 2:
        raise ValueError(
            "sample_balanced: positive and negative must both be [B, N], got "
            f"{tuple(positive.shape)} and {tuple(negative.shape)}"
        )
    negative = negative & ~positive  # positive wins where both are set
    if keys is None:
        keys = torch.rand(positive.shape, generator=generator, device=positive.device)
    elif keys.shape != positive.shape:
        raise ValueError(
            f"sample_balanced: keys must be {tuple(positive.shape)}, got {tuple(keys.shape)}"
        )

    max_pos = int(num_samples * positive_fraction)
    num_pos = positive.sum(dim=1, keepdim=True).clamp(max=max_pos)  # [B, 1]
    num_neg = negative.sum(dim=1, keepdim=True).clamp(max=num_samples - num_pos)  # [B, 1]

    # one random order shared by both masks; an element's rank within its mask is the running
    # count of that mask along the order
    order = keys.detach().sort(dim=1, descending=True, stable=True).indices  # [B, N]
    pos_sorted = positive.gather(1, order)  # [B, N]
    neg_sorted = negative.gather(1, order)  # [B, N]
    take_pos = pos_sorted & (pos_sorted.cumsum(dim=1) <= num_pos)  # [B, N] in key order
    take_neg = neg_sorted & (neg_sorted.cumsum(dim=1) <= num_neg)  # [B, N]
    return Sampled(
        positive=torch.zeros_like(positive).scatter(1, order, take_pos),
        negative=torch.zeros_like(negative).scatter(1, order, take_neg),
    )
