"""The data of an experiment: its data sets (generated on first use for the shapes set), the
checks that they fit the model, and the training loader."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch

from fdet import specs

__all__ = [
    "DataSets",
    "EvaluationSet",
    "SeededSamples",
    "check_batches",
    "check_classes",
    "evaluation_set",
    "experiment_loader",
    "make_datasets",
    "max_objects",
    "unlabeled_loader",
]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a data set that does not fit the model, a
    precision the device cannot run)."""


@attrs.frozen
class DataSets:
    """The train and val data sets of an experiment (``fdet.data.coco.CocoDataset``), and for a
    semi-supervised one the unlabeled set (:class:`fdet.data.semi.UnlabeledPairs`; ``train`` is
    then the labeled part) and whether its images have labels (hidden from training, used to
    measure the pseudo-labels)."""

    train: Any
    val: Any
    unlabeled: Any = None
    unlabeled_has_labels: bool = False


def make_datasets(exp: specs.Experiment, *, with_train: bool = True) -> DataSets:
    """Open (and for the shapes set, generate on first use) the experiment's data sets
    (``with_train=False``: the validation set only; ``train`` is then None).

    The model's class count must match the data's categories, and the validation set must have
    the training set's categories (the same ids), or labels would be mapped to the wrong ids.
    Both sets carry instance masks (``Sample.masks``, ``Batch.gt_masks``) when the model has a
    mask head (a ``mask_head`` field: Mask R-CNN), which its loss needs."""
    from fdet.data.coco import CocoDataset
    from fdet.data.transforms import build_transform

    data = exp.data
    train_args: tuple[str | Path, str | Path]
    val_args: tuple[str | Path, str | Path]
    on_bad: Literal["error", "skip"]
    if isinstance(data, specs.ShapesData):
        from fdet.data.shapes import ensure_shapes

        paths = ensure_shapes(data)
        train_args = (paths.train_images, paths.train_annotations)
        val_args = (paths.val_images, paths.val_annotations)
        on_bad = "error"
    else:
        train_args = (data.train_images, data.train_annotations)
        val_args = (data.val_images, data.val_annotations)
        on_bad = data.on_bad_input
    with_masks = getattr(exp.model, "mask_head", None) is not None
    val = CocoDataset(
        *val_args,
        on_bad_input=on_bad,
        transform=build_transform(exp.val_transforms, train=False),
        with_masks=with_masks,
    )
    train = None
    if with_train:
        train_transform = build_transform(exp.train_transforms, train=True)
        train = CocoDataset(
            *train_args,
            on_bad_input=on_bad,
            transform=train_transform,
            seed=exp.seed,
            with_masks=with_masks,
        )
        if tuple(val.label_to_category_id) != tuple(train.label_to_category_id):
            raise TrainingError(
                f"the validation set's category ids {tuple(val.label_to_category_id)} differ "
                f"from the training set's {tuple(train.label_to_category_id)} ({val_args[1]} vs "
                f"{train_args[1]})"
            )
    check_classes(exp.model, val, "training" if train is not None else "validation")
    if train is not None and exp.semi is not None:
        return _semi_datasets(exp, train, val, train_args, on_bad)
    return DataSets(train=train, val=val)


def _semi_datasets(
    exp: specs.Experiment,
    train: Any,
    val: Any,
    train_args: tuple[str | Path, str | Path],
    on_bad: Literal["error", "skip"],
) -> DataSets:
    """The labeled and unlabeled sets of a semi-supervised experiment: a seeded split of the
    training set (``labeled_fraction``) or the training set and extra images (``unlabeled``)."""
    from fdet.data.coco import CocoDataset
    from fdet.data.semi import ImageFolder, IndexSubset, UnlabeledPairs, split_indices
    from fdet.data.transforms import build_transform

    semi = exp.semi
    assert semi is not None
    source: Any
    has_labels = True
    if semi.labeled_fraction is not None:
        labeled, rest = split_indices(len(train), semi.labeled_fraction, semi.split_seed)
        stored = CocoDataset(*train_args, on_bad_input=on_bad, seed=exp.seed)
        train, source = IndexSubset(train, labeled), IndexSubset(stored, rest)
    else:
        assert semi.unlabeled is not None
        images, annotations = semi.unlabeled.images, semi.unlabeled.annotations
        if annotations is None:
            source, has_labels = ImageFolder(images), False
        else:
            source = CocoDataset(images, annotations, on_bad_input=on_bad, seed=exp.seed)
            has_labels = any(len(v) for v in source.coco.imgToAnns.values())
    unlabeled = UnlabeledPairs(
        source, weak=build_transform(semi.weak, train=True), strong=semi.strong, seed=exp.seed
    )
    return DataSets(train=train, val=val, unlabeled=unlabeled, unlabeled_has_labels=has_labels)


