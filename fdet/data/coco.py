"""COCO-format data sets: annotation files checked once when loaded, images decoded on read.

Bad input is an error by default (:class:`DataError`, naming the file and the image or
annotation id). With ``on_bad_input="skip"`` each bad annotation or image is left out, counted by
reason in ``dataset.skipped``, and summarised in one log line on the ``fdet.data`` logger.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torchvision.io
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from fdet import specs
from fdet.data.sample import Sample

__all__ = [
    "CocoDataset",
    "DataError",
    "Transform",
    "build_dataset",
    "read_image",
    "sample_generator",
]

logger = logging.getLogger("fdet.data")

Transform = Callable[[Sample, torch.Generator], Sample]
"""A per-sample transform: a pure function of the sample and a generator for its randomness."""

# Reasons counted in ``CocoDataset.skipped``.
MALFORMED_IMAGE = "malformed image entry"
MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
OF_SKIPPED_IMAGE = "annotation of a skipped image"
MALFORMED_ANNOTATION = "malformed annotation"
UNKNOWN_IMAGE = "unknown image id"
UNKNOWN_CATEGORY = "unknown category id"
NON_FINITE_BOX = "non-finite box"
EMPTY_BOX = "zero or negative box size"
OUTSIDE_BOX = "box outside the image"
MALFORMED_SEGMENTATION = "malformed segmentation"

_REQUIRED_KEYS = ("images", "annotations", "categories")


class DataError(ValueError):
    """Input data that cannot be used: a malformed annotation file, a bad annotation, a missing
    or unreadable image. The message starts with the file and names the image or annotation."""


def read_image(path: str | os.PathLike[str]) -> torch.Tensor:
    """Decode an image file to uint8 RGB ``[3, H, W]``, as it is displayed.

    - The EXIF orientation, if any, is applied (as ``PIL.ImageOps.exif_transpose`` does): the
      result is the image as a viewer shows it, so ``H`` and ``W`` may be the stored ones
      swapped.
    - Grayscale is repeated over the three channels; alpha is dropped; palette, CMYK and YCbCr
      images are converted to RGB.
    - 16 bits a sample (PNG, TIFF) become 8 by keeping the high byte (``v >> 8``: 65535 -> 255,
      and ``257 * k`` -> ``k``); the first frame of an animated image is taken.

    torchvision's decoders first, PIL for formats they do not read. Raises :class:`DataError`
    when neither can decode the file, or for pixels with no 8-bit RGB reading (PIL's 32-bit
    integer and float modes).
    """
    try:
        data = torchvision.io.read_file(str(path))
        image = torchvision.io.decode_image(
            data, mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True
        )
    except (RuntimeError, ValueError):
        return _read_with_pil(path)
    if image.ndim == 4:  # an animated image: its frames
        image = image[0]
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise DataError(
            f"{path}: decoded to {image.dtype} {tuple(image.shape)}, not 8-bit RGB [3, H, W]"
        )
    return image


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _read_with_pil(path: str | os.PathLike[str]) -> torch.Tensor:
    try:
        with Image.open(path) as stored:
            stored.seek(0)  # the first frame of an animated image
            im = ImageOps.exif_transpose(stored)
            mode = im.mode
            if mode in _SIXTEEN_BIT_MODES:
                gray = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)  # [H, W]
                rgb = np.repeat(gray[..., None], 3, axis=2)
            elif mode not in ("I", "F"):
                rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image: {e}") from e
    if mode in ("I", "F"):
        kind = "32-bit integer" if mode == "I" else "floating-point"
        raise DataError(
            f"{path}: {kind} pixels (PIL mode {mode}) have no 8-bit RGB reading; "
            "save the image with 8 or 16 bits a sample"
        )
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).contiguous()  # a writable copy


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator a transform gets for sample ``index`` in ``epoch``: a pure function of the
    three numbers, independent of workers and of the order samples are read in."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> uint8 ``[H, W]``."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools' numpy 2 copy-keyword notice
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.asarray(mask_utils.decode(rle), dtype=np.uint8)


def _segmentation_ok(segmentation: Any, height: int, width: int) -> bool:
    """A structural check: polygons of >= 3 points, or an RLE of the image's size."""
    if isinstance(segmentation, list):
        return bool(segmentation) and all(
            isinstance(p, list)
            and len(p) >= 6
            and len(p) % 2 == 0
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)
            for p in segmentation
        )
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        return (
            isinstance(size, list)
            and list(size) == [height, width]
            and isinstance(counts, (list, str, bytes))
        )
    return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CocoDataset(torch.utils.data.Dataset):
    """A COCO-format detection data set: ``dataset[i]`` is a :class:`Sample`.

    Category ids map to contiguous labels ``0..K-1`` in sorted id order
    (``label_to_category_id[label]`` maps back; ``category_names[label]`` names it).
    ``iscrowd`` annotations become boxes with ``crowd=True``. Images without annotations are
    kept, as negatives.

    The annotation file is checked once, here: a missing top-level key, malformed JSON or a
    duplicate id is always an error; a bad image entry, a missing image file, or an annotation
    with an unknown image or category id, a non-finite box, a zero or negative width or height,
    or a box wholly outside its image is an error, or with ``on_bad_input="skip"`` left out and
    counted in ``skipped``. A box partly outside its image is clipped (and counted in
    ``clipped``). ``.coco`` is the pycocotools ``COCO`` of what was kept (clipped boxes
    included), for evaluation.

    Images are decoded when read. An image that cannot be decoded, or whose size differs from
    its entry, raises :class:`DataError`; with ``"skip"`` it reads as a black image of the
    entry's size with no objects (an index cannot vanish from a map-style data set), and each
    time is logged and counted. ``check_images=True`` decodes every image here instead, so
    unreadable ones are left out up front (slow on large sets).

    ``transform(sample, generator)`` is applied to each sample with the generator
    ``sample_generator(seed, epoch, index)``; ``set_epoch`` sets the epoch ``dataset[i]`` uses,
    and ``get(i, epoch=e)`` names it explicitly (the loader does, so worker processes need no
    state).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        annotation_file: str | os.PathLike[str],
        *,
        on_bad_input: Literal["error", "skip"] = "error",
        transform: Transform | None = None,
        with_masks: bool = False,
        seed: int = 0,
        check_images: bool = False,
    ) -> None:
        if on_bad_input not in ("error", "skip"):
            raise ValueError(f"on_bad_input: must be 'error' or 'skip', got {on_bad_input!r}")
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.on_bad_input = on_bad_input
        self.transform = transform
        self.with_masks = with_masks
        self.seed = seed
        self.epoch = 0
        self.skipped: Counter[str] = Counter()
        self.clipped = 0
        gc_was_enabled = gc.isenabled()
        gc.disable()  # collections over the freshly parsed JSON cost more than the checks
        try:
            self._load(check_images)
        finally:
            if gc_was_enabled:
                gc.enable()
        self._log_summary()

    # -- loading ---------------------------------------------------------------------------

    def _bad(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        """Raise for a bad item, or count it when skipping."""
        if self.on_bad_input == "error":
            message = f"{self.annotation_file}: {where}: {reason}"
            raise DataError(f"{message} ({detail})" if detail else message)
        self.skipped[reason] += count

    def _file_error(self, message: str) -> DataError:
        return DataError(f"{self.annotation_file}: {message}")

    def _read_json(self) -> dict[str, Any]:
        try:
            text = self.annotation_file.read_bytes()
        except OSError as e:
            raise self._file_error(f"cannot read annotation file: {e.strerror or e}") from e
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._file_error(f"malformed JSON: {e}") from e
        if not isinstance(data, dict):
            raise self._file_error(f"expected a JSON object, got {type(data).__name__}")
        for key in _REQUIRED_KEYS:
            if key not in data:
                raise self._file_error(f"missing top-level key {key!r}")
            if not isinstance(data[key], list):
                raise self._file_error(f"{key!r} must be a list, got {type(data[key]).__name__}")
        return data

    def _load_categories(self, entries: list[Any]) -> None:
        ids: list[int] = []
        names: dict[int, str] = {}
        for k, c in enumerate(entries):
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                raise self._file_error(f"categories[{k}]: needs an integer 'id'")
            if c["id"] in names:
                raise self._file_error(f"duplicate category id {c['id']}")
            ids.append(c["id"])
            names[c["id"]] = str(c.get("name", c["id"]))
        self.label_to_category_id: tuple[int, ...] = tuple(sorted(ids))
        self.category_id_to_label: dict[int, int] = {
            cid: label for label, cid in enumerate(self.label_to_category_id)
        }
        self.category_names: tuple[str, ...] = tuple(names[c] for c in self.label_to_category_id)

    def _load_images(self, entries: list[Any]) -> list[dict[str, Any]]:
        if not self.images_dir.is_dir():
            raise DataError(f"{self.images_dir}: no such image folder")
        listing = set(os.listdir(self.images_dir))
        seen: set[int] = set()
        kept: list[dict[str, Any]] = []
        for k, im in enumerate(entries):
            image_id = im.get("id") if isinstance(im, dict) else None
            if not _is_int(image_id):
                self._bad(MALFORMED_IMAGE, f"images[{k}]", "needs an integer 'id'")
                continue
            assert isinstance(im, dict) and isinstance(image_id, int)
            if image_id in seen:
                raise self._file_error(f"duplicate image id {image_id}")
            seen.add(image_id)
            name, height, width = im.get("file_name"), im.get("height"), im.get("width")
            if not (
                isinstance(name, str)
                and name
                and isinstance(height, int)
                and isinstance(width, int)
                and min(height, width) > 0
            ):
                self._bad(
                    MALFORMED_IMAGE,
                    f"image id {image_id}",
                    "needs 'file_name' and positive integer 'height' and 'width'",
                )
                continue
            exists = name in listing if "/" not in name else (self.images_dir / name).is_file()
            if not exists:
                if self.on_bad_input == "error":
                    raise DataError(
                        f"{self.images_dir / name}: {MISSING_IMAGE} "
                        f"(image id {image_id} in {self.annotation_file})"
                    )
                self.skipped[MISSING_IMAGE] += 1
                continue
            kept.append(im)
        return kept

    def _check_image_files(self, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = []
        for im in images:
            try:
                self._read_checked(im)
            except DataError as e:
                if self.on_bad_input == "error":
                    raise DataError(f"{e} (image id {im['id']} in {self.annotation_file})") from e
                self.skipped[UNREADABLE_IMAGE] += 1
                continue
            kept.append(im)
        return kept

    def _load(self, check_images: bool) -> None:
        data = self._read_json()
        self._load_categories(data["categories"])
        all_image_ids = {
            im["id"] for im in data["images"] if isinstance(im, dict) and _is_int(im.get("id"))
        }
        images = self._load_images(data["images"])
        if check_images:
            images = self._check_image_files(images)
        anns: list[Any] = data["annotations"]
        n = len(anns)

        # One pass for structure; the numeric checks below are vectorised.
        ann_id = np.zeros(n, np.int64)
        image_id = np.zeros(n, np.int64)
        category_id = np.zeros(n, np.int64)
        xywh = np.full((n, 4), np.nan)
        crowd = np.zeros(n, bool)
        malformed = np.zeros(n, bool)
        for k, a in enumerate(anns):
            try:
                key = a["id"], a["image_id"], a["category_id"]
                if type(key[0]) is not int or type(key[1]) is not int or type(key[2]) is not int:
                    raise TypeError  # bools and floats too
                ann_id[k], image_id[k], category_id[k] = key
                box = a["bbox"]
                if not isinstance(box, list) or len(box) != 4:
                    raise ValueError
                xywh[k] = box
                crowd[k] = bool(a.get("iscrowd", 0))
            except (KeyError, TypeError, ValueError, OverflowError):
                malformed[k] = True
        if n:
            values, counts = np.unique(ann_id[~malformed], return_counts=True)
            if (counts > 1).any():
                raise self._file_error(f"duplicate annotation id {int(values[counts > 1][0])}")

        kept_ids = np.array(sorted(im["id"] for im in images), dtype=np.int64)
        size_of = {im["id"]: (im["height"], im["width"]) for im in images}
        known_image = np.isin(image_id, np.fromiter(all_image_ids, np.int64, len(all_image_ids)))
        of_kept_image = np.isin(image_id, kept_ids)
        known_category = np.isin(category_id, np.array(self.label_to_category_id, dtype=np.int64))
        finite = np.isfinite(xywh).all(1)
        with np.errstate(invalid="ignore"):
            positive = (xywh[:, 2] > 0) & (xywh[:, 3] > 0)
        hw = np.array([size_of.get(int(i), (0, 0)) for i in image_id], dtype=np.float64)
        hw = hw.reshape(n, 2)
        xyxy = np.concatenate((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), axis=1)
        clipped = np.stack(
            (
                np.clip(xyxy[:, 0], 0, hw[:, 1]),
                np.clip(xyxy[:, 1], 0, hw[:, 0]),
                np.clip(xyxy[:, 2], 0, hw[:, 1]),
                np.clip(xyxy[:, 3], 0, hw[:, 0]),
            ),
            axis=1,
        )
        with np.errstate(invalid="ignore"):
            inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
            was_clipped = (clipped != xyxy).any(1) & inside

        # The first failing check of each annotation, in this order.
        checks = [
            (malformed, MALFORMED_ANNOTATION),
            (~known_image, UNKNOWN_IMAGE),
            (~of_kept_image, OF_SKIPPED_IMAGE),
            (~known_category, UNKNOWN_CATEGORY),
            (~finite, NON_FINITE_BOX),
            (~positive, EMPTY_BOX),
            (~inside, OUTSIDE_BOX),
        ]
        reason = np.full(n, -1)
        for code, (failed, _) in reversed(list(enumerate(checks))):
            reason[failed] = code
        if self.with_masks:
            for k in np.flatnonzero(reason < 0).tolist():
                a = anns[k]
                h, w = size_of[int(image_id[k])]
                segmentation = a.get("segmentation")
                if segmentation not in (None, []) and not _segmentation_ok(segmentation, h, w):
                    reason[k] = len(checks)
            checks.append((reason == len(checks), MALFORMED_SEGMENTATION))
        for k in np.flatnonzero(reason >= 0).tolist():
            name = checks[reason[k]][1]
            if name == OF_SKIPPED_IMAGE:  # its image was already reported
                self.skipped[name] += 1
                continue
            a = anns[k]
            aid = a.get("id", "?") if isinstance(a, dict) else "?"
            iid = a.get("image_id", "?") if isinstance(a, dict) else "?"
            detail = ""
            if name == MALFORMED_ANNOTATION:
                detail = "needs integer 'id', 'image_id', 'category_id' and a 4-number 'bbox'"
            elif name == UNKNOWN_CATEGORY:
                detail = f"category id {a['category_id']}"
            elif name in (NON_FINITE_BOX, EMPTY_BOX, OUTSIDE_BOX):
                detail = f"bbox {a['bbox']}"
            self._bad(name, f"annotation id {aid} (image id {iid}, annotations[{k}])", detail)
        good = reason < 0
        self.clipped = int(was_clipped[good].sum())

        # Kept images in file order; their annotations grouped per image, in file order.
        self._images = images
        self.image_ids: tuple[int, ...] = tuple(im["id"] for im in images)
        position = {iid: p for p, iid in enumerate(self.image_ids)}
        keep = np.flatnonzero(good)
        owner = np.array([position[int(i)] for i in image_id[keep]], dtype=np.int64)
        order = np.argsort(owner, kind="stable")
        keep, owner = keep[order], owner[order]
        self._ann_index = keep  # [kept annotations] index into the file's annotations
        self._starts = np.searchsorted(owner, np.arange(len(images) + 1))  # [images + 1]
        self._boxes = torch.from_numpy(clipped[keep].astype(np.float32))
        self._labels = torch.tensor(
            [self.category_id_to_label[int(c)] for c in category_id[keep]], dtype=torch.int64
        )
        self._crowd = torch.from_numpy(crowd[keep])
        self._segmentations: list[Any] | None = None
        if self.with_masks:
            self._segmentations = [anns[k].get("segmentation") for k in keep.tolist()]

        # pycocotools' view of what was kept, for evaluation.
        kept_anns = []
        for k, (x1, y1, x2, y2) in zip(keep.tolist(), clipped[keep].tolist()):
            a = dict(anns[k])
            a["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            a["iscrowd"] = int(crowd[k])
            a.setdefault("area", (x2 - x1) * (y2 - y1))
            kept_anns.append(a)
        dataset = {key: value for key, value in data.items() if key not in _REQUIRED_KEYS}
        dataset.update(images=images, annotations=kept_anns, categories=data["categories"])
        self.coco = COCO()
        self.coco.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

    def _log_summary(self) -> None:
        if self.skipped:
            reasons = ", ".join(f"{r}: {c}" for r, c in sorted(self.skipped.items()))
            logger.warning(
                "%s: skipped %d bad items (%s); kept %d images; clipped %d boxes",
                self.annotation_file,
                sum(self.skipped.values()),
                reasons,
                len(self),
                self.clipped,
            )
        elif self.clipped:
            logger.info("%s: clipped %d boxes to their images", self.annotation_file, self.clipped)

    # -- reading ---------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.label_to_category_id)

    @property
    def image_sizes(self) -> np.ndarray:
        """``[N, 2]`` (height, width) of every image, from the annotation file."""
        return np.array([(im["height"], im["width"]) for im in self._images], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """The epoch ``dataset[i]`` draws its transform randomness for."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Sample:
        return self.get(index)

    def _read_checked(self, im: dict[str, Any]) -> torch.Tensor:
        path = self.images_dir / im["file_name"]
        image = read_image(path)
        if tuple(image.shape[1:]) != (im["height"], im["width"]):
            hint = ""
            if tuple(image.shape[1:]) == (im["width"], im["height"]):
                hint = (
                    "; if its EXIF orientation turns it, the entry and its boxes must describe "
                    "the image as displayed (turned), which is how fdet reads it"
                )
            raise DataError(
                f"{path}: image is {image.shape[1]}x{image.shape[2]} (h x w) "
                f"but its entry says {im['height']}x{im['width']}{hint}"
            )
        return image

    def read(self, index: int) -> Sample:
        """Sample ``index`` as stored, without the transform."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        im = self._images[index]
        lo, hi = int(self._starts[index]), int(self._starts[index + 1])
        height, width = im["height"], im["width"]
        try:
            image = self._read_checked(im)
        except DataError as e:
            if self.on_bad_input == "error":
                raise DataError(f"{e} (image id {im['id']} in {self.annotation_file})") from e
            self.skipped[UNREADABLE_IMAGE] += 1
            logger.warning("%s; reading it as a black image without objects", e)
            image = torch.zeros(3, height, width, dtype=torch.uint8)
            lo = hi
        masks = None
        if self._segmentations is not None:
            masks = torch.zeros(hi - lo, height, width, dtype=torch.uint8)
            for slot, k in enumerate(range(lo, hi)):
                segmentation = self._segmentations[k]
                if segmentation:
                    masks[slot] = torch.from_numpy(
                        _decode_segmentation(segmentation, height, width)
                    )
                else:  # no outline: the box, rounded outwards
                    x1, y1, x2, y2 = self._boxes[k].tolist()
                    masks[slot, math.floor(y1) : math.ceil(y2), math.floor(x1) : math.ceil(x2)] = 1
        return Sample(
            image=image,
            boxes=self._boxes[lo:hi].clone(),
            labels=self._labels[lo:hi].clone(),
            crowd=self._crowd[lo:hi].clone(),
            image_id=int(im["id"]),
            orig_size=(height, width),
            masks=masks,
        )

    def get(self, index: int, *, epoch: int | None = None) -> Sample:
        """Sample ``index``, transformed with the generator of ``(seed, epoch, index)``;
        ``epoch`` defaults to the one ``set_epoch`` set."""
        sample = self.read(index)
        if self.transform is None:
            return sample
        epoch = self.epoch if epoch is None else epoch
        return self.transform(sample, sample_generator(self.seed, epoch, index % len(self)))


def build_dataset(
    spec: specs.ShapesData | specs.CocoData,
    *,
    train: bool,
    transform: Transform | None = None,
    with_masks: bool = False,
    seed: int = 0,
) -> CocoDataset:
    """The train or val split of a data spec (the shapes set is generated on first use)."""
    if isinstance(spec, specs.ShapesData):
        from fdet.data.shapes import ensure_shapes

        paths = ensure_shapes(spec)
        images, annotations = (
            (paths.train_images, paths.train_annotations)
            if train
            else (paths.val_images, paths.val_annotations)
        )
        on_bad_input: Literal["error", "skip"] = "error"
    else:
        images, annotations = (
            (Path(spec.train_images), Path(spec.train_annotations))
            if train
            else (Path(spec.val_images), Path(spec.val_annotations))
        )
        on_bad_input = spec.on_bad_input
    return CocoDataset(
        images,
        annotations,
        on_bad_input=on_bad_input,
        transform=transform,
        with_masks=with_masks,
        seed=seed,
    )
