"""Data for semi-supervised training: unlabeled images, their weak and strong views, splits.

An unlabeled image is read once and made into two views (:class:`PairSample`): the *weak* view
(a training transform) that the teacher labels, and the *strong* view, made from the weak one by
:func:`strong_view`, that the student learns on. The geometric part of the strong view is an
axis-aligned map ``x' = a_x x + b_x``, ``y' = a_y y + b_y`` from weak to strong pixels, returned
with it, so the teacher's boxes are carried to the student's view by
:func:`fdet.ops.views.map_boxes`.

Randomness comes only from the generator of ``(seed, epoch, index)`` (the unlabeled stream's own
seed), so a pair is the same in any loader worker and after a resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from fdet import specs
from fdet.data.coco import DataError, read_image, sample_generator
from fdet.data.collate import collate
from fdet.data.sample import Batch, Sample
from fdet.data.transforms import hflip, photometric, random_crop, resize_to

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFolder",
    "IndexSubset",
    "PairBatch",
    "PairSample",
    "SplitCounts",
    "UnlabeledPairs",
    "collate_pairs",
    "cutout",
    "cutout_patches",
    "split_coco",
    "split_indices",
    "strong_view",
]

Affine = tuple[float, float, float, float]  # (a_x, b_x, a_y, b_y)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""The file suffixes :class:`ImageFolder` reads (any case)."""

CUTOUT_FILL = 128

# Mixed into the seed of the unlabeled stream, so its draws differ from the labeled stream's
# for the same (seed, epoch, index).
_UNLABELED_STREAM = 0x5E41AB


# ---------------------------------------------------------------------------------------------
# Strong view
# ---------------------------------------------------------------------------------------------


def cutout_patches(
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    count: tuple[int, int],
    size: tuple[float, float],
) -> Int[Tensor, "N 4"]:
    """The cutout patches of an image of ``height x width``, as integer xyxy pixel boxes
    clipped to the image (possibly empty when clipped away).

    ``n`` is drawn uniformly from ``count[0]..count[1]`` (inclusive); patch ``i`` is a square
    of side ``round(s * min(height, width))`` with ``s`` uniform in ``size``, centred at a
    uniform random point of the image (so it may reach over the border). ``1 + 3 * count[1]``
    numbers are drawn from ``generator`` whatever ``n``, so the stream after it is stable.
    """
    lo, hi = count
    if not 0 <= lo <= hi:
        raise ValueError(f"cutout: count must be (low, high) with 0 <= low <= high, got {count}")
    if not 0 <= size[0] <= size[1]:
        raise ValueError(f"cutout: size must be (low, high) with 0 <= low <= high, got {size}")
    u = torch.rand(1 + 3 * hi, generator=generator, dtype=torch.float64)
    n = min(hi, lo + int(u[0] * (hi - lo + 1)))
    draws = u[1:].view(hi, 3)[:n]  # [n, 3] = (size, centre x, centre y)
    side = (size[0] + (size[1] - size[0]) * draws[:, 0]) * min(height, width)
    side = side.round().long()  # [n]
    x0 = (draws[:, 1] * width).floor().long() - side // 2
    y0 = (draws[:, 2] * height).floor().long() - side // 2
    boxes = torch.stack((x0, y0, x0 + side, y0 + side), dim=1)  # [n, 4]
    upper = torch.tensor([width, height, width, height])
    return torch.minimum(boxes.clamp(min=0), upper)


def cutout(
    sample: Sample,
    generator: torch.Generator,
    *,
    count: tuple[int, int],
    size: tuple[float, float],
) -> Sample:
    """Fill a random number of square patches with gray (128): see :func:`cutout_patches` for
    how they are drawn. Boxes, labels and masks are unchanged."""
    h, w = sample.image.shape[-2:]
    patches = cutout_patches(h, w, generator, count=count, size=size)
    if not len(patches):
        return sample
    image = sample.image.clone()
    for x1, y1, x2, y2 in patches.tolist():
        image[:, y1:y2, x1:x2] = CUTOUT_FILL
    return sample._replace(image=image)


