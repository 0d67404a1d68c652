from __future__ import annotations

import functools

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from fdet import specs
from fdet.data import (
    CocoDataset,
    Sample,
    ShapesPaths,
    ShardedSampler,
    build_transform,
    infinite,
    make_loader,
)
from fdet.data.collate import slot_buckets

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


def test_same_seed_and_epoch_give_the_same_order() -> None:
    a = ShardedSampler(50, shuffle=True, seed=3, epoch=2)
    b = ShardedSampler(50, shuffle=True, seed=3)
    b.set_epoch(2)
    assert list(a) == list(b) and all(epoch == 2 for _, epoch in a)
    order = [i for i, _ in a]
    assert sorted(order) == list(range(50)) and order != list(range(50))
    a.set_epoch(3)
    assert [i for i, _ in a] != order
    assert [i for i, _ in ShardedSampler(50, shuffle=True, seed=4, epoch=2)] != order
    assert [i for i, _ in ShardedSampler(50, shuffle=False, seed=3, epoch=2)] == list(range(50))


@given(
    size=st.integers(0, 60),
    world_size=st.integers(1, 7),
    seed=st.integers(0, 5),
    shuffle=st.booleans(),
)
def test_rank_shards_are_disjoint_and_cover(
    size: int, world_size: int, seed: int, shuffle: bool
) -> None:
    shards = [
        ShardedSampler(
            size, shuffle=shuffle, seed=seed, rank=r, world_size=world_size, pad=False
        ).indices()
        for r in range(world_size)
    ]
    everything = [i for shard in shards for i in shard]
    assert sorted(everything) == list(range(size))  # disjoint and covering
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for r, shard in enumerate(shards):
        assert len(
            ShardedSampler(size, shuffle=shuffle, rank=r, world_size=world_size, pad=False)
        ) == len(shard)

    padded = [
        ShardedSampler(size, shuffle=shuffle, seed=seed, rank=r, world_size=world_size).indices()
        for r in range(world_size)
    ]
    lengths = {len(s) for s in padded}
    assert len(lengths) == 1 or size == 0  # every rank runs the same number of steps
    flat = [i for s in padded for i in s]
    assert set(flat) == set(range(size))
    assert len(flat) - size < world_size
    assert len(ShardedSampler(size, shuffle=shuffle, rank=0, world_size=world_size)) == len(
        padded[0]
    )


def test_bad_rank_is_an_error() -> None:
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(10, shuffle=False, rank=2, world_size=2)


TRAIN = specs.Transforms(
    min_size=(48, 64), max_size=96, hflip_prob=0.5, brightness=0.2, crop_prob=0.5, pad_divisor=32
)


@pytest.fixture(scope="module")
def dataset(shapes_set: ShapesPaths) -> CocoDataset:
    return CocoDataset(
        shapes_set.train_images,
        shapes_set.train_annotations,
        transform=build_transform(TRAIN, train=True),
        seed=1,
    )


def _flat(batches: list) -> list:
    return [
        (b.image_ids.tolist(), b.images.shape, b.gt_boxes[b.gt_valid].tolist()) for b in batches
    ]


def test_batches_do_not_depend_on_workers(dataset: CocoDataset) -> None:
    kw = functools.partial(
        make_loader, batch_size=6, shuffle=True, seed=0, pad_divisor=32, drop_last=True, epoch=1
    )
    serial = kw(dataset, num_workers=0)
    parallel = kw(dataset, num_workers=2)
    assert len(serial) == len(parallel) == 40 // 6
    first = list(serial)
    assert _flat(first) == _flat(list(parallel))
    for batch in first:
        assert batch.images.shape[2] % 32 == 0 and batch.images.shape[3] % 32 == 0
    parallel.set_epoch(2)  # persistent workers, next epoch: new order and new augmentation
    second = list(parallel)
    assert _flat(second) != _flat(first)
    serial.set_epoch(2)
    assert _flat(list(serial)) == _flat(second)


def test_plain_datasets_work(dataset: CocoDataset) -> None:
    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, index: int) -> Sample:
            return dataset.read(index)

    loader = make_loader(
        Plain(), batch_size=2, shuffle=False, seed=0, num_workers=0, pad_divisor=8, drop_last=False
    )
    assert [b.image_ids.tolist() for b in loader] == [[1, 2], [3, 4], [5]]


def test_infinite_advances_epochs_and_resumes(dataset: CocoDataset) -> None:
    loader = make_loader(
        dataset, batch_size=16, shuffle=True, seed=0, num_workers=0, pad_divisor=32, drop_last=True
    )
    assert len(loader) == 2
    stream = infinite(loader)
    ids = [next(stream).image_ids.tolist() for _ in range(5)]
    epochs = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        epochs += [b.image_ids.tolist() for b in loader]
    assert ids == epochs[:5]
    loader.set_epoch(0)
    resumed = infinite(loader, start_iteration=3)
    assert [next(resumed).image_ids.tolist() for _ in range(2)] == ids[3:5]
    assert loader.epoch == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_pads_slots_to_buckets(dataset: CocoDataset, num_workers: int) -> None:
    most = max(len(anns) for anns in dataset.coco.imgToAnns.values())
    buckets = slot_buckets(most, smallest=2)
    assert len(buckets) > 2
    kw = dict(batch_size=3, shuffle=True, seed=0, pad_divisor=32, drop_last=True, epoch=1)
    bucketed = list(make_loader(dataset, num_workers=num_workers, slots=buckets, **kw))
    exact = list(make_loader(dataset, num_workers=0, slots=most, **kw))
    assert _flat(bucketed) == _flat(exact)
    sizes = set()
    for batch in bucketed:
        m = batch.gt_valid.shape[1]
        assert m == min(b for b in buckets if b >= int(batch.gt_valid.sum(1).max()))
        sizes.add(m)
    assert len(sizes) > 1  # the slot count follows the batch
    assert all(batch.gt_valid.shape[1] == most for batch in exact)
    with pytest.raises(ValueError, match="slots"):
        make_loader(dataset, num_workers=num_workers, slots=(4, 2), **kw)
