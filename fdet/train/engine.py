"""The training engine: an experiment spec in, a trained model, its logs and metrics out."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import attrs
import numpy as np
import torch
from torch import nn

import fdet
from fdet import build, specs
from fdet.train.checkpoint import atomic_save, load_checkpoint
from fdet.train.optim import build_optimizer
from fdet.train.schedule import lr_factor

log = logging.getLogger("fdet.train")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a data set that does not fit the model)."""


@attrs.frozen
class DataSets:
    """The train and val data sets of an experiment (``fdet.data.coco.CocoDataset``)."""

    train: Any
    val: Any


def make_datasets(exp: specs.Experiment) -> DataSets:
    """Open (and for the shapes set, generate on first use) the experiment's data sets."""
    from fdet.data.coco import CocoDataset
    from fdet.data.transforms import build_transform

    data = exp.data
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
    train = CocoDataset(
        *train_args,
        on_bad_input=on_bad,
        transform=build_transform(exp.train_transforms, train=True),
    )
    val = CocoDataset(
        *val_args, on_bad_input=on_bad, transform=build_transform(exp.val_transforms, train=False)
    )
    num_classes = len(train.label_to_category_id)
    if num_classes != exp.model.num_classes:
        raise TrainingError(
            f"the model predicts {exp.model.num_classes} classes (model.head.num_classes) but the "
            f"training set has {num_classes} categories"
        )
    return DataSets(train=train, val=val)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_info(exp: specs.Experiment, device: torch.device) -> dict[str, Any]:
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
        "threads": torch.get_num_threads(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, exp: specs.Experiment, it: int
) -> Path:
    return atomic_save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": it,
            "spec": specs.to_json(exp),
            "fdet_version": fdet.__version__,
        },
        path,
    )


@attrs.frozen
class TrainResult:
    out_dir: Path
    iterations: int
    checkpoint: Path
    metrics: Any  # fdet.eval.coco.CocoMetrics | None


