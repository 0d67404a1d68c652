"""Learning-rate schedules as pure functions of the iteration."""

from __future__ import annotations

import math

from fdet import specs


def lr_factor(schedule: specs.Schedule, iteration: int, total: int) -> float:
    """The factor applied to the peak learning rate at ``iteration`` (0-based) of ``total``.

    Warm-up first (linear from ``warmup_factor`` to 1, or constant ``warmup_factor``), then the
    decay of ``schedule.kind`` over the whole run (milestones are fractions of ``total``).
    """
    if total <= 0:
        raise ValueError(f"total iterations must be positive, got {total}")
    it = min(max(iteration, 0), total)
    if schedule.kind == "step":
        passed = sum(it >= round(m * total) for m in schedule.milestones)
        decay = schedule.gamma**passed
    elif schedule.kind == "cosine":
        progress = it / total
        decay = schedule.min_factor + (1 - schedule.min_factor) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )
    elif schedule.kind == "poly":
        progress = it / total
        decay = schedule.min_factor + (1 - schedule.min_factor) * (1 - progress) ** schedule.power
    else:
        decay = 1.0
    if schedule.warmup != "none" and it < schedule.warmup_iters:
        if schedule.warmup == "linear":
            alpha = it / schedule.warmup_iters
            warm = schedule.warmup_factor * (1 - alpha) + alpha
        else:
            warm = schedule.warmup_factor
        return warm * decay
    return decay
