"""RetinaNet v2, ResNet-50 + FPN: torchvision's ``retinanet_resnet50_fpn_v2`` recipe.

Extra levels from C5, group norm in the head towers, GIoU box loss on decoded boxes.
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

BASE = load_module(Path(__file__).with_name("r50_fpn_1x_coco.py"))

MODEL = attrs.evolve(
    BASE.MODEL,
    neck=attrs.evolve(BASE.MODEL.neck, extra_from="c5"),
    head=attrs.evolve(BASE.MODEL.head, norm=specs.GroupNorm(groups=32)),
    box_loss=specs.GIoULoss(),
)

EXPERIMENT = attrs.evolve(BASE.EXPERIMENT, model=MODEL)
