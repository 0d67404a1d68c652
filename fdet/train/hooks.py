"""What the loop does around the steps, one hook a concern: logging, evaluation (with the best
checkpoint and early stopping), interrupts, and checkpoints. Only rank 0 prints and writes."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from fdet.atomic import atomic_write_text
from fdet.train.data import TrainingError
from fdet.train.loop import Hook, Trainer
from fdet.train.step import DATA_WAIT

__all__ = [
    "CheckpointHook",
    "Console",
    "EvalHook",
    "InterruptHook",
    "LogHook",
    "Logs",
    "default_hooks",
    "evaluate",
    "write_prediction_grid",
]

log = logging.getLogger("fdet.train")


# --- output ---------------------------------------------------------------------------------------


class Console:
    """Progress for people: a tqdm bar on a terminal, plain lines otherwise (CI logs stay
    readable); silent on every rank but 0."""

    def __init__(self, total: int, initial: int, stream: TextIO, *, bar: bool, main: bool) -> None:
        self.stream = stream
        self.main = main
        self.bar = None
        if main and bar and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=stream, dynamic_ncols=True)

    def update(self, n: int, stats: dict[str, Any], plain_line: str | None) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix(stats, refresh=False)
        elif plain_line is not None:
            print(plain_line, file=self.stream, flush=True)

    def write(self, line: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Logs:
    """``log.jsonl`` always; TensorBoard event files too when ``tensorboard`` is installed.
    Writes nothing unless ``enabled`` (rank 0)."""

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
            self.tb = None


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


# --- logging --------------------------------------------------------------------------------------


class LogHook(Hook):
    """Every ``log_interval`` iterations (and at the last): the mean of every value the step
    returned over the window, the learning rate and the speed, to the log and the console. This
    is the only place where the loop waits for the device. A non-finite loss stops training."""

    def start(self, trainer: Trainer) -> None:
        self.running: dict[str, Tensor] = {}
        self.window = 0
        self.window_start = time.perf_counter()

    def restart_window(self) -> None:
        """Time spent outside training steps (evaluation) does not count as speed."""
        self.window_start = time.perf_counter()

    def after_step(self, trainer: Trainer, values: dict[str, Tensor]) -> None:
        exp = trainer.exp
        for name, value in values.items():
            held = self.running.get(name)
            self.running[name] = value.detach() if held is None else held + value.detach()
        self.window += 1
        done = trainer.state.iteration
        if done % exp.log_interval and done != exp.iterations:
            return
        now = time.perf_counter()
        stacked = torch.stack([v.float() for v in self.running.values()]) / self.window
        means = dict(zip(self.running, stacked.tolist()))  # one host sync a window
        if not math.isfinite(means["loss"]):
            terms = {k: v for k, v in means.items() if k != "loss"}
            raise TrainingError(
                f"the loss is not finite ({means['loss']}) in iterations "
                f"{done - self.window + 1}–{done}; terms: {terms}"
            )
        rate = self.window / max(now - self.window_start, 1e-9)
        eta = (exp.iterations - done) / rate
        lr = trainer.optimizer.param_groups[0]["lr"]
        record = {
            "iteration": done,
            **{k: round(v, 6) for k, v in means.items()},
            "lr": lr,
            "it_per_s": round(rate, 4),
            "elapsed_s": round(now - trainer.started, 2),
        }
        trainer.logs.write(record)
        parts = " ".join(
            f"{k} {v:.4f}"
            for k, v in means.items()
            if k not in ("loss", DATA_WAIT) and not k.endswith("_count")
        )
        wait = f" data wait {means[DATA_WAIT]:.0f} ms" if DATA_WAIT in means else ""
        trainer.console.update(
            self.window,
            {"loss": f"{means['loss']:.4f}", "lr": f"{lr:.2e}"},
            f"[{done}/{exp.iterations}] loss {means['loss']:.4f} ({parts}) lr {lr:.2e} "
            f"{rate:.2f} it/s{wait} eta {eta / 60:.1f} min",
        )
        self.running, self.window, self.window_start = {}, 0, now


# --- evaluation -----------------------------------------------------------------------------------


def _evaluate_one(trainer: Trainer) -> dict[str, Any] | None:
    """COCO metrics and the validation loss of the trainer's model (as it is now) on the
    validation set (or its first ``eval_images``). Each process predicts its shard; rank 0
    gathers and evaluates and returns the metrics as a dict (the other ranks return None).

    The dict holds the box metrics (``"AP"``, …, ``"per_class_ap"``) and, when the model
    predicts masks and the validation set has segmentations, the mask metrics under
    ``"segm"``."""
    from fdet.eval.coco import evaluate_coco_types
    from fdet.eval.evaluate import predict_coco
    from fdet.train.data import experiment_loader
    from fdet.train.step import autocast

    exp, dist, dataset = trainer.exp, trainer.dist, trainer.datasets.val
    subset = dataset
    if exp.eval_images and exp.eval_images < len(dataset):
        subset = torch.utils.data.Subset(dataset, range(exp.eval_images))
    loader = experiment_loader(exp, subset, train=False, rank=dist.rank, world_size=dist.world_size)
    predictions = predict_coco(
        trainer.raw,
        loader,
        dataset,
        device=trainer.device,
        autocast=autocast(trainer.precision, trainer.device),
        with_loss=True,
    )
    names = list(predictions.loss_terms)
    terms = predictions.loss_terms
    sums = (
        torch.stack(
            [t.total.float() for t in terms.values()] + [t.count.float() for t in terms.values()]
        )
        if names
        else torch.zeros(0, device=trainer.device)
    )
    results, seen = predictions.results, predictions.image_ids
    if dist.world_size > 1:
        from fdet.train.distributed import all_reduce_sum, gather_objects

        sums = all_reduce_sum(sums)
        gathered = gather_objects((results, seen))
        if not dist.is_main:
            return None
        assert gathered is not None
        results = [r for part, _ in gathered for r in part]
        seen = sorted({i for _, part in gathered for i in part})
    by_type = evaluate_coco_types(dataset.coco, results, image_ids=seen)
    metrics = by_type["bbox"].to_dict()
    if "segm" in by_type:
        metrics["segm"] = by_type["segm"].to_dict()
    totals, counts = sums[: len(names)], sums[len(names) :].clamp(min=1.0)
    values = [terms[n].weight * totals[i] / counts[i] for i, n in enumerate(names)]
    metrics["val_loss"] = float(torch.stack(values).sum()) if values else 0.0
    for n, v in zip(names, values):
        metrics[f"val_{n}"] = float(v)
    return metrics


def evaluate(trainer: Trainer) -> tuple[Any, Any]:
    """Metrics of the raw weights and, with EMA, of the EMA weights; logged (rank 0)."""
    metrics = _evaluate_one(trainer)
    ema_metrics = None
    if trainer.ema is not None:
        from fdet.train.ema import swapped_in

        with swapped_in(trainer.raw, trainer.ema):
            ema_metrics = _evaluate_one(trainer)
    record: dict[str, Any] = {
        "iteration": trainer.state.iteration,
        "elapsed_s": round(time.perf_counter() - trainer.started, 2),
    }
    if metrics is not None:
        record["eval"] = metrics
    if ema_metrics is not None:
        record["eval_ema"] = ema_metrics
    trainer.logs.write(record)
    return metrics, ema_metrics


def _track_best(trainer: Trainer, metrics: Any) -> bool:
    """Update the best AP (rank 0 computes metrics; the others learn the AP by broadcast)."""
    from fdet.train.distributed import broadcast_object

    state = trainer.state
    ap = metrics["AP"] if metrics is not None else None
    if trainer.world_size > 1:
        ap = broadcast_object(ap)
    if ap is None:
        return False
    if ap > state.best_ap:
        state.best_ap, state.best_iteration, state.stale_evals = ap, state.iteration, 0
        return True
    state.stale_evals += 1
    return False


def _eval_line(done: int, total: int, metrics: Any, ema_metrics: Any) -> str:
    def aps(m: dict[str, Any]) -> str:
        text = f"AP {m['AP']:.4f} AP50 {m['AP50']:.4f}"
        if "segm" in m:
            text += f" mask AP {m['segm']['AP']:.4f}"
        return text

    line = f"[{done}/{total}] val {aps(metrics)}"
    if "val_loss" in metrics:
        line += f" loss {metrics['val_loss']:.4f}"
    if ema_metrics is not None:
        line += f" | EMA {aps(ema_metrics)}"
    return line


class EvalHook(Hook):
    """Validation every ``eval_interval`` iterations (not at the last: the final evaluation
    follows) with the best checkpoint and early stopping; at the end (``final``, unless
    interrupted) the final evaluation, ``metrics.json`` and ``predictions.png``."""

    def __init__(self, *, final: bool, log_hook: LogHook | None = None) -> None:
        self.final = final
        self.log_hook = log_hook

    def _evaluate(self, trainer: Trainer) -> None:
        metrics, ema_metrics = evaluate(trainer)
        trainer.metrics, trainer.ema_metrics = metrics, ema_metrics
        chosen = ema_metrics if ema_metrics is not None else metrics
        trainer.improved = _track_best(trainer, chosen)
        trainer.save_requested = True

    def after_step(self, trainer: Trainer, values: dict[str, Tensor]) -> None:
        exp, done = trainer.exp, trainer.state.iteration
        if not exp.eval_interval or done % exp.eval_interval or trainer.is_last:
            return
        self._evaluate(trainer)
        if trainer.metrics is not None:
            trainer.console.write(
                _eval_line(done, exp.iterations, trainer.metrics, trainer.ema_metrics)
            )
        state = trainer.state
        if exp.early_stopping and state.stale_evals >= exp.early_stopping:
            trainer.console.write(
                f"[{done}/{exp.iterations}] stopping early: no better AP in "
                f"{state.stale_evals} evaluations (best {state.best_ap:.4f} at "
                f"{state.best_iteration})"
            )
            trainer.stop = "early"
        if self.log_hook is not None:
            self.log_hook.restart_window()

    def end(self, trainer: Trainer) -> None:
        if not self.final or trainer.stop == "interrupted":
            return
        self._evaluate(trainer)
        if not trainer.is_main or trainer.metrics is None:
            return
        write_metrics(trainer)
        if trainer.ema is not None:
            from fdet.train.ema import swapped_in

            with swapped_in(trainer.raw, trainer.ema):
                write_prediction_grid(
                    trainer.raw,
                    trainer.datasets.val,
                    trainer.out / "predictions.png",
                    device=trainer.device,
                )
        else:
            write_prediction_grid(
                trainer.raw,
                trainer.datasets.val,
                trainer.out / "predictions.png",
                device=trainer.device,
            )


def write_metrics(trainer: Trainer) -> None:
    """``metrics.json`` (COCO stats by name, per-class AP, the validation loss; the box metrics
    under ``"bbox"``, the mask metrics, when there are some, under ``"segm"``; the EMA
    weights' under ``"bbox_ema"`` / ``"segm_ema"``) and the tables."""
    from fdet.eval.coco import STAT_NAMES, CocoMetrics, format_table

    metrics, ema_metrics = trainer.metrics, trainer.ema_metrics
    payload: dict[str, Any] = {"iteration": trainer.state.iteration}
    for suffix, found in (("", metrics), ("_ema", ema_metrics)):
        if found is not None:
            boxes = {k: v for k, v in found.items() if k != "segm"}
            payload["bbox" + suffix] = boxes
            if "segm" in found:
                payload["segm" + suffix] = found["segm"]
    atomic_write_text(trainer.out / "metrics.json", json.dumps(payload, indent=2) + "\n")
    chosen = ema_metrics if ema_metrics is not None else metrics
    tables = [("bbox", chosen)] + ([("segm", chosen["segm"])] if "segm" in chosen else [])
    trainer.console.close()
    for iou_type, found in tables:
        table = CocoMetrics.from_stats(
            [found[name] for name in STAT_NAMES],
            per_class_ap=found["per_class_ap"],
            num_images=found["num_images"],
            num_detections=found["num_detections"],
        )
        print(
            format_table(table, iou_type=iou_type if len(tables) > 1 else None),
            file=trainer.console.stream,
        )


def write_prediction_grid(
    model: Any, dataset: Any, path: Path, *, device: torch.device, count: int = 8
) -> Path:
    """Predictions on the first ``count`` validation images, next to their ground truth; with
    their instance masks where the detections have them (Mask R-CNN: box-frame probabilities,
    pasted on the boxes when drawn, or boolean image masks) and the ground truth's where the
    data set has them."""
    from fdet.data.collate import collate
    from fdet.viz.draw import prediction_grid

    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    batch = collate(samples, pad_divisor=32)
    det = model.predict(batch.images.to(device), batch.image_sizes.to(device))
    det = det._replace(**{k: v.cpu() for k, v in det._asdict().items() if v is not None})
    preds = []
    for b in range(len(samples)):
        keep = det.valid[b]
        pred = (det.boxes[b][keep], det.labels[b][keep], det.scores[b][keep])
        preds.append(pred if det.masks is None else (*pred, det.masks[b][keep]))
    gts = [
        (s.boxes, s.labels) if s.masks is None else (s.boxes, s.labels, s.masks.bool())
        for s in samples
    ]
    return prediction_grid(
        [s.image for s in samples], preds, gts, names=dataset.category_names, path=path
    )


# --- interrupts -----------------------------------------------------------------------------------


class InterruptHook(Hook):
    """SIGINT/SIGTERM (or ``stop_after`` iterations) stop the run after the current step with a
    checkpoint. In one process the flag is read after every step (no cost); with several, the
    processes agree at the log interval (one collective), so all stop at the same iteration. A
    second signal stops at once (KeyboardInterrupt)."""

    def __init__(self, *, stop_after: int | None = None) -> None:
        self.stop_after = stop_after
        self.requested = False
        self.previous: dict[int, Any] = {}

    def start(self, trainer: Trainer) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)

    def after_step(self, trainer: Trainer, values: dict[str, Tensor]) -> None:
        done = trainer.state.iteration
        if trainer.is_last or trainer.stop is not None:
            return
        stop = self.stop_after is not None and done >= self.stop_after  # the same on every rank
        if trainer.world_size == 1:
            stop = stop or self.requested
        elif done % trainer.exp.log_interval == 0:
            stop = stop or _any_rank(self.requested, trainer.device)
        if stop:
            trainer.stop = "interrupted"

    def close(self, trainer: Trainer) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def _any_rank(flag: bool, device: torch.device) -> bool:
    import torch.distributed as tdist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


