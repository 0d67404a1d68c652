"""Region-based detectors: the region proposal network, the RoI heads that classify and refine
its proposals (one stage for Faster R-CNN, several for Cascade R-CNN) and the mask head of Mask
R-CNN. Each part is a module with pure functions for its targets, losses and postprocess, on
padded ``[B, R]`` proposals with a validity mask."""

from fdet.models.detectors.two_stage import (
    cascade_rcnn,  # noqa: F401  (registers its builder)
    faster_rcnn,  # noqa: F401  (registers its builder)
    mask_head,  # noqa: F401  (registers its builder)
    mask_rcnn,  # noqa: F401  (registers its builder)
    roi_heads,  # noqa: F401  (registers its builder)
    rpn,  # noqa: F401  (registers its builder)
)
