"""FCOS, ResNet-50 + FPN (P3–P7), the paper's improved recipe on the 1x COCO schedule (80
classes).

Tian et al., "FCOS: A Simple and Strong Anchor-free Object Detector" (TPAMI 2020): group norm
in the head, center sampling at 1.5 strides, GIoU weighted by the centerness target, centerness
on the regression tower, distances normalised by the stride through a ReLU with a learned scale
per level, points at the cell centres; SGD at 0.01 for 90k iterations of 16 images, the rate
divided by 10 at 60k and 80k, after 500 iterations at a third of it (the paper's code).

Weights converted from torchvision's ``fcos_resnet50_fpn`` take ``fdet.compat.torchvision``'s
spec instead (its points sit at the cells' corners, no learned scales, plain GIoU).
"""

from fdet import specs

MODEL = specs.FCOS(
    backbone=specs.ResNet(
        depth=50, norm=specs.FrozenBatchNorm(), frozen_stages=1, out_levels=(3, 4, 5)
    ),
    neck=specs.FPN(in_levels=(3, 4, 5), out_levels=(3, 4, 5, 6, 7), channels=256, extra_from="p5"),
    head=specs.FCOSHead(
        num_classes=80,
        num_convs=4,
        channels=256,
        prior_prob=0.01,
        norm=specs.GroupNorm(groups=32),
        centerness_on="box",
        distance_activation="relu",
        learned_scales=True,
    ),
    points=specs.Points(strides=(8, 16, 32, 64, 128), offset=0.5),
    assigner=specs.FCOSAssigner(
        regress_ranges=((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, None)),
        center_radius=1.5,
    ),
    coder=specs.DistanceCoder(normalize_by_stride=True),
    cls_loss=specs.SigmoidFocalLoss(alpha=0.25, gamma=2.0),
    box_loss=specs.GIoULoss(),
    centerness_weight=1.0,
    box_weight_by_centerness=True,
    postprocess=specs.DensePostprocess(
        score_threshold=0.05, topk_per_level=1000, nms_iou=0.6, max_detections=100
    ),
    normalize=specs.Normalize(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_range=255.0
    ),
)

# The 1x schedule: 90k iterations of 16 images (12 COCO epochs), steps at 60k and 80k.
# Expects COCO 2017 under data/coco (the standard layout); point the paths elsewhere with
# attrs.evolve or `fdet train --set` style overrides.
EXPERIMENT = specs.Experiment(
    model=MODEL,
    data=specs.CocoData(
        train_images="data/coco/train2017",
        train_annotations="data/coco/annotations/instances_train2017.json",
        val_images="data/coco/val2017",
        val_annotations="data/coco/annotations/instances_val2017.json",
    ),
    train_transforms=specs.Transforms(min_size=(800,), max_size=1333, hflip_prob=0.5),
    val_transforms=specs.Transforms(min_size=(800,), max_size=1333),
    optimizer=specs.SGD(lr=0.01, momentum=0.9, weight_decay=1e-4),
    schedule=specs.Schedule(
        warmup=specs.ConstantWarmup(iters=500, factor=1 / 3),
        decay=specs.StepDecay(milestones=(60_000 / 90_000, 80_000 / 90_000), gamma=0.1),
    ),
    batch_size=16,
    iterations=90_000,
    eval_interval=10_000,
    checkpoint_interval=5_000,
    grad_clip_norm=None,
    num_workers=4,
)
