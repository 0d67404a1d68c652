"""`fdet train` end to end on a tiny shapes set, then `fdet eval` of the run."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch

from fdet import specs
from fdet.cli import main
from fdet.train import TrainingError, load_run, train

ZOO = Path(__file__).resolve().parents[2] / "specs"


def tiny_experiment(cache: Path, **kw: object) -> specs.Experiment:
    """The shapes spec cut down to seconds: 64² images, a narrow backbone, 6 steps; float32
    and the default allocator unless ``kw`` says otherwise (exactness tests compare runs in
    float32)."""
    kw = {"precision": "fp32", "allocator": "default", **kw}
    base = specs.load(ZOO / "shapes" / "retinanet_r18_fpn.py", specs.Experiment)
    model = attrs.evolve(base.model, backbone=attrs.evolve(base.model.backbone, width=16))
    return attrs.evolve(
        base,
        model=model,
        data=specs.ShapesData(train_images=24, val_images=8, image_size=64, cache_dir=str(cache)),
        train_transforms=specs.Transforms(
            min_size=(64,), max_size=64, hflip_prob=0.5, pad_divisor=32
        ),
        val_transforms=specs.Transforms(min_size=(64,), max_size=64, pad_divisor=32),
        schedule=specs.Schedule(warmup=specs.LinearWarmup(iters=2), decay=specs.CosineDecay()),
        batch_size=4,
        iterations=6,
        eval_interval=3,
        checkpoint_interval=3,
        log_interval=2,
        num_workers=0,
        **kw,
    )


def test_train_then_eval_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(specs.to_json(tiny_experiment(tmp_path / "cache")))
    run = tmp_path / "run"
    assert main(["train", str(spec_file), "--out", str(run), "--no-progress"]) == 0
    assert specs.load(run / "spec.json") == specs.load(spec_file)
    info = json.loads((run / "run.json").read_text())
    assert info["torch"] == torch.__version__ and info["seed"] == 0
    assert info["precision"] == {
        "requested": "fp32",
        "used": "fp32",
        "reason": "set in the experiment",
    }
    assert info["allocator"] == {
        "requested": "default",
        "configured": False,
        "reason": "left alone",
    }
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["iteration"] for x in train_lines] == [2, 4, 6]
    assert all(x["loss"] > 0 and "lr" in x and "it_per_s" in x for x in train_lines)
    assert [x["iteration"] for x in lines if "eval" in x] == [3, 6]
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["bbox"]) >= {"AP", "AP50", "AP75", "APs", "AR100", "per_class_ap"}
    assert (run / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.pt",
        "iter_00000003.pt",
        "iter_00000006.pt",
    ]
    err = capsys.readouterr().err
    assert "[6/6] loss" in err and "AP50" in err
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    out_json = tmp_path / "eval.json"
    assert main(["eval", str(run), "--out", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "AP50" in table and "per-class AP" in table
    evaluated = json.loads(out_json.read_text())["bbox"]
    assert evaluated["AP"] == pytest.approx(metrics["bbox"]["AP"], abs=1e-9)

    exp, model = load_run(run)
    assert exp == specs.load(spec_file) and not model.training

    # on another COCO-format set on disk, written by `fdet data shapes`
    other = tmp_path / "other"
    assert (
        main(
            [
                "data",
                "shapes",
                "--out",
                str(other),
                "--train",
                "2",
                "--val",
                "3",
                "--size",
                "64",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    assert len(list((other / "val").glob("*.png"))) == 3
    capsys.readouterr()
    ann = other / "annotations" / "val.json"
    assert main(["eval", str(run), "--data", str(other / "val"), str(ann)]) == 0
    assert "COCO evaluation: 3 images" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    data = json.loads(specs.to_json(tiny_experiment(tmp_path)))
    data["spec"]["batch_sise"] = 4
    bad.write_text(json.dumps(data))
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "batch_sise: unknown key in Experiment; did you mean 'batch_size'?" in err
    assert main(["spec", str(tmp_path / "missing.py")]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_class_count_mismatch_is_reported(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "cache")
    exp = attrs.evolve(
        exp, model=attrs.evolve(exp.model, head=attrs.evolve(exp.model.head, num_classes=3))
    )
    with pytest.raises(TrainingError, match=r"predicts 3 classes .* training set has 6"):
        train(exp, tmp_path / "run", progress=False)


def test_validation_categories_must_match_training(tmp_path: Path) -> None:
    import shutil

    from fdet.data.shapes import ensure_shapes

    exp = tiny_experiment(tmp_path / "cache")
    assert isinstance(exp.data, specs.ShapesData)
    paths = ensure_shapes(exp.data)
    root = tmp_path / "coco"
    shutil.copytree(paths.root, root)
    val_json = root / paths.val_annotations.relative_to(paths.root)
    data = json.loads(val_json.read_text())
    data["categories"][0]["id"] = 99  # same count, another id
    for ann in data["annotations"]:
        if ann["category_id"] == 1:
            ann["category_id"] = 99
    val_json.write_text(json.dumps(data))
    coco = specs.CocoData(
        train_images=str(root / paths.train_images.relative_to(paths.root)),
        train_annotations=str(root / paths.train_annotations.relative_to(paths.root)),
        val_images=str(root / paths.val_images.relative_to(paths.root)),
        val_annotations=str(val_json),
    )
    with pytest.raises(TrainingError, match=r"validation set's category ids .* differ"):
        train(attrs.evolve(exp, data=coco), tmp_path / "run", progress=False)


def test_non_finite_loss_stops_training_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fdet.models import RetinaNet

    real = RetinaNet.loss

    def nan_loss(self: RetinaNet, outputs: object, batch: object) -> object:
        terms = real(self, outputs, batch)  # type: ignore[arg-type]
        box = terms["box"]
        return {**terms, "box": box._replace(total=box.total * float("nan"))}

    monkeypatch.setattr(RetinaNet, "loss", nan_loss)
    with pytest.raises(TrainingError, match=r"loss is not finite .* iterations 1–2.*'box': nan"):
        train(tiny_experiment(tmp_path / "cache"), tmp_path / "run", progress=False)
