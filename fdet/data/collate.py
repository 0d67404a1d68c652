"""Collation: a list of samples -> one padded :class:`Batch`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fdet.data.sample import Batch, Sample

__all__ = ["collate"]


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def collate(
    samples: Sequence[Sample],
    *,
    pad_divisor: int,
    pad_to: tuple[int, int] | None = None,
    slots: int | None = None,
) -> Batch:
    """Stack samples into a :class:`Batch`.

    Images are zero-padded at the bottom and right to the largest height and width, rounded up
    to a multiple of ``pad_divisor`` (or to ``pad_to`` = (height, width), for static shapes;
    an image larger than it is an error). Annotation slots are padded to
    ``M = max(1, most objects)`` (or ``slots``; more objects than that is an error) with
    ``gt_valid`` False and zeros elsewhere. ``gt_masks`` is stacked (and padded like the
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
    m = max(1, *counts)
    if slots is not None:
        if max(counts) > slots:
            raise ValueError(
                f"collate: an image has {max(counts)} objects, more than {slots} slots"
            )
        m = slots

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
