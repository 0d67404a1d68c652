"""Faster R-CNN R18-FPN trained from scratch on fdet's synthetic shapes set: the data, optimizer
and budget of `retinanet_r18_fpn.py`, with a region proposal network and a Fast R-CNN stage.

Objects are 8 to 64 pixels on 128-pixel images, so the pyramid is P2–P5 (strides 4 to 32, no
P6) and the RPN's anchors are 8 to 64 pixels, two sizes an octave apart a level
(``8, 11, 16, …, 64, 91``) in three aspect ratios. RoIs are pooled from P2–P5 with the level
rule scaled to the images: an RoI of 112² pixels goes to P4, so the objects' RoIs land on P2
and P3 (a 7×7 grid over 2 to 16 cells) instead of all on P2. Fewer proposals than on COCO
(300 in training, 100 in testing), 128 sampled RoIs an image and a narrow box head (two fully
connected layers of 256) keep a step cheap.
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

RETINANET = load_module(Path(__file__).with_name("retinanet_r18_fpn.py"))

MODEL = specs.FasterRCNN(
    num_classes=RETINANET.NUM_CLASSES,
    backbone=attrs.evolve(RETINANET.MODEL.backbone, out_levels=(2, 3, 4, 5)),
    neck=specs.FPN(in_levels=(2, 3, 4, 5), out_levels=(2, 3, 4, 5), channels=64),
    max_pool_levels=0,
    rpn=specs.RPN(
        anchors=specs.Anchors(
            strides=(4, 8, 16, 32),
            base_sizes=(8.0, 16.0, 32.0, 64.0),
            octave_scales=(1.0, 2**0.5),
            ratios=(0.5, 1.0, 2.0),
            truncate_sizes=False,
            round_offsets=False,
        ),
        pre_nms_topk_train=1000,
        post_nms_topk_train=300,
        pre_nms_topk_test=500,
        post_nms_topk_test=100,
    ),
    roi_head=specs.RoIHead(
        roi_align=specs.RoIAlign(levels=(2, 3, 4, 5), canonical_scale=112.0, canonical_level=4),
        box_head=specs.BoxHead(kind="2fc", fc_channels=256),
        sampler=specs.Sampler(num_samples=128, positive_fraction=0.25),
        postprocess=specs.RoIPostprocess(score_threshold=0.05, nms_iou=0.5, max_detections=100),
    ),
)

EXPERIMENT = attrs.evolve(RETINANET.EXPERIMENT, model=MODEL)
