"""The teacher–student step on the engine: the teacher (EMA weights through functional_call)
never gets gradients and is updated by the EMA rule, pseudo-labels reach the student's view
through the view map, hidden labels of the unlabeled images never reach the objective, every
dense family and the R-CNN family train, resume is bit-identical, and data-parallel training
equals one process on the global batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from fdet import build, specs
from fdet.train import train
from fdet.train.checkpoint import load_checkpoint
from fdet.train.data import make_datasets, unlabeled_loader
from fdet.train.semi import Teacher, semi_step, unsup_weight

from .test_ddp_engine import torchrun_train
from .test_engine import PLAIN_SGD, assert_same_training_state, largest_difference

SHAPES = Path(__file__).resolve().parents[2] / "specs" / "shapes"


def _zero_thresholds(spec: Any) -> Any:
    """``spec`` with every ``score_threshold`` below it set to 0: an untrained tiny model's
    scores are below the shapes specs' thresholds, and the teacher should label something."""
    if not attrs.has(type(spec)):
        return spec
    changes = {}
    for field in attrs.fields(type(spec)):
        value = getattr(spec, field.name)
        if field.name == "score_threshold" and isinstance(value, float):
            changes[field.name] = 0.0
        elif attrs.has(type(value)):
            changes[field.name] = _zero_thresholds(value)
    return attrs.evolve(spec, **changes)


def semi_experiment(cache: Path, file: str = "retinanet_r18_fpn.py", **kw: Any) -> specs.Experiment:
    """``specs/shapes/<file>`` cut down to seconds and trained semi-supervised: 16 images of
    64², a quarter labeled, 2 labeled and 2 unlabeled images a step, float32, group norm (batch
    composition cannot change the math), the teacher labels from iteration 1."""
    base = specs.load(SHAPES / file, specs.Experiment)
    backbone = attrs.evolve(base.model.backbone, width=16, norm=specs.GroupNorm(groups=8))
    model = _zero_thresholds(attrs.evolve(base.model, backbone=backbone))
    semi_fields: dict[str, Any] = {
        "labeled_fraction": 0.25,
        "unlabeled_batch_size": 2,
        "burn_in": 1,
        "weak": specs.Transforms(min_size=(64,), max_size=64, hflip_prob=0.5, pad_divisor=32),
        "strong": specs.StrongAugment(scale=(0.75, 1.25)),
        "score_threshold": 0.0,
        "max_pseudo_labels": 8,
        "box_score_threshold": 0.02,
    }
    semi = specs.SemiSupervised(**{**semi_fields, **kw.pop("semi", {})})
    defaults: dict[str, Any] = {
        "model": model,
        "data": specs.ShapesData(
            train_images=16, val_images=4, image_size=64, cache_dir=str(cache)
        ),
        "train_transforms": specs.Transforms(
            min_size=(64,), max_size=64, hflip_prob=0.5, pad_divisor=32
        ),
        "val_transforms": specs.Transforms(min_size=(64,), max_size=64, pad_divisor=32),
        "schedule": specs.Schedule(warmup=specs.LinearWarmup(iters=1), decay=specs.CosineDecay()),
        "batch_size": 2,
        "iterations": 4,
        "eval_interval": 0,
        "eval_images": 4,
        "checkpoint_interval": 100,
        "log_interval": 1,
        "num_workers": 0,
        "precision": "fp32",
        "allocator": "default",
        "deterministic": True,
        "ema": specs.EMA(decay=0.9, warmup_updates=0),
        "semi": semi,
    }
    defaults.update(kw)
    return attrs.evolve(base, **defaults)


def _log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_unsup_weight_is_zero_in_the_burn_in_then_ramps() -> None:
    semi = specs.SemiSupervised(labeled_fraction=0.1, burn_in=10, unsup_weight=2.0, unsup_warmup=4)
    assert [unsup_weight(semi, i) for i in (0, 9, 10, 11, 12, 13, 50)] == [
        0.0,
        0.0,
        0.5,
        1.0,
        1.5,
        2.0,
        2.0,
    ]
    flat = attrs.evolve(semi, unsup_warmup=0)
    assert unsup_weight(flat, 9) == 0.0 and unsup_weight(flat, 10) == 2.0


