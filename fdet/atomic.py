"""Writing a file atomically: a temporary file in the same folder, fsync, then a rename over the
target, so a reader (or a run resumed after a crash) sees the old file or the new one, never a
partial one. Imports nothing from fdet, so every layer may use it.

The temporary file is created with mode ``0o666`` filtered by the process's umask, like any file
``open()`` creates (``tempfile.mkstemp`` would make it ``0o600``), and is named
``.NAME.RANDOM.tmp``: :data:`TEMP_RE` recognises the ones a killed process leaves behind.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMP_RE", "atomic_write", "atomic_write_text"]

TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
"""Names of the temporary files :func:`atomic_write` makes (``.iter_00000006.pt.3f9a1c2e.tmp``)."""


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file next to ``path``, open for writing; umask-filtered mode."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, flush and fsync it, rename it over
    ``path`` and fsync the folder. On any error (or interrupt) the temporary file is removed and
    ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of ``text`` in UTF-8."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))
