"""The run folder: ``spec.json``, ``run.json``, ``log.jsonl``, ``checkpoints/``, ``metrics.json``
and ``predictions.png``; checking it before a run starts, finding, writing and loading checkpoints,
and choosing the checkpoint a run resumes from."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fdet
from fdet import build, specs
from fdet.atomic import TEMP_RE, atomic_write_text
from fdet.runtime import AllocatorSetting, PrecisionChoice, resolve_precision
from fdet.train.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_weights,
    weights_mismatch,
)
from fdet.train.data import TrainingError

__all__ = [
    "CHECKPOINT_RE",
    "RUN_FILES",
    "check_run_dir",
    "checkpoints",
    "clear_run",
    "latest_checkpoint",
    "load_run",
    "probe_writable",
    "remove_stale_temps",
    "resolve_checkpoint",
    "resume_checkpoint",
    "run_contents",
    "run_info",
    "save_checkpoint",
    "trim_log",
    "write_run_files",
]

CHECKPOINT_RE = re.compile(r"^iter_(\d+)\.pt$")
RESUMED_RE = re.compile(r"^run-resumed-\d+\.json$")
RUN_FILES = (
    "spec.json",
    "run.json",
    "log.jsonl",
    "metrics.json",
    "predictions.png",
    "checkpoints",
    "tensorboard",
)
"""What a run writes in its folder (besides ``run-resumed-N.json``): what marks a folder as
holding a run, and what ``overwrite`` deletes."""


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
        folder = Path(run_dir)
        what = "" if (folder / "spec.json").is_file() else f" ({folder} holds no run)"
        raise FileNotFoundError(f"no checkpoint in {folder / 'checkpoints'}{what}")
    return found[-1][1]


def resolve_checkpoint(path: str | Path, *, best: bool = False) -> Path:
    """The checkpoint file ``path`` stands for: itself if it is a file; for a run folder its
    newest ``checkpoints/iter_N.pt`` (or ``checkpoints/best.pt`` with ``best``). What
    :func:`load_run` loads, for saying which file was evaluated."""
    p = Path(path)
    if p.is_dir():
        if not best:
            return latest_checkpoint(p)
        p = p / "checkpoints" / "best.pt"
        if not p.is_file():
            raise FileNotFoundError(
                f"no best checkpoint {p} (best.pt is written by the run's evaluations)"
            )
        return p
    if not p.exists():
        raise FileNotFoundError(f"no run folder or checkpoint file at {p}")
    return p


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


def run_info(
    exp: specs.Experiment,
    device: torch.device,
    world_size: int,
    *,
    precision: PrecisionChoice | None = None,
    allocator: AllocatorSetting | None = None,
) -> dict[str, Any]:
    """What is needed to reproduce a run: versions, seed, device, the git commit if any, the
    precision used (``precision``: requested, used and why; resolved here when not given) and
    what became of the experiment's ``allocator`` (``allocator``: the result of
    :func:`fdet.runtime.configure_allocator`, None when the experiment left it alone)."""
    if precision is None:
        precision = resolve_precision(exp.precision, device)
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
        "precision": precision._asdict(),
        "allocator": {
            "requested": exp.allocator,
            "configured": allocator is not None and allocator.configured,
            "reason": "left alone" if allocator is None else allocator.reason,
        },
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
    precision: PrecisionChoice | None = None,
    allocator: AllocatorSetting | None = None,
) -> None:
    """``spec.json`` (the experiment, exactly) and ``run.json`` (or ``run-resumed-N.json``;
    :func:`run_info`)."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "spec.json", specs.to_json(exp) + "\n")
    name = "run.json" if resumed_at is None else f"run-resumed-{resumed_at}.json"
    atomic_write_text(
        out / name,
        json.dumps(
            run_info(exp, device, world_size, precision=precision, allocator=allocator), indent=2
        )
        + "\n",
    )


# --- the folder before a run starts ---------------------------------------------------------------


def run_contents(out: str | Path) -> list[str]:
    """The entries of a run in folder ``out`` (``RUN_FILES`` and ``run-resumed-N.json``), sorted;
    empty when ``out`` holds no run (missing, empty, or only other files)."""
    folder = Path(out)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if entry.name in RUN_FILES or RESUMED_RE.match(entry.name):
            if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
                continue  # an empty checkpoints folder alone is no run
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return sorted(found)