def check_classes(model: specs.Spec, dataset: Any, name: str = "data") -> None:
    """A clear error when the model's class count differs from the data set's categories."""
    num_classes = len(dataset.label_to_category_id)
    expected = getattr(model, "num_classes", None)
    if expected is not None and num_classes != expected:
        raise TrainingError(
            f"the model predicts {expected} classes ({type(model).__name__}.num_classes) but "
            f"the {name} set has {num_classes} categories"
        )


def _where(dataset: Any) -> str:
    where = getattr(dataset, "annotation_file", None)
    return f" ({where})" if where is not None else ""


def check_batches(
    exp: specs.Experiment,
    dataset: Any,
    *,
    world_size: int = 1,
    val: Any = None,
    unlabeled: Any = None,
) -> None:
    """A clear error when the training set is empty or holds fewer images (a process's share
    of them, with several processes) than one micro-batch, so that no full batch can be made,
    or when the validation set ``val`` (given when the run evaluates) is empty, or the
    ``unlabeled`` set of a semi-supervised run smaller than its micro-batch: found before the
    run folder is written."""
    where = _where(dataset)
    size = len(dataset)
    if size == 0:
        raise TrainingError(f"the training set{where} has no images")
    if val is not None and len(val) == 0:
        raise TrainingError(f"the validation set{_where(val)} has no images to evaluate")
    micro = exp.batch_size // exp.accumulate
    share = -(-size // world_size)
    if share < micro:
        each = f", {share} a process of {world_size}" if world_size > 1 else ""
        split = f" ({micro} a micro-batch)" if exp.accumulate > 1 else ""
        raise TrainingError(
            f"batch_size {exp.batch_size}{split} is larger than the training set{where}: "
            f"{size} images{each}; use a batch_size of at most {share * exp.accumulate}"
        )
    if unlabeled is not None and exp.semi is not None:
        micro = exp.semi.unlabeled_batch_size // exp.accumulate
        share = -(-len(unlabeled) // world_size)
        if share < micro:
            raise TrainingError(
                f"semi.unlabeled_batch_size {exp.semi.unlabeled_batch_size} is larger than the "
                f"unlabeled set: {len(unlabeled)} images"
                + (f", {share} a process of {world_size}" if world_size > 1 else "")
            )


def max_objects(dataset: Any) -> int:
    """The most annotations of any image of a COCO-format data set (at least 1; 1 for a set
    without annotations)."""
    per_image = getattr(getattr(dataset, "coco", None), "imgToAnns", {})
    return max([1, *(len(anns) for anns in per_image.values())])


class SeededSamples:
    """A training set whose samples are made with Python's, NumPy's and torch's global random
    generators seeded from ``(seed, epoch, index)`` and put back afterwards. fdet's transforms
    draw only from the generator they are given; a transform of one's own that draws from the
    global generators is then as reproducible, in any loader worker and after a resume, and the
    main process's generators never depend on the data."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int, *, epoch: int | None = None) -> Any:
        key = [self.seed, 0 if epoch is None else epoch, index, 0x6A10BA1]
        words = np.random.SeedSequence(key).generate_state(4, np.uint32)
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(int(words[0]) << 32 | int(words[1]))
        np.random.seed(int(words[2]))
        torch.default_generator.manual_seed(int(words[3]))  # the CPU's only: CUDA's stay
        try:
            get = getattr(self.dataset, "get", None)
            return get(index, epoch=epoch) if callable(get) else self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])

    def __getitem__(self, index: int) -> Any:
        return self.get(index)


def experiment_loader(
    exp: specs.Experiment, dataset: Any, *, train: bool, rank: int = 0, world_size: int = 1
) -> Any:
    """The loader of ``dataset`` for ``exp`` on process ``rank`` of ``world_size``: micro-batches
    of ``batch_size / accumulate`` images, shuffled and full for training, in order and complete
    (``drop_last`` off, shards not padded) for validation. Ground-truth slots are padded per batch
    to one of a few bucket sizes (:func:`fdet.data.collate.slot_buckets`), so a batch pays for
    its own objects rather than the data set's most crowded image."""
    from fdet.data.collate import slot_buckets
    from fdet.data.loader import make_loader

    transforms = exp.train_transforms if train else exp.val_transforms
    full = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return make_loader(
        SeededSamples(dataset, exp.seed) if train else dataset,
        batch_size=max(1, exp.batch_size // exp.accumulate),
        shuffle=train,
        seed=exp.seed,
        num_workers=exp.num_workers,
        pad_divisor=transforms.pad_divisor,
        drop_last=train,
        rank=rank,
        world_size=world_size,
        slots=slot_buckets(max_objects(full)),
        pad_shards=train,  # evaluation sees every image once
    )


def unlabeled_loader(
    exp: specs.Experiment, dataset: Any, *, rank: int = 0, world_size: int = 1
) -> Any:
    """The loader of a semi-supervised experiment's unlabeled set: shuffled micro-batches of
    ``semi.unlabeled_batch_size / accumulate`` pairs (:func:`fdet.data.semi.collate_pairs`), in
    an order of their own (seeded apart from the labeled stream's)."""
    from fdet.data.collate import slot_buckets
    from fdet.data.loader import make_loader
    from fdet.data.semi import collate_pairs

    semi = exp.semi
    if semi is None:
        raise TrainingError("unlabeled_loader: the experiment has no semi spec")
    return make_loader(
        SeededSamples(dataset, exp.seed + 7919),
        batch_size=max(1, semi.unlabeled_batch_size // exp.accumulate),
        shuffle=True,
        seed=exp.seed + 7919,
        num_workers=exp.num_workers,
        pad_divisor=semi.weak.pad_divisor,
        drop_last=True,
        rank=rank,
        world_size=world_size,
        slots=slot_buckets(max_objects(dataset)),
        pad_shards=True,
        collate=collate_pairs,
    )


@attrs.frozen
class EvaluationSet:
    """A run's evaluation data: the data set (validation transforms) and the category id of each
    of the model's labels (None: the run's class names are unknown and its labels are taken to
    be the data set's categories in id order, which :func:`check_classes` has checked)."""

    dataset: Any
    label_to_category_id: list[int] | None


def evaluation_set(
    exp: specs.Experiment,
    checkpoint: str | Path,
    data: tuple[str | Path, str | Path] | None = None,
) -> EvaluationSet:
    """The data ``fdet eval`` and ``fdet analyze`` evaluate a run on: its validation set, or
    ``data`` (an image folder and a COCO annotation file) through its validation transforms,
    with the model's labels mapped to the set's categories by the class names the run records
    (``checkpoint``'s, else its training data's; :mod:`fdet.eval.classes`)."""
    from fdet.data.coco import CocoDataset
    from fdet.data.transforms import build_transform
    from fdet.eval.classes import category_ids_by_name, run_class_names
    from fdet.train.checkpoint import checkpoint_entries

    if data is not None:
        images_dir, annotation_file = data
        dataset = CocoDataset(
            images_dir,
            annotation_file,
            transform=build_transform(exp.val_transforms, train=False),
        )
    else:
        dataset = make_datasets(exp, with_train=False).val
    source = str(dataset.annotation_file)
    names = run_class_names(exp, checkpoint_entries(checkpoint))
    if names is None:
        check_classes(exp.model, dataset, source)
        return EvaluationSet(dataset, None)
    lut = category_ids_by_name(
        names, dataset.category_names, dataset.label_to_category_id, source=source
    )
    return EvaluationSet(dataset, list(lut))
