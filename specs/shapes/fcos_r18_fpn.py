"""FCOS R18-FPN trained from scratch on fdet's synthetic shapes set: the backbone, pyramid,
data, optimizer and budget of `retinanet_r18_fpn.py`, with FCOS's head, points and losses.

P3–P5 on 128-pixel images; objects are 8 to 64 pixels, so a point's largest distance to the
sides of its box is at most 64. The regression ranges split that between the levels the way
the anchors of the RetinaNet spec do (16, 32 and 64-pixel anchors on P3, P4, P5): P3 takes
boxes reaching up to 16 pixels from the point, P4 up to 32, P5 the rest. The rest is the
paper's improved recipe: group norm, learned scales, center sampling at 1.5 strides, GIoU
weighted by the centerness target.
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

RETINANET = load_module(Path(__file__).with_name("retinanet_r18_fpn.py"))

MODEL = specs.FCOS(
    backbone=RETINANET.MODEL.backbone,
    neck=RETINANET.MODEL.neck,
    head=specs.FCOSHead(
        num_classes=RETINANET.NUM_CLASSES,
        num_convs=2,
        channels=64,
        norm=specs.GroupNorm(groups=16),
        learned_scales=True,
    ),
    points=specs.Points(strides=(8, 16, 32), offset=0.5),
    assigner=specs.FCOSAssigner(
        regress_ranges=((-1.0, 16.0), (16.0, 32.0), (32.0, None)), center_radius=1.5
    ),
    coder=specs.DistanceCoder(normalize_by_stride=True),
    box_loss=specs.GIoULoss(weight=1.0),
    box_weight_by_centerness=True,
    postprocess=specs.DensePostprocess(
        score_threshold=0.05, topk_per_level=1000, nms_iou=0.6, max_detections=100
    ),
)

EXPERIMENT = attrs.evolve(RETINANET.EXPERIMENT, model=MODEL)