def _describe(out: Path) -> str:
    found = checkpoints(out)
    if found:
        return f"checkpoints up to iteration {found[-1][0]}"
    return ", ".join(run_contents(out)[:4])


def check_run_dir(out: str | Path, *, resume: bool, overwrite: bool) -> None:
    """What must hold before any work (generating data, building the model): a folder that
    holds a run is refused unless the run is resumed or ``overwrite`` is given; a resumed run
    must exist; ``out`` must not be a file; and the folder (and its ``checkpoints/``) must take
    a written file (a real write, which is what counts: permissions, read-only mounts, full
    quotas). Raises :class:`~fdet.train.data.TrainingError` or ``FileNotFoundError``."""
    out = Path(out)
    if resume and overwrite:
        raise TrainingError("resume and overwrite exclude each other: resume continues a run")
    if out.exists() and not out.is_dir():
        raise TrainingError(f"the run folder {out} is a file, not a folder")
    if resume:
        if not out.is_dir():
            raise FileNotFoundError(f"no run folder at {out} to resume")
        if not (out / "spec.json").is_file() and not checkpoints(out):
            raise FileNotFoundError(f"{out} holds no run to resume (no spec.json, no checkpoint)")
    elif not overwrite and run_contents(out):
        raise TrainingError(
            f"the folder {out} holds a run already ({_describe(out)}): continue it with "
            f"`fdet train --resume {out}`, replace it with --overwrite, or choose another folder"
        )
    probe_writable(out)


def probe_writable(out: str | Path) -> None:
    """Write and delete a small file in ``out`` and in ``out/checkpoints`` (those that exist;
    for a folder still to be made, in its nearest existing parent). A one-line
    :class:`~fdet.train.data.TrainingError` says which folder refuses and why."""
    out = Path(out)
    if out.exists():
        folders = [out, out / "checkpoints"]
        folders = [f for f in folders if f.exists()]
    else:
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        folders = [parent]
    for folder in folders:
        if not folder.is_dir():
            raise TrainingError(f"cannot make the run folder {out}: {folder} is a file")
        probe = folder / f".fdet-write-probe.{os.getpid()}.tmp"  # a stale one is cleaned
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                os.write(fd, b"fdet\n")
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as e:
            raise TrainingError(
                f"cannot write in {folder} ({e.strerror or e}): the run folder {out} must be "
                "writable"
            ) from None


