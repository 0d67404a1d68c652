"""Mask R-CNN R18-FPN trained from scratch on fdet's synthetic shapes set: the Faster R-CNN of
`faster_rcnn_r18_fpn.py` (backbone, pyramid, RPN, RoI stage, data, optimizer and budget), with a
mask branch on its RoIs.

The mask RoI Align pools 14×14 bins (28×28 masks) from the levels of the box RoI Align with
its level rule, half-pixel aligned (Detectron2's ``aligned=True``), which is also how the gt
masks are cut into targets: at pixel centres, where the predicted masks are pasted back (cut at
their own boxes and pasted back, the val set's gt masks keep segm AP 0.861, against 0.705 with
torchvision's ``aligned=False``); a narrow head (four 3×3 convs of 64) learns from at most as
many positive RoIs an image as the RoI sampler can draw, so no positive is left out. Training
loads the shapes' instance masks; evaluation reports segm AP beside bbox AP.
"""

from pathlib import Path

import attrs

from fdet import specs
from fdet.specs import load_module

FASTER_RCNN = load_module(Path(__file__).with_name("faster_rcnn_r18_fpn.py"))

_BASE = FASTER_RCNN.MODEL
_SAMPLER = _BASE.roi_head.sampler

MODEL = specs.MaskRCNN(
    **attrs.asdict(_BASE, recurse=False),
    mask_head=specs.MaskHead(
        roi_align=attrs.evolve(_BASE.roi_head.roi_align, output_size=14, aligned=True),
        num_convs=4,
        channels=64,
        max_rois=max(1, int(_SAMPLER.num_samples * _SAMPLER.positive_fraction)),
    ),
)

EXPERIMENT = attrs.evolve(FASTER_RCNN.EXPERIMENT, model=MODEL)
