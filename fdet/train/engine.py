"""The training engine: an experiment spec in, a trained model, its logs and metrics out.

:func:`train` assembles the parts and runs them; each part does one thing:

- :mod:`fdet.train.data` — the data sets and the training loader;
- :mod:`fdet.train.step` — step factories (the supervised step; the exact reduction of loss
  terms over micro-batches and processes);
- :mod:`fdet.train.loop` — the :class:`~fdet.train.loop.Trainer` context and the short loop;
- :mod:`fdet.train.hooks` — logging, evaluation, interrupts, checkpoints;
- :mod:`fdet.train.run_dir` — the run folder and checkpoint files;
- :mod:`fdet.train.state` — counters and random generator states.

The engine knows detectors only through the detector contract (``forward``, ``loss`` returning
loss terms, ``postprocess``, ``predict``): any registered family trains here unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import attrs
import torch

from fdet import build, specs
from fdet.runtime import AllocatorSetting, PrecisionChoice, configure_allocator, resolve_precision
from fdet.train.checkpoint import CheckpointError
from fdet.train.data import (
    TrainingError,
    check_batches,
    check_classes,
    experiment_loader,
    make_datasets,
)
from fdet.train.hooks import Console, Hook, Logs, default_hooks
from fdet.train.loop import Trainer, run_loop
from fdet.train.optim import build_optimizer
from fdet.train.run_dir import (
    check_run_dir,
    checkpoints,
    clear_run,
    latest_checkpoint,
    load_run,
    remove_stale_temps,
    resolve_checkpoint,
    resume_checkpoint,
    trim_log,
    write_run_files,
)
from fdet.train.state import seed_everything
from fdet.train.step import StepFactory, supervised_step

__all__ = [
    "CheckpointError",
    "TrainResult",
    "TrainingError",
    "check_classes",
    "checkpoints",
    "dry_run",
    "latest_checkpoint",
    "load_run",
    "make_datasets",
    "resolve_checkpoint",
    "train",
]


@attrs.frozen
class TrainResult:
    out_dir: Path
    iterations: int
    checkpoint: Path
    metrics: Any  # a dict of COCO metrics (rank 0), or None
    ema_metrics: Any = None
    interrupted: bool = False
    stopped_early: bool = False
    model: Any = attrs.field(default=None, repr=False)  # the trained module (raw weights)


def _check_precision(exp: specs.Experiment, device: torch.device) -> PrecisionChoice:
    """The precision the run uses (``auto`` resolved for ``device``), once; fp16 off CUDA is an
    error."""
    if exp.precision == "fp16" and device.type != "cuda":
        raise TrainingError(
            f"precision 'fp16' needs a CUDA device (this run is on {device}); use 'bf16' on CPU"
        )
    return resolve_precision(exp.precision, device)


def train(
    exp: specs.Experiment,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    final_eval: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    step_factory: StepFactory | None = None,
    hooks: list[Hook] | None = None,
) -> TrainResult:
    """Train ``exp`` and write the run to ``out_dir``.

    ``out_dir`` receives ``spec.json`` (the experiment, exactly), ``run.json`` (versions, seed,
    git commit), ``log.jsonl`` (a line every ``log_interval`` iterations and every evaluation),
    ``checkpoints/iter_N.pt`` (atomic, the last ``keep_checkpoints`` kept) and ``best.pt``, and
    at the end ``metrics.json`` (COCO stats by name and per-class AP) and ``predictions.png``.

    A folder that holds a run already is refused, unless ``resume``: continue from its newest
    usable checkpoint (model, optimizer, scaler, EMA, RNG states and data position), so that the
    result equals the uninterrupted run; a checkpoint that cannot be read is passed over for the
    one before, with a warning naming it; or ``overwrite``: delete the run first. The folder is
    checked (and probed with a real write) before any data is made or model built, and the data
    (empty, or smaller than a batch) before anything is written.
    ``stop_after``: checkpoint and stop after that iteration, as an interruption would.
    ``step_factory``: how a step is computed (default: :func:`fdet.train.step.supervised_step`,
    or :func:`fdet.train.semi.semi_step` for an experiment with ``semi``);
    ``hooks``: replace the default hooks (:func:`fdet.train.hooks.default_hooks`).
    Under ``torchrun`` each process runs this function; rank 0 writes the files.
    """
    from fdet.data.loader import infinite
    from fdet.train.distributed import cleanup, init_distributed, wrap_ddp

    stream = stream or sys.stderr
    out = Path(out_dir)
    dist = init_distributed(str(device) if device is not None else None)
    dev = torch.device(dist.device)
    try:
        precision = _check_precision(exp, dev)

        def say(line: str) -> None:
            if dist.is_main:
                print(f"fdet train: {line}", file=stream, flush=True)

        if dist.is_main:
            check_run_dir(out, resume=resume, overwrite=overwrite)
        ckpt, resumed_from = None, None
        if resume:
            resumed_from, ckpt = resume_checkpoint(
                out, exp, main=dist.is_main, warn=lambda line: say(f"warning: {line}")
            )
        allocator = configure_allocator() if exp.allocator == "retain" else None
        if precision.requested != precision.used:
            say(f"precision {precision.requested}: {precision.used} ({precision.reason})")
        if allocator is not None and not allocator.configured:
            say(f"warning: allocator 'retain' not applied: {allocator.reason}")
        seed_everything(exp.seed)
        if exp.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        datasets = make_datasets(exp)
        evaluates = hooks is None and (final_eval or exp.eval_interval > 0)
        check_batches(
            exp,
            datasets.train,
            world_size=dist.world_size,
            val=datasets.val if evaluates else None,
            unlabeled=datasets.unlabeled,
        )
        if dist.is_main:
            _prepare_run_dir(
                out,
                exp,
                dev,
                dist.world_size,
                ckpt,
                overwrite=overwrite,
                say=say,
                precision=precision,
                allocator=allocator,
            )
        loader = experiment_loader(
            exp, datasets.train, train=True, rank=dist.rank, world_size=dist.world_size
        )
        raw = build(exp.model).to(dev)
        optimizer = build_optimizer(exp.optimizer, raw, exp.param_groups)
        scale = 1.0
        if exp.base_batch_size is not None:
            scale = exp.batch_size * dist.world_size / exp.base_batch_size
        ema = None
        if exp.ema is not None:
            from fdet.train.ema import ema_init

            ema = ema_init(raw)
        trainer = Trainer(
            exp=exp,
            out=out,
            dist=dist,
            device=dev,
            raw=raw,
            model=raw,
            optimizer=optimizer,
            scaler=torch.amp.GradScaler("cuda") if precision.used == "fp16" else None,
            ema=ema,
            datasets=datasets,
            batches=iter(()),
            forward=raw,
            loss_fn=raw.loss,
            base_lrs=[g["lr"] * scale for g in optimizer.param_groups],
            logs=Logs(out, dist.is_main),
            console=None,
            precision=precision.used,
        )
        if ckpt is not None:
            trainer.restore(ckpt, source=resumed_from)
        trainer.model = wrap_ddp(raw, dist, sync_batch_norm=exp.sync_batch_norm)
        trainer.forward = trainer.model
        loss_fn: Callable[..., Any] = raw.loss
        if exp.compile in ("objective", "model"):
            # one static graph a (image size, slot bucket): with dynamic sizes, torch's
            # compiled backward of the dense objectives keeps a stride of the first size and
            # fails at the second (multi-scale training, the strong views of semi-supervised
            # training). Past torch._dynamo's recompile limit (8), new shapes run eagerly.
            loss_fn = torch.compile(raw.loss, fullgraph=True, dynamic=False)
        trainer.loss_fn = loss_fn
        if exp.compile == "model":
            trainer.forward = torch.compile(trainer.model)
        trainer.batches = infinite(loader, start_iteration=trainer.state.iteration * exp.accumulate)
        trainer.console = Console(
            exp.iterations, trainer.state.iteration, stream, bar=progress, main=dist.is_main
        )
        if step_factory is None:
            step_factory = supervised_step
            if exp.semi is not None:
                from fdet.train.semi import semi_step

                step_factory = semi_step  # type: ignore[assignment]
        try:
            run_loop(
                trainer,
                step_factory(trainer),
                hooks
                if hooks is not None
                else default_hooks(final_eval=final_eval, stop_after=stop_after),
            )
        finally:
            trainer.console.close()
            trainer.logs.close()
        assert trainer.last_checkpoint is not None
        interrupted = trainer.stop == "interrupted"
        if interrupted and dist.is_main:
            print(
                f"fdet train: stopped at iteration {trainer.state.iteration}; resume with "
                f"fdet train --resume {out}",
                file=stream,
            )
        return TrainResult(
            out,
            trainer.state.iteration,
            trainer.last_checkpoint,
            None if interrupted else trainer.metrics,
            None if interrupted else trainer.ema_metrics,
            interrupted=interrupted,
            stopped_early=trainer.stop == "early",
            model=raw,
        )
    finally:
        cleanup()


def _prepare_run_dir(
    out: Path,
    exp: specs.Experiment,
    device: torch.device,
    world_size: int,
    ckpt: dict[str, Any] | None,
    *,
    overwrite: bool,
    say: Callable[[str], None],
    precision: PrecisionChoice,
    allocator: AllocatorSetting | None,
) -> None:
    """Once every check passed: delete the old run (``overwrite``), the temporary files of
    killed writes, and log records the resumed run writes again; then write the run files."""
    if overwrite:
        gone = clear_run(out)
        if gone:
            say(f"overwrite: deleted the previous run in {out} ({', '.join(gone)})")
    stale = remove_stale_temps(out)
    if stale:
        names = ", ".join(str(p.relative_to(out)) for p in stale)
        say(f"removed {len(stale)} temporary file(s) left by an interrupted write: {names}")
    resumed_at = None
    if ckpt is not None:
        resumed_at = int(ckpt["iteration"])
        dropped = trim_log(out, resumed_at)
        if dropped:
            say(
                f"log.jsonl: dropped {dropped} record(s) after iteration {resumed_at}, which "
                "this run writes again"
            )
        if resumed_at >= exp.iterations:
            say(f"{out} is finished (iteration {resumed_at}); evaluating it again")
        else:
            say(f"resuming {out} at iteration {resumed_at} of {exp.iterations}")
    write_run_files(
        out,
        exp,
        device,
        world_size,
        resumed_at=resumed_at,
        precision=precision,
        allocator=allocator,
    )


# --- dry run --------------------------------------------------------------------------------------


def dry_run(exp: specs.Experiment, stream: TextIO) -> None:
    """Print the resolved spec tree, the model's parameter counts and a data summary."""
    print(specs.format_tree(exp), file=stream)
    with torch.device("meta"):
        model = build(exp.model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\nmodel: {total:,} parameters, {trainable:,} trainable", file=stream)
    datasets = make_datasets(exp)
    labeled = "labeled" if exp.semi is not None else "train"
    for name, ds in ((labeled, datasets.train), ("val", datasets.val)):
        per_image = ds.coco.imgToAnns
        anns = sum(len(per_image.get(i, ())) for i in ds.image_ids)
        print(
            f"{name}: {len(ds)} images, {anns} annotations, {len(ds.category_names)} classes "
            f"({', '.join(ds.category_names)})",
            file=stream,
        )
    if datasets.unlabeled is not None:
        assert exp.semi is not None
        hidden = " (their labels unused)" if datasets.unlabeled_has_labels else ""
        print(
            f"unlabeled: {len(datasets.unlabeled)} images{hidden}, "
            f"{exp.semi.unlabeled_batch_size} a step; burn-in {exp.semi.burn_in} iterations",
            file=stream,
        )
    per_step = exp.batch_size
    print(
        f"schedule: {exp.iterations} iterations of {per_step} images a process "
        f"({exp.accumulate} micro-batches of {per_step // exp.accumulate}); "
        f"{exp.iterations * per_step / max(1, len(datasets.train)):.1f} epochs on one process",
        file=stream,
    )
