"""The exportable detection graph: pixels in, padded detections out, in one module.

:class:`DetectionGraph` wraps a trained detector so that one call does all that inference does
after the images are resized and padded: input normalization, the network, decoding and NMS.
Its ``forward`` takes a single tensor and returns a tuple of four, which is what exporters
want (ONNX, ``torch.export``)::

    images [B, 3, H, W]  float32 pixel values in [0, 255] (any real dtype is cast to float32)
      -> boxes  [B, N, 4] float32, xyxy in pixels of ``images``
         scores [B, N]    float32
         labels [B, N]    int64, the contiguous class index 0 .. K-1
         valid  [B, N]    bool; padded slots are False (score 0, label 0, box zeros)

``N`` is the detector's ``max_detections``; valid slots come first, by score descending, as
:class:`fdet.ops.postprocess.Detections` has them. Every image of the batch is taken to fill
the whole ``H × W`` input: boxes are clipped to it, not to an image's area before padding.

Every shape in the graph is static, except the batch size where the export says so; the only
host synchronizations are inside fdet's two custom operators (``fdet::nms_keep_mask``,
``fdet::roi_align_levels``), which both exporters see as one opaque call each.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import Detector

__all__ = [
    "OUTPUT_NAMES",
    "DetectionGraph",
    "ExportError",
    "check_exportable",
    "check_image_size",
    "default_image_size",
]

INPUT_NAME = "images"
OUTPUT_NAMES = ("boxes", "scores", "labels", "valid")


class ExportError(ValueError):
    """A model, size or file that cannot be exported or loaded, with what is wrong."""


def check_exportable(model: nn.Module) -> Detector:
    """``model`` if it is a detector whose detections the graph can carry; else an
    :class:`ExportError` saying why (instance masks are not exported)."""
    if not isinstance(model, Detector):
        raise ExportError(
            f"only fdet detectors are exported (a fdet.models.Detector), got {type(model).__name__}"
        )
    if getattr(model, "mask_head", None) is not None:
        raise ExportError(
            f"{type(model).__name__} predicts instance masks, which are not exported; export "
            "the same detector without its mask head for boxes alone"
        )
    return model


def check_image_size(image_size: tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(height, width)`` as two positive ints, or an :class:`ExportError`."""
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(n, int) and n > 0 for n in size):
        raise ExportError(f"image_size: expected (height, width), two positive ints, got {size}")
    return size[0], size[1]


def default_image_size(transforms: specs.Transforms) -> tuple[int, int]:
    """The square input that holds every image the validation ``transforms`` produce: the
    longest side they allow (``max_size``) rounded up to a multiple of ``pad_divisor``.

    A resized image (its longer side at most ``max_size``) fits in it once padded at the bottom
    and right, as fdet's batches are. For the shapes specs that is 128 × 128; for COCO specs
    (``max_size`` 1333, ``pad_divisor`` 32) 1344 × 1344.
    """
    side = math.ceil(transforms.max_size / transforms.pad_divisor) * transforms.pad_divisor
    return side, side


class DetectionGraph(nn.Module):
    """A detector and its postprocessing as one module: ``images → (boxes, scores, labels,
    valid)`` (see the module docstring for dtypes and shapes).

    Holds the detector (its parameters and buffers) and nothing else; call it in eval mode. A
    detector with a mask head is refused (:class:`ExportError`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = check_exportable(model)

    def forward(
        self, images: Float[Tensor, "B 3 H W"]
    ) -> tuple[
        Float[Tensor, "B N 4"], Float[Tensor, "B N"], Int[Tensor, "B N"], Bool[Tensor, "B N"]
    ]:
        """``(boxes, scores, labels, valid)`` of ``images`` (pixel values in ``[0, 255]``, any
        real dtype): a plain tuple, which every exporter flattens the same way."""
        images = images.to(torch.float32)
        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        image_sizes = torch.tensor([height, width], device=images.device).expand(batch, 2)
        detections = self.model.postprocess(self.model(images), image_sizes)
        if detections.masks is not None:  # a detector predicting masks without a mask_head
            raise ExportError(f"{type(self.model).__name__} returns masks, which are not exported")
        return (
            detections.boxes.to(torch.float32),
            detections.scores.to(torch.float32),
            detections.labels.to(torch.int64),
            detections.valid.to(torch.bool),
        )
