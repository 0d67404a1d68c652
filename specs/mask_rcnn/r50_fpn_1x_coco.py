"""Mask R-CNN, ResNet-50 + FPN, the 1x COCO recipe of torchvision's ``maskrcnn_resnet50_fpn``
(80 classes).

He et al., "Mask R-CNN" (ICCV 2017): the Faster R-CNN of `../faster_rcnn/r50_fpn_1x_coco.py`
(backbone, FPN, RPN, RoI stage, schedule and data) with a mask branch: 14×14 RoI Align on
P2–P5, four 3×3 convs of 256, a 2×2 transposed conv to 28×28 and one mask logit map per class,
trained with per-class binary cross-entropy on the positive sampled RoIs. Training reads the
COCO instance masks; evaluation reports segm AP beside bbox AP.
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

FASTER_RCNN = load_module(Path(__file__).parents[1] / "faster_rcnn" / "r50_fpn_1x_coco.py")

MODEL = specs.MaskRCNN(**attrs.asdict(FASTER_RCNN.MODEL, recurse=False), mask_head=specs.MaskHead())

EXPERIMENT = attrs.evolve(FASTER_RCNN.EXPERIMENT, model=MODEL)