def _crop_window(
    height: int, width: int, generator: torch.Generator, *, min_scale: float
) -> tuple[int, int, int, int]:
    """The window ``(x0, y0, crop height, crop width)`` that ``random_crop`` draws from a
    generator in the same state (the same four numbers, the same formula)."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    ch = min(height, max(1, round(height * (min_scale + (1 - min_scale) * u[0]))))
    cw = min(width, max(1, round(width * (min_scale + (1 - min_scale) * u[1]))))
    y0 = min(height - ch, int(u[2] * (height - ch + 1)))
    x0 = min(width - cw, int(u[3] * (width - cw + 1)))
    return x0, y0, ch, cw


def strong_view(
    sample: Sample, generator: torch.Generator, spec: specs.StrongAugment
) -> tuple[Sample, Affine]:
    """The student's view of ``sample`` (the teacher's weak view), and the map from its pixels.

    In order (``spec``: :class:`fdet.specs.StrongAugment`): a random crop with probability
    ``crop_prob`` (``fdet.data.transforms.random_crop``: boxes clipped, those with less than
    ``crop_min_visible`` of their area inside dropped), a resize by a factor uniform in
    ``scale`` (to ``max(1, round(h f)) x max(1, round(w f))``), a horizontal flip with
    probability ``hflip_prob``, colour jitter, then :func:`cutout`. Masks are dropped.

    Returns ``(strong, (a_x, b_x, a_y, b_y))``: the map ``x' = a_x x + b_x``,
    ``y' = a_y y + b_y`` from ``sample``'s pixel coordinates to ``strong``'s, from the actual
    integer sizes: the crop offset, then the resize factors ``new_w / crop_w`` and
    ``new_h / crop_h``, then the flip ``x -> W' - x``. ``strong.boxes`` are ``sample.boxes``
    carried over by the transforms, which is what ``fdet.ops.views.map_boxes`` computes from
    the map (with ``min_visible=spec.crop_min_visible``).
    """
    sample = sample._replace(masks=None)
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    h, w = sample.image.shape[-2:]
    x0, y0, ch, cw = 0, 0, h, w
    if u[0] < spec.crop_prob:
        probe = torch.Generator()
        probe.set_state(generator.get_state())
        x0, y0, ch, cw = _crop_window(h, w, probe, min_scale=spec.crop_min_scale)
        sample = random_crop(
            sample, generator, min_scale=spec.crop_min_scale, min_visible=spec.crop_min_visible
        )
        if tuple(sample.image.shape[-2:]) != (ch, cw):  # random_crop's draw has changed
            raise RuntimeError(
                f"strong_view: random_crop cut {tuple(sample.image.shape[-2:])}, expected "
                f"{(ch, cw)}: its window draw differs from _crop_window's"
            )
    lo, hi = spec.scale
    factor = lo + (hi - lo) * u[1]
    nh, nw = max(1, round(ch * factor)), max(1, round(cw * factor))
    sample = resize_to(sample, (nh, nw))
    sx, sy = nw / cw, nh / ch
    affine: Affine = (sx, -sx * x0, sy, -sy * y0)
    if u[2] < spec.hflip_prob:
        sample = hflip(sample)
        affine = (-sx, nw + sx * x0, sy, -sy * y0)
    sample = photometric(
        sample,
        generator,
        brightness=spec.brightness,
        contrast=spec.contrast,
        saturation=spec.saturation,
        hue=spec.hue,
    )
    count = (int(spec.cutout_count[0]), int(spec.cutout_count[1]))
    size = (float(spec.cutout_size[0]), float(spec.cutout_size[1]))
    sample = cutout(sample, generator, count=count, size=size)
    return sample, affine


# ---------------------------------------------------------------------------------------------
# Pairs and their batches
# ---------------------------------------------------------------------------------------------


class PairSample(NamedTuple):
    """One unlabeled image as the teacher sees it (``weak``) and as the student does
    (``strong``), and the map ``(a_x, b_x, a_y, b_y)`` from weak to strong pixels.

    ``weak`` keeps the image's labels where the source has any: they only measure the
    pseudo-labels' precision, never train. ``strong.boxes`` are the weak boxes carried over."""

    weak: Sample
    strong: Sample
    affine: Affine


class PairBatch(NamedTuple):
    """A batch of :class:`PairSample`: both views padded and stacked, and ``affine[B, 4]``
    (float32) from each weak view's pixels to its strong view's."""

    weak: Batch
    strong: Batch
    affine: Float[Tensor, "B 4"]

    def to(self, device: object, *, non_blocking: bool = False) -> PairBatch:
        """The same batch with every tensor on ``device``."""
        return PairBatch(
            weak=self.weak.to(device, non_blocking=non_blocking),
            strong=self.strong.to(device, non_blocking=non_blocking),
            affine=self.affine.to(device, non_blocking=non_blocking),  # type: ignore[call-overload]
        )


