"""`fdet eval` as a user meets it: classes matched by name, bad options refused up front."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from fdet import specs
from fdet.cli import main
from fdet.data.coco import DataError
from fdet.data.shapes import CATEGORIES

ZOO = Path(__file__).resolve().parents[2] / "specs"


def run_fdet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdet", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], command: str) -> str:
    """The command failed with exit status 2 and one `fdet COMMAND: error: ...` line (after
    argparse's usage lines, if any), and no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if not x.startswith(("usage:", " "))]
    assert len(lines) == 1 and lines[0].startswith(f"fdet {command}: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for one step on a tiny shapes set, keeping every candidate above score 0
    (so that even this untrained model makes detections of every class)."""
    from fdet.train import train

    root = tmp_path_factory.mktemp("eval-cli")
    base = specs.load(ZOO / "shapes" / "retinanet_r18_fpn.py", specs.Experiment)
    model = attrs.evolve(
        base.model,
        backbone=attrs.evolve(base.model.backbone, width=16),
        postprocess=attrs.evolve(base.model.postprocess, score_threshold=0.0, max_detections=30),
    )
    exp = attrs.evolve(
        base,
        model=model,
        data=specs.ShapesData(
            train_images=4, val_images=6, image_size=64, cache_dir=str(root / "cache")
        ),
        train_transforms=specs.Transforms(min_size=(64,), max_size=64, pad_divisor=32),
        val_transforms=specs.Transforms(min_size=(64,), max_size=64, pad_divisor=32),
        schedule=specs.Schedule(warmup=None, decay=specs.ConstantDecay()),
        batch_size=4,
        iterations=1,
        eval_interval=0,
        eval_images=0,
        checkpoint_interval=1,
        log_interval=1,
        num_workers=0,
    )
    train(exp, root / "run", progress=False)
    return root / "run"


def val_split(run: Path) -> tuple[Path, dict]:
    """The run's validation images folder and annotation file contents."""
    from fdet.data.shapes import ensure_shapes

    exp = specs.load(run / "spec.json", specs.Experiment)
    assert isinstance(exp.data, specs.ShapesData)
    paths = ensure_shapes(exp.data)
    return paths.val_images, json.loads(paths.val_annotations.read_text())


def test_categories_are_matched_by_name(run: Path, tmp_path: Path) -> None:
    images, data = val_split(run)
    original = tmp_path / "original.json"
    original.write_text(json.dumps(data))
    # The same file with the category ids permuted (and listed in another order).
    new_id = {1: 4, 2: 6, 3: 1, 4: 2, 5: 3, 6: 5}
    permuted = json.loads(json.dumps(data))
    for c in permuted["categories"]:
        c["id"] = new_id[c["id"]]
    permuted["categories"].reverse()
    for a in permuted["annotations"]:
        a["category_id"] = new_id[a["category_id"]]
    permuted_file = tmp_path / "permuted.json"
    permuted_file.write_text(json.dumps(permuted))
    # Other names under the same ids.
    renamed = json.loads(json.dumps(data))
    for c in renamed["categories"]:
        c["name"] = f"thing{c['id']}"
    renamed_file = tmp_path / "renamed.json"
    renamed_file.write_text(json.dumps(renamed))

    outputs = ["--out", str(tmp_path / "m0.json"), "--results", str(tmp_path / "r0.json")]
    assert main(["eval", str(run), "--data", str(images), str(original), *outputs]) == 0
    proc = run_fdet(
        "eval",
        str(run),
        "--data",
        str(images),
        str(permuted_file),
        "--out",
        "m1.json",
        "--results",
        "r1.json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    assert "fdet eval: evaluating " in proc.stderr and "iter_00000001.pt" in proc.stderr
    r0 = json.loads((tmp_path / "r0.json").read_text())
    r1 = json.loads((tmp_path / "r1.json").read_text())
    assert len({r["category_id"] for r in r0}) >= 2  # several classes: the mapping shows
    assert r1 == [{**r, "category_id": new_id[r["category_id"]]} for r in r0]
    m0 = json.loads((tmp_path / "m0.json").read_text())["bbox"]
    m1 = json.loads((tmp_path / "m1.json").read_text())["bbox"]
    # the same metrics (to rounding: the evaluator averages the classes in id order, and the
    # ids are permuted)
    assert set(m1) == set(m0) and set(m1["per_class_ap"]) == set(CATEGORIES)
    for key, value in m0.items():
        assert m1[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key

    proc = run_fdet("eval", str(run), "--data", str(images), str(renamed_file), cwd=tmp_path)
    line = assert_one_line_error(proc, "eval")
    assert str(renamed_file) in line and "do not match the model's classes by name" in line
    assert "the model has [circle, square, triangle, star, cross, ellipse]" in line
    assert "the data has [thing1, thing2, thing3, thing4, thing5, thing6]" in line
    assert proc.stdout == ""


def test_bad_options_fail_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    missing_run = str(tmp_path / "no-such-run")  # never read: the options fail first
    cases = [
        (["--out", str(folder)], f"argument --out: {folder} is a folder; give a file to write"),
        (["--results", str(folder)], "argument --results: "),
        (["--out", str(tmp_path / "m.json" / "x")], "argument --out: cannot write"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--batch-size", "-3"], "argument --batch-size: must be >= 1, got -3"),
        (["--max-images", "0"], "argument --max-images: must be >= 1, got 0"),
    ]
    (tmp_path / "m.json").write_text("{}")
    for options, message in cases:
        proc = run_fdet("eval", missing_run, *options, cwd=tmp_path)
        assert message in assert_one_line_error(proc, "eval"), options
        assert not (tmp_path / "no-such-run").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", missing_run, "--images", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "fdet eval: error: --images and --annotations go together" in capsys.readouterr().err


def test_class_names_of_a_run(tmp_path: Path) -> None:
    from fdet.eval.classes import run_class_names

    model = specs.RetinaNet(head=specs.RetinaHead(num_classes=3))
    shapes = specs.Experiment(
        model=attrs.evolve(model, head=specs.RetinaHead(num_classes=6)), data=specs.ShapesData()
    )
    assert run_class_names(shapes) == CATEGORIES
    assert run_class_names(shapes, {"class_names": list("abcdef")}) == tuple("abcdef")
    assert run_class_names(shapes, {"class_names": ["a"]}) is None  # not the model's count

    ann = tmp_path / "val.json"
    categories = [{"id": 7, "name": "c"}, {"id": 2, "name": "a"}, {"id": 5, "name": "b"}]
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    coco = specs.CocoData(
        train_images="t", train_annotations="t.json", val_images="v", val_annotations=str(ann)
    )
    exp = specs.Experiment(model=model, data=coco)
    assert run_class_names(exp) == ("a", "b", "c")  # label order: sorted ids
    assert run_class_names(attrs.evolve(exp, data=attrs.evolve(coco, val_annotations="x"))) is None


def test_category_ids_by_name() -> None:
    from fdet.eval.classes import category_ids_by_name

    assert category_ids_by_name(["a", "b", "c"], ["c", "a", "b"], [1, 2, 3]) == (2, 3, 1)
    with pytest.raises(DataError, match=r"^v\.json: .*missing from the data: c; not classes of"):
        category_ids_by_name(["a", "b", "c"], ["a", "b", "d"], [1, 2, 3], source="v.json")
    with pytest.raises(DataError, match=r"the data's categories repeat 'a'"):
        category_ids_by_name(["a", "b"], ["a", "a"], [1, 2])
    with pytest.raises(DataError, match=r"the model has \[a, b\], the data has \[a\]$"):
        category_ids_by_name(["a", "b"], ["a"], [1])
