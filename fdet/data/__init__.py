"""Data: records, the synthetic shapes set, COCO-format reading, transforms, collation."""

from fdet.data.sample import Batch, Sample

__all__ = ["Batch", "Sample"]
