"""Faster R-CNN, ResNet-50 + FPN, the 1x COCO recipe of torchvision's
``fasterrcnn_resnet50_fpn`` (80 classes).

Ren et al., "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal Networks"
(NeurIPS 2015), with Lin et al.'s feature pyramid (CVPR 2017): frozen batch norm, stem and
first stage frozen; FPN on C2–C5 and P6 max-pooled from P5 for the RPN; anchors 32 to 512 on
P2–P6 in three aspect ratios; 2000 proposals an image in training, 1000 in testing; 512
sampled RoIs an image, a quarter positive; 7×7 RoI Align on P2–P5 and two fully connected
layers of 1024. SGD at 0.02 for 90k iterations of 16 images, the rate divided by 10 at 60k and
80k, after a linear warmup of 1000 iterations from a thousandth of it: the 1x schedule
(torchvision's reference scripts train the same model for 26 epochs, steps at 16 and 22).
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

RETINANET = load_module(Path(__file__).parents[1] / "retinanet" / "r50_fpn_1x_coco.py")

MODEL = specs.FasterRCNN(
    num_classes=80,
    backbone=specs.ResNet(
        depth=50, norm=specs.FrozenBatchNorm(), frozen_stages=1, out_levels=(2, 3, 4, 5)
    ),
    neck=specs.FPN(in_levels=(2, 3, 4, 5), out_levels=(2, 3, 4, 5), channels=256),
    max_pool_levels=1,
    rpn=specs.RPN(),
    roi_head=specs.RoIHead(),
    normalize=specs.Normalize(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_range=255.0
    ),
)

# The 1x schedule of the RetinaNet zoo file (90k iterations of 16 images, 12 COCO epochs, COCO
# 2017 under data/coco), at Faster R-CNN's rate: SGD 0.02 after 1 000 warm-up iterations, steps
# at 60k and 80k.
EXPERIMENT = attrs.evolve(
    RETINANET.EXPERIMENT,
    model=MODEL,
    optimizer=specs.SGD(lr=0.02, momentum=0.9, weight_decay=1e-4),
    schedule=specs.Schedule(
        warmup=specs.LinearWarmup(iters=1000, factor=0.001),
        decay=specs.StepDecay(milestones=(60_000 / 90_000, 80_000 / 90_000), gamma=0.1),
    ),
)
