"""Faster R-CNN R18-FPN trained from scratch on fdet's synthetic shapes set: the data, optimizer,
budget, backbone and pyramid of `retinanet_r18_fpn.py`, with a region proposal network and a
Fast R-CNN stage.

Objects are 8 to 64 pixels on 128-pixel images. As in RetinaNet's shapes spec the pyramid reads
C3 alone (P3 from C3, P4 and P5 by stride-2 convs): ResNet-18's last two stages would see 8×8
and 4×4 maps and hold most of its weights. The RPN's anchors are 10 to 64 pixels, three sizes a
third of an octave apart a level (``10, 12.6, 15.9, 20, …, 63.5``) in three aspect ratios. RoIs
are pooled from P3 alone, a 7×7 grid over the 1 to 8 cells of an object (one RoI Align call),
with as many samples a bin as its size in cells needs (``sampling_ratio=0``: one or two a side
here). Fewer proposals than on COCO (500 an RPN level before NMS and 300 after in training, 100
in testing), 64 sampled RoIs an image (at most 16 positive; an image has at most 12 objects)
and a narrow box head (two fully connected layers of 256) keep a step cheap.
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

RETINANET = load_module(Path(__file__).with_name("retinanet_r18_fpn.py"))

MODEL = specs.FasterRCNN(
    num_classes=RETINANET.NUM_CLASSES,
    backbone=RETINANET.MODEL.backbone,
    neck=RETINANET.MODEL.neck,
    max_pool_levels=0,
    rpn=specs.RPN(
        anchors=specs.Anchors(
            strides=(8, 16, 32),
            base_sizes=(10.0, 20.0, 40.0),
            octave_scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
            ratios=(0.5, 1.0, 2.0),
            truncate_sizes=False,
            round_offsets=False,
        ),
        pre_nms_topk_train=500,
        post_nms_topk_train=300,
        pre_nms_topk_test=500,
        post_nms_topk_test=100,
    ),
    roi_head=specs.RoIHead(
        roi_align=specs.RoIAlign(levels=(3,), sampling_ratio=0),
        box_head=specs.BoxHead(kind="2fc", fc_channels=256),
        sampler=specs.Sampler(num_samples=64, positive_fraction=0.25),
        postprocess=specs.RoIPostprocess(score_threshold=0.05, nms_iou=0.5, max_detections=100),
    ),
)

EXPERIMENT = attrs.evolve(RETINANET.EXPERIMENT, model=MODEL)
