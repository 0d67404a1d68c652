"""ATSS R18-FPN on fdet's synthetic shapes set, with a pyramid on C3–C5 and the head width, data
and training budget of the RetinaNet shapes spec (retinanet_r18_fpn.py).

One square anchor a location, of side 2 × stride (16, 32 and 64 pixels on P3–P5): at 128² the
objects are 8 to 64 pixels, and ATSS spreads their positives over the three levels (about
55 %, 35 % and 10 % of them on P3, P4 and P5); sides of 8 × stride, the COCO setting, would be
64 to 256 pixels here and put almost every positive on P3.
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

MODEL = specs.ATSS(
    backbone=BACKBONE,
    neck=NECK,
    head=specs.ATSSHead(
        num_classes=BASE.NUM_CLASSES,
        num_convs=BASE.MODEL.head.num_convs,
        channels=BASE.MODEL.head.channels,
        norm=BASE.MODEL.head.norm,
        centerness=True,
    ),
    anchors=specs.Anchors(
        strides=(8, 16, 32),
        base_sizes=(16, 32, 64),
        octave_scales=(1.0,),
        ratios=(1.0,),
        truncate_sizes=False,
        round_offsets=False,
    ),
    assigner=specs.ATSSAssigner(topk=9),
    coder=specs.DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2)),
    cls_loss=specs.SigmoidFocalLoss(alpha=0.25, gamma=2.0),
    box_loss=specs.GIoULoss(weight=2.0),
    centerness_weight=1.0,
    postprocess=BASE.MODEL.postprocess,
)

EXPERIMENT = attrs.evolve(BASE.EXPERIMENT, model=MODEL)
