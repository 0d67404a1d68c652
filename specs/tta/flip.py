"""Test-time augmentation with a horizontal flip: two views, merged by class-aware NMS.

`fdet eval RUN --tta specs/tta/flip.py`; in Python, `fdet.specs.load(FILE, fdet.specs.TTA,
name="TTA")` and `fdet.inference.tta.predict_tta`.
"""

from fdet import specs

TTA = specs.TTA(flip=True, scales=(1.0,), merge="nms", iou_threshold=0.5, max_detections=100)
