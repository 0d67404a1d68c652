"""Data: records, the synthetic shapes set, COCO-format reading, transforms, collation."""

from fdet.data import transforms
from fdet.data.coco import CocoDataset, DataError, build_dataset, read_image, sample_generator
from fdet.data.collate import collate, slot_buckets
from fdet.data.loader import Loader, ShardedSampler, infinite, make_loader
from fdet.data.sample import Batch, Sample
from fdet.data.shapes import CATEGORIES as SHAPE_CATEGORIES
from fdet.data.shapes import ShapesPaths, ensure_shapes
from fdet.data.shapes import generate as generate_shapes
from fdet.data.transforms import build_transform

__all__ = [
    "SHAPE_CATEGORIES",
    "Batch",
    "CocoDataset",
    "DataError",
    "Loader",
    "Sample",
    "ShapesPaths",
    "ShardedSampler",
    "build_dataset",
    "build_transform",
    "collate",
    "ensure_shapes",
    "generate_shapes",
    "infinite",
    "make_loader",
    "read_image",
    "sample_generator",
    "slot_buckets",
    "transforms",
]
