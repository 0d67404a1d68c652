"""GFL R18-FPN on fdet's synthetic shapes set, with a pyramid on C3–C5 and the head width, data
and training budget of the RetinaNet shapes spec (retinanet_r18_fpn.py), and the anchors of the
ATSS one (atss_r18_fpn.py: one anchor a location of side 2 × stride, used for the assignment
only; boxes are distances from the anchor centres).

``reg_max = 16`` strides covers distances up to 128 pixels on P3, enough for the 8 to 64 pixel
objects of 128² images on every level.
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

BASE = load_module(Path(__file__).with_name("retinanet_r18_fpn.py"))

# The pyramid on C3–C5, as these figures were measured with (docs/benchmarks.md, "The dense
# families on the shapes set"); the RetinaNet spec has since moved to a pyramid on C3 alone.
BACKBONE = attrs.evolve(BASE.MODEL.backbone, out_levels=(3, 4, 5))
NECK = attrs.evolve(BASE.MODEL.neck, in_levels=(3, 4, 5))
ATSS = load_module(Path(__file__).with_name("atss_r18_fpn.py"))

MODEL = specs.GFL(
    backbone=BACKBONE,
    neck=NECK,
    head=specs.GFLHead(
        num_classes=BASE.NUM_CLASSES,
        num_convs=BASE.MODEL.head.num_convs,
        channels=BASE.MODEL.head.channels,
        norm=BASE.MODEL.head.norm,
        reg_max=16,
    ),
    anchors=ATSS.MODEL.anchors,
    assigner=specs.ATSSAssigner(topk=9),
    cls_loss=specs.QualityFocalLoss(beta=2.0, weight=1.0),
    box_loss=specs.GIoULoss(weight=2.0),
    dfl=specs.DistributionFocalLoss(weight=0.25),
    postprocess=BASE.MODEL.postprocess,
)

EXPERIMENT = attrs.evolve(BASE.EXPERIMENT, model=MODEL)