def test_spec_needs_the_ema_teacher_and_one_unlabeled_source(tmp_path: Path) -> None:
    with pytest.raises(specs.SpecError, match="teacher is the EMA"):
        semi_experiment(tmp_path, ema=None)
    with pytest.raises(specs.SpecError, match="exactly one"):
        specs.SemiSupervised()
    with pytest.raises(specs.SpecError, match="exactly one"):
        specs.SemiSupervised(labeled_fraction=0.5, unlabeled=specs.UnlabeledImages(images="x"))
    with pytest.raises(specs.SpecError, match="labeled_fraction"):
        specs.SemiSupervised(labeled_fraction=1.0)
    with pytest.raises(specs.SpecError, match="accumulate"):
        semi_experiment(tmp_path, accumulate=2, semi={"unlabeled_batch_size": 3})
    exp = semi_experiment(tmp_path)
    assert specs.from_json(specs.to_json(exp)) == exp


def test_split_gives_labeled_and_unlabeled_sets(tmp_path: Path) -> None:
    exp = semi_experiment(tmp_path / "cache")
    data = make_datasets(exp)
    assert len(data.train) == 4 and len(data.unlabeled) == 12  # a quarter of 16
    assert data.unlabeled_has_labels
    labeled = {data.train.get(i).image_id for i in range(len(data.train))}
    unlabeled = {data.unlabeled.get(i).weak.image_id for i in range(len(data.unlabeled))}
    assert not labeled & unlabeled and len(labeled | unlabeled) == 16


def _context(exp: specs.Experiment) -> Any:
    """A trainer for ``exp`` without a run folder: what a step factory reads."""
    from fdet.data.loader import infinite
    from fdet.train.data import experiment_loader
    from fdet.train.ema import ema_init
    from fdet.train.loop import Trainer
    from fdet.train.optim import build_optimizer

    torch.manual_seed(0)
    data = make_datasets(exp)
    raw = build(exp.model)
    optimizer = build_optimizer(exp.optimizer, raw, exp.param_groups)
    return Trainer(
        exp=exp,
        out=Path("unused"),
        dist=type("Dist", (), {"rank": 0, "world_size": 1, "is_main": True})(),
        device=torch.device("cpu"),
        raw=raw,
        model=raw,
        optimizer=optimizer,
        scaler=None,
        ema=ema_init(raw),
        datasets=data,
        batches=infinite(experiment_loader(exp, data.train, train=True)),
        forward=raw,
        loss_fn=raw.loss,
        base_lrs=[g["lr"] for g in optimizer.param_groups],
        logs=None,
        console=None,
        precision="fp32",
    )


def test_teacher_is_the_ema_weights_without_gradients(tmp_path: Path) -> None:
    from fdet.train.ema import swapped_in

    exp = semi_experiment(tmp_path / "cache", semi={"burn_in": 0, "reset_teacher": False})
    ctx = _context(exp)
    with torch.no_grad():  # a teacher different from the student
        for t in ctx.ema.params.values():
            t.add_(0.01 * torch.randn_like(t))
    before = {k: v.clone() for k, v in ctx.raw.state_dict().items()}
    pair = next(iter(unlabeled_loader(exp, ctx.datasets.unlabeled)))
    teacher = Teacher(ctx.raw, exp.semi, "fp32")
    pseudo, reliable = teacher(ctx.ema, pair.weak.images, pair.weak.image_sizes)
    # the same detections as the model holding the EMA weights
    with swapped_in(ctx.raw, ctx.ema):
        expected = ctx.raw.predict(pair.weak.images, pair.weak.image_sizes)
    assert pseudo.valid.any()
    order = expected.scores.argsort(dim=1, descending=True, stable=True)[:, : pseudo.boxes.shape[1]]
    torch.testing.assert_close(
        pseudo.boxes, expected.boxes.gather(1, order[..., None].expand(-1, -1, 4))
    )
    torch.testing.assert_close(pseudo.scores, expected.scores.gather(1, order))
    assert torch.equal(reliable, pseudo.valid & (pseudo.scores >= exp.semi.box_score_threshold))
    assert pseudo.boxes.grad_fn is None and pseudo.scores.grad_fn is None
    # the student's weights and mode are untouched
    assert ctx.raw.training
    for k, v in ctx.raw.state_dict().items():
        assert torch.equal(v, before[k]), k

    teacher_before = {k: v.clone() for k, v in ctx.ema.params.items()}
    values = semi_step(ctx)()
    assert {"u_cls", "u_box", "pseudo_per_image"} <= set(values)
    assert float(values["pseudo_per_image"]) > 0 and float(values["u_cls"]) > 0
    # the step moved the student and left the teacher alone (the loop's EMA update moves it)
    assert any(not torch.equal(v, before[k]) for k, v in ctx.raw.state_dict().items())
    for key, value in ctx.ema.params.items():
        assert not value.requires_grad and value.grad is None, key
        assert torch.equal(value, teacher_before[key]), key


