"""The training engine: an experiment spec in, a trained model, its logs and metrics out.

One function, :func:`train`, runs an :class:`fdet.specs.Experiment` in one process or in each
process that ``torchrun`` starts (data parallel). Everything it does is in the spec; the run
folder records the spec, the environment, the log, checkpoints and the final metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TextIO, cast

import attrs
import numpy as np
import torch
from torch import Tensor, nn

import fdet
from fdet import build, specs
from fdet.train.checkpoint import atomic_save, load_checkpoint
from fdet.train.optim import build_optimizer
from fdet.train.schedule import lr_factor

log = logging.getLogger("fdet.train")

CHECKPOINT_RE = re.compile(r"^iter_(\d+)\.pt$")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a data set that does not fit the model, a
    precision the device cannot run)."""


# --- data -----------------------------------------------------------------------------------------


@attrs.frozen
class DataSets:
    """The train and val data sets of an experiment (``fdet.data.coco.CocoDataset``)."""

    train: Any
    val: Any


def make_datasets(exp: specs.Experiment, *, with_train: bool = True) -> DataSets:
    """Open (and for the shapes set, generate on first use) the experiment's data sets
    (``with_train=False``: the validation set only; ``train`` is then None).

    The model's class count must match the data's categories, and the validation set must have
    the training set's categories (the same ids), or labels would be mapped to the wrong ids."""
    from fdet.data.coco import CocoDataset
    from fdet.data.transforms import build_transform

    data = exp.data
    train_args: tuple[str | Path, str | Path]
    val_args: tuple[str | Path, str | Path]
    on_bad: Literal["error", "skip"]
    if isinstance(data, specs.ShapesData):
        from fdet.data.shapes import ensure_shapes

        paths = ensure_shapes(data)
        train_args = (paths.train_images, paths.train_annotations)
        val_args = (paths.val_images, paths.val_annotations)
        on_bad = "error"
    else:
        train_args = (data.train_images, data.train_annotations)
        val_args = (data.val_images, data.val_annotations)
        on_bad = data.on_bad_input
    val = CocoDataset(
        *val_args, on_bad_input=on_bad, transform=build_transform(exp.val_transforms, train=False)
    )
    train = None
    if with_train:
        train_transform = build_transform(exp.train_transforms, train=True)
        train = CocoDataset(
            *train_args, on_bad_input=on_bad, transform=train_transform, seed=exp.seed
        )
        if tuple(val.label_to_category_id) != tuple(train.label_to_category_id):
            raise TrainingError(
                f"the validation set's category ids {tuple(val.label_to_category_id)} differ "
                f"from the training set's {tuple(train.label_to_category_id)} ({val_args[1]} vs "
                f"{train_args[1]})"
            )
    check_classes(exp.model, val, "training" if train is not None else "validation")
    return DataSets(train=train, val=val)


def check_classes(model: specs.RetinaNet, dataset: Any, name: str = "data") -> None:
    """A clear error when the model's class count differs from the data set's categories."""
    num_classes = len(dataset.label_to_category_id)
    if num_classes != model.num_classes:
        raise TrainingError(
            f"the model predicts {model.num_classes} classes (model.head.num_classes) but the "
            f"{name} set has {num_classes} categories"
        )


def max_objects(dataset: Any) -> int:
    """The most annotations of any image of a COCO-format data set (at least 1): a fixed number
    of ground-truth slots keeps batch shapes static, so compiled steps never recompile."""
    per_image = getattr(dataset.coco, "imgToAnns", {})
    return max([1, *(len(anns) for anns in per_image.values())])


