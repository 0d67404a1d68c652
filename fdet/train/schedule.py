"""Learning-rate schedules as pure functions of the iteration, built from their specs.

A warm-up spec builds into ``warm(iteration) -> factor`` (1 from its ``iters`` on), a decay spec
into ``decay(iteration, total) -> factor``; :func:`lr_factor` multiplies them. Builders for your
own :class:`fdet.specs.Warmup` or :class:`fdet.specs.Decay` subclasses register the same way::

    @fdet.register(ExpDecay)
    def build_exp_decay(spec: ExpDecay) -> DecayFn:
        return lambda iteration, total: spec.rate ** (-iteration / total)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fdet import specs
from fdet.registry import build, register

__all__ = ["DecayFn", "WarmupFn", "lr_factor"]

WarmupFn = Callable[[int], float]
"""A built warm-up: iteration (0-based) → factor."""

DecayFn = Callable[[int, int], float]
"""A built decay: (iteration, total iterations) → factor."""


def lr_factor(schedule: specs.Schedule, iteration: int, total: int) -> float:
    """The factor applied to the peak learning rate at ``iteration`` (0-based) of ``total``.

    The warm-up's factor (1 after it, or without one) times the decay's over the whole run;
    ``iteration`` is clamped to ``[0, total]``.
    """
    if total <= 0:
        raise ValueError(f"total iterations must be positive, got {total}")
    it = min(max(iteration, 0), total)
    decay = build(schedule.decay)(it, total)
    if schedule.warmup is None:
        return decay
    return build(schedule.warmup)(it) * decay


# --- warm-ups -------------------------------------------------------------------------------------


@register(specs.LinearWarmup)
def build_linear_warmup(spec: specs.LinearWarmup) -> WarmupFn:
    def warm(iteration: int) -> float:
        if iteration >= spec.iters:
            return 1.0
        alpha = iteration / spec.iters
        return spec.factor * (1 - alpha) + alpha

    return warm


@register(specs.ConstantWarmup)
def build_constant_warmup(spec: specs.ConstantWarmup) -> WarmupFn:
    return lambda iteration: spec.factor if iteration < spec.iters else 1.0


# --- decays ---------------------------------------------------------------------------------------


@register(specs.StepDecay)
def build_step_decay(spec: specs.StepDecay) -> DecayFn:
    def decay(iteration: int, total: int) -> float:
        passed = sum(iteration >= round(m * total) for m in spec.milestones)
        return spec.gamma**passed

    return decay


@register(specs.CosineDecay)
def build_cosine_decay(spec: specs.CosineDecay) -> DecayFn:
    def decay(iteration: int, total: int) -> float:
        progress = iteration / total
        return spec.min_factor + (1 - spec.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return decay


@register(specs.PolyDecay)
def build_poly_decay(spec: specs.PolyDecay) -> DecayFn:
    def decay(iteration: int, total: int) -> float:
        progress = iteration / total
        return spec.min_factor + (1 - spec.min_factor) * (1 - progress) ** spec.power

    return decay


@register(specs.ConstantDecay)
def build_constant_decay(spec: specs.ConstantDecay) -> DecayFn:
    return lambda iteration, total: 1.0
