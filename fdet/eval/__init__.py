"""Evaluation: COCO results and metrics (boxes and masks), and the loop that runs a detector
over a loader."""

from fdet.eval.classes import category_ids_by_name, run_class_names
from fdet.eval.coco import (
    IOU_TYPES,
    STAT_NAMES,
    CocoMetrics,
    detections_to_coco,
    evaluate_coco,
    evaluate_coco_types,
    format_table,
    has_segmentations,
)
from fdet.eval.evaluate import evaluate_model, evaluate_model_types

__all__ = [
    "IOU_TYPES",
    "STAT_NAMES",
    "CocoMetrics",
    "category_ids_by_name",
    "detections_to_coco",
    "evaluate_coco",
    "evaluate_coco_types",
    "evaluate_model",
    "evaluate_model_types",
    "format_table",
    "has_segmentations",
    "run_class_names",
]