def collate_pairs(
    samples: Sequence[PairSample],
    *,
    pad_divisor: int,
    pad_to: tuple[int, int] | None = None,
    slots: int | Sequence[int] | None = None,
) -> PairBatch:
    """Collate each view with :func:`fdet.data.collate.collate` (the same ``pad_divisor``,
    ``pad_to`` and ``slots``) and stack the maps; a drop-in ``collate`` for
    :class:`fdet.data.loader.Loader`."""
    if not samples:
        raise ValueError("collate_pairs: no samples")
    options: dict[str, Any] = dict(pad_divisor=pad_divisor, pad_to=pad_to, slots=slots)
    return PairBatch(
        weak=collate([s.weak for s in samples], **options),
        strong=collate([s.strong for s in samples], **options),
        affine=torch.tensor([s.affine for s in samples], dtype=torch.float32).reshape(-1, 4),
    )


def _read_stored(dataset: Any, index: int, epoch: int | None) -> Sample:
    """Sample ``index`` of ``dataset`` as stored (``read``), else as it gives it."""
    read = getattr(dataset, "read", None)
    if callable(read):
        return read(index)
    get = getattr(dataset, "get", None)
    return get(index, epoch=epoch) if callable(get) else dataset[index]


class UnlabeledPairs:
    """A data set of :class:`PairSample`: each image of ``dataset`` (its stored sample,
    ``dataset.read(i)``) through ``weak``, then :func:`strong_view` with ``strong``.

    Both draw from one generator, that of ``(seed, epoch, index)`` for the unlabeled stream
    (distinct from the labeled stream's of the same numbers), so ``get(i, epoch=e)`` is a pure
    function of ``(seed, e, i)``. ``category_names``, ``label_to_category_id``, ``coco`` and
    ``annotation_file`` are the wrapped data set's (None where it has none).
    """

    def __init__(
        self,
        dataset: Any,
        *,
        weak: Callable[[Sample, torch.Generator], Sample],
        strong: specs.StrongAugment,
        seed: int,
    ) -> None:
        self.dataset = dataset
        self.weak = weak
        self.strong = strong
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``pairs[i]`` draws its randomness for."""
        self.epoch = epoch

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        """The generator pair ``index`` of ``epoch`` is made with."""
        epoch = self.epoch if epoch is None else epoch
        words = np.random.SeedSequence([self.seed, _UNLABELED_STREAM]).generate_state(2, np.uint32)
        stream_seed = int(words[0]) << 32 | int(words[1])
        return sample_generator(stream_seed, epoch, index % len(self))

    def get(self, index: int, *, epoch: int | None = None) -> PairSample:
        """Pair ``index`` of ``epoch`` (default: the one ``set_epoch`` set)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        sample = _read_stored(self.dataset, index, epoch)
        generator = self.generator(index, epoch)
        weak = self.weak(sample, generator)
        strong, affine = strong_view(weak, generator, self.strong)
        return PairSample(weak=weak, strong=strong, affine=affine)

    def __getitem__(self, index: int) -> PairSample:
        return self.get(index)

    @property
    def category_names(self) -> Any:
        return getattr(self.dataset, "category_names", None)

    @property
    def label_to_category_id(self) -> Any:
        return getattr(self.dataset, "label_to_category_id", None)

    @property
    def coco(self) -> Any:
        return getattr(self.dataset, "coco", None)

    @property
    def annotation_file(self) -> Any:
        return getattr(self.dataset, "annotation_file", None)


# ---------------------------------------------------------------------------------------------
# Subsets and splits
# ---------------------------------------------------------------------------------------------


