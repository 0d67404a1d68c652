"""RetinaNet, ResNet-101 + FPN: the R50 recipe with a deeper backbone."""

from pathlib import Path

import attrs

from fdet.specs import load_module

BASE = load_module(Path(__file__).with_name("r50_fpn_1x_coco.py"))

MODEL = attrs.evolve(BASE.MODEL, backbone=attrs.evolve(BASE.MODEL.backbone, depth=101))

EXPERIMENT = attrs.evolve(BASE.EXPERIMENT, model=MODEL)