# --- reproducibility ----------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator's state, in a form ``torch.load(weights_only=True)`` accepts."""
    version, keys, gauss = random.getstate()
    np_state = cast(tuple, np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(keys), gauss],
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys_np.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_info(exp: specs.Experiment, device: torch.device, world_size: int) -> dict[str, Any]:
    """What is needed to reproduce a run: versions, seed, device, and the git commit if any."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(fdet.__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import torchvision

    return {
        "fdet": fdet.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit or None,
        "seed": exp.seed,
        "device": str(device),
        "world_size": world_size,
        "threads": torch.get_num_threads(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- checkpoints ----------------------------------------------------------------------------------


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The numbered checkpoints of a run folder, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path:
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    return found[-1][1]


def load_run(
    path: str | Path, *, device: str | torch.device = "cpu", best: bool = False
) -> tuple[specs.Experiment, nn.Module]:
    """The experiment and trained model of a run folder (its latest checkpoint, or ``best.pt``
    with ``best``) or of a checkpoint file. With EMA, the model carries the EMA weights."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoints" / "best.pt" if best else latest_checkpoint(p)
    ckpt = load_checkpoint(p, map_location=device)
    exp = specs.from_json(ckpt["spec"], specs.Experiment, source=f"{p} (spec)")
    model = build(exp.model)
    model.load_state_dict(ckpt["model"])
    if ckpt.get("ema") is not None:
        from fdet.train.ema import ema_load_state_dict

        state = ema_load_state_dict(ckpt["ema"])
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                tensor.copy_(state.params[name])
            for name, tensor in model.named_buffers():
                if name in state.buffers:
                    tensor.copy_(state.buffers[name])
    return exp, model.to(device).eval()


