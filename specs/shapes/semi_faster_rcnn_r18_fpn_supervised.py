"""The supervised baseline of semi_faster_rcnn_r18_fpn.py: the same 400 labeled shapes images,
model, schedule, batch and EMA, without the unlabeled images (the burn-in lasts the whole run)."""

from pathlib import Path

import attrs

from fdet.specs import load_module

SEMI = load_module(Path(__file__).with_name("semi_faster_rcnn_r18_fpn.py"))

EXPERIMENT = attrs.evolve(
    SEMI.EXPERIMENT,
    semi=attrs.evolve(SEMI.SEMI, burn_in=SEMI.ITERATIONS),
)
