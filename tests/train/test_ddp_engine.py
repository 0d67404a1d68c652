"""Data-parallel training through torchrun (2 CPU processes on gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import attrs
import torch

from fdet import specs
from fdet.train import train
from fdet.train.checkpoint import load_checkpoint

from .test_engine import PLAIN_SGD, gn_experiment, largest_difference, weights


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_train(
    exp: specs.Experiment, out: Path, work: Path, *, final_eval: bool = True
) -> None:
    """``train(exp, out)`` in 2 processes under ``torchrun`` (gloo, one thread each); each rank
    saves its final weights to ``out/rank{r}.pt``."""
    spec_file = work / "ddp.json"
    spec_file.write_text(specs.to_json(exp))
    worker = work / "worker.py"
    worker.write_text(
        "import sys, torch\n"
        "from fdet import specs\n"
        "from fdet.train import train\n"
        f"result = train(specs.load(sys.argv[1]), sys.argv[2], progress=False, "
        f"final_eval={final_eval})\n"
        "rank = int(__import__('os').environ['RANK'])\n"
        "torch.save(result.model.state_dict(), f'{sys.argv[2]}/rank{rank}.pt')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(worker), str(spec_file), str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    single = gn_experiment(
        tmp_path / "cache",
        batch_size=4,
        iterations=3,
        eval_images=8,
        checkpoint_interval=1,
        **PLAIN_SGD,  # a gradient off by a constant factor would show (AdamW cancels it)
    )
    per_rank = attrs.evolve(single, batch_size=2)
    torchrun_train(per_rank, tmp_path / "ddp", tmp_path)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # DDP keeps ranks identical
    reference = train(single, tmp_path / "single", progress=False).model.state_dict()
    # the last step's update (lr × its gradient) against the difference of the two runs
    before_last = weights(tmp_path / "single" / "checkpoints" / "iter_00000002.pt")
    update = largest_difference(reference, before_last)
    assert update > 1e-3
    assert largest_difference(ranks[0], reference) < 1e-3 * update
    # rank 0 wrote the run; evaluation gathered both ranks' shards of the 8 images
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["bbox"]
    assert metrics["num_images"] == 8
    saved = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "iter_00000003.pt")
    assert torch.equal(saved["model"][next(iter(ranks[0]))], ranks[0][next(iter(ranks[0]))])
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["world_size"] == 2