def test_teacher_follows_the_ema_rule_and_starts_from_the_student(tmp_path: Path) -> None:
    """At the end of the burn-in the teacher takes the student's weights θ0; the step moves the
    student to θ1 and the loop's EMA update gives d·θ0 + (1 − d)·θ1; the next one
    d·(that) + (1 − d)·θ2."""
    exp = semi_experiment(tmp_path / "cache", semi={"burn_in": 2}, iterations=4)
    seen: list[dict[str, torch.Tensor]] = []

    def factory(ctx: Any) -> Any:
        step = semi_step(ctx)

        def wrapped() -> Any:
            seen.append({k: v.detach().clone() for k, v in ctx.raw.named_parameters()})
            values = step()
            return values

        return wrapped

    result = train(exp, tmp_path / "run", progress=False, final_eval=False, step_factory=factory)
    final = {k: v.detach() for k, v in result.model.named_parameters()}
    teacher = load_checkpoint(result.checkpoint)["ema"]["params"]
    d = exp.ema.decay
    theta0, theta1, theta2 = seen[2], seen[3], final
    for key, value in teacher.items():
        after_reset = d * theta0[key] + (1 - d) * theta1[key]
        torch.testing.assert_close(
            value, d * after_reset + (1 - d) * theta2[key], rtol=1e-5, atol=1e-7
        )
    records = _log(tmp_path / "run")
    steps = [r for r in records if "u_cls" in r]
    assert [r["unsup_weight"] for r in steps] == [0.0, 0.0, 1.0, 1.0]
    assert [r["u_cls"] == 0 for r in steps] == [True, True, False, False]


def test_hidden_labels_of_unlabeled_images_never_reach_the_objective(tmp_path: Path) -> None:
    """The same step with the unlabeled images' labels emptied gives the same objective and
    gradients: only the logged precision and recall change."""
    exp = semi_experiment(tmp_path / "cache", semi={"burn_in": 0})
    runs = []
    for hide in (False, True):
        ctx = _context(exp)
        step = semi_step(ctx)
        if hide:
            original = ctx.datasets.unlabeled.get

            def stripped(index: int, *, epoch: int | None = None, _get: Any = original) -> Any:
                pair = _get(index, epoch=epoch)
                empty = pair.weak._replace(
                    boxes=pair.weak.boxes[:0],
                    labels=pair.weak.labels[:0],
                    crowd=pair.weak.crowd[:0],
                )
                return pair._replace(weak=empty)

            ctx.datasets.unlabeled.get = stripped  # type: ignore[method-assign]
        ctx.optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradients to compare
        values = step()
        grads = {n: p.grad.clone() for n, p in ctx.raw.named_parameters() if p.grad is not None}
        runs.append((values, grads))
    (a, ga), (b, gb) = runs
    for name in ("loss", "u_cls", "u_box", "cls", "box"):
        assert torch.equal(a[name], b[name]), name
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name
    # the labels were there to hide: the unlabeled images have objects
    unlabeled = make_datasets(exp).unlabeled
    assert all(len(unlabeled.get(i).weak.labels) for i in range(len(unlabeled)))
    assert float(b["pseudo_recall"]) == 0.0


