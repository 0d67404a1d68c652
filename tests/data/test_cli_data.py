"""`fdet data shapes` as a user meets it: what it wrote, what was there, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fdet.cli import main
from fdet.data.shapes import generate


def run_fdet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdet", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one `fdet data [shapes]: error: ...` line of a failed run (after argparse's usage
    lines, if any); no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if not x.startswith(("usage:", " "))]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(("fdet data: error: ", "fdet data shapes: error: ")), proc.stderr
    return lines[0]


def test_writes_then_finds_the_set_already_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ("data", "shapes", "--out", "set", "--train", "2", "--val", "1", "--size", "32")
    assert main(list(args)) == 0
    assert capsys.readouterr().out == "fdet data shapes: wrote 2 train and 1 val images under set\n"
    manifest = (tmp_path / "set" / "shapes.json").stat()

    again = run_fdet(*args, cwd=tmp_path)  # the re-run, as a user meets it
    assert again.returncode == 0, again.stderr
    assert again.stdout == (
        "fdet data shapes: set already holds this set (2 train and 1 val images); nothing written\n"
    )
    assert (tmp_path / "set" / "shapes.json").stat().st_mtime_ns == manifest.st_mtime_ns

    assert main(["data", "shapes", "--out", "set", "--train", "3", "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "set: holds a shapes set with other parameters " in err
    assert "(train 2, val 1, size 32, seed 0" in err
    assert "choose another folder, or remove this one first" in err
    assert len(list((tmp_path / "set" / "train").iterdir())) == 2  # untouched


def test_bad_arguments_name_the_option(tmp_path: Path) -> None:
    cases = [
        (
            ["--size", "0"],
            "argument --size: must be >= 16 (twice the smallest object, 8 px), got 0",
        ),
        (["--size", "15"], "argument --size: must be >= 16"),
        (["--train", "-1"], "argument --train: must be >= 0, got -1"),
        (["--val", "x"], "argument --val: expected an integer, got 'x'"),
        (["--seed", "-2"], "argument --seed: must be >= 0, got -2"),
    ]
    for options, message in cases:
        proc = run_fdet("data", "shapes", "--out", "never", *options, cwd=tmp_path)
        assert message in error_line(proc), options
    assert not (tmp_path / "never").exists()


def test_a_file_or_a_foreign_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for out, message in (
        ("file", "file: is a file, not a folder"),
        ("mine", "mine: is not empty and holds no shapes set; choose another folder"),
    ):
        assert main(["data", "shapes", "--out", str(tmp_path / out), "--train", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(("fdet data: error: ", "fdet data shapes: error: "))
        assert message in err and len(err.splitlines()) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_find_set_and_read_manifest(tmp_path: Path) -> None:
    from fdet.data.shapes import find_set, read_manifest

    assert find_set(tmp_path / "s", train=1, val=1, size=32) is None
    assert read_manifest(tmp_path / "s") is None
    paths = generate(tmp_path / "s", train=1, val=1, size=32, min_object_size=4)
    assert find_set(tmp_path / "s", train=1, val=1, size=32, min_object_size=4) == paths
    assert find_set(tmp_path / "s", train=1, val=1, size=32) is None  # min_object_size differs
    assert read_manifest(tmp_path / "s") == {
        "format": "fdet-shapes",
        "version": 1,
        "train": 1,
        "val": 1,
        "size": 32,
        "seed": 0,
        "min_object_size": 4,
        "max_objects": 12,
    }
    with pytest.raises(ValueError, match=r"^seed: must be >= 0, got -1"):
        generate(tmp_path / "t", train=1, val=1, size=32, seed=-1)
    with pytest.raises(ValueError, match=r"^size: must be >= 2, got 0"):
        generate(tmp_path / "t", train=1, val=1, size=0)
