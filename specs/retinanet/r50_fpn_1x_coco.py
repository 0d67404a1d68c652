"""RetinaNet, ResNet-50 + FPN (P3–P7), the 1x COCO recipe (80 classes).

The architecture, anchors, assignment, losses and postprocess of torchvision's
``retinanet_resnet50_fpn``: weights converted from it load unchanged.
"""

from fdet import specs

MODEL = specs.RetinaNet(
    backbone=specs.ResNet(
        depth=50, norm=specs.FrozenBatchNorm(), frozen_stages=1, out_levels=(3, 4, 5)
    ),
    neck=specs.FPN(in_levels=(3, 4, 5), out_levels=(3, 4, 5, 6, 7), channels=256, extra_from="p5"),
    head=specs.RetinaHead(num_classes=80, num_convs=4, channels=256, prior_prob=0.01),
    anchors=specs.Anchors(
        strides=(8, 16, 32, 64, 128),
        base_sizes=(32, 64, 128, 256, 512),
        octave_scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        ratios=(0.5, 1.0, 2.0),
    ),
    assigner=specs.MaxIoUAssigner(pos_iou=0.5, neg_iou=0.4, low_quality_matches=True),
    coder=specs.DeltaXYWHCoder(means=(0, 0, 0, 0), stds=(1, 1, 1, 1)),
    cls_loss=specs.SigmoidFocalLoss(alpha=0.25, gamma=2.0),
    box_loss=specs.L1Loss(),
    postprocess=specs.DensePostprocess(
        score_threshold=0.05, topk_per_level=1000, nms_iou=0.5, max_detections=300
    ),
    normalize=specs.Normalize(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_range=255.0
    ),
)

# The 1x schedule: 90k iterations of 16 images (12 COCO epochs), steps at epochs 8 and 11.
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
        warmup=specs.LinearWarmup(iters=500, factor=0.001),
        decay=specs.StepDecay(milestones=(8 / 12, 11 / 12), gamma=0.1),
    ),
    batch_size=16,
    iterations=90_000,
    eval_interval=10_000,
    checkpoint_interval=5_000,
    grad_clip_norm=None,
    num_workers=4,
)
