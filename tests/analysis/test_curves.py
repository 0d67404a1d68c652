from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fdet.analysis.curves import (
    LogError,
    plot_training_curves,
    read_log,
    run_curves,
    training_curves,
)


def train_line(it: int, cls: float, box: float, lr: float) -> dict[str, Any]:
    return {"iteration": it, "cls": cls, "box": box, "loss": cls + box, "cls_count": 12.0,
            "box_count": 12.0, "data_wait_ms": 1.5, "lr": lr, "it_per_s": 3.0,
            "elapsed_s": it / 3}  # fmt: skip


def eval_line(it: int, ap: float, *, segm: bool = False) -> dict[str, Any]:
    metrics: dict[str, Any] = {"AP": ap, "AP50": ap + 0.2, "APl": -1.0,
                               "per_class_ap": {"cat": ap - 0.1}, "val_loss": 1 - ap}  # fmt: skip
    if segm:
        metrics["segm"] = {"AP": ap / 2, "AP50": ap}
    return {"iteration": it, "elapsed_s": it / 3, "eval": metrics}


def write_run(folder: Path, lines: list[Any]) -> Path:
    folder.mkdir(parents=True)
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    (folder / "log.jsonl").write_text(text)
    return folder


@pytest.fixture
def run_a(tmp_path: Path) -> Path:
    return write_run(
        tmp_path / "a" / "run",
        [
            train_line(10, 1.0, 0.5, 1e-3),
            train_line(20, 0.8, 0.4, 2e-3),
            eval_line(20, 0.3, segm=True),
            "",  # a blank line is no record
            train_line(30, 0.6, 0.3, 1e-3),
            eval_line(30, 0.4, segm=True),
        ],
    )


@pytest.fixture
def run_b(tmp_path: Path) -> Path:
    lines = [train_line(i, 2.0 / i, 0.1, 5e-4) for i in (5, 15, 25, 35)] + [eval_line(35, 0.5)]
    return write_run(tmp_path / "b" / "run", lines)


def test_read_log(run_a: Path) -> None:
    records = read_log(run_a)
    assert [r["iteration"] for r in records] == [10, 20, 20, 30, 30]
    assert records == read_log(run_a / "log.jsonl")
    assert records[2]["eval"]["segm"]["AP"] == 0.15


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ('{"iteration": 40, "loss": 0.', "not JSON"),  # truncated by a crash
        ("[1, 2]", "a JSON list, not an object"),
        ('{"loss": 1.0}', "no integer 'iteration'"),
        ('{"iteration": "7"}', "no integer 'iteration'"),
    ],
)
def test_malformed_line_is_named(tmp_path: Path, bad: str, problem: str) -> None:
    run = write_run(tmp_path / "r", [train_line(10, 1.0, 0.5, 1e-3), "", bad])
    with pytest.raises(LogError, match=rf"r[/\\]log\.jsonl, line 3: {problem}"):
        read_log(run)
    with pytest.raises(LogError, match="line 3"):
        training_curves([run])


def test_malformed_lines_skipped_and_counted(tmp_path: Path) -> None:
    run = write_run(
        tmp_path / "r", [train_line(10, 1.0, 0.5, 1e-3), "garbage", "{", train_line(20, 1, 1, 1)]
    )
    with pytest.warns(UserWarning, match=r"skipped 2 malformed line\(s\): 2, 3"):
        records = read_log(run, on_error="skip")
    assert [r["iteration"] for r in records] == [10, 20]


def test_missing_log(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no training log"):
        read_log(tmp_path)


def test_curves_of_one_run(run_a: Path) -> None:
    c = run_curves(run_a)
    assert c.label == "run"
    assert sorted(c.losses) == ["box", "cls", "loss"]
    np.testing.assert_array_equal(c.losses["cls"].iterations, [10, 20, 30])
    np.testing.assert_allclose(c.losses["cls"].values, [1.0, 0.8, 0.6])
    np.testing.assert_allclose(c.losses["loss"].values, [1.5, 1.2, 0.9])
    np.testing.assert_allclose(c.lr.values, [1e-3, 2e-3, 1e-3])
    assert {"cls_count", "box_count", "it_per_s", "data_wait_ms", "elapsed_s"} == set(c.train)
    np.testing.assert_array_equal(c.eval["eval/AP"].iterations, [20, 30])
    np.testing.assert_allclose(c.eval["eval/AP"].values, [0.3, 0.4])
    np.testing.assert_allclose(c.eval["eval/segm/AP"].values, [0.15, 0.2])
    np.testing.assert_allclose(c.eval["eval/per_class_ap/cat"].values, [0.2, 0.3])
    np.testing.assert_allclose(c.eval["eval/val_loss"].values, [0.7, 0.6])
    assert all(math.isnan(v) for v in c.eval["eval/APl"].values)  # COCO's -1: no large objects
    assert "elapsed_s" not in c.eval and "iteration" not in c.eval


def test_two_runs(run_a: Path, run_b: Path) -> None:
    curves = training_curves([run_a, run_b])
    assert list(curves) == ["run", "run (2)"]  # same folder names: numbered
    assert curves["run (2)"].path == run_b / "log.jsonl"
    np.testing.assert_allclose(curves["run (2)"].losses["cls"].values, [0.4, 2 / 15, 0.08, 2 / 35])
    assert "eval/segm/AP" not in curves["run (2)"].eval
    named = training_curves([run_a, run_b], labels=["base", "wide"])
    assert list(named) == ["base", "wide"]
    with pytest.raises(ValueError, match="labels: got 1 for 2 runs"):
        training_curves([run_a, run_b], labels=["x"])


def test_plot_two_runs(run_a: Path, run_b: Path, tmp_path: Path) -> None:
    paths = plot_training_curves([run_a, run_b], tmp_path / "plots", labels=["a", "b"])
    assert [p.name for p in paths] == [
        "losses.png",
        "lr.png",
        "eval_bbox.png",
        "eval_segm.png",
        "val_losses.png",
    ]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
    # without evaluation lines no eval plots
    only_train = write_run(tmp_path / "c", [train_line(1, 1, 1, 1)])
    names = [p.name for p in plot_training_curves([only_train], tmp_path / "plots2")]
    assert names == ["losses.png", "lr.png"]
