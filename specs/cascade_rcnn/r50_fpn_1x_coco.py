"""Cascade R-CNN, ResNet-50 + FPN, the 1x COCO recipe (80 classes).

Cai & Vasconcelos, "Cascade R-CNN: Delving into High Quality Object Detection" (CVPR 2018): the
Faster R-CNN of `../faster_rcnn/r50_fpn_1x_coco.py` (backbone, FPN with P6 max-pooled for the
RPN, RPN, schedule and data) with three Fast R-CNN stages instead of one: 7×7 RoI Align on
P2–P5 and two fully connected layers of 1024 each, class-agnostic deltas, RoIs labelled at IoU
0.5, 0.6 and 0.7, ``stds`` (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1) and (0.033, 0.033,
0.067, 0.067), 512 RoIs an image a quarter positive, the stage losses weighted 1, 0.5 and 0.25;
at test time the mean of the three classifiers' probabilities on the last stage's RoIs.
"""

from pathlib import Path

import attrs

from fdet.specs import load_module
from fdet.specs.cascade import cascade_from

FASTER_RCNN = load_module(Path(__file__).parents[1] / "faster_rcnn" / "r50_fpn_1x_coco.py")

_BASE = FASTER_RCNN.MODEL

MODEL = cascade_from(_BASE)

EXPERIMENT = attrs.evolve(FASTER_RCNN.EXPERIMENT, model=MODEL)
