"""torch.export: the saved ExportedProgram loads back (in this process and in a fresh one) and
gives the detections of the eager model; a file that is not a program is refused clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fdet.export import ExportError, export_program, load_program
from tests.export.conftest import SIZE, graph_outputs, make_case, match_detections


@pytest.mark.parametrize("name", ["retinanet_r18_fpn", "gfl_r18_fpn", "faster_rcnn_r18_fpn"])
def test_the_saved_program_gives_the_eager_detections(name: str, tmp_path: Path) -> None:
    case = make_case(name)
    path = export_program(
        case.model, tmp_path / "model.pt2", image_size=(SIZE, SIZE), dynamic_batch=True
    )
    program = load_program(path)
    assert isinstance(program, torch.export.ExportedProgram)
    module = program.module()
    expected = graph_outputs(case.model, case.images)
    with torch.no_grad():
        got = module(case.images)
    assert [t.dtype for t in got] == [torch.float32, torch.float32, torch.int64, torch.bool]
    assert match_detections(got, expected, box_tol=1e-4, score_tol=1e-6) >= 20
    with torch.no_grad():
        single = module(case.images[2:3])
    match_detections(single, tuple(t[2:3] for t in expected), box_tol=1e-4, score_tol=1e-6)


def test_the_program_loads_in_a_fresh_process(tmp_path: Path) -> None:
    case = make_case("faster_rcnn_r18_fpn")
    path = export_program(case.model, tmp_path / "model.pt2", image_size=(SIZE, SIZE))
    images = case.images[case.empty : case.empty + 1] if case.empty is not None else None
    assert images is not None  # the gray image: no detection
    for index, image in enumerate([images, case.images[:1]]):
        torch.save(image, tmp_path / f"image{index}.pt")
    script = (
        "import sys, numpy as np, torch\n"
        "from fdet.export import load_program\n"
        "module = load_program(sys.argv[1]).module()\n"
        "for i in range(2):\n"
        "    image = torch.load(f'{sys.argv[2]}/image{i}.pt')\n"
        "    with torch.no_grad():\n"
        "        out = module(image)\n"
        "    np.savez(f'{sys.argv[2]}/out{i}.npz', *[t.numpy() for t in out])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    for index, image in enumerate([images, case.images[:1]]):
        saved = np.load(tmp_path / f"out{index}.npz")
        got = [saved[f"arr_{k}"] for k in range(4)]
        count = match_detections(
            got, graph_outputs(case.model, image), box_tol=1e-4, score_tol=1e-6
        )
        assert count == 0 if index == 0 else count >= 10


def test_files_that_are_not_programs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no exported program"):
        load_program(tmp_path / "missing.pt2")
    text = tmp_path / "text.pt2"
    text.write_text("not a program\n")
    with pytest.raises(ExportError, match="not an exported program"):
        load_program(text)
    with pytest.raises(ExportError, match="a folder"):
        load_program(tmp_path)
    case = make_case("centernet_r18")
    path = export_program(case.model, tmp_path / "model.pt2", image_size=(SIZE, SIZE))
    data = path.read_bytes()
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"cut\.pt2"):
        load_program(cut)
