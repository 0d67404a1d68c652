"""Every family's shapes spec file trains through `fdet train` and evaluates through `fdet eval`,
cut down from the command line to seconds (a narrow backbone, 64² images, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from fdet import specs
from fdet.cli import main
from fdet.train import load_run
from tests.inference.conftest import tiny_set_args

SHAPES = Path(__file__).resolve().parents[2] / "specs" / "shapes"

CASCADE_TERMS = {f"roi{t}_{kind}" for t in range(3) for kind in ("cls", "box")}
FAMILIES = [
    ("retinanet_r18_fpn.py", specs.RetinaNet, {"cls", "box"}),
    ("fcos_r18_fpn.py", specs.FCOS, {"cls", "box", "centerness"}),
    ("atss_r18_fpn.py", specs.ATSS, {"cls", "box", "centerness"}),
    ("gfl_r18_fpn.py", specs.GFL, {"cls", "box", "dfl"}),
    ("centernet_r18.py", specs.CenterNet, {"heatmap", "size", "offset"}),
    ("faster_rcnn_r18_fpn.py", specs.FasterRCNN, {"rpn_cls", "rpn_box", "roi_cls", "roi_box"}),
    (
        "mask_rcnn_r18_fpn.py",
        specs.MaskRCNN,
        {"rpn_cls", "rpn_box", "roi_cls", "roi_box", "mask"},
    ),
    ("cascade_rcnn_r18_fpn.py", specs.CascadeRCNN, {"rpn_cls", "rpn_box"} | CASCADE_TERMS),
    (
        "cascade_mask_rcnn_r18_fpn.py",
        specs.CascadeRCNN,
        {"rpn_cls", "rpn_box", "mask"} | CASCADE_TERMS,
    ),
]


def tiny_overrides(cache: Path) -> list[str]:
    """``--set`` options that shrink any shapes experiment to four steps of four 64² images,
    float32 (the same on every CPU), keeping the file's model otherwise."""
    return tiny_set_args(cache)


@pytest.mark.parametrize(("file", "family", "terms"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_trains_and_evaluates_from_the_command_line(
    file: str,
    family: type,
    terms: set[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    args = ["train", str(SHAPES / file), "--out", str(run), "--no-progress"]
    assert main(args + tiny_overrides(tmp_path / "cache")) == 0

    exp, model = load_run(run)
    assert isinstance(exp.model, family)
    base = specs.load(SHAPES / file, specs.Experiment).model
    assert exp.model == attrs.evolve(base, backbone=attrs.evolve(base.backbone, width=16))
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["iteration"] for x in train_lines] == [2, 4]
    for line in train_lines:
        # every term of the family is logged, finite, and they add up to the loss
        assert terms <= set(line), line
        assert all(line[t] >= 0 for t in terms)
        assert sum(line[t] for t in terms) == pytest.approx(line["loss"], rel=1e-4, abs=1e-6)
    written = json.loads((run / "metrics.json").read_text())
    metrics = written["bbox"]
    assert 0.0 <= metrics["AP"] <= 1.0 and len(metrics["per_class_ap"]) == 6
    with_masks = getattr(exp.model, "mask_head", None) is not None
    assert ("segm" in written) == with_masks  # mask AP beside box AP for mask heads

    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(run), "--out", str(out_json)]) == 0
    assert "AP50" in capsys.readouterr().out
    evaluated_types = json.loads(out_json.read_text())
    evaluated = evaluated_types["bbox"]
    assert evaluated["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    if with_masks:
        segm = evaluated_types["segm"]
        assert 0.0 <= segm["AP"] <= 1.0 and len(segm["per_class_ap"]) == 6
        assert segm["AP"] == pytest.approx(written["segm"]["AP"], abs=1e-9)
    else:
        assert set(evaluated_types) == {"bbox"}
    assert not model.training
