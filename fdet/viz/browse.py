"""A static gallery of a data set's samples as the model sees them: each image after its
transforms, with its boxes, class names and instance masks drawn, to check a data pipeline.

:func:`browse` writes the gallery of any data set of :class:`~fdet.data.sample.Sample` s;
:func:`open_source` opens what ``fdet data browse`` is given (an experiment spec file, or a COCO
annotation file and its image folder).

The gallery draws with :mod:`fdet.viz.draw` and opens an experiment's data as
:func:`fdet.train.engine.make_datasets` does (imported where it is used, so that the ``fdet``
parser stays light).
"""

from __future__ import annotations

import html
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image

from fdet import specs
from fdet.data.coco import DataError
from fdet.data.sample import Sample

__all__ = ["BrowseSource", "GalleryItem", "browse", "open_source", "pick_indices"]

_GENERATOR = "fdet data browse"
_COCO_KEYS = ("images", "annotations", "categories")


@attrs.frozen
class GalleryItem:
    """One image of a gallery: its PNG (a file name in the gallery folder), where it came from
    and what was drawn on it."""

    png: str
    index: int  # the sample's index in the data set
    image_id: int
    file_name: str
    size: tuple[int, int]  # (height, width) after the transforms
    orig_size: tuple[int, int]  # (height, width) on disk
    objects: int  # annotations drawn, crowd regions included
    crowd: int


@attrs.frozen
class BrowseSource:
    """A data set to browse and how to describe it (what :func:`open_source` returns)."""

    dataset: Any
    seed: int
    class_names: tuple[str, ...]
    title: str


def pick_indices(size: int, count: int, seed: int) -> list[int]:
    """The first ``count`` indices of epoch 0 of a training loader shuffled with ``seed``
    (:class:`fdet.data.loader.ShardedSampler`): the images training with that seed reads
    first, in that order."""
    from fdet.data.loader import ShardedSampler

    return ShardedSampler(size, shuffle=True, seed=seed).indices(0)[:count]


def _base(dataset: Any) -> Any:
    """The innermost data set (through wrappers that hold theirs in ``.dataset``)."""
    while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def _file_name(dataset: Any, image_id: int) -> str:
    coco = getattr(_base(dataset), "coco", None)
    entry = getattr(coco, "imgs", {}).get(image_id) if coco is not None else None
    if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
        return entry["file_name"]
    return f"image {image_id}"


def _read(dataset: Any, index: int) -> Sample:
    """Sample ``index`` of epoch 0, as a training loader reads it."""
    get = getattr(dataset, "get", None)
    return get(index, epoch=0) if callable(get) else dataset[index]


def _draw(sample: Sample, names: Sequence[str]) -> torch.Tensor:
    """The sample's image with its boxes (class colours; crowd regions captioned so), class
    names and masks drawn."""
    from fdet.viz.draw import draw_boxes, label_color

    labels = sample.labels.reshape(-1).long()
    crowd = sample.crowd.reshape(-1).bool()
    colors = [label_color(int(x)) for x in labels.tolist()]
    # crowd regions: the class name with "(crowd)", read from a second block of names
    num = max([len(names), int(labels.max()) + 1 if labels.numel() else 0])
    all_names = [names[k] if k < len(names) else str(k) for k in range(num)]
    all_names += [f"{n} (crowd)" for n in all_names]
    shown = torch.where(crowd, labels + num, labels)
    masks = None if sample.masks is None else sample.masks.bool()
    return draw_boxes(
        sample.image, sample.boxes, labels=shown, names=all_names, colors=colors, masks=masks
    )


