"""Spec files are checked by a type checker: a misspelled or mistyped field is an error in the
editor, before anything runs. fdet ships ``py.typed``; this runs mypy on spec files against the
fdet that is installed."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import fdet

PACKAGE = Path(fdet.__file__).resolve().parent


def _mypy(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("MYPYPATH", None)
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if PACKAGE.parent not in site:
        # An editable install finds fdet through an import hook, which mypy does not run: point
        # it at the source tree (a regular install is found in site-packages by its py.typed).
        env["MYPYPATH"] = str(PACKAGE.parent)
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--config-file=",  # none of the project's settings: a user's plain mypy
        "--cache-dir",
        str(tmp_path / "mypy_cache"),
        # Check the spec files fully and read fdet's annotations, without reporting on the
        # libraries below them.
        "--follow-imports=silent",
        "--no-error-summary",
        *map(str, files),
    ]
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_fdet_is_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()


def test_mypy_names_a_misspelled_or_mistyped_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad_spec.py"
    bad.write_text(
        "from fdet import specs\n"
        "HEAD = specs.RetinaHead(num_clases=3)\n"
        'BACKBONE = specs.ResNet(norm="bn")\n'
        "SCHEDULE = specs.Schedule(decay=specs.LinearWarmup())\n"
    )
    good = tmp_path / "good_spec.py"
    good.write_text(
        "from fdet import specs\n"
        "MODEL = specs.RetinaNet(\n"
        "    backbone=specs.ResNet(depth=18, norm=specs.BatchNorm()),\n"
        "    head=specs.RetinaHead(num_classes=3, norm=specs.GroupNorm(groups=16)),\n"
        "    box_loss=specs.GIoULoss(weight=2.0),\n"
        ")\n"
        "EXPERIMENT = specs.Experiment(\n"
        "    model=MODEL,\n"
        "    optimizer=specs.AdamW(lr=1e-3),\n"
        "    schedule=specs.Schedule(warmup=None, decay=specs.CosineDecay()),\n"
        ")\n"
    )
    result = _mypy(tmp_path, bad, good)
    lines = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 1, result.stdout + result.stderr
    assert all(line.startswith("bad_spec.py:") for line in lines), result.stdout
    assert any(
        line.startswith("bad_spec.py:2:") and '"num_clases"' in line and "RetinaHead" in line
        for line in lines
    ), result.stdout
    assert any(line.startswith("bad_spec.py:3:") and '"Norm"' in line for line in lines)
    assert any(line.startswith("bad_spec.py:4:") and '"Decay"' in line for line in lines)
