"""The embedded default: RetinaNet R18-FPN trained from scratch on fdet's synthetic shapes set.

`fdet train specs/shapes/retinanet_r18_fpn.py` generates the shapes set on first use (cached),
trains on the CPU in under ten minutes on 2 cores, and writes COCO metrics and a picture of the
validation predictions. Small 128-pixel images and a narrow head keep a step cheap; P3–P5 with
anchors from 16 to 101 pixels cover objects from 8 to 64 pixels.

The pyramid is built on C3 alone: ResNet-18's stem and its first two stages (16×16 at stride 8,
a receptive field of about 100 pixels, more than the largest object), then P4 and P5 by stride-2
convs. At 128² ResNet's last two stages give 8×8 and 4×4 maps and hold 94% of its weights; a
pyramid on C3–C5 trained 1.5× slower a step and reached AP 0.56 after 1 000 iterations where this
one reaches 0.61, and 0.75 at the end against 0.73 (docs/benchmarks.md, "The shapes pyramid on
C3").

``precision="auto"`` trains in bf16 where the CPU (or GPU) computes it natively and in float32
elsewhere; ``allocator="retain"`` keeps the step's large temporaries in the heap instead of
faulting them in again every step (docs/benchmarks.md, "The shapes step on a CPU").
"""

from fdet import specs

NUM_CLASSES = 6

MODEL = specs.RetinaNet(
    backbone=specs.ResNet(depth=18, norm=specs.BatchNorm(), frozen_stages=-1, out_levels=(3,)),
    neck=specs.FPN(in_levels=(3,), out_levels=(3, 4, 5), channels=64),
    head=specs.RetinaHead(
        num_classes=NUM_CLASSES, num_convs=2, channels=64, norm=specs.GroupNorm(groups=16)
    ),
    anchors=specs.Anchors(
        strides=(8, 16, 32),
        base_sizes=(16, 32, 64),
        octave_scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        ratios=(0.5, 1.0, 2.0),
        truncate_sizes=False,
        round_offsets=False,
    ),
    assigner=specs.MaxIoUAssigner(pos_iou=0.5, neg_iou=0.4),
    box_loss=specs.GIoULoss(weight=2.0),
    postprocess=specs.DensePostprocess(
        score_threshold=0.05, topk_per_level=1000, nms_iou=0.5, max_detections=100
    ),
)

EXPERIMENT = specs.Experiment(
    model=MODEL,
    data=specs.ShapesData(train_images=4000, val_images=200, image_size=128, seed=0),
    train_transforms=specs.Transforms(
        min_size=(128,), max_size=128, hflip_prob=0.5, pad_divisor=32
    ),
    val_transforms=specs.Transforms(min_size=(128,), max_size=128, pad_divisor=32),
    optimizer=specs.AdamW(lr=2e-3, weight_decay=0.05),
    schedule=specs.Schedule(
        warmup=specs.LinearWarmup(iters=100, factor=0.01), decay=specs.CosineDecay()
    ),
    batch_size=16,
    iterations=3000,
    eval_interval=500,
    eval_images=200,
    checkpoint_interval=500,
    log_interval=25,
    grad_clip_norm=10.0,
    seed=0,
    num_workers=1,
    precision="auto",
    allocator="retain",
)
