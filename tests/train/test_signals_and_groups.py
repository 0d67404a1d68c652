"""SIGINT saves a checkpoint and exits cleanly; learning-rate groups and scaling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from fdet import build, specs
from fdet.train import train
from fdet.train.checkpoint import load_checkpoint
from fdet.train.engine import checkpoints
from fdet.train.optim import build_optimizer

from .test_engine import assert_same_training_state, gn_experiment


def test_sigint_checkpoints_and_exits_then_resumes(tmp_path: Path) -> None:
    """Ctrl-C in `fdet train` saves the step it ended on and exits with 130; `fdet train
    --resume` then finishes the run with the weights and momentum of an uninterrupted one."""
    exp = gn_experiment(
        tmp_path / "cache",
        iterations=10,
        log_interval=1,
        optimizer=specs.SGD(lr=0.01, momentum=0.9, weight_decay=1e-4),
    )
    spec_file = tmp_path / "exp.json"
    spec_file.write_text(specs.to_json(exp))
    run = tmp_path / "run"
    # the same number of threads as this process, so that the sums are made alike
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fdet", "train", str(spec_file), "--out", str(run), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    log = run / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "resume with fdet train --resume" in err
    assert "Traceback" not in err
    saved = checkpoints(run)
    assert saved, "no checkpoint written on SIGINT"
    stopped_at = saved[-1][0]
    assert 2 <= stopped_at < 10
    last_logged = json.loads(log.read_text().splitlines()[-1])["iteration"]
    assert last_logged == stopped_at  # the checkpoint is the step the log ended on

    resumed = subprocess.run(
        [sys.executable, "-m", "fdet", "train", "--resume", str(run), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run} at iteration {stopped_at} of 10" in resumed.stderr
    straight = train(exp, tmp_path / "straight", progress=False, final_eval=False)
    assert checkpoints(run)[-1][0] == 10
    assert_same_training_state(
        load_checkpoint(straight.checkpoint), load_checkpoint(checkpoints(run)[-1][1])
    )
    logged = [json.loads(x)["iteration"] for x in log.read_text().splitlines() if '"loss"' in x]
    assert logged == list(range(1, 11))  # each iteration once


def test_backbone_lr_multiplier_and_norm_decay() -> None:
    exp = gn_experiment(Path("/unused"))
    model = build(exp.model)
    opt = build_optimizer(
        specs.SGD(lr=0.1, weight_decay=0.01),
        model,
        specs.ParamGroups(backbone_lr_mult=0.1, norm_decay=True),
    )
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["decay/backbone"]["lr"] == 0.1 * 0.1
    assert by_name["decay"]["lr"] == 0.1
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for g in opt.param_groups:
        assert all((id(p) in backbone_ids) == g["name"].endswith("/backbone") for p in g["params"])
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert norm_weights <= decayed  # norm_decay=True
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == total


def test_learning_rate_scales_with_the_total_batch(tmp_path: Path) -> None:
    exp = gn_experiment(
        tmp_path / "cache",
        iterations=2,
        log_interval=1,
        base_batch_size=16,
        optimizer=specs.SGD(lr=0.08),
        schedule=specs.Schedule(warmup=None, decay=specs.ConstantDecay()),
    )
    train(exp, tmp_path / "run", progress=False, final_eval=False)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lrs == [0.08 * exp.batch_size / 16] * 2