# --- progress and logs ----------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on a terminal; plain log lines otherwise (CI logs stay readable)."""

    def __init__(self, total: int, initial: int, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=stream, dynamic_ncols=True)

    def update(self, n: int, stats: dict[str, Any], plain_line: str | None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix(stats, refresh=False)
        elif plain_line is not None:
            print(plain_line, file=self.stream, flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Logs:
    """JSONL always; TensorBoard event files too when ``tensorboard`` is installed."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.path = out / "log.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            step = record["iteration"]
            for key, value in _flatten(record).items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


# --- the training step --------------------------------------------------------------------------


def _autocast(exp: specs.Experiment, device: torch.device) -> contextlib.AbstractContextManager:
    if exp.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if exp.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_precision(exp: specs.Experiment, device: torch.device) -> None:
    if exp.precision == "fp16" and device.type != "cuda":
        raise TrainingError(
            f"precision 'fp16' needs a CUDA device (this run is on {device}); use 'bf16' on CPU"
        )


@attrs.define
class _State:
    """What changes during a run besides the weights: saved in every checkpoint."""

    iteration: int = 0
    best_ap: float = -1.0
    best_iteration: int = 0
    stale_evals: int = 0


class _Interrupt:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and stops."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@attrs.frozen
class TrainResult:
    out_dir: Path
    iterations: int
    checkpoint: Path
    metrics: Any  # fdet.eval.coco.CocoMetrics | None (rank 0)
    ema_metrics: Any = None
    interrupted: bool = False
    stopped_early: bool = False
    model: Any = attrs.field(default=None, repr=False)  # the trained module (raw weights)


def train(
    exp: specs.Experiment,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    final_eval: bool = True,
    resume: bool = False,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``exp`` and write the run to ``out_dir``.

    ``out_dir`` receives ``spec.json`` (the experiment, exactly), ``run.json`` (versions, seed,
    git commit), ``log.jsonl`` (a line every ``log_interval`` iterations and every evaluation),
    ``checkpoints/iter_N.pt`` (atomic, the last ``keep_checkpoints`` kept) and ``best.pt``, and
    at the end ``metrics.json`` (COCO stats by name and per-class AP) and ``predictions.png``.

    ``resume``: continue from the latest checkpoint in ``out_dir`` (model, optimizer, scaler,
    EMA, RNG states and data position), so that the result equals the uninterrupted run.
    ``stop_after``: checkpoint and stop after that iteration, as an interruption would.
    Under ``torchrun`` each process runs this function; rank 0 writes the files.
    """
    from fdet.data.loader import infinite, make_loader
    from fdet.train.distributed import cleanup, init_distributed, wrap_ddp

    stream = stream or sys.stderr
    out = Path(out_dir)
    dist = init_distributed(str(device) if device is not None else None)
    dev = torch.device(dist.device)
    try:
        _check_precision(exp, dev)
        ckpt = None
        if resume:
            ckpt = load_checkpoint(latest_checkpoint(out), map_location="cpu")
            saved = specs.from_json(ckpt["spec"], specs.Experiment, source=str(out))
            if saved != exp:
                raise TrainingError(
                    f"{out} was trained with another spec; resume with the saved one "
                    f"(fdet train --resume {out})"
                )
        seed_everything(exp.seed)
        if exp.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "spec.json").write_text(specs.to_json(exp) + "\n", encoding="utf-8")
            info_name = "run.json" if ckpt is None else f"run-resumed-{ckpt['iteration']}.json"
            info = run_info(exp, dev, dist.world_size)
            (out / info_name).write_text(json.dumps(info, indent=2) + "\n")

        datasets = make_datasets(exp)
        micro = exp.batch_size // exp.accumulate
        loader = make_loader(
            datasets.train,
            batch_size=micro,
            shuffle=True,
            seed=exp.seed,
            num_workers=exp.num_workers,
            pad_divisor=exp.train_transforms.pad_divisor,
            drop_last=True,
            rank=dist.rank,
            world_size=dist.world_size,
            slots=max_objects(datasets.train),  # one gt-slot count: static shapes, no recompiles
        )
        raw = build(exp.model).to(dev)
        state = _State()
        if ckpt is not None:
            raw.load_state_dict(ckpt["model"])
            state = _State(**ckpt["state"])
        model = wrap_ddp(raw, dist, sync_batch_norm=exp.sync_batch_norm)
        optimizer = build_optimizer(exp.optimizer, raw, exp.param_groups)
        scale = 1.0
        if exp.base_batch_size is not None:
            scale = exp.batch_size * dist.world_size / exp.base_batch_size
        base_lrs = [g["lr"] * scale for g in optimizer.param_groups]
        scaler = torch.amp.GradScaler("cuda") if exp.precision == "fp16" else None
        ema = None
        if exp.ema is not None:
            from fdet.train.ema import ema_init, ema_load_state_dict

            ema = ema_init(raw)
        if ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
            if exp.ema is not None and ckpt.get("ema") is not None:
                ema = ema_load_state_dict(ckpt["ema"], device=dev)
            set_rng_state(ckpt["rng"])

        forward: Callable[[Tensor], Any] = model
        loss_fn: Callable[..., Any] = raw.loss
        if exp.compile in ("objective", "model"):
            loss_fn = torch.compile(raw.loss, fullgraph=True)
        if exp.compile == "model":
            forward = torch.compile(model)

        logs = _Logs(out, dist.is_main)
        bar = _Progress(exp.iterations, state.iteration, stream, progress and dist.is_main)
        batches = infinite(loader, start_iteration=state.iteration * exp.accumulate)

        def save(tag_best: bool = False) -> Path:
            path = out / "checkpoints" / f"iter_{state.iteration:08d}.pt"
            if not dist.is_main:
                return path
            payload = {
                "model": raw.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": _ema_dict(ema),
                "state": attrs.asdict(state),
                "rng": rng_state(),
                "iteration": state.iteration,
                "spec": specs.to_json(exp),
                "fdet_version": fdet.__version__,
            }
            atomic_save(payload, path)
            for _, old in checkpoints(out)[: -exp.keep_checkpoints]:
                old.unlink(missing_ok=True)
            if tag_best:
                atomic_save(payload, out / "checkpoints" / "best.pt")
            return path

        def evaluate() -> tuple[Any, Any]:
            metrics = _evaluate(exp, raw, datasets.val, dist, dev)
            ema_metrics = None
            if ema is not None:
                from fdet.train.ema import swapped_in

                with swapped_in(raw, ema):
                    ema_metrics = _evaluate(exp, raw, datasets.val, dist, dev)
            record: dict[str, Any] = {
                "iteration": state.iteration,
                "elapsed_s": round(time.perf_counter() - start_time, 2),
            }
            if metrics is not None:
                record["eval"] = metrics
            if ema_metrics is not None:
                record["eval_ema"] = ema_metrics
            logs.write(record)
            return metrics, ema_metrics

        interrupt = _Interrupt()
        running: dict[str, Tensor] = {}
        window_start, window_it = time.perf_counter(), 0
        start_time = time.perf_counter()
        stopped_early = False
        last_path = None
        with interrupt:
            while state.iteration < exp.iterations:
                factor = lr_factor(exp.schedule, state.iteration, exp.iterations)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                values = _step(exp, model, forward, loss_fn, batches, optimizer, scaler, dist, dev)
                if ema is not None and exp.ema is not None:
                    from fdet.train.ema import ema_update_

                    ema_update_(
                        ema, raw, decay=exp.ema.decay, warmup_updates=exp.ema.warmup_updates
                    )
                state.iteration += 1
                for name, value in values.items():
                    running[name] = running.get(name, 0) + value
                window_it += 1
                done = state.iteration

                if done % exp.log_interval == 0 or done == exp.iterations:
                    now = time.perf_counter()
                    means = {k: (v / window_it).item() for k, v in running.items()}
                    if not math.isfinite(means["loss"]):
                        raise TrainingError(
                            f"the loss is not finite ({means['loss']}) in iterations "
                            f"{done - window_it + 1}–{done}; losses: {means}"
                        )
                    rate = window_it / (now - window_start)
                    eta = (exp.iterations - done) / rate
                    record = {
                        "iteration": done,
                        **{k: round(v, 6) for k, v in means.items()},
                        "lr": optimizer.param_groups[0]["lr"],
                        "it_per_s": round(rate, 4),
                        "elapsed_s": round(now - start_time, 2),
                    }
                    logs.write(record)
                    bar.update(
                        window_it,
                        {"loss": f"{means['loss']:.4f}", "lr": f"{record['lr']:.2e}"},
                        f"[{done}/{exp.iterations}] loss {means['loss']:.4f} "
                        f"(cls {means.get('cls_loss', 0):.4f} box {means.get('box_loss', 0):.4f})"
                        f" lr {record['lr']:.2e} {rate:.2f} it/s eta {eta / 60:.1f} min",
                    )
                    running, window_start, window_it = {}, now, 0

                is_last = done == exp.iterations
                if exp.eval_interval and done % exp.eval_interval == 0 and not is_last:
                    metrics, ema_metrics = evaluate()
                    chosen = ema_metrics if ema_metrics is not None else metrics
                    improved = _track_best(state, chosen, dist)
                    if dist.is_main:
                        bar.write(_eval_line(done, exp.iterations, metrics, ema_metrics))
                    last_path = save(tag_best=improved)
                    if exp.early_stopping and state.stale_evals >= exp.early_stopping:
                        bar.write(
                            f"[{done}/{exp.iterations}] stopping early: no better AP in "
                            f"{state.stale_evals} evaluations (best {state.best_ap:.4f} at "
                            f"{state.best_iteration})"
                        )
                        stopped_early = True
                        break
                    window_start = time.perf_counter()  # evaluation time is not training speed
                elif done % exp.checkpoint_interval == 0 and not is_last:
                    last_path = save()
                stop = interrupt.requested or (stop_after is not None and done >= stop_after)
                if dist.world_size > 1:
                    stop = bool(_any_rank(stop, dev))
                if stop and not is_last:
                    bar.close()
                    last_path = save()
                    print(
                        f"fdet train: stopped at iteration {done}; resume with "
                        f"fdet train --resume {out}",
                        file=stream,
                    )
                    logs.close()
                    return TrainResult(out, done, last_path, None, interrupted=True, model=raw)
        bar.close()

        metrics = ema_metrics = None
        if final_eval:
            metrics, ema_metrics = evaluate()
            chosen = ema_metrics if ema_metrics is not None else metrics
            improved = _track_best(state, chosen, dist)
            last_path = save(tag_best=improved)
            if dist.is_main and metrics is not None:
                _write_metrics(out, state.iteration, metrics, ema_metrics, stream)
                if ema is not None:
                    from fdet.train.ema import swapped_in

                    with swapped_in(raw, ema):
                        write_prediction_grid(
                            raw, datasets.val, out / "predictions.png", device=dev
                        )
                else:
                    write_prediction_grid(raw, datasets.val, out / "predictions.png", device=dev)
        else:
            last_path = save()
        logs.close()
        return TrainResult(
            out,
            state.iteration,
            last_path,
            metrics,
            ema_metrics,
            stopped_early=stopped_early,
            model=raw,
        )
    finally:
        cleanup()


def _ema_dict(ema: Any) -> Any:
    if ema is None:
        return None
    from fdet.train.ema import ema_state_dict

    return ema_state_dict(ema)


def _any_rank(flag: bool, device: torch.device) -> bool:
    import torch.distributed as tdist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _step(
    exp: specs.Experiment,
    model: nn.Module,
    forward: Callable[[Tensor], Any],
    loss_fn: Callable[..., Any],
    batches: Iterator[Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    dist: Any,
    device: torch.device,
) -> dict[str, Tensor]:
    """One optimizer step over ``exp.accumulate`` micro-batches.

    Each micro-batch's loss is back-propagated as a sum (``normalizer`` 1); once all are done the
    gradients are divided by the positives of the whole step (all micro-batches, all processes),
    which is exactly the gradient of the big batch's loss. Data parallel averaging over ``W``
    processes is undone by the factor ``W``.
    """
    from fdet.train.distributed import all_reduce_mean

    one = torch.ones((), device=device)
    sums: dict[str, Tensor] = {}
    num_pos = torch.zeros((), device=device)
    for i in range(exp.accumulate):
        batch = next(batches).to(device, non_blocking=True)
        no_sync = getattr(model, "no_sync", None)  # DDP: all-reduce once, after the last
        last = i == exp.accumulate - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with _autocast(exp, device):
                outputs = forward(batch.images)
            losses = loss_fn(outputs, batch, normalizer=one)
            total = losses.loss if scaler is None else scaler.scale(losses.loss)
            total.backward()
        for name in ("loss", "cls_loss", "box_loss"):
            sums[name] = sums.get(name, 0) + getattr(losses, name).detach()
        num_pos = num_pos + losses.num_pos.detach()
    # positives of the whole step over all processes, as a mean per process
    mean_pos = all_reduce_mean(num_pos.clone()) if dist.world_size > 1 else num_pos
    normalizer = mean_pos.clamp(min=1.0)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        torch._foreach_div_(grads, normalizer)
    if exp.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), exp.grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    values = {k: v / normalizer for k, v in sums.items()}
    values["num_pos"] = num_pos
    return values


def _track_best(state: _State, metrics: Any, dist: Any) -> bool:
    """Update the best AP (rank 0 computes metrics; the others learn the AP by broadcast)."""
    from fdet.train.distributed import broadcast_object

    ap = metrics["AP"] if metrics is not None else None
    if dist.world_size > 1:
        ap = broadcast_object(ap)
    if ap is None:
        return False
    if ap > state.best_ap:
        state.best_ap, state.best_iteration, state.stale_evals = ap, state.iteration, 0
        return True
    state.stale_evals += 1
    return False


def _eval_line(done: int, total: int, metrics: Any, ema_metrics: Any) -> str:
    line = f"[{done}/{total}] val AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f}"
    if "val_loss" in metrics:
        line += f" loss {metrics['val_loss']:.4f}"
    if ema_metrics is not None:
        line += f" | EMA AP {ema_metrics['AP']:.4f} AP50 {ema_metrics['AP50']:.4f}"
    return line


def _evaluate(
    exp: specs.Experiment, model: Any, dataset: Any, dist: Any, device: torch.device
) -> dict[str, Any] | None:
    """COCO metrics and the validation loss of ``model`` on the validation set (or its first
    ``eval_images``). Each process predicts its shard; rank 0 gathers and evaluates and returns
    the metrics as a dict (the other ranks return None)."""
    from fdet.data.loader import make_loader
    from fdet.eval.coco import detections_to_coco, evaluate_coco
    from fdet.train.distributed import all_reduce_mean, gather_objects

    subset = dataset
    if exp.eval_images and exp.eval_images < len(dataset):
        subset = torch.utils.data.Subset(dataset, range(exp.eval_images))
    loader = make_loader(
        subset,
        batch_size=max(1, exp.batch_size // exp.accumulate),
        shuffle=False,
        seed=exp.seed,
        num_workers=exp.num_workers,
        pad_divisor=exp.val_transforms.pad_divisor,
        drop_last=False,
        rank=dist.rank,
        world_size=dist.world_size,
        pad_shards=False,
        slots=max_objects(dataset),
    )
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    loss_sum = torch.zeros((), device=device)
    pos_sum = torch.zeros((), device=device)
    try:
        with torch.inference_mode():
            for batch in loader:
                batch = batch.to(device)
                with _autocast(exp, device):
                    outputs = model(batch.images)
                losses = model.loss(outputs, batch, normalizer=torch.ones((), device=device))
                loss_sum += losses.loss
                pos_sum += losses.num_pos
                detections = model.postprocess(outputs, batch.image_sizes)
                results.extend(
                    detections_to_coco(
                        detections,
                        image_ids=batch.image_ids,
                        scales=batch.scales,
                        label_to_category_id=dataset.label_to_category_id,
                    )
                )
                seen.extend(int(i) for i in batch.image_ids.tolist())
    finally:
        model.train(was_training)
    if dist.world_size > 1:
        loss_sum = all_reduce_mean(loss_sum)
        pos_sum = all_reduce_mean(pos_sum)
        gathered = gather_objects((results, seen))
        if not dist.is_main:
            return None
        assert gathered is not None
        results = [r for part, _ in gathered for r in part]
        seen = sorted({i for _, part in gathered for i in part})
    metrics = evaluate_coco(dataset.coco, results, image_ids=seen).to_dict()
    metrics["val_loss"] = float(loss_sum / pos_sum.clamp(min=1.0))
    return metrics


def _write_metrics(
    out: Path, iteration: int, metrics: dict, ema_metrics: dict | None, stream: TextIO
) -> None:
    from fdet.eval.coco import STAT_NAMES, CocoMetrics, format_table

    payload: dict[str, Any] = {"iteration": iteration, "bbox": metrics}
    if ema_metrics is not None:
        payload["bbox_ema"] = ema_metrics
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    chosen = ema_metrics if ema_metrics is not None else metrics
    table = CocoMetrics.from_stats(
        [chosen[name] for name in STAT_NAMES],
        per_class_ap=chosen["per_class_ap"],
        num_images=chosen["num_images"],
        num_detections=chosen["num_detections"],
    )
    print(format_table(table), file=stream)


def write_prediction_grid(
    model: Any, dataset: Any, path: Path, *, device: torch.device, count: int = 8
) -> Path:
    """Predictions on the first ``count`` validation images, next to their ground truth."""
    from fdet.data.collate import collate
    from fdet.viz.draw import prediction_grid

    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    batch = collate(samples, pad_divisor=32)
    det = model.predict(batch.images.to(device), batch.image_sizes.to(device))
    det = det._replace(**{k: v.cpu() for k, v in det._asdict().items()})
    preds = [
        (det.boxes[b][det.valid[b]], det.labels[b][det.valid[b]], det.scores[b][det.valid[b]])
        for b in range(len(samples))
    ]
    gts = [(s.boxes, s.labels) for s in samples]
    return prediction_grid(
        [s.image for s in samples], preds, gts, names=dataset.category_names, path=path
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
    for name, ds in (("train", datasets.train), ("val", datasets.val)):
        anns = sum(len(v) for v in ds.coco.imgToAnns.values())
        print(
            f"{name}: {len(ds)} images, {anns} annotations, {len(ds.category_names)} classes "
            f"({', '.join(ds.category_names)})",
            file=stream,
        )
    per_step = exp.batch_size
    print(
        f"schedule: {exp.iterations} iterations of {per_step} images a process "
        f"({exp.accumulate} micro-batches of {per_step // exp.accumulate}); "
        f"{exp.iterations * per_step / max(1, len(datasets.train)):.1f} epochs on one process",
        file=stream,
    )
