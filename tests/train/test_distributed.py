"""Distributed helpers: single-process behaviour, and a real 2-process gloo run under torchrun.

Run as a script (by torchrun, from :func:`test_two_processes_under_torchrun`), this file is the
worker: each rank checks the collectives and trains a DDP model on its half of a global batch.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fdet.train import distributed as D
from fdet.train.ema import ema_init

_TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*_TORCHRUN_VARS, "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_single_process_without_torchrun_env(single_process: None) -> None:
    info = D.init_distributed("cpu")
    assert info == D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.distributed
    assert not torch.distributed.is_initialized()  # nothing was started
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_mean(t) is t
    assert D.all_reduce_sum(t) is t
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.gather_objects([1, 2]) == [[1, 2]]
    assert D.all_gather_objects("x") == ["x"]
    D.barrier()
    model = _tiny_model()
    assert D.wrap_ddp(model, info, sync_batch_norm=True) is model
    assert D.unwrap(model) is model
    compiled = torch.compile(model)  # lazy wrapper, nothing compiles
    assert isinstance(compiled, nn.Module) and D.unwrap(compiled) is model
    D.cleanup()
    with pytest.raises(TypeError, match="floating"):
        D.all_reduce_mean(torch.tensor([1, 2]))


def test_world_size_one_and_bad_environments(
    single_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not D.init_distributed("cpu").distributed
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        D.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK")
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, 2\)"):
        D.init_distributed("cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="names a GPU"):
        D.init_distributed("cuda:0")
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_under_torchrun(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (*_TORCHRUN_VARS, "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", FDET_DIST_TEST_OUT=str(tmp_path))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        __file__,
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 for r in reports)
    assert reports[0]["gathered"] == [{"rank": 0, "items": []}, {"rank": 1, "items": [0]}]
    assert reports[1]["gathered"] is None
    assert all(r["broadcast"] == {"seed": 1234, "from": 0} for r in reports)
    assert all(r["mean"] == [1.5, 5.0] for r in reports)
    assert all(r["checked_training"] for r in reports)


# --- the worker, run by torchrun ------------------------------------------------------------------


def _worker() -> None:
    info = D.init_distributed("cpu")
    assert info.world_size == 2 and info.distributed
    assert info.rank == int(os.environ["RANK"]) and info.is_main == (info.rank == 0)
    assert torch.distributed.get_backend() == "gloo"
    assert D.init_distributed("cpu") == info  # a second call joins nothing new
    rank = info.rank

    # Collectives.
    t = torch.tensor([rank + 1.0, 10.0 * rank])
    mean = D.all_reduce_mean(t)
    assert t.tolist() == [rank + 1.0, 10.0 * rank]  # the input is left alone
    assert D.all_reduce_sum(torch.tensor([rank + 1])).tolist() == [3]
    gathered = D.gather_objects({"rank": rank, "items": list(range(rank))})
    broadcast = D.broadcast_object({"seed": 1234, "from": rank} if rank == 0 else None)
    assert D.all_gather_objects(rank * 2) == [0, 2]
    D.barrier()

    # DDP on each rank's half of the global batch == one process on the whole batch.
    x, y = _global_batch()
    reference = _tiny_model()
    model = _tiny_model()
    ddp = D.wrap_ddp(model, info, sync_batch_norm=False)
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)
    assert D.unwrap(ddp) is model
    assert ema_init(ddp).params.keys() == ema_init(model).params.keys()
    half = slice(4 * rank, 4 * rank + 4)
    _train(ddp, x[half], y[half])
    _train(reference, x, y)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    every = D.all_gather_objects(params)
    for k in params:
        assert torch.equal(every[0][k], every[1][k]), f"ranks differ on {k}"
        torch.testing.assert_close(params[k], reference.state_dict()[k], rtol=0, atol=1e-6)
    assert not torch.equal(params["0.weight"], _tiny_model().state_dict()["0.weight"])

    # Asking for SyncBatchNorm on CPU is refused up front.
    try:
        D.wrap_ddp(copy.deepcopy(model), info, sync_batch_norm=True)
    except ValueError as e:
        assert "CUDA" in str(e)
    else:
        raise AssertionError("sync_batch_norm on CPU should be refused")

    report = {
        "rank": rank,
        "world_size": info.world_size,
        "mean": mean.tolist(),
        "gathered": gathered,
        "broadcast": broadcast,
        "checked_training": True,
    }
    out = Path(os.environ["FDET_DIST_TEST_OUT"]) / f"rank{rank}.json"
    out.write_text(json.dumps(report))
    D.barrier()
    D.cleanup()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker()
