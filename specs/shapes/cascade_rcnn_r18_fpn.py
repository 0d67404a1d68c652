"""Cascade R-CNN R18-FPN trained from scratch on fdet's synthetic shapes set: the Faster R-CNN
of `faster_rcnn_r18_fpn.py` (backbone, pyramid, RPN, data, optimizer and budget) with its one
RoI stage made into the paper's three.

Each stage is that file's RoI head (RoI Align and level rule, box head, sampler, losses,
postprocess) with class-agnostic deltas, labelled at IoU 0.5, 0.6 and 0.7 with ``stds`` (0.1,
0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1) and (0.033, 0.033, 0.067, 0.067); the stage losses are
weighted 1, 0.5 and 0.25.
"""

from pathlib import Path

import attrs

from fdet.specs import load_module
from fdet.specs.cascade import cascade_from

FASTER_RCNN = load_module(Path(__file__).with_name("faster_rcnn_r18_fpn.py"))

_BASE = FASTER_RCNN.MODEL

MODEL = cascade_from(_BASE)

EXPERIMENT = attrs.evolve(FASTER_RCNN.EXPERIMENT, model=MODEL)
