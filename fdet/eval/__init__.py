"""Evaluation: COCO results and metrics, and the loop that runs a detector over a loader."""

from fdet.eval.classes import category_ids_by_name, run_class_names
from fdet.eval.coco import (
    STAT_NAMES,
    CocoMetrics,
    detections_to_coco,
    evaluate_coco,
    format_table,
)
from fdet.eval.evaluate import evaluate_model

__all__ = [
    "STAT_NAMES",
    "CocoMetrics",
    "category_ids_by_name",
    "detections_to_coco",
    "evaluate_coco",
    "evaluate_model",
    "format_table",
    "run_class_names",
]
