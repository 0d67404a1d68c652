"""ATSS, ResNet-50 + FPN (P3–P7), the 1x COCO recipe of the paper (80 classes).

As MMDetection's ``atss_r50_fpn_1x_coco``: one square anchor a location of side 8 × stride,
ATSS assignment with 9 candidates a level, focal loss, GIoU (weight 2) on deltas with stds
(0.1, 0.1, 0.2, 0.2) weighted by the centerness target, centerness BCE, group-normed head
towers, P6–P7 from the P5 output without ReLU; NMS at 0.6, 100 detections an image. The
schedule and data are those of the RetinaNet 1x recipe (SGD 0.01, 12 epochs, steps at 8 and
11). The backbone's batch norm is frozen (MMDetection trains its affine terms).
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

RETINANET = load_module(Path(__file__).parents[1] / "retinanet" / "r50_fpn_1x_coco.py")

MODEL = specs.ATSS(
    backbone=specs.ResNet(
        depth=50, norm=specs.FrozenBatchNorm(), frozen_stages=1, out_levels=(3, 4, 5)
    ),
    neck=specs.FPN(
        in_levels=(3, 4, 5),
        out_levels=(3, 4, 5, 6, 7),
        channels=256,
        extra_from="p5",
        extra_relu=False,
    ),
    head=specs.ATSSHead(
        num_classes=80,
        num_convs=4,
        channels=256,
        prior_prob=0.01,
        norm=specs.GroupNorm(groups=32),
        centerness=True,
    ),
    anchors=specs.Anchors(
        strides=(8, 16, 32, 64, 128),
        base_sizes=(64, 128, 256, 512, 1024),
        octave_scales=(1.0,),
        ratios=(1.0,),
        truncate_sizes=False,
        round_offsets=False,
    ),
    assigner=specs.ATSSAssigner(topk=9),
    coder=specs.DeltaXYWHCoder(means=(0, 0, 0, 0), stds=(0.1, 0.1, 0.2, 0.2)),
    cls_loss=specs.SigmoidFocalLoss(alpha=0.25, gamma=2.0, weight=1.0),
    box_loss=specs.GIoULoss(weight=2.0),
    centerness_weight=1.0,
    postprocess=specs.DensePostprocess(
        score_threshold=0.05, topk_per_level=1000, nms_iou=0.6, max_detections=100
    ),
    normalize=specs.Normalize(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_range=255.0
    ),
)

EXPERIMENT = attrs.evolve(RETINANET.EXPERIMENT, model=MODEL)
