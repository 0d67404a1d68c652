"""Collation: a list of samples -> one padded :class:`Batch`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from fdet.data.sample import Batch, Sample

__all__ = ["collate", "slot_buckets"]

_Slots = int | tuple[int, ...]  # an exact slot count, or ascending bucket sizes


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def slot_buckets(max_count: int, *, smallest: int = 8, growth: float = 2.0) -> tuple[int, ...]:
    """Ascending gt-slot bucket sizes for a data set whose most crowded image has ``max_count``
    objects: ``smallest``, then each size times ``growth`` (rounded up), for as long as sizes
    stay below ``max_count``, and ``max_count`` itself last.

    ``slot_buckets(93) == (8, 16, 32, 64, 93)``; ``slot_buckets(12) == (8, 12)``; a
    ``max_count`` of at most ``smallest`` gives the one size ``max(1, max_count)``. Passed as
    ``slots`` to :func:`collate` (or a loader), each batch is padded to the smallest size that
    holds its own most crowded image, so a batch pays for its own objects, not for the data
    set's most crowded image, and a compiled step sees at most ``len(buckets)`` slot counts.
    """
    if max_count < 0:
        raise ValueError(f"slot_buckets: max_count must be >= 0, got {max_count}")
    if smallest < 1:
        raise ValueError(f"slot_buckets: smallest must be >= 1, got {smallest}")
    if not growth > 1:
        raise ValueError(f"slot_buckets: growth must be > 1, got {growth}")
    buckets = []
    size = smallest
    while size < max_count:
        buckets.append(size)
        size = max(size + 1, math.ceil(size * growth))
    buckets.append(max(1, max_count))
    return tuple(buckets)


def _check_slots(slots: int | Sequence[int] | None) -> _Slots | None:
    """``slots`` as :func:`collate` takes it (a sequence of sizes becomes a tuple), or an error
    that says what is wrong with it."""
    if slots is None:
        return None
    if isinstance(slots, int) and not isinstance(slots, bool):
        if slots < 0:
            raise ValueError(f"slots: must be >= 0, got {slots}")
        return slots
    if isinstance(slots, (str, bytes)) or not isinstance(slots, Sequence):
        raise TypeError(f"slots: must be an int or a sequence of ints, got {slots!r}")
    buckets = tuple(slots)
    if not buckets:
        raise ValueError("slots: no bucket sizes")
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in buckets):
        raise TypeError(f"slots: bucket sizes must be ints, got {slots!r}")
    if buckets[0] < 0 or any(a >= b for a, b in itertools.pairwise(buckets)):
        raise ValueError(f"slots: bucket sizes must be >= 0 and strictly ascending, got {slots!r}")
    return buckets


def _slot_count(samples: Sequence[Sample], counts: list[int], slots: _Slots | None) -> int:
    """M for a batch whose images have ``counts`` objects."""
    most = max(counts)
    if slots is None:
        return max(1, most)
    largest = slots if isinstance(slots, int) else slots[-1]
    if most > largest:
        over = [(s.image_id, n) for s, n in zip(samples, counts) if n > largest]
        listed = ", ".join(f"image id {i} ({n} objects)" for i, n in over)
        limit = f"{slots} slots" if isinstance(slots, int) else f"the largest slot bucket {largest}"
        raise ValueError(f"collate: more objects than {limit}: {listed}")
    if isinstance(slots, int):
        return slots
    return next(b for b in slots if b >= most)


def collate(
    samples: Sequence[Sample],
    *,
    pad_divisor: int,
    pad_to: tuple[int, int] | None = None,
    slots: int | Sequence[int] | None = None,
) -> Batch:
    """Stack samples into a :class:`Batch`.

    Images are zero-padded at the bottom and right to the largest height and width, rounded up
    to a multiple of ``pad_divisor`` (or to ``pad_to`` = (height, width), for static shapes;
    an image larger than it is an error). Annotation slots are padded with ``gt_valid`` False
    and zeros elsewhere, to ``M`` slots:

    - ``slots=None``: ``M = max(1, most objects of an image of the batch)``;
    - ``slots=int``: exactly that many;
    - ``slots=(s_0, s_1, ...)``, strictly ascending bucket sizes (e.g. from
      :func:`slot_buckets`): the smallest ``s_i`` that holds the batch's most crowded image.

    An image with more objects than ``slots`` (or than the largest bucket) is an error that
    names it by image id; nothing is dropped. ``gt_masks`` is stacked (and padded like the
    images) only when every sample has masks, else it is None.
    """
    if not samples:
        raise ValueError("collate: no samples")
    if pad_divisor < 1:
        raise ValueError(f"pad_divisor: must be >= 1, got {pad_divisor}")
    b = len(samples)
    sizes = torch.tensor([s.image.shape[-2:] for s in samples], dtype=torch.int64)  # [B, 2]
    if pad_to is None:
        height = _round_up(int(sizes[:, 0].max()), pad_divisor)
        width = _round_up(int(sizes[:, 1].max()), pad_divisor)
    else:
        height, width = pad_to
        if bool((sizes[:, 0] > height).any() or (sizes[:, 1] > width).any()):
            raise ValueError(f"collate: an image of size {sizes.tolist()} exceeds pad_to {pad_to}")
    counts = [len(s.labels) for s in samples]
    m = _slot_count(samples, counts, _check_slots(slots))

    images = torch.zeros(b, 3, height, width, dtype=torch.uint8)
    gt_boxes = torch.zeros(b, m, 4, dtype=torch.float32)
    gt_labels = torch.zeros(b, m, dtype=torch.int64)
    gt_valid = torch.zeros(b, m, dtype=torch.bool)
    gt_crowd = torch.zeros(b, m, dtype=torch.bool)
    with_masks = all(s.masks is not None for s in samples)
    gt_masks = torch.zeros(b, m, height, width, dtype=torch.uint8) if with_masks else None
    for i, s in enumerate(samples):
        h, w = s.image.shape[-2:]
        n = counts[i]
        images[i, :, :h, :w] = s.image
        gt_boxes[i, :n] = s.boxes
        gt_labels[i, :n] = s.labels
        gt_valid[i, :n] = True
        gt_crowd[i, :n] = s.crowd
        if gt_masks is not None and s.masks is not None:
            gt_masks[i, :n, :h, :w] = s.masks
    return Batch(
        images=images,
        image_sizes=sizes,
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_valid=gt_valid,
        gt_crowd=gt_crowd,
        image_ids=torch.tensor([s.image_id for s in samples], dtype=torch.int64),
        scales=torch.tensor([s.scale for s in samples], dtype=torch.float32),
        gt_masks=gt_masks,
    )
