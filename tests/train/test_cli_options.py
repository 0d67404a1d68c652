"""`fdet train` options: --dry-run, --set, --resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdet import specs
from fdet.cli import main

from .test_engine import gn_experiment


def test_dry_run_prints_tree_parameters_and_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = tmp_path / "exp.json"
    spec_file.write_text(specs.to_json(gn_experiment(tmp_path / "cache")))
    assert main(["train", str(spec_file), "--dry-run", "--set", "iterations=7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Experiment\n")
    assert "iterations: 7" in out
    assert "parameters" in out and "trainable" in out
    assert "train: 24 images" in out and "val: 8 images" in out and "circle" in out
    assert not (tmp_path / "runs").exists()


def test_set_is_validated_like_the_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "exp.json"
    spec_file.write_text(specs.to_json(gn_experiment(tmp_path / "cache")))
    assert main(["train", str(spec_file), "--dry-run", "--set", "optimizer.lrr=0.1"]) == 2
    assert "optimizer.lrr" in capsys.readouterr().err
    assert main(["train", str(spec_file), "--dry-run", "--set", "batch_size=-4"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main(["train", str(spec_file), "--dry-run", "--set", "precision=fp8"]) == 2
    assert "precision" in capsys.readouterr().err


def test_resume_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fdet.train import train

    exp = gn_experiment(tmp_path / "cache", iterations=4)
    train(exp, tmp_path / "run", progress=False, stop_after=2)
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "[4/4] loss" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.json").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit, match="2"):
        main(["train", "x.py", "--resume", str(tmp_path / "run")])
    assert "--resume continues a run in its folder with its saved spec; a spec file" in (
        capsys.readouterr().err
    )
