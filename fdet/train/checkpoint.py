"""Checkpoints: written atomically, read with ``weights_only=True``, and every way of being
unusable reported as one :class:`CheckpointError` that names the file."""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdet.atomic import atomic_write

__all__ = [
    "CheckpointError",
    "atomic_save",
    "checkpoint_entries",
    "load_checkpoint",
    "load_weights",
    "weights_mismatch",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated or damaged, not a checkpoint, not fdet's,
    holding objects other than tensors, numbers and strings, or weights that do not fit."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never a partial one. The file's mode follows
    the umask, like the run's other files."""
    return atomic_write(path, lambda f: torch.save(obj, f))


_ZIP_MAGIC = b"PK\x03\x04"


def _why_unreadable(path: Path, error: BaseException) -> str:
    """What is wrong with a file ``torch.load`` refused, in words that never suggest loading it
    with ``weights_only=False``."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty"
    if head != _ZIP_MAGIC:
        return "not a PyTorch checkpoint file"
    if not zipfile.is_zipfile(path):
        return "truncated or damaged (an incomplete checkpoint file)"
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL (\S+?)[ ,]", str(error))
        what = f" ({found.group(1)})" if found else ""
        return (
            f"refused: it holds Python objects{what} besides tensors, numbers and strings, which "
            "fdet checkpoints never do; it is not loaded, since loading it could run code"
        )
    return f"damaged ({type(error).__name__})"


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by fdet (tensors, numbers, strings only: ``weights_only``).

    A missing file raises ``FileNotFoundError``; anything else unusable a one-line
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint file (a folder?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings about foreign pickles
            data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: {_why_unreadable(path, e)}") from e
    if not isinstance(data, dict) or "model" not in data or "spec" not in data:
        raise CheckpointError(f"{path}: not an fdet checkpoint (no 'model' and 'spec' entries)")
    if not isinstance(data["model"], Mapping) or not isinstance(data["spec"], str):
        raise CheckpointError(f"{path}: not an fdet checkpoint (malformed 'model' or 'spec')")
    return data


def checkpoint_entries(path: str | Path) -> dict | None:
    """A checkpoint's entries with its tensors left on disk (memory-mapped, ``weights_only``),
    or None when it cannot be read: for metadata (the class names a run records) of a file the
    model was already loaded from by :func:`load_checkpoint`, which reports what is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entries = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return entries if isinstance(entries, dict) else None


def weights_mismatch(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], *, limit: int = 3
) -> str | None:
    """How ``state`` (a state dict) differs from the names and shapes ``expected``, in one
    line, or None when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {list(getattr(state[k], 'shape', ()))} instead of {list(expected[k])}"
        for k in expected
        if k in state and tuple(getattr(state[k], "shape", ())) != tuple(expected[k])
    ]
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("of another shape", reshaped),
    ):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:limit])}{more})")
    if not parts:
        return None
    return "; ".join(parts)


def load_weights(module: nn.Module, state: Mapping[str, Any], *, source: str | Path) -> None:
    """``module.load_state_dict(state)``, or a one-line :class:`CheckpointError` naming
    ``source`` and the missing, unexpected and misshapen entries."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problem = weights_mismatch(expected, state)
    if problem is not None:
        raise CheckpointError(
            f"{source}: its weights do not fit the model of its spec ({type(module).__name__}): "
            f"{problem}"
        )
    module.load_state_dict(state)