def clear_run(out: str | Path) -> list[str]:
    """Delete what a run wrote in ``out`` (``RUN_FILES``, ``run-resumed-N.json``, temporary
    files); other files stay. Returns what was deleted."""
    out = Path(out)
    gone = run_contents(out)
    for name in gone:
        path = out / name.rstrip("/")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    gone += [p.name for p in remove_stale_temps(out)]
    return gone


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Delete the temporary files an atomic write left in ``out`` and ``out/checkpoints`` when
    its process was killed (``.iter_N.pt.RANDOM.tmp``). Returns them."""
    out = Path(out)
    removed = []
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if TEMP_RE.match(p.name) and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


def trim_log(out: str | Path, iteration: int) -> int:
    """Drop the records of ``log.jsonl`` after ``iteration`` (a run resumed from an older
    checkpoint writes them again), atomically. Returns how many were dropped."""
    path = Path(out) / "log.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            later = int(json.loads(line)["iteration"]) > iteration
        except (ValueError, KeyError, TypeError):
            later = False  # a line cut short by a kill: keep it as it is
        if later:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in kept))
    return dropped


# --- resuming -------------------------------------------------------------------------------------


def _expected_weights(exp: specs.Experiment) -> dict[str, tuple[int, ...]] | None:
    """The names and shapes of the model's state dict, from a build on the meta device (no
    memory, no initialization); None when the model cannot be built there."""
    try:
        with torch.device("meta"):
            model = build(exp.model)
    except Exception:
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _other_spec(out: Path, path: Path, exp: specs.Experiment) -> TrainingError:
    try:
        saved = specs.load(out / "spec.json", specs.Experiment)
    except (specs.SpecError, OSError):
        saved = None
    if saved == exp:  # the folder's spec.json and its checkpoint disagree
        return TrainingError(
            f"{out} mixes two runs: spec.json and the checkpoint {path.name} hold different "
            "experiments; start again with --overwrite or resume another folder"
        )
    return TrainingError(
        f"{out} was trained with another spec (checkpoint {path.name}); resume it with its own "
        f"spec (`fdet train --resume {out}`), or train this one into another folder"
    )


def resume_checkpoint(
    out: str | Path,
    exp: specs.Experiment,
    *,
    main: bool = True,
    warn: Callable[[str], None] = lambda line: None,
) -> tuple[Path, dict[str, Any]]:
    """The newest usable checkpoint of run folder ``out`` for experiment ``exp``, and its
    contents.

    A checkpoint that cannot be read (truncated, damaged, not fdet's, a spec that does not
    parse) or whose weights do not fit the model is passed over for the one before: ``warn``
    gets a line naming it and why, and the main process renames it to ``iter_N.pt.bad`` so
    that it is neither resumed nor kept in place of a good one. A readable checkpoint of
    another experiment stops the search (a ``TrainingError``: nothing is renamed). Raises
    ``FileNotFoundError`` when there is no checkpoint and :class:`CheckpointError` when none is
    usable."""
    out = Path(out)
    found = checkpoints(out)
    if not found:
        passed_over = sorted(p.name for p in (out / "checkpoints").glob("iter_*.pt.bad"))
        if passed_over:
            raise CheckpointError(
                f"no usable checkpoint in {out / 'checkpoints'} (passed over before: "
                f"{', '.join(passed_over)}); start the run again with --overwrite"
            )
        raise FileNotFoundError(
            f"no checkpoint to resume in {out / 'checkpoints'}: the run stopped before its first "
            "checkpoint; start it again with --overwrite"
        )
    expected: dict[str, tuple[int, ...]] | None = None
    problems = []
    for _, path in reversed(found):
        try:
            ckpt = load_checkpoint(path, map_location="cpu")
            for key in ("optimizer", "state", "rng", "iteration"):
                if key not in ckpt:
                    raise CheckpointError(f"{path}: not a training checkpoint (no {key!r})")
            saved = specs.from_json(ckpt["spec"], specs.Experiment, source=f"{path} (spec)")
            if saved != exp:
                raise _other_spec(out, path, exp)
            expected = expected or _expected_weights(exp)
            problem = None if expected is None else weights_mismatch(expected, ckpt["model"])
            if problem is not None:
                raise CheckpointError(f"{path}: its weights do not fit its spec: {problem}")
        except FileNotFoundError:
            continue  # renamed by the main process since it was listed
        except (CheckpointError, specs.SpecError) as e:
            problems.append(str(e))
            bad = path.with_name(path.name + ".bad")
            if main:
                os.replace(path, bad)
            warn(f"{e}; passed over (renamed to {bad.name})")
            continue
        return path, ckpt
    raise CheckpointError(f"no usable checkpoint in {out / 'checkpoints'}: {'; '.join(problems)}")


# --- loading a trained model ----------------------------------------------------------------------


def load_run(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    best: bool = False,
    ema: bool = True,
) -> tuple[specs.Experiment, nn.Module]:
    """The experiment and trained model of a run folder (its latest checkpoint, or ``best.pt``
    with ``best``) or of a checkpoint file. With EMA, the model carries the EMA weights, unless
    ``ema`` is False (then the raw weights, as trained).
    :func:`resolve_checkpoint` says which file that is. An unusable checkpoint raises a
    one-line :class:`~fdet.train.checkpoint.CheckpointError`; a device this machine lacks a
    ``ValueError``."""
    from fdet.train.distributed import check_device

    dev = check_device(device)
    p = resolve_checkpoint(path, best=best)
    ckpt = load_checkpoint(p, map_location=dev)
    exp = specs.from_json(ckpt["spec"], specs.Experiment, source=f"{p} (spec)")
    model = build(exp.model)
    load_weights(model, ckpt["model"], source=p)
    if ema and ckpt.get("ema") is not None:
        from fdet.train.ema import ema_load_state_dict

        try:
            state = ema_load_state_dict(ckpt["ema"], model)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{p}: its EMA weights do not fit: {e}") from None
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                tensor.copy_(state.params[name])
            for name, tensor in model.named_buffers():
                if name in state.buffers:
                    tensor.copy_(state.buffers[name])
    return exp, model.to(dev).eval()