# --- checkpoints ----------------------------------------------------------------------------------


class CheckpointHook(Hook):
    """A checkpoint every ``checkpoint_interval`` iterations, after every evaluation (and as
    ``best.pt`` when it set a new best AP), when the run stops early or is interrupted, and at
    the end."""

    def after_step(self, trainer: Trainer, values: dict[str, Tensor]) -> None:
        interval = trainer.state.iteration % trainer.exp.checkpoint_interval == 0
        if trainer.is_last:
            return  # the end saves
        if trainer.save_requested or trainer.stop is not None or interval:
            trainer.save(best=trainer.improved)
        trainer.save_requested = trainer.improved = False

    def end(self, trainer: Trainer) -> None:
        saved_here = trainer.last_checkpoint is not None and trainer.last_checkpoint.name == (
            f"iter_{trainer.state.iteration:08d}.pt"
        )
        if trainer.stop is not None and saved_here and not trainer.save_requested:
            return
        trainer.save(best=trainer.improved)
        trainer.save_requested = trainer.improved = False


def default_hooks(*, final_eval: bool, stop_after: int | None) -> list[Hook]:
    """Logging, evaluation, interrupts, checkpoints, in that order."""
    log_hook = LogHook()
    return [
        log_hook,
        EvalHook(final=final_eval, log_hook=log_hook),
        InterruptHook(stop_after=stop_after),
        CheckpointHook(),
    ]
