"""Cascade Mask R-CNN, ResNet-50 + FPN, the 1x COCO recipe (80 classes): the Cascade R-CNN of
`../cascade_rcnn/r50_fpn_1x_coco.py` with the mask branch of `../mask_rcnn/r50_fpn_1x_coco.py`
(14×14 RoI Align on P2–P5, four 3×3 convs of 256, 28×28 masks), trained on the last stage's
positive RoIs and predicting the final detections' masks. Training reads the COCO instance
masks; evaluation reports segm AP beside bbox AP.
"""

from pathlib import Path

import attrs

from fdet.specs import load_module

CASCADE_RCNN = load_module(Path(__file__).parents[1] / "cascade_rcnn" / "r50_fpn_1x_coco.py")
MASK_RCNN = load_module(Path(__file__).parents[1] / "mask_rcnn" / "r50_fpn_1x_coco.py")

MODEL = attrs.evolve(CASCADE_RCNN.MODEL, mask_head=MASK_RCNN.MODEL.mask_head)

EXPERIMENT = attrs.evolve(CASCADE_RCNN.EXPERIMENT, model=MODEL)
