"""Per-sample transforms: pure functions from a :class:`Sample` to a new one.

Nothing is mutated. Randomness comes only from an explicit ``torch.Generator``, so a transform
is a function of ``(sample, generator state)``. Boxes, masks, ``scale`` and ``flipped`` are
updated with the image; boxes stay the tight boxes of their masks (to within a pixel of
resampling) when both are present.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from jaxtyping import Bool, Float, UInt8
from torch import Tensor

from fdet import specs
from fdet.data.sample import Sample
from fdet.ops.boxes import box_area, clip_boxes

__all__ = [
    "TransformPipeline",
    "build_transform",
    "hflip",
    "masks_to_boxes",
    "photometric",
    "random_crop",
    "resize",
    "resize_to",
]


def masks_to_boxes(
    masks: UInt8[Tensor, "M H W"],
) -> tuple[Float[Tensor, "M 4"], Bool[Tensor, " M"]]:
    """Tight xyxy boxes of masks in pixel-edge coordinates (a mask covering pixel columns
    3..7 has ``x1 = 3, x2 = 8``), and which masks are non-empty (empty ones get a zero box)."""
    rows = (masks != 0).any(dim=2)  # [M, H]
    cols = (masks != 0).any(dim=1)  # [M, W]
    nonempty = rows.any(dim=1)  # [M]
    h, w = rows.shape[1], cols.shape[1]
    y1 = rows.byte().argmax(dim=1)
    y2 = h - rows.flip(1).byte().argmax(dim=1)
    x1 = cols.byte().argmax(dim=1)
    x2 = w - cols.flip(1).byte().argmax(dim=1)
    boxes = torch.stack((x1, y1, x2, y2), dim=1).float()  # [M, 4]
    return boxes * nonempty[:, None], nonempty


def _resize_image(image: UInt8[Tensor, "3 H W"], size: tuple[int, int]) -> UInt8[Tensor, "3 h w"]:
    """Bilinear with antialiasing, uint8 in and out."""
    if size == (1, 1):  # torch's uint8 antialiasing kernel fails on a 1x1 output
        out = F.interpolate(
            image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
        )
        return out[0].round().clamp(0, 255).to(torch.uint8)
    return F.interpolate(
        image[None], size=size, mode="bilinear", antialias=True, align_corners=False
    )[0]


def resize_to(sample: Sample, size: tuple[int, int]) -> Sample:
    """Resize to exactly ``size`` = (height, width): bilinear with antialiasing on the image,
    nearest on masks; boxes and ``scale`` follow."""
    h, w = sample.image.shape[-2:]
    nh, nw = size
    if (nh, nw) == (h, w):
        return sample
    sy, sx = nh / h, nw / w
    image = _resize_image(sample.image, (nh, nw))
    boxes = sample.boxes * sample.boxes.new_tensor([sx, sy, sx, sy])
    masks = sample.masks
    if masks is not None:
        masks = (
            F.interpolate(masks[None], size=(nh, nw), mode="nearest-exact")[0]
            if masks.shape[0]
            else masks.new_zeros(0, nh, nw)
        )
    return sample._replace(
        image=image,
        boxes=boxes,
        masks=masks,
        scale=(sample.scale[0] * sy, sample.scale[1] * sx),
    )


def resize(sample: Sample, *, min_size: int, max_size: int) -> Sample:
    """Resize keeping the aspect ratio: the shorter side becomes ``min_size`` unless the longer
    one would exceed ``max_size``, in which case the longer side becomes ``max_size``."""
    h, w = sample.image.shape[-2:]
    factor = min(min_size / min(h, w), max_size / max(h, w))
    return resize_to(sample, (max(1, round(h * factor)), max(1, round(w * factor))))


def hflip(sample: Sample) -> Sample:
    """Mirror left-right; ``flipped`` toggles. Applying it twice gives the sample back."""
    w = sample.image.shape[-1]
    x1, y1, x2, y2 = sample.boxes.unbind(-1)
    return sample._replace(
        image=sample.image.flip(-1),
        boxes=torch.stack((w - x2, y1, w - x1, y2), dim=-1),
        masks=None if sample.masks is None else sample.masks.flip(-1),
        flipped=not sample.flipped,
    )


def photometric(
    sample: Sample,
    generator: torch.Generator,
    *,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
) -> Sample:
    """Colour jitter: brightness, contrast and saturation factors drawn from
    ``[1 - s, 1 + s]``, a hue shift from ``[-hue, hue]`` (fraction of the colour wheel), applied
    in that order. A strength of 0 leaves that property alone. Geometry is unchanged.

    Four numbers are drawn from ``generator`` whatever the strengths.
    """
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    image = sample.image
    if brightness > 0:
        image = TF.adjust_brightness(image, max(0.0, 1 + brightness * (2 * u[0] - 1)))
    if contrast > 0:
        image = TF.adjust_contrast(image, max(0.0, 1 + contrast * (2 * u[1] - 1)))
    if saturation > 0:
        image = TF.adjust_saturation(image, max(0.0, 1 + saturation * (2 * u[2] - 1)))
    if hue > 0:
        image = TF.adjust_hue(image, hue * (2 * u[3] - 1))
    return sample._replace(image=image)


def random_crop(
    sample: Sample, generator: torch.Generator, *, min_scale: float, min_visible: float
) -> Sample:
    """Crop a random window whose height and width are each at least ``min_scale`` of the
    image's (drawn independently), at a uniformly random position.

    Boxes are shifted and clipped to the window; an object keeps its place only if at least
    ``min_visible`` of its box area is inside and its clipped box is not degenerate. With masks,
    the masks are cropped too, each box shrinks to the tight box of its cropped mask, and an
    object whose cropped mask is empty is dropped. The crop may leave no objects (a negative
    image). ``scale`` is unchanged, so boxes no longer map back to the original image: this is a
    training augmentation.
    """
    h, w = sample.image.shape[-2:]
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    ch = min(h, max(1, round(h * (min_scale + (1 - min_scale) * u[0]))))
    cw = min(w, max(1, round(w * (min_scale + (1 - min_scale) * u[1]))))
    y0 = min(h - ch, int(u[2] * (h - ch + 1)))
    x0 = min(w - cw, int(u[3] * (w - cw + 1)))

    offset = sample.boxes.new_tensor([x0, y0, x0, y0])
    boxes = clip_boxes(sample.boxes - offset, (ch, cw))  # [M, 4]
    before, after = box_area(sample.boxes), box_area(boxes)
    visible = torch.where(before > 0, after / before.clamp(min=1e-12), 0.0)
    keep = (visible >= min_visible) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    masks = sample.masks
    if masks is not None:
        masks = masks[:, y0 : y0 + ch, x0 : x0 + cw]
        tight, nonempty = masks_to_boxes(masks)
        boxes = torch.cat(
            (torch.maximum(boxes[:, :2], tight[:, :2]), torch.minimum(boxes[:, 2:], tight[:, 2:])),
            dim=1,
        )
        keep &= nonempty & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        masks = masks[keep].contiguous()
    return sample._replace(
        image=sample.image[:, y0 : y0 + ch, x0 : x0 + cw].contiguous(),
        boxes=boxes[keep],
        labels=sample.labels[keep],
        crowd=sample.crowd[keep],
        masks=masks,
    )


@attrs.frozen
class TransformPipeline:
    """The per-sample transform a :class:`fdet.specs.Transforms` describes; picklable, so it
    travels to loader workers.

    Training: a random crop (with ``crop_prob``), a resize to one of ``min_size`` picked at
    random, a horizontal flip (with ``hflip_prob``), then colour jitter. Evaluation: the resize
    to ``min_size[0]`` only.
    """

    spec: specs.Transforms
    train: bool

    def __call__(self, sample: Sample, generator: torch.Generator) -> Sample:
        s = self.spec
        if not self.train:
            return resize(sample, min_size=s.min_size[0], max_size=s.max_size)
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        if u[0] < s.crop_prob:
            sample = random_crop(
                sample, generator, min_scale=s.crop_min_scale, min_visible=s.crop_min_visible
            )
        min_size = s.min_size[min(int(u[1] * len(s.min_size)), len(s.min_size) - 1)]
        sample = resize(sample, min_size=min_size, max_size=s.max_size)
        if u[2] < s.hflip_prob:
            sample = hflip(sample)
        if s.brightness or s.contrast or s.saturation or s.hue:
            sample = photometric(
                sample,
                generator,
                brightness=s.brightness,
                contrast=s.contrast,
                saturation=s.saturation,
                hue=s.hue,
            )
        return sample


def build_transform(spec: specs.Transforms, *, train: bool) -> TransformPipeline:
    """The transform ``(sample, generator) -> sample`` for training or evaluation."""
    return TransformPipeline(spec, train)
