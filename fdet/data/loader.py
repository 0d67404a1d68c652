"""Loading batches: a deterministic, shardable sampler, a DataLoader around it, and an endless
batch stream for iteration-based training.

The order of samples is a function of ``(seed, epoch)``, and each sample's transform randomness
a function of ``(dataset seed, epoch, index)``: neither depends on the number of workers, on
which worker reads what, or on the process (the sampler hands out ``(index, epoch)`` keys, so
persistent workers need no epoch state).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fdet.data.collate import _check_slots, collate
from fdet.data.sample import Batch, Sample

__all__ = ["EpochDataset", "Loader", "ShardedSampler", "infinite", "make_loader"]


class EpochDataset(Protocol):
    """A data set whose samples may depend on the epoch (their random augmentation).
    :class:`fdet.data.CocoDataset` is one; a plain map-style data set works too (``ds[i]``)."""

    def __len__(self) -> int: ...

    def get(self, index: int, *, epoch: int | None = None) -> Sample: ...


def _mix(*numbers: int) -> int:
    """A well-spread 63-bit seed from a few integers."""
    state = np.random.SeedSequence(list(numbers)).generate_state(2, np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class ShardedSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` keys: a permutation of ``range(size)`` fixed by
    ``(seed, epoch)`` (or the identity without ``shuffle``), of which rank ``r`` of
    ``world_size`` takes positions ``r, r + world_size, ...``.

    The shards are disjoint and together cover every index. With ``pad`` (for training, where
    every rank must run the same number of steps) each shard is filled up to
    ``ceil(size / world_size)`` with indices from the start of the permutation, so at most
    ``world_size - 1`` indices appear twice in an epoch; without it (evaluation) shard lengths
    differ by at most one.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, world_size = {world_size}), got {rank}")
        if size < 0:
            raise ValueError(f"size: must be >= 0, got {size}")
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = epoch
        self.start = 0

    def set_epoch(self, epoch: int, *, start: int = 0) -> None:
        """Use ``epoch``'s order from now on, beginning at this shard's ``start``-th key (to
        resume mid-epoch without reading what came before)."""
        self.epoch = epoch
        self.start = start

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's indices for ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world_size > 1 and order:
            total = -(-self.size // self.world_size) * self.world_size
            order += (order * (total // len(order) + 1))[: total - len(order)]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        for index in self.indices(epoch)[self.start :]:
            yield index, epoch

    def __len__(self) -> int:
        """Keys of this rank in a whole epoch."""
        if self.pad and self.world_size > 1:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))


class _Keyed(Dataset):
    """``dataset`` read by ``(index, epoch)`` keys."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, epoch = key
        get = getattr(self.dataset, "get", None)
        return get(index, epoch=epoch) if callable(get) else self.dataset[index]


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and numpy's global generators in a worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class Loader:
    """Batches of a data set, in a deterministic order per epoch; iterate it for one epoch.

    Wraps a ``torch.utils.data.DataLoader`` (``.dataloader``) over a :class:`ShardedSampler`
    (``.sampler``) with :func:`fdet.data.collate.collate`.

    ``pin_memory`` defaults to whether CUDA is available, ``persistent_workers`` to whether
    there are workers. ``rank``/``world_size`` shard the data for distributed training (see
    :class:`ShardedSampler`; ``pad_shards=False`` for evaluation). ``pad_to`` fixes the
    batch's image size; ``slots`` its annotation slots, exactly (an int) or to the smallest of a
    few bucket sizes that holds the batch (a tuple, e.g. from
    :func:`fdet.data.collate.slot_buckets`); see :func:`collate`. ``collate`` replaces the
    collation: it is called as ``collate(samples, pad_divisor=..., pad_to=..., slots=...)``
    (e.g. :func:`fdet.data.semi.collate_pairs` for pairs of views); a module-level function,
    so that it travels to worker processes.
    """

    def __init__(
        self,
        dataset: EpochDataset | Dataset,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        num_workers: int,
        pad_divisor: int,
        drop_last: bool,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad_shards: bool = True,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int | None = None,
        pad_to: tuple[int, int] | None = None,
        slots: int | Sequence[int] | None = None,
        collate: Callable[..., Any] = collate,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {num_workers}")
        if not isinstance(dataset, Sized):
            raise TypeError("make_loader: the data set must have a length")
        slots = _check_slots(slots)  # a bad value fails here, not in a worker
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = ShardedSampler(
            len(dataset),
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            pad=pad_shards,
        )
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        self.dataloader = DataLoader(
            _Keyed(dataset),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=functools.partial(
                collate, pad_divisor=pad_divisor, pad_to=pad_to, slots=slots
            ),
            pin_memory=pin_memory,
            drop_last=drop_last,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(_mix(seed, 1)),
        )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """The next iteration reads ``epoch``, from its ``start_batch``-th batch on."""
        self.sampler.set_epoch(epoch, start=start_batch * self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.dataloader)

    def __len__(self) -> int:
        """Batches in a whole epoch (of this rank)."""
        return len(self.dataloader)


make_loader = Loader
"""A :class:`Loader` of padded :class:`Batch` es (the same constructor, by its verb name)."""


def infinite(loader: Loader, *, start_iteration: int = 0) -> Iterator[Batch]:
    """Batches without end, for iteration-based training: epoch after epoch, each in its own
    order. Batch ``i`` of the stream is batch ``i % len(loader)`` of epoch
    ``first epoch + i // len(loader)``, where the first epoch is the loader's epoch when this is
    called; ``start_iteration`` resumes the stream there without reading the batches before."""
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("infinite: the loader yields no batches (data set smaller than a batch?)")
    first = loader.epoch
    epoch, offset = divmod(start_iteration, per_epoch)
    epoch += first
    while True:
        loader.set_epoch(epoch, start_batch=offset)
        yield from loader
        epoch, offset = epoch + 1, 0
