"""The training loop: a step, then the hooks, until the iterations are done or a hook stops it.

Everything the loop, the steps and the hooks share is the :class:`Trainer` of a run: the
experiment, the model (raw and wrapped for data parallel), optimizer, gradient scaler, EMA
weights, data, counters, run folder and outputs. The loop itself only sets the learning rate,
calls the step, updates the EMA weights and calls the hooks::

    trainer = Trainer(...)                       # assembled by fdet.train.engine.train
    run_loop(trainer, supervised_step(trainer), default_hooks(...))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

import fdet
from fdet import specs
from fdet.train.schedule import lr_factor
from fdet.train.state import TrainState, rng_state
from fdet.train.step import Step

__all__ = ["Hook", "Trainer", "run_loop"]


@attrs.define(eq=False)
class Trainer:
    """One run's training context (mutable; the spec tree it holds is not)."""

    exp: specs.Experiment
    out: Path
    dist: Any  # fdet.train.distributed.DistInfo
    device: torch.device
    raw: nn.Module  # the detector
    model: nn.Module  # the detector, wrapped for data parallel when there are several processes
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: Any  # fdet.train.ema.EmaState | None
    datasets: Any  # fdet.train.data.DataSets
    batches: Iterator[Any]
    forward: Callable[[Tensor], Any]
    loss_fn: Callable[[Any, Any], Any]
    base_lrs: list[float]
    logs: Any  # fdet.train.hooks.Logs
    console: Any  # fdet.train.hooks.Console
    precision: str = "fp32"  # the experiment's precision, "auto" resolved for the device
    state: TrainState = attrs.field(factory=TrainState)
    started: float = attrs.field(factory=time.perf_counter)
    stop: str | None = None  # "interrupted" or "early" once a hook stops the run
    save_requested: bool = False  # a hook asks for a checkpoint at the end of this iteration
    improved: bool = False  # the last evaluation set a new best AP: save best.pt too
    last_checkpoint: Path | None = None
    metrics: Any = None
    ema_metrics: Any = None

    @property
    def world_size(self) -> int:
        return int(self.dist.world_size)

    @property
    def is_main(self) -> bool:
        return bool(self.dist.is_main)

    @property
    def is_last(self) -> bool:
        return self.state.iteration >= self.exp.iterations

    def checkpoint_payload(self) -> dict[str, Any]:
        """Weights, optimizer, scaler, EMA, counters, RNG states, the spec, and the class names
        in label order (what ``fdet eval`` matches other data sets' categories against)."""
        ema = None
        if self.ema is not None:
            from fdet.train.ema import ema_state_dict

            ema = ema_state_dict(self.ema)
        return {
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": ema,
            "state": attrs.asdict(self.state),
            "rng": rng_state(),
            "iteration": self.state.iteration,
            "spec": specs.to_json(self.exp),
            "class_names": list(self.datasets.val.category_names),
            "fdet_version": fdet.__version__,
        }

    def save(self, *, best: bool = False) -> Path:
        """A checkpoint of this iteration (rank 0 writes it; every rank gets its path)."""
        from fdet.train.run_dir import save_checkpoint

        path = self.out / "checkpoints" / f"iter_{self.state.iteration:08d}.pt"
        if self.is_main:
            path = save_checkpoint(
                self.out,
                self.checkpoint_payload(),
                iteration=self.state.iteration,
                keep=self.exp.keep_checkpoints,
                best=best,
            )
        self.last_checkpoint = path
        return path

    def restore(self, ckpt: dict[str, Any], *, source: str | Path | None = None) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint_payload`. What does not fit
        this run raises a one-line :class:`~fdet.train.checkpoint.CheckpointError` naming
        ``source``."""
        from fdet.train.checkpoint import CheckpointError, load_weights
        from fdet.train.state import set_rng_state

        where = source if source is not None else "checkpoint"
        load_weights(self.raw, ckpt["model"], source=where)
        try:
            self.state = TrainState(**ckpt["state"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and ckpt.get("scaler") is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            if self.ema is not None and ckpt.get("ema") is not None:
                from fdet.train.ema import ema_load_state_dict

                self.ema = ema_load_state_dict(ckpt["ema"], self.raw, device=self.device)
            set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{where}: does not fit this run: {first}") from e


class Hook:
    """Something done around the steps: logging, evaluation, checkpoints, interrupts ...

    ``start`` runs before the first step, ``after_step`` after each (``values``: what the step
    returned), ``end`` after the last or when a hook set ``trainer.stop``, and ``close`` at the
    very end, also after an error. Hooks run in their
    list order; a hook talks to the others only through the trainer.
    """

    def start(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer, values: dict[str, Tensor]) -> None:
        pass

    def end(self, trainer: Trainer) -> None:
        pass

    def close(self, trainer: Trainer) -> None:
        """Release what ``start`` took (always called once ``start`` returned)."""


def run_loop(trainer: Trainer, step: Step, hooks: Sequence[Hook]) -> None:
    """Run ``step`` until ``exp.iterations`` or until a hook sets ``trainer.stop``; every hook
    that started is closed, also when a step or a hook raises."""
    exp = trainer.exp
    started: list[Hook] = []
    try:
        for hook in hooks:
            hook.start(trainer)
            started.append(hook)
        while trainer.state.iteration < exp.iterations and trainer.stop is None:
            factor = lr_factor(exp.schedule, trainer.state.iteration, exp.iterations)
            for group, base in zip(trainer.optimizer.param_groups, trainer.base_lrs):
                group["lr"] = base * factor
            values = step()
            if trainer.ema is not None and exp.ema is not None:
                from fdet.train.ema import ema_update_

                ema_update_(
                    trainer.ema,
                    trainer.raw,
                    decay=exp.ema.decay,
                    warmup_updates=exp.ema.warmup_updates,
                )
            trainer.state.iteration += 1
            for hook in hooks:
                hook.after_step(trainer, values)
        for hook in hooks:
            hook.end(trainer)
    finally:
        for hook in reversed(started):
            hook.close(trainer)