def _prepare(out: Path) -> None:
    """Make ``out``; a gallery written there before is replaced, anything else refused."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        index = out / "index.html"
        ours = index.is_file() and f'content="{_GENERATOR}"' in index.read_text(errors="replace")
        if not ours:
            raise DataError(
                f"{out}: is not empty and holds no gallery; choose another folder, or remove "
                "this one first"
            )
        for entry in out.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def browse(
    dataset: Any,
    out_dir: str | os.PathLike[str],
    *,
    count: int = 16,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write a gallery of ``count`` samples of ``dataset`` to ``out_dir``: one PNG an image
    (``NNN_<file stem>.png``: the image after the data set's transforms, at that size, with
    its boxes, class names and instance masks drawn by :func:`fdet.viz.draw.draw_boxes`) and
    ``index.html``, a static page of them with captions (file name, objects, size after the
    transforms). Returns the path of ``index.html``.

    The samples are the first ``count`` of epoch 0 in the order a training loader shuffled with
    ``seed`` reads them (:func:`pick_indices`; all of them when there are fewer), each read
    with ``dataset.get(i, epoch=0)``: the same seed gives the same files. ``class_names``:
    the label names (default: the data set's ``category_names``). A folder that holds a gallery
    already is written over; any other non-empty folder is an error.
    """
    if count < 1:
        raise ValueError(f"count: must be >= 1, got {count}")
    size = len(dataset)
    base = _base(dataset)
    where = getattr(base, "annotation_file", None)
    if size == 0:
        raise DataError(f"{where or 'the data set'}: has no images to browse")
    if class_names is None:
        class_names = tuple(getattr(base, "category_names", ()))
    names = list(class_names)
    out = Path(out_dir)
    _prepare(out)
    items: list[GalleryItem] = []
    for rank, index in enumerate(pick_indices(size, count, seed)):
        sample = _read(dataset, index)
        file_name = _file_name(dataset, sample.image_id)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(file_name).stem)
        png = f"{rank:03d}_{stem or sample.image_id}.png"
        drawn = _draw(sample, names)
        Image.fromarray(drawn.permute(1, 2, 0).contiguous().numpy()).save(out / png)
        items.append(
            GalleryItem(
                png=png,
                index=index,
                image_id=sample.image_id,
                file_name=file_name,
                size=(int(sample.image.shape[-2]), int(sample.image.shape[-1])),
                orig_size=(int(sample.orig_size[0]), int(sample.orig_size[1])),
                objects=int(sample.labels.numel()),
                crowd=int(sample.crowd.sum()),
            )
        )
    heading = title or (str(where) if where is not None else "data set")
    summary = (
        f"{len(items)} of {size} images, epoch 0, seed {seed}; "
        f"classes: {', '.join(names) if names else 'unnamed'}"
    )
    index_html = out / "index.html"
    index_html.write_text(_page(heading, summary, items), encoding="utf-8")
    return index_html


def _caption(item: GalleryItem) -> str:
    height, width = item.size
    objects = f"{item.objects} object{'s' if item.objects != 1 else ''}"
    if item.crowd:
        objects += f" ({item.crowd} crowd)"
    size = f"{width}×{height} px"
    if item.orig_size != item.size:
        size += f" (from {item.orig_size[1]}×{item.orig_size[0]})"
    return (
        f'<span class="file">{html.escape(item.file_name)}</span>'
        f'<span class="objects" data-objects="{item.objects}">{objects}</span>'
        f'<span class="size" data-width="{width}" data-height="{height}">{size}</span>'
    )


