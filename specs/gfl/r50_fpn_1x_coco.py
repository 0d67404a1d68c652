"""GFL, ResNet-50 + FPN (P3–P7), the 1x COCO recipe of the paper (80 classes).

As MMDetection's ``gfl_r50_fpn_1x_coco``: one square anchor a location of side 8 × stride
(used by the ATSS assignment, 9 candidates a level), quality focal loss (beta 2), GIoU
(weight 2) and distribution focal loss (weight 0.25, reg_max 16) weighted by the predicted
score, group-normed head towers, P6–P7 from the P5 output without ReLU; NMS at 0.6, 100
detections an image. The schedule and data are those of the RetinaNet 1x recipe (SGD 0.01,
12 epochs, steps at 8 and 11). The backbone's batch norm is frozen (MMDetection trains its
affine terms).
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

RETINANET = load_module(Path(__file__).parents[1] / "retinanet" / "r50_fpn_1x_coco.py")
ATSS = load_module(Path(__file__).parents[1] / "atss" / "r50_fpn_1x_coco.py")

MODEL = specs.GFL(
    backbone=ATSS.MODEL.backbone,
    neck=ATSS.MODEL.neck,
    head=specs.GFLHead(
        num_classes=80,
        num_convs=4,
        channels=256,
        prior_prob=0.01,
        norm=specs.GroupNorm(groups=32),
        reg_max=16,
    ),
    anchors=ATSS.MODEL.anchors,
    assigner=specs.ATSSAssigner(topk=9),
    cls_loss=specs.QualityFocalLoss(beta=2.0, weight=1.0),
    box_loss=specs.GIoULoss(weight=2.0),
    dfl=specs.DistributionFocalLoss(weight=0.25, eps=0.1),
    postprocess=specs.DensePostprocess(
        score_threshold=0.05, topk_per_level=1000, nms_iou=0.6, max_detections=100
    ),
    normalize=ATSS.MODEL.normalize,
)

EXPERIMENT = attrs.evolve(RETINANET.EXPERIMENT, model=MODEL)
