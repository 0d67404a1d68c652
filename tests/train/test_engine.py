"""The engine's guarantees: exact resume, accumulation equals the big batch, AMP, EMA,
checkpoint keeping, early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch

from fdet import specs
from fdet.train import train
from fdet.train.checkpoint import load_checkpoint
from fdet.train.engine import checkpoints

from .test_cli_train import tiny_experiment


def gn_experiment(cache: Path, **kw: object) -> specs.Experiment:
    """A model without batch statistics, so that batch composition cannot change the math."""
    exp = tiny_experiment(cache)
    model = attrs.evolve(
        exp.model,
        backbone=attrs.evolve(exp.model.backbone, norm=specs.GroupNorm(groups=8), width=16),
    )
    defaults: dict[str, object] = {
        "model": model,
        "train_transforms": attrs.evolve(exp.train_transforms, hflip_prob=0.5),
        "eval_interval": 0,
        "checkpoint_interval": 100,
        "iterations": 4,
        "deterministic": True,
    }
    defaults.update(kw)
    return attrs.evolve(exp, **defaults)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_interrupted_and_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    exp = gn_experiment(
        tmp_path / "cache", iterations=6, ema=specs.EMA(decay=0.9, warmup_updates=2)
    )
    straight = train(exp, tmp_path / "a", progress=False, final_eval=False)
    stopped = train(exp, tmp_path / "b", progress=False, final_eval=False, stop_after=3)
    assert stopped.interrupted and stopped.iterations == 3
    resumed = train(exp, tmp_path / "b", progress=False, final_eval=False, resume=True)
    assert resumed.iterations == 6
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]["params"]:
        assert torch.equal(a["ema"]["params"][key], b["ema"]["params"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    logged = [
        json.loads(x)["iteration"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    ]
    assert logged == [2, 4, 6]  # the resumed log continues, nothing twice


def test_resume_refuses_another_spec(tmp_path: Path) -> None:
    exp = gn_experiment(tmp_path / "cache", iterations=4)
    train(exp, tmp_path / "a", progress=False, final_eval=False, stop_after=2)
    other = attrs.evolve(exp, seed=1)
    with pytest.raises(RuntimeError, match="trained with another spec"):
        train(other, tmp_path / "a", progress=False, resume=True)


def test_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    big = gn_experiment(tmp_path / "cache", batch_size=4, accumulate=1, iterations=2)
    small = attrs.evolve(big, accumulate=2)
    a = train(big, tmp_path / "big", progress=False, final_eval=False)
    b = train(small, tmp_path / "small", progress=False, final_eval=False)
    wa, wb = weights(a.checkpoint), weights(b.checkpoint)
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-5
    # the runs differ only in how the step was computed
    assert specs.load(tmp_path / "small" / "spec.json").accumulate == 2


def test_bf16_autocast_trains_with_finite_losses(tmp_path: Path) -> None:
    exp = gn_experiment(tmp_path / "cache", precision="bf16", iterations=2)
    result = train(exp, tmp_path / "run", progress=False, final_eval=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    assert all(
        torch.isfinite(v).all()
        for v in weights(result.checkpoint).values()
        if v.is_floating_point()
    )


def test_fp16_on_cpu_is_refused_clearly(tmp_path: Path) -> None:
    exp = gn_experiment(tmp_path / "cache", precision="fp16")
    with pytest.raises(RuntimeError, match=r"'fp16' needs a CUDA device .* use 'bf16' on CPU"):
        train(exp, tmp_path / "run", progress=False)


def test_ema_is_evaluated_beside_the_raw_weights(tmp_path: Path) -> None:
    exp = gn_experiment(
        tmp_path / "cache", iterations=3, ema=specs.EMA(decay=0.5, warmup_updates=0)
    )
    result = train(exp, tmp_path / "run", progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"iteration", "bbox", "bbox_ema"}
    assert "val_loss" in metrics["bbox"] and "val_loss" in metrics["bbox_ema"]
    assert result.ema_metrics is not None


def test_keeps_the_last_checkpoints_and_the_best(tmp_path: Path) -> None:
    exp = gn_experiment(
        tmp_path / "cache", iterations=6, checkpoint_interval=1, keep_checkpoints=2, eval_interval=2
    )
    train(exp, tmp_path / "run", progress=False)
    assert [i for i, _ in checkpoints(tmp_path / "run")] == [5, 6]
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["state"]["best_iteration"] in (2, 4, 6)


def test_early_stopping(tmp_path: Path) -> None:
    # a zero learning rate never improves the AP after the first evaluation
    exp = gn_experiment(
        tmp_path / "cache",
        iterations=10,
        eval_interval=1,
        early_stopping=2,
        optimizer=specs.SGD(lr=1e-12, momentum=0.0, weight_decay=0.0),
    )
    result = train(exp, tmp_path / "run", progress=False)
    assert result.stopped_early
    assert result.iterations == 3