class IndexSubset:
    """The images ``indices`` of ``dataset``, in that order: ``subset.get(i, epoch=e)`` is
    ``dataset.get(indices[i], epoch=e)`` (so a sample's randomness stays that of its index in
    the whole set), ``subset.read(i)`` is ``dataset.read(indices[i])``. Other attributes
    (``coco``, ``category_names``, ``label_to_category_id``, ``annotation_file``, ...) are the
    wrapped data set's."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        size = len(dataset)
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < size]
        if bad:
            raise IndexError(
                f"IndexSubset: indices {bad[:5]} out of range for a data set of {size} images"
            )
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self.indices[index]

    def get(self, index: int, *, epoch: int | None = None) -> Any:
        inner = self._index(index)
        get = getattr(self.dataset, "get", None)
        return get(inner, epoch=epoch) if callable(get) else self.dataset[inner]

    def read(self, index: int) -> Any:
        return self.dataset.read(self._index(index))

    def __getitem__(self, index: int) -> Any:
        return self.get(index)

    @property
    def image_ids(self) -> tuple[int, ...] | None:
        """The subset's image ids (None when the data set has none)."""
        ids = getattr(self.dataset, "image_ids", None)
        return None if ids is None else tuple(ids[i] for i in self.indices)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "indices"):  # unpickling, copying
            raise AttributeError(name)
        return getattr(self.dataset, name)


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split of ``range(n)``: ``max(1, round(fraction * n))`` labeled indices
    and the others, each sorted. An error when ``n < 2``, ``fraction`` is not in ``(0, 1)`` or
    the unlabeled part would be empty."""
    if n < 2:
        raise ValueError(f"split: needs at least 2 images to split, got {n}")
    if not 0 < fraction < 1:
        raise ValueError(f"split: fraction must be in (0, 1), got {fraction}")
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(
            f"split: a labeled fraction of {fraction} of {n} images takes {k} of them, leaving "
            "no unlabeled image; use a smaller fraction"
        )
    words = np.random.SeedSequence([seed, _UNLABELED_STREAM, 1]).generate_state(2, np.uint32)
    g = torch.Generator().manual_seed(int(words[0]) << 31 ^ int(words[1]))
    order = torch.randperm(n, generator=g)
    return sorted(order[:k].tolist()), sorted(order[k:].tolist())


class SplitCounts(NamedTuple):
    """What :func:`split_coco` put where."""

    labeled_images: int
    unlabeled_images: int
    labeled_annotations: int


def _coco_error(path: str | os.PathLike[str], message: str) -> DataError:
    return DataError(f"{path}: {message}")


def split_coco(
    annotation_file: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fraction: float,
    seed: int = 0,
) -> SplitCounts:
    """Split a COCO annotation file for semi-supervised training: ``out_dir/labeled.json``
    holds ``max(1, round(fraction * n))`` images chosen by :func:`split_indices` (over the
    images in the file's order) and their annotations, ``out_dir/unlabeled.json`` the other
    images and no annotations; both keep the categories (and the file's other top-level keys).
    A missing or malformed file or a split that leaves one side empty is a :class:`DataError`
    naming the file."""
    from fdet.atomic import atomic_write_text

    path = Path(annotation_file)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise _coco_error(path, f"cannot read annotation file: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _coco_error(path, f"malformed JSON: {e}") from e
    if not isinstance(data, dict):
        raise _coco_error(path, f"expected a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _coco_error(path, f"needs a list {key!r}")
    images = data["images"]
    ids = []
    for k, im in enumerate(images):
        image_id = im.get("id") if isinstance(im, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise _coco_error(path, f"images[{k}]: needs an integer 'id'")
        ids.append(image_id)
    try:
        labeled, unlabeled = split_indices(len(images), fraction, seed)
    except ValueError as e:
        raise _coco_error(path, str(e)) from e
    labeled_ids = {ids[i] for i in labeled}
    annotations = []
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a:
            raise _coco_error(path, f"annotations[{k}]: needs an 'image_id'")
        if a["image_id"] in labeled_ids:
            annotations.append(a)
    out = Path(out_dir)
    for name, part, part_annotations in (
        ("labeled.json", labeled, annotations),
        ("unlabeled.json", unlabeled, []),
    ):
        replaced = {"images": [images[i] for i in part], "annotations": part_annotations}
        written = {key: replaced.get(key, value) for key, value in data.items()}
        atomic_write_text(out / name, json.dumps(written))
    return SplitCounts(len(labeled), len(unlabeled), len(annotations))


# ---------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------


class ImageFolder:
    """Every image file under ``root`` (suffixes :data:`IMAGE_SUFFIXES`, any case, in
    sub-folders too), sorted by path: ``folder[i]`` is a :class:`Sample` with no objects,
    ``image_id = i + 1``. A missing folder or one without images is a :class:`DataError`, and
    so is an image that cannot be decoded (naming the file) when read.

    It has no categories: ``category_names``, ``label_to_category_id``, ``coco`` and
    ``annotation_file`` are None.
    """

    category_names = None
    label_to_category_id = None
    coco = None
    annotation_file = None

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such image folder")
        self.files: tuple[Path, ...] = tuple(
            sorted(
                (
                    p
                    for p in self.root.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                ),
                key=lambda p: p.relative_to(self.root).as_posix(),
            )
        )
        if not self.files:
            raise DataError(
                f"{self.root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"
            )

    @property
    def images_dir(self) -> Path:
        return self.root

    @property
    def image_ids(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.files) + 1))

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> Sample:
        """Image ``index`` as stored, without objects."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        image = read_image(self.files[index])  # a DataError names the file
        h, w = image.shape[-2:]
        return Sample(
            image=image,
            boxes=torch.zeros(0, 4, dtype=torch.float32),
            labels=torch.zeros(0, dtype=torch.int64),
            crowd=torch.zeros(0, dtype=torch.bool),
            image_id=index + 1,
            orig_size=(int(h), int(w)),
        )

    def get(self, index: int, *, epoch: int | None = None) -> Sample:
        """The same as :meth:`read`: an image folder has no transform of its own."""
        return self.read(index)

    def __getitem__(self, index: int) -> Sample:
        return self.read(index)
