"""The supervised baseline of semi_retinanet_r18_fpn.py: the same 400 labeled shapes images,
model, schedule, batch of 8 labeled images and EMA, without the unlabeled images (the burn-in
lasts the whole run, so no step reads them). The EMA weights are evaluated as the semi-supervised
run's teacher is (docs/semi_supervised.md)."""

from pathlib import Path

import attrs

from fdet.specs import load_module

SEMI = load_module(Path(__file__).with_name("semi_retinanet_r18_fpn.py"))

EXPERIMENT = attrs.evolve(
    SEMI.EXPERIMENT,
    semi=attrs.evolve(SEMI.SEMI, burn_in=SEMI.ITERATIONS),
)
