"""The engine's guarantees: exact resume, accumulation equals the big batch, AMP, EMA,
checkpoint keeping, early stopping."""

from __future__ import annotations

import json
import random
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

from fdet import specs
from fdet.data.sample import Sample
from fdet.data.transforms import TransformPipeline
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


def assert_same_training_state(a: dict, b: dict) -> None:
    """Two checkpoints hold the same weights, optimizer buffers (momentum, Adam moments, by
    value), EMA weights and counters, bit for bit."""
    assert a["iteration"] == b["iteration"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa, "no optimizer state to compare"
    for index in sa:
        assert sa[index].keys() == sb[index].keys()
        for name, value in sa[index].items():
            same = (
                torch.equal(value, sb[index][name])
                if torch.is_tensor(value)
                else (value == sb[index][name])
            )
            assert same, (index, name)
    if a.get("ema") is not None:
        for key in a["ema"]["params"]:
            assert torch.equal(a["ema"]["params"][key], b["ema"]["params"][key]), key


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
    assert_same_training_state(a, b)  # AdamW: both moments, by value
    logged = [
        json.loads(x)["iteration"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    ]
    assert logged == [2, 4, 6]  # the resumed log continues, nothing twice


class GlobalDrawTransform(TransformPipeline):
    """fdet's training transform, then a brightness shift drawn from the global generators
    (torch, NumPy, Python) rather than from the sample's generator, as a transform of one's
    own might do. It runs in the loader's workers."""

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        out = super().__call__(sample, generator)
        if not self.train:
            return out
        shift = int(torch.randint(0, 3, ())) + int(np.random.randint(0, 3)) + random.randint(0, 2)
        return out._replace(image=(out.image.int() + shift).clamp(0, 255).to(torch.uint8))


def test_resume_across_epochs_with_workers_and_global_random_draws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resumed mid-epoch, the run crosses into the next epoch with two loader workers, a
    transform that draws from the global generators (in the workers) and a loss that does (in
    the main process): a missing restore of any random state, or an augmentation that depends
    on which worker made a sample, would change the weights or the momentum."""
    from fdet.data import transforms
    from fdet.models import RetinaNet

    monkeypatch.setattr(
        transforms, "build_transform", lambda spec, *, train: GlobalDrawTransform(spec, train)
    )
    real_loss = RetinaNet.loss
    calls = []

    def noisy_loss(self: RetinaNet, outputs: object, batch: object) -> object:
        terms = real_loss(self, outputs, batch)  # type: ignore[arg-type]
        noise = float(torch.rand(())) + float(np.random.rand()) + random.random()
        calls.append(noise)
        cls = terms["cls"]
        return {**terms, "cls": cls._replace(total=cls.total * (1 + 0.01 * noise))}

    monkeypatch.setattr(RetinaNet, "loss", noisy_loss)
    # 24 images, 4 a batch: 6 steps an epoch; stopped at 4, resumed through epoch 1
    exp = gn_experiment(
        tmp_path / "cache",
        iterations=9,
        num_workers=2,
        optimizer=specs.SGD(lr=0.01, momentum=0.9, weight_decay=1e-4),
    )
    straight = train(exp, tmp_path / "a", progress=False, final_eval=False)
    train(exp, tmp_path / "b", progress=False, final_eval=False, stop_after=4)
    resumed = train(exp, tmp_path / "b", progress=False, final_eval=False, resume=True)
    assert len(set(calls[:9])) == 9  # the loss drew from the global generators
    assert calls[9:] == calls[:9]  # the interrupted and the resumed run drew the same
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all("momentum_buffer" in v for v in a["optimizer"]["state"].values())
    assert_same_training_state(a, b)


def test_resume_refuses_another_spec(tmp_path: Path) -> None:
    exp = gn_experiment(tmp_path / "cache", iterations=4)
    train(exp, tmp_path / "a", progress=False, final_eval=False, stop_after=2)
    other = attrs.evolve(exp, seed=1)
    with pytest.raises(RuntimeError, match="trained with another spec"):
        train(other, tmp_path / "a", progress=False, resume=True)


PLAIN_SGD: dict[str, object] = {
    # the update is lr × the gradient, nothing rescales it: a gradient off by a constant
    # factor (a wrong normalizer) shows in the weights, as it would not under AdamW
    "optimizer": specs.SGD(lr=0.01, momentum=0.0, weight_decay=0.0),
    "schedule": specs.Schedule(warmup=None, decay=specs.ConstantDecay()),
}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_accumulation_equals_the_large_batch(tmp_path: Path) -> None:
    big = gn_experiment(
        tmp_path / "cache",
        batch_size=4,
        accumulate=1,
        iterations=2,
        checkpoint_interval=1,
        **PLAIN_SGD,
    )
    small = attrs.evolve(big, accumulate=2)
    a = train(big, tmp_path / "big", progress=False, final_eval=False)
    b = train(small, tmp_path / "small", progress=False, final_eval=False)
    wa, wb = weights(a.checkpoint), weights(b.checkpoint)
    # the second step's update is lr × its gradient: a gradient off by a constant factor
    # would make the runs differ by about that much
    update = largest_difference(wa, weights(tmp_path / "big" / "checkpoints" / "iter_00000001.pt"))
    assert update > 1e-3
    assert largest_difference(wa, wb) < 1e-3 * update
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


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_resolved_once_used_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    from fdet.runtime import AllocatorSetting
    from fdet.train import engine
    from fdet.train.step import supervised_step

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    # the real setting is process-wide: the run records what the engine was told
    monkeypatch.setattr(
        engine, "configure_allocator", lambda: AllocatorSetting(True, "configured here")
    )
    seen = []

    def factory(ctx):  # type: ignore[no-untyped-def]
        seen.append(ctx.precision)
        return supervised_step(ctx)

    exp = gn_experiment(tmp_path / "cache", precision="auto", allocator="retain", iterations=2)
    result = train(exp, tmp_path / "run", progress=False, final_eval=False, step_factory=factory)
    used = "bf16" if native else "fp32"
    assert seen == [used] and result.iterations == 2
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["precision"]["requested"] == "auto" and info["precision"]["used"] == used
    assert info["precision"]["reason"].startswith(
        "the CPU has " + ("AVX512" if native else "neither")
    )
    assert info["allocator"] == {
        "requested": "retain",
        "configured": True,
        "reason": "configured here",
    }
    assert specs.load(tmp_path / "run" / "spec.json").precision == "auto"


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
    # the class names in label order travel with the weights (fdet eval maps data sets by them)
    from fdet.data.shapes import CATEGORIES

    assert best["class_names"] == list(CATEGORIES)


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
