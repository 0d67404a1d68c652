"""Data specs: data sets, transforms, loaders."""

from typing import Literal

import attrs

from fdet.specs._core import Spec, SpecError, int_tuple, non_negative, positive, probability


@attrs.frozen(kw_only=True)
class ShapesData(Spec):
    """fdet's synthetic shapes set, generated on first use and cached under ``cache_dir``
    (default: ``$FDET_CACHE`` or ``~/.cache/fdet``), keyed by every field below.

    Images are ``image_size`` squares with 1 to ``max_objects`` shapes each, of sizes from
    ``min_object_size`` pixels to half the image.
    """

    train_images: int = attrs.field(default=2000, validator=positive)
    val_images: int = attrs.field(default=200, validator=positive)
    image_size: int = attrs.field(default=128, validator=positive)
    min_object_size: int = attrs.field(default=8, validator=positive)
    max_objects: int = attrs.field(default=12, validator=positive)
    seed: int = attrs.field(default=0, validator=non_negative)
    cache_dir: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.min_object_size * 2 > self.image_size:
            raise SpecError(
                f"must be at most half of image_size ({self.image_size}), "
                f"got {self.min_object_size}",
                "min_object_size",
            )


@attrs.frozen(kw_only=True)
class CocoData(Spec):
    """A COCO-format data set on disk: image folders and annotation files.

    ``on_bad_input``: ``"error"`` stops at the first missing or corrupt image or invalid
    annotation with a message naming the file and annotation id; ``"skip"`` leaves those
    annotations or images out and counts them in the log.
    """

    train_images: str
    train_annotations: str
    val_images: str
    val_annotations: str
    on_bad_input: Literal["error", "skip"] = attrs.field(default="error")

    @on_bad_input.validator
    def _check(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in ("error", "skip"):
            raise SpecError(f"must be 'error' or 'skip'; got {value!r}", attribute.name)


@attrs.frozen(kw_only=True)
class Transforms(Spec):
    """Data augmentation and resizing, applied per sample before collation.

    Resize keeps the aspect ratio: the shorter side becomes ``min_size`` (one picked at random
    per sample when several are given, for multi-scale training) unless the longer side would
    exceed ``max_size``. ``hflip_prob``: chance of a horizontal flip. ``brightness``,
    ``contrast``, ``saturation``, ``hue``: photometric jitter strengths (0 = off).
    ``crop_prob``: chance of a random crop keeping at least ``crop_min_scale`` of each side;
    boxes are clipped to the crop and those left with less than ``crop_min_visible`` of their
    area are dropped. Batches are padded to a multiple of ``pad_divisor``.
    """

    min_size: tuple[int, ...] = attrs.field(default=(800,), converter=int_tuple)
    max_size: int = attrs.field(default=1333, validator=positive)
    hflip_prob: float = attrs.field(default=0.0, validator=probability)
    brightness: float = attrs.field(default=0.0, validator=non_negative)
    contrast: float = attrs.field(default=0.0, validator=non_negative)
    saturation: float = attrs.field(default=0.0, validator=non_negative)
    hue: float = attrs.field(default=0.0, validator=[non_negative])
    crop_prob: float = attrs.field(default=0.0, validator=probability)
    crop_min_scale: float = attrs.field(default=0.6, validator=probability)
    crop_min_visible: float = attrs.field(default=0.5, validator=probability)
    pad_divisor: int = attrs.field(default=128, validator=positive)

    def __attrs_post_init__(self) -> None:
        if not self.min_size or any(
            not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in self.min_size
        ):
            raise SpecError(f"must be positive integers, got {self.min_size}", "min_size")
        if self.hue > 0.5:
            raise SpecError(f"must be in [0, 0.5], got {self.hue}", "hue")
