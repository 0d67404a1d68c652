"""Data-parallel training across processes, started by ``torchrun``.

``torchrun --nproc_per_node=N -m fdet train …`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in each process; :func:`init_distributed` reads them and
joins the process group (NCCL on CUDA, one GPU per process picked by ``LOCAL_RANK``; gloo on
CPU). Without them (or with ``WORLD_SIZE=1``) everything here is a single-process no-op, so the
same training code runs both ways.

Collectives: :func:`all_reduce_mean` (logged losses), :func:`broadcast_object` (values decided
on rank 0), :func:`gather_objects` (per-rank detections to rank 0 for COCO evaluation),
:func:`all_gather_objects`, :func:`barrier`. :func:`wrap_ddp` wraps a model in
``DistributedDataParallel``; :func:`unwrap` gets the plain model back from DDP and
``torch.compile`` wrappers (for checkpoints, EMA and evaluation).
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@attrs.frozen(kw_only=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` processes, its rank on this
    machine (``local_rank``) and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment, or describe a single
    process when ``WORLD_SIZE`` is unset or 1 (nothing is initialized then).

    ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``None`` picks CUDA when available. In a
    multi-process run on CUDA each process takes ``cuda:LOCAL_RANK`` (and makes it the current
    device); naming an index there is an error, since every process would take the same GPU.
    Calling it again in an initialized process returns the same description.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    dev = _parse_device(device if device is not None else _default_device())
    if world_size == 1:
        return DistInfo(device=check_device(dev))

    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but RANK or LOCAL_RANK is not set; start multi-process "
            "training with torchrun (python -m torch.distributed.run --nproc_per_node=N …)"
        )
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, {world_size}), got {rank}")
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    if dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(
                f"device {str(dev)!r} names a GPU; in a multi-process run give 'cuda' and "
                "each process takes cuda:LOCAL_RANK"
            )
        check_device(dev)
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not "
            f"match the environment (RANK={rank}, WORLD_SIZE={world_size})"
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device {str(device)!r}: not a device name (cpu, cuda, cuda:1, mps, ...)"
        ) from None


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or a one-line ``ValueError`` when it is not a device
    name or this machine cannot compute on it (no CUDA GPU, no such GPU index, no MPS)."""
    dev = _parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
            if torch.version.cuda is None:
                why = "this PyTorch is built without CUDA"
            raise ValueError(f"device {str(dev)!r}: {why}; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(dev)!r}: MPS is not available on this machine; use cpu")
    return dev


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if _active():
        dist.barrier()


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of a floating tensor over all processes, as a new tensor (``tensor`` itself in
    a single process). Every process must call it with the same shape."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"all_reduce_mean needs a floating tensor, got {tensor.dtype}")
    if not _active():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum of a tensor over all processes (counts), as a new tensor (``tensor`` itself in a
    single process)."""
    if not _active():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable value) on every process; other ranks' ``obj`` is
    ignored. Trusted peers only: objects travel pickled."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, *, dst: int = 0) -> list[Any] | None:
    """Every process's ``obj``, in rank order, on rank ``dst``; ``None`` on the others. A single
    process gets ``[obj]``. E.g. per-rank COCO result lists, to evaluate on rank 0."""
    if not _active():
        return [obj]
    rank = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process (``[obj]`` in a single one)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(
    model: nn.Module,
    info: DistInfo,
    *,
    sync_batch_norm: bool = False,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (gradients averaged over processes during
    backward) when ``info`` is a multi-process run, else ``model`` itself.

    ``sync_batch_norm``: turn ``nn.BatchNorm*`` layers into ``nn.SyncBatchNorm`` first, so batch
    statistics cover the whole global batch (CUDA only; frozen norms are left alone). The
    model must already be on ``info.device``; build the optimizer from the returned module's
    parameters (they are the same tensors as ``model``'s).
    """
    if not info.distributed:
        return model
    if sync_batch_norm:
        if info.device.type != "cuda":
            raise ValueError("sync_batch_norm needs CUDA: SyncBatchNorm has no CPU kernel")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside ``DistributedDataParallel`` and ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(inner, nn.Module):
            model = inner
        else:
            return model
