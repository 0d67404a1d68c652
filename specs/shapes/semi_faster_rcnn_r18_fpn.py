"""Semi-supervised Faster R-CNN R18-FPN on the shapes set, 10 % of the training images labeled,
with Soft Teacher's box jitter as the reliability test of the pseudo-labels' boxes.

The model of faster_rcnn_r18_fpn.py, the data split, schedule, views and teacher of
semi_retinanet_r18_fpn.py. The RoI head's softmax scores are sharper than RetinaNet's sigmoid
ones: pseudo-labels are the teacher's detections scoring at least 0.7; their boxes train the
student's RPN and RoI box regression when ten jittered copies (by up to 6 % of the box's size),
refined by the teacher's RoI head, spread by at most 2 % of the box's size.

`semi_faster_rcnn_r18_fpn_supervised.py` is its supervised baseline (the same labeled images and
iterations, no unlabeled images).
"""

from pathlib import Path

import attrs

from fdet.specs import load_module

SEMI_RETINANET = load_module(Path(__file__).with_name("semi_retinanet_r18_fpn.py"))
FASTER_RCNN = load_module(Path(__file__).with_name("faster_rcnn_r18_fpn.py"))

ITERATIONS = SEMI_RETINANET.ITERATIONS

SEMI = attrs.evolve(
    SEMI_RETINANET.SEMI,
    score_threshold=0.7,
    reliability="jitter",
    jitter_times=10,
    jitter_scale=0.06,
    jitter_max_std=0.02,
)

EXPERIMENT = attrs.evolve(SEMI_RETINANET.EXPERIMENT, model=FASTER_RCNN.MODEL, semi=SEMI)