def _page(heading: str, summary: str, items: Sequence[GalleryItem]) -> str:
    figures = "\n".join(
        f'<figure data-index="{item.index}" data-image-id="{item.image_id}">'
        f'<a href="{html.escape(item.png)}"><img src="{html.escape(item.png)}" '
        f'alt="{html.escape(item.file_name)}"></a>'
        f"<figcaption>{_caption(item)}</figcaption></figure>"
        for item in items
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{_GENERATOR}">
<title>{html.escape(heading)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; background: #fafafa; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; padding: 6px; background: #fff; border: 1px solid #ddd; }}
img {{ display: block; width: 256px; height: auto; image-rendering: pixelated; }}
figcaption {{ font-size: 12px; width: 256px; }}
figcaption span {{ display: block; overflow-wrap: anywhere; }}
</style>
</head>
<body>
<h1>{html.escape(heading)}</h1>
<p>{html.escape(summary)}</p>
<div class="gallery">
{figures}
</div>
</body>
</html>
"""


def _is_coco(path: Path) -> bool:
    """Whether a ``.json`` file reads as a COCO annotation file rather than a spec."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise DataError(f"{path}: cannot read it: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON: {e}") from e
    return isinstance(data, dict) and any(key in data for key in _COCO_KEYS)


def open_source(
    source: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    split: str | None = None,
    transforms: bool = True,
    seed: int | None = None,
    overrides: Sequence[str] = (),
) -> BrowseSource:
    """The data set ``fdet data browse`` shows for ``source``.

    An experiment spec file (``.py`` or ``.json``, with ``overrides`` as ``--set PATH=VALUE``):
    its ``split`` (``"train"``, the default, or ``"val"``) opened as ``fdet train`` opens it,
    transformed with its ``train_transforms`` (or ``val_transforms``) and the experiment's seed
    (``seed`` replaces it), instance masks included when the model has a mask head or the data
    is the shapes set. A COCO annotation file (with ``images``, its image folder): its images
    as stored, without transforms, masks included when an annotation has a segmentation.
    ``transforms=False``: images as stored in either case.
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".json" and _is_coco(path):
        for given, what in ((split, "--split"), (overrides, "--set")):
            if given:
                raise ValueError(f"{what} goes with an experiment spec, not with {path}")
        if images is None:
            raise ValueError(f"{path} is a COCO annotation file: give its image folder, --images")
        from fdet.data.coco import CocoDataset

        data = json.loads(path.read_bytes())
        anns = data.get("annotations")
        with_masks = isinstance(anns, list) and any(
            isinstance(a, dict) and a.get("segmentation") for a in anns
        )
        dataset = CocoDataset(images, path, with_masks=with_masks, seed=seed or 0)
        return BrowseSource(dataset, seed or 0, dataset.category_names, str(path))
    if images is not None:
        raise ValueError(f"--images goes with a COCO annotation file, not with {path}")
    if split not in (None, "train", "val"):
        raise ValueError(f"split: must be 'train' or 'val', got {split!r}")
    exp = _load_experiment(path, overrides)
    if seed is not None:
        exp = attrs.evolve(exp, seed=seed)
    train = split in (None, "train")
    return _experiment_source(exp, train=train, transforms=transforms, source=str(path))


def _load_experiment(path: Path, overrides: Sequence[str]) -> specs.Experiment:
    try:
        spec = specs.load(path)
    except specs.SpecError as e:
        if path.suffix != ".json":
            raise
        raise DataError(
            f"{path}: neither a COCO annotation file (none of {', '.join(_COCO_KEYS)}) nor an "
            f"experiment spec ({e})"
        ) from e
    if not isinstance(spec, specs.Experiment):
        raise specs.SpecError(
            f"holds a {type(spec).__name__}, not an experiment with data and transforms "
            "(EXPERIMENT); or give a COCO annotation file and --images",
            source=str(path),
        )
    if overrides:
        spec = specs.apply_overrides(spec, overrides)
    return spec


def _experiment_source(
    exp: specs.Experiment, *, train: bool, transforms: bool, source: str
) -> BrowseSource:
    from fdet.data.coco import build_dataset
    from fdet.data.transforms import build_transform
    from fdet.train.data import SeededSamples

    spec = exp.train_transforms if train else exp.val_transforms
    with_masks = getattr(exp.model, "mask_head", None) is not None or isinstance(
        exp.data, specs.ShapesData
    )
    dataset = build_dataset(
        exp.data,
        train=train,
        transform=build_transform(spec, train=train) if transforms else None,
        with_masks=with_masks,
        seed=exp.seed,
    )
    names = dataset.category_names
    split = "train" if train else "val"
    how = "transforms" if transforms else "no transforms"
    title = f"{source}: {split} ({how}) — {dataset.annotation_file}"
    # training reads its samples through SeededSamples: the same here, for the same pixels
    shown = SeededSamples(dataset, exp.seed) if train and transforms else dataset
    return BrowseSource(shown, exp.seed, names, title)