def train(
    exp: specs.Experiment,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    stream: TextIO | None = None,
    final_eval: bool = True,
) -> TrainResult:
    """Train ``exp`` and write the run to ``out_dir``.

    ``out_dir`` receives ``spec.json`` (the experiment, exactly), ``run.json`` (versions, seed,
    git commit), ``log.jsonl`` (a line every ``log_interval`` iterations and every evaluation),
    ``checkpoints/`` (atomic writes), and at the end ``metrics.json`` (COCO stats by name and
    per-class AP) and ``predictions.png`` (validation predictions next to ground truth).
    """
    from fdet.data.loader import infinite, make_loader
    from fdet.eval.coco import format_table
    from fdet.eval.evaluate import evaluate_model

    stream = stream or sys.stderr
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(exp.seed)
    (out / "spec.json").write_text(specs.to_json(exp) + "\n", encoding="utf-8")
    (out / "run.json").write_text(json.dumps(run_info(exp, dev), indent=2) + "\n")

    datasets = make_datasets(exp)
    pad = exp.train_transforms.pad_divisor
    loader = make_loader(
        datasets.train,
        batch_size=exp.batch_size,
        shuffle=True,
        seed=exp.seed,
        num_workers=exp.num_workers,
        pad_divisor=pad,
        drop_last=True,
    )
    model = build(exp.model).to(dev)
    optimizer = build_optimizer(exp.optimizer, model)
    base_lrs = [g["lr"] for g in optimizer.param_groups]

    def evaluate(it: int) -> Any:
        val_loader = make_loader(
            datasets.val,
            batch_size=exp.batch_size,
            shuffle=False,
            seed=exp.seed,
            num_workers=exp.num_workers,
            pad_divisor=exp.val_transforms.pad_divisor,
            drop_last=False,
        )
        t0 = time.perf_counter()
        metrics, _ = evaluate_model(
            model, val_loader, datasets.val, max_images=exp.eval_images or None, device=dev
        )
        model.train()
        record = {"iteration": it, "eval": metrics.to_dict(), "eval_s": time.perf_counter() - t0}
        _append_jsonl(out / "log.jsonl", record)
        return metrics

    model.train()
    batches = infinite(loader)
    progress_bar = _Progress(exp.iterations, 0, stream, progress)
    running: dict[str, torch.Tensor] = {}
    window_start, window_it = time.perf_counter(), 0
    start = time.perf_counter()
    last_ckpt = out / "checkpoints" / "last.pt"
    metrics = None
    try:
        for it in range(exp.iterations):
            factor = lr_factor(exp.schedule, it, exp.iterations)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            batch = next(batches).to(dev, non_blocking=True)
            outputs = model(batch.images)
            losses = model.loss(outputs, batch)
            losses.loss.backward()
            if exp.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), exp.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for name, value in losses._asdict().items():
                running[name] = running.get(name, 0) + value.detach().float()
            window_it += 1

            done = it + 1
            if done % exp.log_interval == 0 or done == exp.iterations:
                now = time.perf_counter()
                values = {k: (v / window_it).item() for k, v in running.items()}
                if not math.isfinite(values["loss"]):
                    raise TrainingError(
                        f"the loss is not finite ({values['loss']}) in iterations "
                        f"{done - window_it + 1}–{done}; losses: {values}"
                    )
                rate = window_it / (now - window_start)
                eta = (exp.iterations - done) / rate
                record = {
                    "iteration": done,
                    **{k: round(v, 6) for k, v in values.items()},
                    "lr": optimizer.param_groups[0]["lr"],
                    "it_per_s": round(rate, 4),
                    "elapsed_s": round(now - start, 2),
                }
                _append_jsonl(out / "log.jsonl", record)
                progress_bar.update(
                    window_it,
                    {"loss": f"{values['loss']:.4f}", "lr": f"{record['lr']:.2e}"},
                    f"[{done}/{exp.iterations}] loss {values['loss']:.4f} "
                    f"(cls {values.get('cls_loss', 0):.4f} box {values.get('box_loss', 0):.4f}) "
                    f"lr {record['lr']:.2e} {rate:.2f} it/s eta {eta / 60:.1f} min",
                )
                running, window_start, window_it = {}, now, 0
            if done % exp.checkpoint_interval == 0 and done < exp.iterations:
                _checkpoint(last_ckpt, model, optimizer, exp, done)
            if exp.eval_interval and done % exp.eval_interval == 0 and done < exp.iterations:
                m = evaluate(done)
                print(f"[{done}/{exp.iterations}] val AP {m.AP:.4f} AP50 {m.AP50:.4f}", file=stream)
                window_start = time.perf_counter()  # evaluation time is not training speed
    finally:
        progress_bar.close()
    _checkpoint(last_ckpt, model, optimizer, exp, exp.iterations)
    if final_eval:
        metrics = evaluate(exp.iterations)
        (out / "metrics.json").write_text(
            json.dumps({"iteration": exp.iterations, "bbox": metrics.to_dict()}, indent=2) + "\n"
        )
        print(format_table(metrics), file=stream)
        write_prediction_grid(model, datasets.val, out / "predictions.png", device=dev)
    return TrainResult(
        out_dir=out, iterations=exp.iterations, checkpoint=last_ckpt, metrics=metrics
    )


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_prediction_grid(
    model: nn.Module, dataset: Any, path: Path, *, device: torch.device, count: int = 8
) -> Path:
    """Predictions on the first ``count`` validation images, next to their ground truth."""
    from fdet.data.collate import collate
    from fdet.viz.draw import prediction_grid

    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    batch = collate(samples, pad_divisor=128)
    model.eval()
    with torch.inference_mode():
        det = model.predict(batch.images.to(device), batch.image_sizes.to(device))
    det = det._replace(**{k: v.cpu() for k, v in det._asdict().items()})
    images, preds, gts = [], [], []
    for b, s in enumerate(samples):
        h, w = s.image.shape[-2:]
        images.append(s.image)
        keep = det.valid[b]
        preds.append((det.boxes[b][keep], det.labels[b][keep], det.scores[b][keep]))
        gts.append((s.boxes, s.labels))
        del h, w
    return prediction_grid(images, preds, gts, names=dataset.category_names, path=path)


def load_run(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[specs.Experiment, nn.Module]:
    """The experiment and trained model of a run folder or a checkpoint file."""
    p = Path(path)
    ckpt_path = p / "checkpoints" / "last.pt" if p.is_dir() else p
    ckpt = load_checkpoint(ckpt_path, map_location=device)
    exp = specs.from_json(ckpt["spec"], specs.Experiment, source=f"{ckpt_path} (spec)")
    model = build(exp.model)
    model.load_state_dict(ckpt["model"])
    return exp, model.to(device).eval()
