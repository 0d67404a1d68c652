"""CenterNet, ResNet-18 up-sampled to stride 4: the paper's ResNet-18 COCO recipe (80 classes).

"Objects as Points" (Zhou et al. 2019), section 5: 512 × 512 inputs (a 128 × 128 output map),
140 epochs with Adam at 5e-4, the learning rate divided by 10 at epochs 90 and 120; random
flips, scaling, crops and colour jitter. The paper reports 28.1 AP on COCO val for its
ResNet-18 without test-time augmentation (30.0 with flip testing).

Where this differs: the paper trained its ResNet and DLA models at batch 114 (5 GPUs); this uses
128 (MMDetection's 8 × 16) at the same learning rate. The neck's 3×3 convs are plain, where the
paper's ResNets have deformable ones. The random scaling (0.6–1.3) and 512² crops are
approximated by a random longer side (at most 512) and fdet's random crop. Inputs are normalized
with the ImageNet statistics of torchvision's backbones (the paper's code uses COCO's own). The
backbone starts from scratch unless ImageNet weights are loaded into it. Expects COCO 2017 under
data/coco.

``batch_size`` counts images a process: on N processes set it to 128 / N (or keep the total and
use ``accumulate``).
"""

import math

from fdet import specs

COCO_TRAIN_IMAGES = 118_287
BATCH = 128
EPOCHS = 140

MODEL = specs.CenterNet(
    backbone=specs.ResNet(depth=18, norm=specs.BatchNorm(), frozen_stages=-1, out_levels=(5,)),
    neck=specs.CenterNetNeck(in_level=5, channels=(256, 128, 64), norm=specs.BatchNorm()),
    head=specs.CenterNetHead(num_classes=80, channels=64, prior_prob=0.1),
    radius=specs.GaussianRadius(min_overlap=0.3, variant="exact"),
    heatmap_loss=specs.HeatmapFocalLoss(alpha=2.0, beta=4.0, weight=1.0),
    size_weight=0.1,
    offset_weight=1.0,
    postprocess=specs.CenterNetPostprocess(topk=100, score_threshold=0.01, kernel=3),
)

EXPERIMENT = specs.Experiment(
    model=MODEL,
    data=specs.CocoData(
        train_images="data/coco/train2017",
        train_annotations="data/coco/annotations/instances_train2017.json",
        val_images="data/coco/val2017",
        val_annotations="data/coco/annotations/instances_val2017.json",
    ),
    train_transforms=specs.Transforms(
        min_size=(320, 352, 384, 416, 448, 480, 512),
        max_size=512,
        hflip_prob=0.5,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        crop_prob=0.5,
        crop_min_scale=0.6,
        pad_divisor=32,
    ),
    val_transforms=specs.Transforms(min_size=(512,), max_size=512, pad_divisor=32),
    # Adam: AdamW without weight decay is the same update
    optimizer=specs.AdamW(lr=5e-4, betas=(0.9, 0.999), weight_decay=0.0),
    schedule=specs.Schedule(
        warmup=None, decay=specs.StepDecay(milestones=(90 / EPOCHS, 120 / EPOCHS), gamma=0.1)
    ),
    batch_size=BATCH,
    iterations=math.ceil(EPOCHS * COCO_TRAIN_IMAGES / BATCH),  # 129 377
    eval_interval=10_000,
    checkpoint_interval=5_000,
    num_workers=8,
)
