"""Semi-supervised RetinaNet R18-FPN on the shapes set: 10 % of the training images labeled.

The model, data and optimizer of the RetinaNet shapes spec (retinanet_r18_fpn.py). A seeded
10 % of its 4 000 training images (400) keep their labels; the other 3 600 are unlabeled (their
labels are never read for training; the log measures the pseudo-labels' precision and recall
against them). Each step reads 8 labeled and 8 unlabeled images. For the first 1 000 iterations
the student learns from the labeled images alone; then the teacher (the EMA of the student,
decay 0.998) starts from the student and labels the weak view of the unlabeled images: its
detections scoring at least 0.5 train the student's classification on a strong view (scale
jitter, crop, flip, colour, cutout), those at 0.6 and above its box regression as well.

`semi_retinanet_r18_fpn_supervised.py` is the same run without the unlabeled images (a burn-in
as long as the run): the supervised baseline on the same labeled images and iterations
(docs/semi_supervised.md, docs/benchmarks.md).
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

BASE = load_module(Path(__file__).with_name("retinanet_r18_fpn.py"))

ITERATIONS = 3000

SEMI = specs.SemiSupervised(
    labeled_fraction=0.1,
    split_seed=0,
    unlabeled_batch_size=8,
    burn_in=1000,
    reset_teacher=True,
    weak=specs.Transforms(min_size=(128,), max_size=128, hflip_prob=0.5, pad_divisor=32),
    strong=specs.StrongAugment(
        scale=(0.75, 1.25),
        hflip_prob=0.5,
        crop_prob=0.5,
        crop_min_scale=0.6,
        crop_min_visible=0.5,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        cutout_count=(1, 5),
        cutout_size=(0.05, 0.15),
    ),
    score_threshold=0.5,
    max_pseudo_labels=32,
    reliability="score",
    box_score_threshold=0.6,
    unsup_weight=1.0,
    unsup_warmup=200,
)

EXPERIMENT = attrs.evolve(
    BASE.EXPERIMENT,
    batch_size=8,
    iterations=ITERATIONS,
    eval_interval=500,
    checkpoint_interval=500,
    ema=specs.EMA(decay=0.998, warmup_updates=0),
    semi=SEMI,
)
