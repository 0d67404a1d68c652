"""`fdet data split` as a user meets it: the two files it writes, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fdet.cli import main
from fdet.data import CocoDataset, ShapesPaths
from fdet.data.semi import split_indices
from fdet.data.shapes import generate


def run_fdet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed ``fdet`` command (the one next to this Python), else ``python -m fdet``."""
    script = Path(sys.executable).parent / "fdet"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "fdet"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def error_line(returncode: int, stdout: str, stderr: str) -> str:
    """The one error line of a failed run (after argparse's usage lines); no traceback."""
    assert returncode == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    lines = [x for x in stderr.splitlines() if not x.startswith(("usage:", " "))]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(("fdet data: error: ", "fdet data split: error: ")), stderr
    return lines[0]


def main_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The error line of ``fdet ARGS`` run in this process."""
    try:
        returncode = main(args)
    except SystemExit as e:  # argparse's errors
        returncode = int(e.code or 0)
    out = capsys.readouterr()
    return error_line(returncode, out.out, out.err)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> ShapesPaths:
    root = tmp_path_factory.mktemp("split") / "set"
    return generate(root, train=10, val=1, size=32, seed=2, min_object_size=4)


def test_split_writes_labeled_and_unlabeled_files(shapes: ShapesPaths, tmp_path: Path) -> None:
    source = shapes.train_annotations
    data = json.loads(source.read_text())
    proc = run_fdet(
        "data",
        "split",
        str(source),
        "--fraction",
        "0.3",
        "--seed",
        "4",
        "--out",
        "out",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    labeled = json.loads((tmp_path / "out" / "labeled.json").read_text())
    unlabeled = json.loads((tmp_path / "out" / "unlabeled.json").read_text())

    expected_labeled, expected_unlabeled = split_indices(len(data["images"]), 0.3, 4)
    assert labeled["images"] == [data["images"][i] for i in expected_labeled]
    assert unlabeled["images"] == [data["images"][i] for i in expected_unlabeled]
    assert len(labeled["images"]) == 3 and len(unlabeled["images"]) == 7
    ids = {im["id"] for im in labeled["images"]}
    assert labeled["annotations"] == [a for a in data["annotations"] if a["image_id"] in ids]
    assert labeled["annotations"] and unlabeled["annotations"] == []
    assert labeled["categories"] == data["categories"] == unlabeled["categories"]
    assert proc.stdout == (
        f"fdet data split: 3 labeled images ({len(labeled['annotations'])} annotations) in "
        "out/labeled.json, 7 unlabeled images in out/unlabeled.json\n"
    )
    # both are COCO files fdet reads, with the source's image folder
    images = shapes.train_images
    reread = CocoDataset(images, tmp_path / "out" / "labeled.json")
    assert reread.image_ids == tuple(im["id"] for im in labeled["images"])
    assert len(reread.coco.getAnnIds()) == len(labeled["annotations"])
    rest = CocoDataset(images, tmp_path / "out" / "unlabeled.json")
    assert rest.image_ids == tuple(im["id"] for im in unlabeled["images"])
    # seeded: the same seed the same split, another seed another
    again = run_fdet(
        "data",
        "split",
        str(source),
        "--fraction",
        "0.3",
        "--seed",
        "4",
        "--out",
        "again",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "labeled.json").read_text() == json.dumps(labeled)
    splits = {tuple(split_indices(len(data["images"]), 0.3, seed)[0]) for seed in range(5)}
    assert len(splits) > 1


def test_split_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            {
                "images": [{"id": 1}, {"id": 2}, {"id": 3}],
                "annotations": [{"id": 1, "image_id": 2}],
                "categories": [{"id": 1, "name": "a"}],
            }
        )
    )
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"annotations": [], "categories": []}))
    (tmp_path / "a_file").write_text("")
    cases = [
        ((str(tmp_path / "missing.json"), "--fraction", "0.5"), "missing.json: cannot read"),
        ((str(bad_json), "--fraction", "0.5"), "bad.json: malformed JSON"),
        ((str(no_images), "--fraction", "0.5"), "no_images.json: needs a list 'images'"),
        ((str(good), "--fraction", "0"), "argument --fraction: must be in (0, 1), got 0"),
        ((str(good), "--fraction", "1.5"), "argument --fraction: must be in (0, 1), got 1.5"),
        ((str(good), "--fraction", "half"), "argument --fraction: expected a number, got 'half'"),
        ((str(good), "--fraction", "0.9"), "good.json: split: a labeled fraction of 0.9 of 3"),
        ((str(one), "--fraction", "0.5"), "one.json: split: needs at least 2 images"),
    ]
    for args, message in cases:
        line = main_error(["data", "split", *args, "--out", "out"], capsys)
        assert message in line, (args, line)
    assert not (tmp_path / "out").exists()
    line = main_error(["data", "split", str(good), "--fraction", "0.5", "--out", "a_file"], capsys)
    assert "a_file: is a file, not a folder" in line
    # as a user meets them: from the installed command
    for args, message in cases[3], cases[6]:
        proc = run_fdet("data", "split", *args, "--out", "out", cwd=tmp_path)
        assert message in error_line(proc.returncode, proc.stdout, proc.stderr)
