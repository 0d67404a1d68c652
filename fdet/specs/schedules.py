"""Learning-rate schedule specs: a warm-up, then a decay over the whole run.

:class:`Warmup` and :class:`Decay` are extension points. Subclass one with an
``@attrs.frozen(kw_only=True)`` class and register a builder with :func:`fdet.register`:

- a warm-up's builder ``fn(spec) -> (iteration -> factor)`` gives the factor for every
  iteration (1 from ``spec.iters`` on; every warm-up has an ``iters`` field);
- a decay's builder ``fn(spec) -> ((iteration, total) -> factor)`` gives the factor at
  ``iteration`` of a ``total``-iteration run (``iteration / total`` is the progress).

:func:`fdet.train.schedule.lr_factor` multiplies the two.
"""

import attrs

from fdet.specs._core import (
    Spec,
    SpecError,
    each,
    float_tuple,
    non_negative,
    positive,
    probability,
    spec_of,
)


class Warmup(Spec):
    """Base of warm-up specs (abstract: make a subclass). Every subclass has an ``iters`` field:
    the warm-up lasts iterations ``0 … iters - 1`` and its factor is 1 afterwards."""

    __slots__ = ()
    iters: int


class Decay(Spec):
    """Base of decay specs (abstract: make a subclass): the factor on the peak learning rate as
    training progresses, applied after (and multiplied into) the warm-up."""

    __slots__ = ()


@attrs.frozen(kw_only=True)
class LinearWarmup(Warmup):
    """From ``factor × lr`` at iteration 0 linearly up to ``lr`` at iteration ``iters``."""

    iters: int = attrs.field(default=500, validator=non_negative)
    factor: float = attrs.field(default=0.001, validator=probability)


@attrs.frozen(kw_only=True)
class ConstantWarmup(Warmup):
    """``factor × lr`` for the first ``iters`` iterations, then ``lr``."""

    iters: int = attrs.field(default=500, validator=non_negative)
    factor: float = attrs.field(default=0.1, validator=probability)


@attrs.frozen(kw_only=True)
class StepDecay(Decay):
    """Multiply by ``gamma`` at each of ``milestones``: fractions of the run, each rounded to an
    iteration (``round(m × total)``), increasing."""

    milestones: tuple[float, ...] = attrs.field(
        default=(8 / 12, 11 / 12), converter=float_tuple, validator=each(probability)
    )
    gamma: float = attrs.field(default=0.1, validator=positive)

    def __attrs_post_init__(self) -> None:
        if list(self.milestones) != sorted(self.milestones):
            raise SpecError(f"must be increasing, got {self.milestones}", "milestones")


@attrs.frozen(kw_only=True)
class CosineDecay(Decay):
    """Half a cosine from 1 at the start down to ``min_factor`` at the end."""

    min_factor: float = attrs.field(default=0.0, validator=probability)


@attrs.frozen(kw_only=True)
class PolyDecay(Decay):
    """``min_factor + (1 - min_factor) × (1 - progress) ** power``."""

    power: float = attrs.field(default=1.0, validator=positive)
    min_factor: float = attrs.field(default=0.0, validator=probability)


@attrs.frozen(kw_only=True)
class ConstantDecay(Decay):
    """No decay: the peak learning rate until the end."""


@attrs.frozen(kw_only=True)
class Schedule(Spec):
    """Learning rate over iterations: ``warmup`` (None: none), then ``decay``; the factor on the
    peak rate is the product of both. The default is a 500-iteration linear warm-up from
    0.001 × lr, then ×0.1 at 8/12 and 11/12 of the run."""

    warmup: Warmup | None = attrs.field(
        default=LinearWarmup(), validator=spec_of(Warmup, optional=True)
    )
    decay: Decay = attrs.field(default=StepDecay(), validator=spec_of(Decay))


__all__ = [
    "ConstantDecay",
    "ConstantWarmup",
    "CosineDecay",
    "Decay",
    "LinearWarmup",
    "PolyDecay",
    "Schedule",
    "StepDecay",
    "Warmup",
]
