"""The records that flow through the data pipeline: one :class:`Sample` an image, and the
padded :class:`Batch` that the model and the objective consume."""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Bool, Float, Int, UInt8
from torch import Tensor


class Sample(NamedTuple):
    """One image and its annotations. Transforms take a sample and return a new one.

    ``boxes`` are xyxy pixels of ``image`` as it is now; ``scale`` is the (y, x) factor from the
    original image to this one (resizing multiplies it), so ``boxes / scale`` (after undoing a
    flip) are in original pixels. ``crowd`` marks COCO ``iscrowd`` regions: ignored in training,
    never matched as objects. ``masks`` are instance masks aligned with ``image``, or None.
    """

    image: UInt8[Tensor, "3 H W"]
    boxes: Float[Tensor, "M 4"]
    labels: Int[Tensor, " M"]
    crowd: Bool[Tensor, " M"]
    image_id: int
    orig_size: tuple[int, int]  # (height, width) of the image on disk
    scale: tuple[float, float] = (1.0, 1.0)  # (y, x)
    flipped: bool = False
    masks: UInt8[Tensor, "M H W"] | None = None


class Batch(NamedTuple):
    """A padded batch. Images are padded at the bottom and right with zeros to a common size;
    annotation slots are padded to ``M`` with ``gt_valid`` False: the most objects of an image
    of the batch (at least 1), or the ``slots`` that collation was given (a fixed count, or the
    smallest of a few bucket sizes that holds the batch: see ``fdet.data.collate``).

    ``images`` are uint8 in ``[0, 255]``: the model normalizes them (its ``Normalize`` spec).
    ``image_sizes[b]`` is the (height, width) of image ``b`` before padding; ``scales[b]`` the
    (y, x) factor from its original size.
    """

    images: UInt8[Tensor, "B 3 H W"]
    image_sizes: Int[Tensor, "B 2"]
    gt_boxes: Float[Tensor, "B M 4"]
    gt_labels: Int[Tensor, "B M"]
    gt_valid: Bool[Tensor, "B M"]
    gt_crowd: Bool[Tensor, "B M"]
    image_ids: Int[Tensor, " B"]
    scales: Float[Tensor, "B 2"]
    gt_masks: UInt8[Tensor, "B M H W"] | None = None

    def to(self, device: object, *, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on ``device``."""
        return Batch(
            *(
                t.to(device, non_blocking=non_blocking) if isinstance(t, Tensor) else t  # type: ignore[call-overload,arg-type]
                for t in self
            )
        )
