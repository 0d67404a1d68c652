"""Spec errors as a user meets them on the command line: one line naming the place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parents[2] / "specs"


def run_fdet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdet", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def one_error_line(proc: subprocess.CompletedProcess[str], command: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fdet {command}: error: "), proc.stderr
    return lines[0].removeprefix(f"fdet {command}: error: ")


def test_python_spec_file_errors(tmp_path: Path) -> None:
    start = "from fdet import specs\n\nMODEL = specs.RetinaNet(\n"
    (tmp_path / "broken.py").write_text(start + "    head=specs.RetinaHead(num_classes=2]\n)\n")
    (tmp_path / "typo.py").write_text(start + "    head=specs.RetinaHead(num_clases=2),\n)\n")
    syntax = one_error_line(run_fdet("spec", "broken.py", cwd=tmp_path), "spec")
    assert syntax.startswith("broken.py:4: syntax error: closing parenthesis ']'"), syntax
    typo = one_error_line(run_fdet("spec", "typo.py", "--json", cwd=tmp_path), "spec")
    assert typo.startswith(
        "typo.py:4: unknown keyword 'num_clases' for RetinaHead; did you mean 'num_classes'?"
    ), typo


def test_a_non_finite_override_fails_the_dry_run(tmp_path: Path) -> None:
    spec = str(ZOO / "shapes" / "retinanet_r18_fpn.py")
    proc = run_fdet("train", spec, "--set", "optimizer.lr=Infinity", "--dry-run", cwd=tmp_path)
    message = one_error_line(proc, "train")
    assert message.startswith("optimizer.lr: inf is not a finite number"), message


def test_build_without_a_builder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fdet.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd.py").write_text(
        "import attrs\nfrom fdet import specs\n\n\n"
        "@attrs.frozen(kw_only=True)\nclass UnbuiltNorm(specs.Norm):\n    eps: float = 1e-5\n\n\n"
        "MODEL = specs.RetinaNet(\n    head=specs.RetinaHead(num_classes=2),\n"
        "    backbone=specs.ResNet(norm=UnbuiltNorm()),\n)\n"
    )
    assert main(["spec", "odd.py", "--build"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fdet spec: error: odd.py: cannot build it: no builder is registered")
    assert len(err.splitlines()) == 1
