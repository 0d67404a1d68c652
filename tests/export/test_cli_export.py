"""`fdet export onnx` and `fdet export program`, run as the installed command: files that give
the run's detections; unusable inputs end in one line naming them, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from fdet import build
from fdet.cli import main
from fdet.export import load_program
from tests.export.conftest import (
    graph_outputs,
    make_case,
    match_detections,
    tiny_spec,
    write_run,
)

FDET = str(Path(sys.executable).parent / "fdet")


def fdet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FDET, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    case = make_case("cascade_rcnn_r18_fpn")
    return write_run(case, tmp_path_factory.mktemp("cli") / "run"), case


def test_export_onnx_and_program_from_a_run_folder(run_dir: tuple, tmp_path: Path) -> None:
    run, case = run_dir
    done = fdet("export", "onnx", str(run), "--out", str(tmp_path / "m.onnx"), "--dynamic-batch")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stderr and "[B, 3, 64, 64]" in done.stderr  # the run's size
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fdet.model"] == "CascadeRCNN"
    assert meta["fdet.class_names"].startswith('["')  # the shapes set's names
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    expected = graph_outputs(case.model, case.images)
    got = sess.run(None, {"images": case.images.numpy()})
    assert match_detections(got, expected) >= 40
    assert not got[3][case.empty].any()

    done = fdet(
        "export", "program", str(run), "--out", str(tmp_path / "m.pt2"), "--image-size", "64", "96"
    )
    assert done.returncode == 0, done.stderr
    assert "[1, 3, 64, 96]" in done.stderr
    module = load_program(tmp_path / "m.pt2").module()
    wide = torch.cat([case.images[:1], case.images[:1, ..., :32]], dim=-1)  # [1, 3, 64, 96]
    with torch.no_grad():
        got_program = module(wide)
    assert match_detections(got_program, graph_outputs(case.model, wide), score_tol=1e-6) >= 10


def one_line_error(done: subprocess.CompletedProcess[str], *names: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("fdet export: error: ")
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def test_unusable_checkpoints_end_in_one_line(run_dir: tuple, tmp_path: Path) -> None:
    run, _ = run_dir
    out = str(tmp_path / "m.onnx")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    line = one_line_error(fdet("export", "onnx", str(text), "--out", out), "notes.pt")
    assert "not a PyTorch checkpoint" in line

    checkpoint = next((run / "checkpoints").iterdir())
    data = checkpoint.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 3])
    line = one_line_error(fdet("export", "program", str(cut), "--out", out), "cut.pt")
    assert "truncated" in line
    assert not Path(out).exists()


def in_process_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``fdet.cli.main(args)`` as one line on stderr and exit status 2."""
    capsys.readouterr()
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fdet export: error: ")
    return err


def test_other_unusable_inputs_end_in_one_line(
    run_dir: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, case = run_dir
    out = str(tmp_path / "m.onnx")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    line = in_process_error(capsys, "export", "onnx", str(other), "--out", out)
    assert "other.pt" in line and "not an fdet checkpoint" in line

    checkpoint = next((run / "checkpoints").iterdir())
    entries = torch.load(checkpoint, weights_only=True)
    entries["spec"] = entries["spec"].replace('"max_pool_levels"', '"max_pool_levls"')
    newer = tmp_path / "newer.pt"
    torch.save(entries, newer)
    line = in_process_error(capsys, "export", "onnx", str(newer), "--out", out)
    assert "newer.pt" in line and "max_pool_levls" in line

    line = in_process_error(capsys, "export", "program", str(tmp_path / "none"), "--out", out)
    assert "none" in line

    masks = write_run(
        case._replace(
            name="mask_rcnn_r18_fpn",
            spec=tiny_spec("mask_rcnn_r18_fpn"),
            model=build(tiny_spec("mask_rcnn_r18_fpn")),
        ),
        tmp_path / "masks",
    )
    line = in_process_error(capsys, "export", "onnx", str(masks), "--out", out)
    assert "MaskRCNN predicts instance masks, which are not exported" in line
    assert not Path(out).exists()
