"""``fdet infer`` end to end, run as the installed ``fdet`` command: a folder of the run's own
validation images against ``fdet eval``'s results, a video, and every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fdet.cli import main
from fdet.inference import Predictor
from tests.inference.conftest import RETINANET_DETECTS, MakeTinyRun

FDET = Path(sys.executable).parent / "fdet"


def fdet(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert FDET.is_file(), f"the fdet command is not installed beside {sys.executable}"
    return subprocess.run(
        [str(FDET), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FDET_DEBUG": ""},
    )


@pytest.fixture(scope="module")
def run(make_tiny_run: MakeTinyRun) -> Path:
    return make_tiny_run("retinanet_r18_fpn.py", RETINANET_DETECTS)


def val_set(run: Path) -> tuple[Path, dict[str, Any]]:
    """The run's validation image folder and annotations (the shapes set it was trained on)."""
    from fdet import specs
    from fdet.data.shapes import ensure_shapes

    exp = specs.load(run / "spec.json", specs.Experiment)
    paths = ensure_shapes(exp.data)
    return paths.val_images, json.loads(paths.val_annotations.read_text())


def test_a_folder_gives_the_results_of_fdet_eval(run: Path, tmp_path: Path) -> None:
    images, annotations = val_set(run)
    out = tmp_path / "out"
    done = fdet("infer", run, images, "--out", out, "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    results = json.loads((out / "results.json").read_text())

    assert main(["eval", str(run), "--results", str(tmp_path / "eval.json")]) == 0
    expected = json.loads((tmp_path / "eval.json").read_text())

    entries = {e["id"]: e for e in annotations["images"]}
    category_ids = {c["id"] for c in annotations["categories"]}
    assert len(results) == len(expected) > 0
    for got, want in zip(results, expected, strict=True):  # both: image by image, best first
        entry = entries[want["image_id"]]
        assert got["image_id"] == want["image_id"]
        assert got["file_name"] == str(images / entry["file_name"])
        assert got["category_id"] == want["category_id"] and got["category_id"] in category_ids
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-3)
        assert got["score"] == pytest.approx(want["score"], abs=1e-6)
        assert set(got) == {"file_name", "image_id", "category_id", "bbox", "score"}

    # one annotated image an input, at its original size
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(Path(e["file_name"]).stem + ".png" for e in entries.values())
    for e in entries.values():
        with Image.open(out / (Path(e["file_name"]).stem + ".png")) as drawn:
            assert drawn.size == (e["width"], e["height"])


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decoded_frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_a_video_gives_an_annotated_video_and_results_by_frame(run: Path, tmp_path: Path) -> None:
    images, _ = val_set(run)
    pictures = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(images.glob("*.png"))]
    frames = [pictures[i % len(pictures)][:48] for i in range(5)]  # 48×64 frames
    clip = tmp_path / "clip.mp4"
    write_video(clip, frames)
    out = tmp_path / "out"
    done = fdet("infer", run, clip, "--out", out, "--batch-size", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert {r["file_name"] for r in results} == {str(clip)}
    assert all("image_id" not in r for r in results)

    # each frame's records are the Predictor's detections of that frame as decoded
    source = decoded_frames(clip)
    assert len(source) == 5
    predictions = Predictor.from_checkpoint(run)(source)
    category_ids = {k: k + 1 for k in range(6)}  # the shapes set numbers its categories from 1
    for index, prediction in enumerate(predictions):
        got = [r for r in results if r["frame"] == index]
        assert len(got) == len(prediction) > 0
        for record, box, label, score in zip(
            got, prediction.boxes.tolist(), prediction.labels.tolist(), prediction.scores.tolist()
        ):
            x1, y1, x2, y2 = box
            assert record["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)
            assert record["category_id"] == category_ids[label]
            assert record["score"] == pytest.approx(score, abs=1e-6)

    annotated = decoded_frames(out / "clip.mp4")
    assert len(annotated) == 5 and annotated[0].shape == (48, 64, 3)
    assert any(not np.array_equal(a, s) for a, s in zip(annotated, source))  # boxes drawn


# --- bad input ------------------------------------------------------------------------------------


def good_png(folder: Path, name: str = "good.png") -> Path:
    rng = np.random.default_rng(0)
    path = folder / name
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def bad_image(folder: Path, kind: str) -> Path:
    if kind == "text named .png":
        path = folder / "notes.png"
        path.write_text("these are notes, not pixels\n")
    elif kind == "truncated png":
        data = good_png(folder, "whole.png").read_bytes()
        path = folder / "cut.png"
        path.write_bytes(data[: len(data) // 2])
        (folder / "whole.png").unlink()
    elif kind == "zero-size file":
        path = folder / "empty.png"
        path.write_bytes(b"")
    elif kind == "text named .mp4":
        path = folder / "clip.mp4"
        path.write_text("not a video either\n")
    else:  # a folder that does not exist
        path = folder / "missing"
    return path


BAD_IMAGES = {
    "text named .png": "not a readable image",
    "truncated png": "not a readable image",
    "zero-size file": "an empty file (0 bytes)",
    "missing input": "no such file or folder",
    "text named .mp4": "not a readable video",
}
GIVEN_ALONE = ("missing input", "text named .mp4")  # not found by listing the folder


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fdet infer: error: ") and "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_a_bad_image_is_one_line_naming_it(run: Path, tmp_path: Path, kind: str) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = bad_image(inputs, kind)
    good_png(inputs)
    given = [bad, inputs] if kind in GIVEN_ALONE else [inputs]
    done = fdet("infer", run, *given, "--out", "out", cwd=tmp_path)
    assert_one_line_error(done, str(bad), BAD_IMAGES[kind])


def test_skip_bad_skips_counts_and_keeps_the_others(run: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad = [bad_image(inputs, kind) for kind in BAD_IMAGES]
    goods = [good_png(inputs, "a.png"), good_png(inputs, "z.png")]
    given = [p for p, kind in zip(bad, BAD_IMAGES) if kind in GIVEN_ALONE]
    args = ["infer", run, inputs, *given, "--out", tmp_path / "out", "--skip-bad"]
    done = fdet(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fdet infer: skipped 5 bad inputs: "), done.stderr
    for path in bad:
        assert str(path) in last
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["file_name"] for r in results} == {str(p) for p in goods}
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "z.png"]
    # the good images' results are the Predictor's on them alone
    predictions = Predictor.from_checkpoint(run)(goods)
    assert len(results) == sum(len(p) for p in predictions) > 0
    boxes = torch.cat([p.boxes for p in predictions]).double()
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1)
    assert [r["file_name"] for r in results] == [
        p.source for p in predictions for _ in range(len(p))
    ]
    torch.testing.assert_close(
        torch.tensor([r["bbox"] for r in results], dtype=torch.float64), xywh, atol=1e-4, rtol=0
    )


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root, which reads any folder whatever its permissions",
)
def test_an_unreadable_folder_is_one_line_naming_it(run: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    good_png(locked)
    locked.chmod(0)
    try:
        done = fdet("infer", run, locked, "--out", "out", cwd=tmp_path)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(done, str(locked), "cannot read the folder")


def future_checkpoint(source: Path, target: Path) -> None:
    entries = torch.load(source, weights_only=True)
    envelope = json.loads(entries["spec"])
    envelope["schema_version"] = 99
    entries["spec"] = json.dumps(envelope)
    torch.save(entries, target)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "truncated or damaged"),
        ("future spec version", "schema_version 99 was written by a newer fdet"),
        ("not a checkpoint", "not a PyTorch checkpoint file"),
        ("not fdet's", "not an fdet checkpoint"),
    ],
)
def test_a_bad_checkpoint_is_one_line_naming_it(
    run: Path, tmp_path: Path, kind: str, message: str
) -> None:
    source = sorted((run / "checkpoints").glob("iter_*.pt"))[-1]
    checkpoint = tmp_path / "model.pt"
    if kind == "truncated":
        data = source.read_bytes()
        checkpoint.write_bytes(data[: len(data) // 2])
    elif kind == "future spec version":
        future_checkpoint(source, checkpoint)
    elif kind == "not a checkpoint":
        checkpoint.write_text("weights, honestly\n")
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, checkpoint)
    image = good_png(tmp_path)
    done = fdet("infer", checkpoint, image, "--out", "out", cwd=tmp_path)
    assert_one_line_error(done, str(checkpoint), message)


def test_tta_spec_file_gives_the_predictors_tta_results(run: Path, tmp_path: Path) -> None:
    from fdet import specs

    tta_file = Path(__file__).resolve().parents[2] / "specs" / "tta" / "flip.py"
    image = good_png(tmp_path)
    out = tmp_path / "out"
    done = fdet("infer", run, image, "--out", out, "--tta", tta_file, "--no-draw", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not list(out.glob("*.png"))  # --no-draw
    results = json.loads((out / "results.json").read_text())
    tta = specs.load(tta_file, specs.TTA, name="TTA")
    want = Predictor.from_checkpoint(run, tta=tta)(image)[0]
    plain = Predictor.from_checkpoint(run)(image)[0]
    assert len(results) == len(want) > 0
    boxes = want.boxes.double()
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1)
    got = torch.tensor([r["bbox"] for r in results], dtype=torch.float64)
    torch.testing.assert_close(got, xywh, atol=1e-4, rtol=0)
    assert not (len(plain) == len(want) and torch.allclose(plain.boxes, want.boxes))


def test_output_names_and_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import io

    from fdet.inference.cli import _Names, _progress

    names = _Names()
    assert [names("x", ".png"), names("x", ".png"), names("X", ".png"), names("x", ".mp4")] == [
        "x.png",
        "x-2.png",
        "X-3.png",
        "x.mp4",
    ]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = argparse.Namespace(no_progress=False)
    bar = _progress(3, args)
    bar.update(3)
    bar.close()
    assert "3/3" in terminal.getvalue()
    for total, no_progress in ((1, False), (3, True)):  # one input, or --no-progress: no bar
        before = terminal.getvalue()
        quiet = _progress(total, argparse.Namespace(no_progress=no_progress))
        quiet.update(1)
        quiet.close()
        assert terminal.getvalue() == before
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar
    assert type(_progress(3, args)).__name__ == "_NoBar"
