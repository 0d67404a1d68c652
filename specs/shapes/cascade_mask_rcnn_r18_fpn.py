"""Cascade Mask R-CNN R18-FPN trained from scratch on fdet's synthetic shapes set: the Cascade
R-CNN of `cascade_rcnn_r18_fpn.py` with the mask branch of `mask_rcnn_r18_fpn.py` (14×14 RoI
Align on the box RoI Align's levels with its level rule, four 3×3 convs of 64), trained on the
last stage's positive RoIs and predicting the final detections' masks. Training loads the
shapes' instance masks; evaluation reports segm AP beside bbox AP.
"""

from pathlib import Path

import attrs

from fdet.specs import load_module

CASCADE_RCNN = load_module(Path(__file__).with_name("cascade_rcnn_r18_fpn.py"))
MASK_RCNN = load_module(Path(__file__).with_name("mask_rcnn_r18_fpn.py"))

MODEL = attrs.evolve(CASCADE_RCNN.MODEL, mask_head=MASK_RCNN.MODEL.mask_head)

EXPERIMENT = attrs.evolve(CASCADE_RCNN.EXPERIMENT, model=MODEL)
