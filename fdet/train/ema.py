"""An exponential moving average (EMA) of a model's weights, as a pure update over tensor trees.

The state is a :class:`EmaState`: named copies of every parameter and buffer and the number of
updates so far (a 0-dim int64 tensor kept on the CPU, so that it is counted in place and read
without a device sync). :func:`ema_update` returns a new state after one optimizer step (the
``n``-th update, ``n = state.updates + 1``, uses the decay :func:`ema_decay` gives for ``n``)::

    ema = state.params[k] * d + live[k] * (1 - d)        # floating parameters and buffers
    ema = live[k]                                        # integer buffers (num_batches_tracked)

:func:`ema_update_` is the same update done in place on the state's tensors, the count included
(no new allocations), for the training loop. To evaluate, :func:`swapped_in` loads the averaged
weights into the model for the duration of a ``with`` block and restores the raw ones on exit,
bit for bit, also when the block raises. :func:`ema_state_dict` and :func:`ema_load_state_dict`
write and read the state as plain dicts of tensors and ints (``torch.load(...,
weights_only=True)``).

Models wrapped by ``DistributedDataParallel`` or ``torch.compile`` are unwrapped first, so names
never carry ``module.`` or ``_orig_mod.`` prefixes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fdet.train.distributed import unwrap


class EmaState(NamedTuple):
    """Averaged copies of a model's parameters and buffers, by name, and the update count
    (0-dim int64 CPU tensor; ``int(state.updates)`` reads it)."""

    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    updates: Tensor


def _count(n: int) -> Tensor:
    return torch.tensor(n, dtype=torch.int64)


def _named(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every parameter and buffer of the unwrapped model by name (shared ones under each name)."""
    base = unwrap(model)
    params: dict[str, Tensor] = dict(base.named_parameters(remove_duplicate=False))
    buffers: dict[str, Tensor] = dict(base.named_buffers(remove_duplicate=False))
    return params, buffers


def _check_names(state: EmaState, params: Mapping[str, Any], buffers: Mapping[str, Any]) -> None:
    for kind, have, want in (
        ("parameters", state.params, params),
        ("buffers", state.buffers, buffers),
    ):
        if have.keys() != want.keys():
            missing = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            raise ValueError(
                f"the EMA state does not match the model's {kind}: "
                f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{' …' if len(extra) > 5 else ''}"
            )


def ema_init(model: nn.Module) -> EmaState:
    """A state whose averages start at the model's current weights (detached copies)."""
    params, buffers = _named(model)
    with torch.no_grad():
        return EmaState(
            params={k: p.detach().clone() for k, p in params.items()},
            buffers={k: b.detach().clone() for k, b in buffers.items()},
            updates=_count(0),
        )


def ema_decay(decay: float, warmup_updates: int, updates: int) -> float:
    """The decay of the ``updates``-th update: ``decay × (1 - exp(-updates / warmup_updates))``,
    or ``decay`` itself when ``warmup_updates`` is 0. It starts near 0, so the first averages
    follow the (poor, fast-changing) early weights, and tends to ``decay``."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if warmup_updates < 0 or updates < 0:
        raise ValueError(
            f"warmup_updates and updates must be >= 0, got {warmup_updates} and {updates}"
        )
    if warmup_updates == 0:
        return decay
    return decay * (1.0 - math.exp(-updates / warmup_updates))


def _kinds(tree: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Names of the floating (averaged) tensors and of the others (copied), in tree order."""
    averaged = [k for k, t in tree.items() if t.is_floating_point() or t.is_complex()]
    kept = set(averaged)
    return averaged, [k for k in tree if k not in kept]


def ema_update(state: EmaState, model: nn.Module, *, decay: float, warmup_updates: int) -> EmaState:
    """The state after one more update with the model's current weights; ``state`` is left
    untouched. Floating tensors move towards the model's by ``1 - d`` (one fused
    ``torch._foreach_lerp`` over all of them), other tensors are copied."""
    updates = int(state.updates) + 1
    weight = 1.0 - ema_decay(decay, warmup_updates, updates)
    params, buffers = _named(model)
    _check_names(state, params, buffers)
    new: list[dict[str, Tensor]] = []
    with torch.no_grad():
        for ema, live in ((state.params, params), (state.buffers, buffers)):
            floats, others = _kinds(ema)
            lerped = (
                torch._foreach_lerp([ema[k] for k in floats], [live[k] for k in floats], weight)
                if floats
                else ()
            )
            out = dict(zip(floats, lerped))
            out.update({k: live[k].detach().clone() for k in others})
            new.append({k: out[k] for k in ema})
    return EmaState(params=new[0], buffers=new[1], updates=_count(updates))