def test_a_perfect_teacher_teaches_the_strong_views_own_labels(tmp_path: Path) -> None:
    """With the teacher's pseudo-labels replaced by the weak view's true objects, the unlabeled
    terms equal the detector's loss on the strong view against the boxes the transforms carried
    there: the view map puts the pseudo-labels where the objects are."""
    from fdet.ops.pseudo import PseudoLabels

    exp = semi_experiment(tmp_path / "cache", semi={"burn_in": 0, "unsup_weight": 1.0})
    ctx = _context(exp)
    captured: dict[str, Any] = {}

    def perfect(self: Any, ema: Any, images: torch.Tensor, image_sizes: torch.Tensor) -> Any:
        batch = captured["pair"].weak
        pseudo = PseudoLabels(
            boxes=batch.gt_boxes,
            labels=batch.gt_labels,
            scores=batch.gt_valid.float(),
            valid=batch.gt_valid,
        )
        return pseudo, batch.gt_valid

    loader = unlabeled_loader(exp, ctx.datasets.unlabeled)
    pair = next(iter(loader))
    captured["pair"] = pair
    step = semi_step(ctx)
    import fdet.train.semi as semi_module

    original_teacher = semi_module.Teacher.__call__
    semi_module.Teacher.__call__ = perfect  # type: ignore[method-assign]
    try:
        values = step()
    finally:
        semi_module.Teacher.__call__ = original_teacher  # type: ignore[method-assign]
    assert pair.strong.gt_valid.any()
    # the student's loss on the strong view's own objects, with the weights the step started at
    ctx2 = _context(exp)
    outputs = ctx2.raw(pair.strong.images)
    terms = ctx2.raw.loss(outputs, pair.strong)
    for name, term in terms.items():
        torch.testing.assert_close(values[f"u_{name}"], term.value(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("file", "extra"),
    [
        ("retinanet_r18_fpn.py", {}),
        ("fcos_r18_fpn.py", {}),
        ("atss_r18_fpn.py", {}),
        ("gfl_r18_fpn.py", {}),
        ("centernet_r18.py", {}),
        ("faster_rcnn_r18_fpn.py", {"reliability": "jitter", "jitter_max_std": 1.0}),
        ("cascade_rcnn_r18_fpn.py", {"reliability": "jitter", "jitter_max_std": 1.0}),
    ],
)
def test_every_family_trains_semi_supervised(file: str, extra: dict, tmp_path: Path) -> None:
    exp = semi_experiment(tmp_path / "cache", file, iterations=3, semi=extra, eval_interval=0)
    result = train(exp, tmp_path / "run", progress=False)
    last = next(r for r in _log(tmp_path / "run") if r.get("iteration") == 3 and "loss" in r)
    unsup = {k: v for k, v in last.items() if k.startswith("u_") and not k.endswith("_count")}
    assert unsup and all(abs(v) < 1e6 for v in unsup.values())  # (NaN fails too)
    assert any(v > 0 for v in unsup.values()), unsup
    assert last["pseudo_per_image"] > 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "bbox" in metrics and "bbox_ema" in metrics  # student and teacher evaluated
    assert result.iterations == 3


def test_mask_heads_are_refused_with_one_line(tmp_path: Path) -> None:
    from fdet.train.data import TrainingError

    exp = semi_experiment(tmp_path / "cache", "mask_rcnn_r18_fpn.py")
    with pytest.raises(TrainingError, match="pseudo-labels carry no masks"):
        train(exp, tmp_path / "run", progress=False)
    dense = semi_experiment(tmp_path / "cache", semi={"reliability": "jitter"})
    with pytest.raises(TrainingError, match="refine_boxes"):
        train(dense, tmp_path / "run2", progress=False)


def test_interrupted_and_resumed_semi_run_is_bit_identical(tmp_path: Path) -> None:
    """Stopped after the burn-in with a loader worker, both streams past an epoch boundary
    (4 labeled images: 2 steps an epoch; 12 unlabeled: 6), resumed: teacher, student,
    optimizer and counters equal the straight run's bit for bit."""
    exp = semi_experiment(
        tmp_path / "cache",
        iterations=9,
        num_workers=1,
        semi={"burn_in": 2, "unlabeled_batch_size": 2},
    )
    straight = train(exp, tmp_path / "a", progress=False, final_eval=False)
    stopped = train(exp, tmp_path / "b", progress=False, final_eval=False, stop_after=5)
    assert stopped.interrupted and stopped.iterations == 5
    resumed = train(exp, tmp_path / "b", progress=False, final_eval=False, resume=True)
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same_training_state(a, b)
    for key in a["ema"]["buffers"]:
        assert torch.equal(a["ema"]["buffers"][key], b["ema"]["buffers"][key]), key
    log_a = [r for r in _log(tmp_path / "a") if "u_cls" in r]
    log_b = [r for r in _log(tmp_path / "b") if "u_cls" in r]
    assert [r["u_cls"] for r in log_a] == [r["u_cls"] for r in log_b]


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    single = semi_experiment(
        tmp_path / "cache",
        batch_size=4,
        iterations=3,
        checkpoint_interval=1,
        # strong views of one size: a batch's padding (which dense losses see as background)
        # would otherwise depend on which images share a process
        semi={
            "burn_in": 1,
            "unlabeled_batch_size": 4,
            "strong": specs.StrongAugment(scale=(1.0, 1.0), crop_prob=0.0),
        },
        **PLAIN_SGD,
    )
    per_rank = attrs.evolve(
        single, batch_size=2, semi=attrs.evolve(single.semi, unlabeled_batch_size=2)
    )
    torchrun_train(per_rank, tmp_path / "ddp", tmp_path, final_eval=False)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    reference = train(single, tmp_path / "single", progress=False, final_eval=False)
    ref = reference.model.state_dict()
    before_last = load_checkpoint(tmp_path / "single" / "checkpoints" / "iter_00000002.pt")["model"]
    update = largest_difference(ref, before_last)
    assert update > 1e-3
    assert largest_difference(ranks[0], ref) < 1e-3 * update
    ddp_log = [r for r in _log(tmp_path / "ddp") if "u_cls" in r]
    assert ddp_log[-1]["u_cls"] > 0


@pytest.mark.parametrize(
    "file", ["semi_retinanet_r18_fpn.py", "semi_faster_rcnn_r18_fpn.py"], ids=lambda f: f
)
def test_semi_spec_files_train_and_evaluate_from_the_command_line(
    file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fdet.cli import main
    from tests.inference.conftest import tiny_set_args

    run = tmp_path / "run"
    extra = {
        "data.train_images": 40,  # 10 % labeled: 4 images, a batch of 4
        "semi.unlabeled_batch_size": 4,
        "semi.burn_in": 2,
        "semi.weak.min_size": [64],
        "semi.weak.max_size": 64,
        "semi.score_threshold": 0.0,
        "iterations": 4,
    }
    args = ["train", str(SHAPES / file), "--out", str(run), "--no-progress"]
    assert main(args + tiny_set_args(tmp_path / "cache", extra)) == 0
    records = [r for r in _log(run) if "unsup_weight" in r]
    assert [r["unsup_weight"] > 0 for r in records] == [False, True]  # logs at 2 and 4
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"bbox", "bbox_ema"} <= set(metrics)
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0  # the teacher (EMA weights) by default
    assert "AP" in capsys.readouterr().out

    too_few = {**extra, "semi.unlabeled_batch_size": 64}
    args2 = ["train", str(SHAPES / file), "--out", str(tmp_path / "run2"), "--no-progress"]
    assert main(args2 + tiny_set_args(tmp_path / "cache", too_few)) == 2
    assert "unlabeled_batch_size 64 is larger than the unlabeled set: 36 images" in (
        capsys.readouterr().err
    )


def test_compiled_objective_with_two_image_sizes_equals_eager(tmp_path: Path) -> None:
    """Labeled batches at 64² and strong views at 96²: the compiled objective meets two image
    sizes in one run (also what multi-scale supervised training does) and gives the eager
    run's losses. (With dynamic sizes, torch's compiled backward of this objective fails on a
    stride kept from the first size; the engine compiles one static graph a size.)"""
    strong = specs.StrongAugment(scale=(1.5, 1.5), crop_prob=0.0)
    runs = {}
    for mode in ("none", "objective"):
        exp = semi_experiment(
            tmp_path / "cache", iterations=3, compile=mode, semi={"burn_in": 1, "strong": strong}
        )
        train(exp, tmp_path / mode, progress=False, final_eval=False)
        runs[mode] = [r for r in _log(tmp_path / mode) if "loss" in r]
    eager, compiled = runs["none"], runs["objective"]
    assert [r["iteration"] for r in compiled] == [1, 2, 3]
    assert compiled[-1]["u_cls"] > 0
    for a, b in zip(eager, compiled):
        for key in ("loss", "cls", "box", "u_cls", "u_box"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["iteration"], key)
