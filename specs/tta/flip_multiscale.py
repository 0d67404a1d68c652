"""Test-time augmentation with a horizontal flip at three scales: six views, merged by weighted
box fusion (for NMS instead: `attrs.evolve(TTA, merge="nms")`, or `--tta` a JSON file)."""

from fdet import specs

TTA = specs.TTA(
    flip=True,
    scales=(0.8, 1.0, 1.2),
    merge="wbf",
    iou_threshold=0.55,
    max_detections=100,
    skip_score=0.0,
    conf_type="avg",
)
