"""Training steps. A step factory turns the training context into ``step() -> values``: one
optimizer update over ``accumulate`` micro-batches, returning what to log.

The step knows only the detector contract (:mod:`fdet.models.detectors.base`): the loss is a set
of named :class:`~fdet.models.detectors.Term` s, each a summed loss with its own count and weight.
:func:`backward_terms` back-propagates ``Σ weight · total / max(count, 1)`` where each count is
the term's count over **all micro-batches and all processes** of the step, so the gradient is
exactly that of the whole batch, for any set of terms:

- one micro-batch: the counts are all-reduced (a vector, one collective, no host sync) and the
  normalized loss is back-propagated once;
- several micro-batches whose terms share one count (a classification and a box term both
  normalized by the positives): each micro-batch back-propagates its plain sums and the summed
  gradients are divided by the step's count at the end;
- several micro-batches and several counts (RPN + RoI heads ...): each group of terms sharing a
  count back-propagates into a gradient buffer of its own, and the buffers are combined with
  their own step-wide counts at the end (one backward pass a group and micro-batch).

Data-parallel averaging over ``W`` processes is accounted for by all-reducing counts as means.
A new kind of step is a new factory that computes its terms in its own way and hands them to
:func:`update` (:func:`backward_terms`, then :func:`apply_update`); the loop is unchanged
(:func:`fdet.train.semi.semi_step`, the teacher–student step, is one).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import LossTerms

__all__ = [
    "Step",
    "StepContext",
    "StepFactory",
    "apply_update",
    "autocast",
    "backward_terms",
    "supervised_step",
    "update",
]

DATA_WAIT = "data_wait_ms"
"""The value a step reports for the milliseconds it waited for its batches."""

Step = Callable[[], dict[str, Tensor]]
"""One optimizer update; returns detached scalars by name (every term, ``loss``, the counts)."""


class StepContext(Protocol):
    """What a step factory reads (:class:`fdet.train.loop.Trainer` provides it)."""

    exp: specs.Experiment
    precision: str  # the precision the run uses: the experiment's, with "auto" resolved
    model: nn.Module  # what forward calls: the detector, wrapped for data parallel if need be
    raw: nn.Module  # the detector itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    batches: Iterator[Any]
    device: torch.device
    forward: Callable[[Tensor], Any]  # model's forward, possibly compiled
    loss_fn: Callable[[Any, Any], LossTerms]  # raw.loss, possibly compiled

    @property
    def world_size(self) -> int: ...  # processes of a data-parallel run


StepFactory = Callable[[StepContext], Step]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``precision`` (``fp32``: none; resolve ``"auto"``
    with :func:`fdet.runtime.resolve_precision` first)."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(
            f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r} (resolve 'auto' "
            "with fdet.runtime.resolve_precision)"
        )
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _mean_over_processes(values: Tensor, world_size: int) -> Tensor:
    if world_size == 1:
        return values
    from fdet.train.distributed import all_reduce_mean

    return all_reduce_mean(values.clone())


def _backward(loss: Tensor, scaler: torch.amp.GradScaler | None, *, retain: bool = False) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward(retain_graph=retain)


def _groups(terms: LossTerms) -> list[list[str]]:
    """Term names grouped by shared count tensor (the same object), in order."""
    by_count: dict[int, list[str]] = {}
    for name, term in terms.items():
        by_count.setdefault(id(term.count), []).append(name)
    return list(by_count.values())


def _check_terms(terms: LossTerms, names: list[str], groups: list[list[str]]) -> None:
    if list(terms) != names:
        raise ValueError(
            f"the loss returned terms {list(terms)} for one micro-batch and {names} for another"
        )
    for group in groups:
        first = terms[group[0]].count
        if any(terms[name].count is not first for name in group[1:]):
            raise ValueError(
                f"the loss terms {group} shared a count tensor in one micro-batch but not in "
                f"another; terms normalized alike must share it in every micro-batch"
            )


def _backward_one(
    terms: LossTerms, *, scaler: torch.amp.GradScaler | None, world_size: int
) -> dict[str, Tensor]:
    """One micro-batch: normalize by the all-reduced counts, back-propagate once."""
    names = list(terms)
    if not names:
        raise ValueError("the loss returned no terms")
    local = torch.stack([terms[n].count.detach().float() for n in names])  # [T]
    denom = _mean_over_processes(local, world_size).clamp(min=1.0)  # [T]
    parts = [terms[n].weight * terms[n].total / denom[i] for i, n in enumerate(names)]
    loss = torch.stack(parts).sum()
    _backward(loss, scaler)
    values = {n: part.detach() for n, part in zip(names, parts)}
    values["loss"] = loss.detach()
    values.update({f"{n}_count": local[i] for i, n in enumerate(names)})
    return values


def backward_terms(
    compute: Callable[[int], LossTerms],
    *,
    accumulate: int,
    model: nn.Module,
    scaler: torch.amp.GradScaler | None = None,
    world_size: int = 1,
) -> dict[str, Tensor]:
    """Back-propagate the exact step objective of ``accumulate`` micro-batches.

    ``compute(i)`` runs micro-batch ``i`` (forward and loss, with gradients) and returns its
    terms. On return, ``model``'s parameters hold the gradient of
    ``Σ_terms weight · Σ_micro,process total / max(Σ_micro,process count, 1)`` (scaled by
    ``scaler`` if given, averaged over processes as data-parallel training expects). ``model`` may
    be wrapped in ``DistributedDataParallel``; gradients are synchronized once a step.

    Returns each term's value under the step-wide count (``name``), their sum (``loss``) and each
    term's count on this process (``name_count``), as detached scalars.
    """
    no_sync = getattr(model, "no_sync", None)
    params = [p for p in model.parameters() if p.requires_grad]
    if accumulate == 1:
        return _backward_one(compute(0), scaler=scaler, world_size=world_size)

    names: list[str] = []
    groups: list[list[str]] = []
    totals: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    buffers: list[list[Tensor | None]] = []
    for i in range(accumulate):
        last = i == accumulate - 1
        # DDP synchronizes the last backward of a single-count step; with several counts every
        # backward is local and the combined gradient is all-reduced below
        sync = last and len(groups) <= 1
        context = contextlib.nullcontext() if sync or no_sync is None else no_sync()
        with context:
            terms = compute(i)
            if i == 0:
                names, groups = list(terms), _groups(terms)
                if not names:
                    raise ValueError("the loss returned no terms")
                buffers = [[None] * len(params) for _ in groups] if len(groups) > 1 else []
            else:
                _check_terms(terms, names, groups)
            for n in names:
                totals[n] = totals.get(n, 0) + terms[n].total.detach()
                counts[n] = counts.get(n, 0) + terms[n].count.detach().float()
            if len(groups) == 1:
                micro_sum = torch.stack([terms[n].weight * terms[n].total for n in names]).sum()
                _backward(micro_sum, scaler)
                continue
            for g, group in enumerate(groups):
                group_sum = torch.stack([terms[n].weight * terms[n].total for n in group]).sum()
                _backward(group_sum, scaler, retain=g < len(groups) - 1)
                for k, p in enumerate(params):
                    if p.grad is not None:
                        held = buffers[g][k]
                        buffers[g][k] = p.grad if held is None else held.add_(p.grad)
                        p.grad = None
    local = torch.stack([counts[n] for n in names])  # [T]
    denom = _mean_over_processes(local, world_size).clamp(min=1.0)  # [T]
    index = {n: i for i, n in enumerate(names)}
    if len(groups) == 1:  # (a loss scale, if any, is removed later: scalars commute)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, denom[0])
    else:
        for k, p in enumerate(params):
            combined = None
            for g, group in enumerate(groups):
                held = buffers[g][k]
                if held is not None:
                    part = held / denom[index[group[0]]]
                    combined = part if combined is None else combined.add_(part)
            p.grad = combined
        if world_size > 1:  # every backward was local: average the combined gradients once
            from fdet.train.distributed import all_reduce_mean

            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            flat = all_reduce_mean(torch.cat([g.flatten() for g in grads]))
            for p, g in zip(params, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p)
    values = {n: terms[n].weight * totals[n] / denom[index[n]] for n in names}
    values["loss"] = torch.stack([values[n] for n in names]).sum()
    values.update({f"{n}_count": counts[n] for n in names})
    return values


def apply_update(
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter] | Iterator[nn.Parameter],
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip_norm: float | None = None,
) -> None:
    """Unscale (fp16), clip, step and zero the gradients: the end of every step."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params), grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def update(ctx: StepContext, compute: Callable[[int], LossTerms]) -> dict[str, Tensor]:
    """One optimizer update of ``ctx`` over ``exp.accumulate`` micro-batches of ``compute``:
    :func:`backward_terms`, then :func:`apply_update`. Returns what :func:`backward_terms`
    does."""
    values = backward_terms(
        compute,
        accumulate=ctx.exp.accumulate,
        model=ctx.model,
        scaler=ctx.scaler,
        world_size=ctx.world_size,
    )
    apply_update(
        ctx.optimizer,
        ctx.model.parameters(),
        scaler=ctx.scaler,
        grad_clip_norm=ctx.exp.grad_clip_norm,
    )
    return values


def supervised_step(ctx: StepContext) -> Step:
    """The supervised step: each micro-batch of ``ctx.batches`` through ``ctx.forward`` (under
    the run's autocast, ``ctx.precision``) and ``ctx.loss_fn``, :func:`backward_terms`, then
    :func:`apply_update`."""
    waited = [0.0]

    def compute(_: int) -> LossTerms:
        start = time.perf_counter()
        batch = next(ctx.batches)
        waited[0] += time.perf_counter() - start
        batch = batch.to(ctx.device, non_blocking=True)
        with autocast(ctx.precision, ctx.device):
            outputs = ctx.forward(batch.images)
        return ctx.loss_fn(outputs, batch)

    def step() -> dict[str, Tensor]:
        waited[0] = 0.0
        values = update(ctx, compute)
        # what the step waited for its batches (host time; 0 when the loader keeps ahead)
        values[DATA_WAIT] = torch.tensor(waited[0] * 1e3, device=values["loss"].device)
        return values

    return step