def ema_update_(
    state: EmaState, model: nn.Module, *, decay: float, warmup_updates: int
) -> EmaState:
    """:func:`ema_update` done in place on ``state``'s tensors, the update count included (no
    new tensors); returns ``state`` itself, for symmetry with :func:`ema_update`."""
    updates = int(state.updates) + 1
    weight = 1.0 - ema_decay(decay, warmup_updates, updates)
    params, buffers = _named(model)
    _check_names(state, params, buffers)
    with torch.no_grad():
        for ema, live in ((state.params, params), (state.buffers, buffers)):
            floats, others = _kinds(ema)
            if floats:
                torch._foreach_lerp_([ema[k] for k in floats], [live[k] for k in floats], weight)
            if others:
                torch._foreach_copy_([ema[k] for k in others], [live[k] for k in others])
        state.updates.fill_(updates)
    return state


@contextlib.contextmanager
def swapped_in(model: nn.Module, state: EmaState) -> Iterator[nn.Module]:
    """Within the block, ``model`` holds the averaged weights; on exit (also by an exception)
    its own weights and buffers are restored exactly. Values are copied in and out, so the
    model's tensors (and an optimizer's references to them) stay the same objects, and
    nothing the block does to the model (BatchNorm statistics in train mode) reaches the
    state. Yields ``model``. ::

        with swapped_in(model, ema):
            metrics = evaluate(model)
    """
    params, buffers = _named(model)
    _check_names(state, params, buffers)
    live = [*params.values(), *buffers.values()]
    averaged = [*(state.params[k] for k in params), *(state.buffers[k] for k in buffers)]
    with torch.no_grad():
        backup = [t.detach().clone() for t in live]
        torch._foreach_copy_(live, averaged)
    try:
        yield model
    finally:
        with torch.no_grad():
            torch._foreach_copy_(live, backup)


def ema_model_state_dict(model: nn.Module, state: EmaState) -> dict[str, Tensor]:
    """``model.state_dict()`` (of the unwrapped model) with the averaged values in place of the
    raw ones: what ``load_state_dict`` takes to make a plain model of the EMA weights."""
    params, buffers = _named(model)
    _check_names(state, params, buffers)
    out: dict[str, Tensor] = {}
    for k, v in unwrap(model).state_dict().items():
        if k in state.params:
            out[k] = state.params[k]
        elif k in state.buffers:
            out[k] = state.buffers[k]
        else:
            out[k] = v
    return out


def ema_state_dict(state: EmaState) -> dict[str, Any]:
    """The state as ``{"params": {...}, "buffers": {...}, "updates": int}`` for checkpoints."""
    return {
        "params": {k: v.detach() for k, v in state.params.items()},
        "buffers": {k: v.detach() for k, v in state.buffers.items()},
        "updates": int(state.updates),
    }


def ema_load_state_dict(
    data: Mapping[str, Any],
    model: nn.Module | None = None,
    *,
    device: str | torch.device | None = None,
) -> EmaState:
    """The state written by :func:`ema_state_dict`. With ``model``, the names, shapes and dtypes
    must match the model's and the tensors move to its devices; with ``device``, to that
    device (the count stays on the CPU)."""
    if not isinstance(data, Mapping) or set(data) != {"params", "buffers", "updates"}:
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"not an EMA state dict (expected params, buffers, updates; got {keys})")
    updates = data["updates"]
    if isinstance(updates, Tensor) and updates.numel() == 1:
        updates = int(updates.item())
    if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
        raise ValueError(f"EMA state: updates must be an integer >= 0, got {updates!r}")
    trees: list[dict[str, Tensor]] = []
    for kind in ("params", "buffers"):
        tree = data[kind]
        if not isinstance(tree, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in tree.items()
        ):
            raise ValueError(f"EMA state: {kind} must map names to tensors")
        trees.append(dict(tree))
    if device is not None:
        trees = [{k: v.to(device) for k, v in tree.items()} for tree in trees]
    state = EmaState(params=trees[0], buffers=trees[1], updates=_count(updates))
    if model is None:
        return state
    params, buffers = _named(model)
    _check_names(state, params, buffers)
    moved: list[dict[str, Tensor]] = []
    for tree, live in ((state.params, params), (state.buffers, buffers)):
        out = {}
        for k, t in tree.items():
            ref = live[k]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(
                    f"EMA state: {k} is {tuple(t.shape)} {t.dtype}, "
                    f"the model's is {tuple(ref.shape)} {ref.dtype}"
                )
            out[k] = t.to(ref.device)
        moved.append(out)
    return EmaState(params=moved[0], buffers=moved[1], updates=state.updates)
