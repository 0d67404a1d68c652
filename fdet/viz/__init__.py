"""Visualization: boxes drawn on images, and grids of ground truth next to predictions."""

from fdet.viz.draw import PALETTE, draw_boxes, draw_masks, label_color, prediction_grid

__all__ = ["PALETTE", "draw_boxes", "draw_masks", "label_color", "prediction_grid"]
