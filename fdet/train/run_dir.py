"""The run folder: ``spec.json``, ``run.json``, ``log.jsonl``, ``checkpoints/``, ``metrics.json``
and ``predictions.png``; finding, writing and loading checkpoints."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fdet
from fdet import build, specs
from fdet.train.checkpoint import atomic_save, load_checkpoint

__all__ = [
    "CHECKPOINT_RE",
    "checkpoints",
    "latest_checkpoint",
    "load_run",
    "run_info",
    "save_checkpoint",
    "write_run_files",
]

CHECKPOINT_RE = re.compile(r"^iter_(\d+)\.pt$")


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
    """The newest numbered checkpoint of a run folder."""
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    return found[-1][1]


def save_checkpoint(
    out: Path, payload: dict[str, Any], *, iteration: int, keep: int, best: bool = False
) -> Path:
    """Write ``checkpoints/iter_N.pt`` atomically, delete all but the newest ``keep`` numbered
    checkpoints, and with ``best`` also write ``checkpoints/best.pt``."""
    path = out / "checkpoints" / f"iter_{iteration:08d}.pt"
    atomic_save(payload, path)
    for _, old in checkpoints(out)[:-keep]:
        old.unlink(missing_ok=True)
    if best:
        atomic_save(payload, out / "checkpoints" / "best.pt")
    return path


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


def write_run_files(
    out: Path,
    exp: specs.Experiment,
    device: torch.device,
    world_size: int,
    *,
    resumed_at: int | None = None,
) -> None:
    """``spec.json`` (the experiment, exactly) and ``run.json`` (or ``run-resumed-N.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(specs.to_json(exp) + "\n", encoding="utf-8")
    name = "run.json" if resumed_at is None else f"run-resumed-{resumed_at}.json"
    (out / name).write_text(json.dumps(run_info(exp, device, world_size), indent=2) + "\n")


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
