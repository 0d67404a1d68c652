"""CenterNet ("Objects as Points", Zhou et al. 2019) as pure functions on padded batches, and the
module that applies them with its spec's hyperparameters.

An object is the peak of a class heatmap at its centre, on one map at stride ``s`` (4); the
head also predicts, at every cell, the size of a box centred there and the sub-cell offset of
the centre::

    outputs = detector(images)                          # CenterNetOutputs: heatmap, size, offset
    targets = centernet_targets(gt_boxes, gt_labels, gt_valid, gt_crowd, num_classes=K,
                                size=(H, W), stride=s, radius=spec.radius)
    terms = centernet_loss(outputs, gt_boxes, gt_labels, gt_valid, gt_crowd, stride=s, ...)
    detections = centernet_postprocess(outputs, image_sizes, stride=s,
                                       postprocess=spec.postprocess)

:class:`CenterNet` does the same on the detector contract (:mod:`fdet.models.detectors.base`).
The equations are the paper's (section 3); docs/centernet.md walks through them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import LossTerms, Targets, Term
from fdet.models.detectors.dense import DenseDetector, build_dense_parts, with_one_slot
from fdet.models.heads.centernet import CenterNetOutputs
from fdet.ops.anchors import grid_points
from fdet.ops.boxes import clip_boxes
from fdet.ops.heatmap import (
    draw_heatmaps,
    gaussian_radius,
    heatmap_focal_loss,
    heatmap_peaks,
    scatter_max_by_class,
)
from fdet.ops.losses import l1_loss, masked_sum
from fdet.ops.postprocess import Detections, top_detections
from fdet.registry import register

__all__ = [
    "CenterNet",
    "CenterNetTargets",
    "build_centernet",
    "centernet_loss",
    "centernet_postprocess",
    "centernet_targets",
    "gather_cells",
]

# the specs' defaults (frozen, so safe to share as argument defaults)
_RADIUS = specs.GaussianRadius()
_HEATMAP_LOSS = specs.HeatmapFocalLoss()
_POSTPROCESS = specs.CenterNetPostprocess()


class CenterNetTargets(NamedTuple):
    """The training targets of a padded batch on a ``H × W`` output grid (units: cells).

    ``objects`` are the slots that are objects: valid, not crowd, with a box of positive width
    and height (after clipping to the grid). ``regress`` are the objects whose size and offset
    are trained: all of them but those that share their centre cell with an object that wins
    it (see :func:`centernet_targets`).
    """

    heatmap: Float[Tensor, "B K H W"]  # Gaussian peaks, exactly 1 at each object's centre
    heatmap_counted: Bool[Tensor, "B K H W"]  # False inside crowd boxes (of their class), off peaks
    centre_index: Int[Tensor, "B M"]  # centre cell, flat: y · W + x (0 for non-objects)
    size: Float[Tensor, "B M 2"]  # (w, h) of the box in cells
    offset: Float[Tensor, "B M 2"]  # centre - centre cell, in [0, 1)
    objects: Bool[Tensor, "B M"]
    regress: Bool[Tensor, "B M"]
    num_objects: Float[Tensor, ""]


def gather_cells(
    maps: Float[Tensor, "B C H W"], index: Int[Tensor, "B N"]
) -> Float[Tensor, "B N C"]:
    """The ``C`` channels of ``maps`` at flat cells ``index`` (``y · W + x``) of each image."""
    channels = maps.shape[1]
    flat = maps.flatten(2)  # [B, C, H·W]
    picked = flat.gather(2, index[:, None, :].expand(-1, channels, -1))  # [B, C, N]
    return picked.transpose(1, 2)  # [B, N, C]


def centernet_targets(
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    num_classes: int,
    size: tuple[int, int],
    stride: int,
    radius: specs.GaussianRadius = _RADIUS,
) -> CenterNetTargets:
    """CenterNet's targets for a padded batch (paper, section 3), all slots at once.

    1. Boxes go to output cells: ``box / stride``, clipped to the ``H × W`` grid. An object is a
       valid, non-crowd slot whose clipped box has positive width and height.
    2. Centre ``p / R`` (``R`` the stride), its cell ``p̃ = floor(p / R)`` and the offset target
       ``p / R - p̃`` in ``[0, 1)²`` (eq. 2's target); the size target is ``s = (w, h)`` of the
       box in cells (eq. 3's target; the paper's code also regresses sizes in output cells).
    3. Heatmap target: :func:`fdet.ops.heatmap.draw_heatmaps` with radius
       ``floor(gaussian_radius(h, w))`` (CornerNet's rule on the box in cells, the ``radius``
       spec): ``Y = exp(-((x - p̃x)² + (y - p̃y)²) / (2σ²))``, max over objects of a class.
    4. Two objects with their centres in one cell: the heatmap keeps a peak for each class, but
       one size and one offset can be predicted there. The smaller box (by area in cells) wins
       the cell; between equal areas, the lower slot. The others are left out of the size and
       offset losses (``regress`` False) but still count as objects. The rule is a pure
       function of the boxes, so the result never depends on the order of writes.
    5. Crowd boxes (COCO ``iscrowd``) are not objects: no peak, no size or offset. Inside one
       (cells whose centre lies in the box), their class's heatmap is left out of the loss
       except at the peaks of real objects (``heatmap_counted``): the crowd neither teaches
       "object" nor "background" there.

    Padded slots may hold anything (NaN boxes, out-of-range labels). ``num_objects`` is the
    number of objects in the batch, float32.
    """
    gt_boxes, gt_labels, gt_valid, gt_crowd = with_one_slot(gt_boxes, gt_labels, gt_valid, gt_crowd)
    height, width = size
    crowd = gt_valid & gt_crowd if gt_crowd is not None else torch.zeros_like(gt_valid)
    boxes = torch.where(gt_valid[..., None], gt_boxes.float(), 0.0) / stride  # [B, M, 4] cells
    clipped = clip_boxes(boxes, (height, width))  # [B, M, 4]
    x1, y1, x2, y2 = clipped.unbind(-1)  # [B, M] each
    box_w, box_h = x2 - x1, y2 - y1
    objects = gt_valid & ~crowd & (box_w > 0) & (box_h > 0)  # [B, M]

    centre = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2), dim=-1)  # [B, M, 2] (x, y)
    last = torch.tensor([width - 1, height - 1], dtype=centre.dtype, device=centre.device)
    cell = torch.minimum(centre.floor(), last)  # [B, M, 2]
    offset = centre - cell  # [B, M, 2]
    radii = gaussian_radius(
        box_h, box_w, min_overlap=radius.min_overlap, variant=radius.variant
    ).floor()  # [B, M]
    heatmap = draw_heatmaps(
        cell, radii, gt_labels, objects, num_classes=num_classes, size=(height, width)
    )  # [B, K, H, W]

    index = (cell[..., 1] * width + cell[..., 0]).long()  # [B, M]
    index = torch.where(objects, index, torch.zeros_like(index))
    # one object per cell for size and offset: the smallest box, then the lowest slot
    area = box_w * box_h  # [B, M]
    slot = torch.arange(index.shape[1], device=index.device)
    shared = (index[:, :, None] == index[:, None, :]) & objects[:, None, :]  # [B, M, M'] same cell
    beaten = (area[:, None, :] < area[:, :, None]) | (
        (area[:, None, :] == area[:, :, None]) & (slot[None, :] < slot[:, None])
    )  # [B, M, M']: M' wins over M
    regress = objects & ~(shared & beaten).any(dim=2)  # [B, M]

    counted = torch.ones_like(heatmap, dtype=torch.bool)  # [B, K, H, W]
    if gt_crowd is not None:
        points = grid_points([(height, width)], [1.0], device=boxes.device)  # [H·W, 2] cells
        px, py = points[:, 0], points[:, 1]  # [H·W]
        bx1, by1, bx2, by2 = (v[..., None] for v in boxes.unbind(-1))  # [B, M, 1] each
        inside = (px > bx1) & (px < bx2) & (py > by1) & (py < by2)  # [B, M, H·W]
        cover = scatter_max_by_class(
            inside.float().unflatten(2, (height, width)), gt_labels, crowd, num_classes=num_classes
        )  # [B, K, H, W]
        counted = (cover == 0) | (heatmap == 1)

    return CenterNetTargets(
        heatmap=heatmap,
        heatmap_counted=counted,
        centre_index=index,
        size=torch.where(objects[..., None], torch.stack((box_w, box_h), dim=-1), 0.0),
        offset=torch.where(objects[..., None], offset, 0.0),
        objects=objects,
        regress=regress,
        num_objects=objects.sum(dtype=torch.float32),
    )


def centernet_loss(
    outputs: CenterNetOutputs,
    gt_boxes: Float[Tensor, "B M 4"],
    gt_labels: Int[Tensor, "B M"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    stride: int,
    radius: specs.GaussianRadius = _RADIUS,
    heatmap_loss: specs.HeatmapFocalLoss = _HEATMAP_LOSS,
    size_weight: float = 0.1,
    offset_weight: float = 1.0,
) -> dict[str, Term]:
    """The CenterNet objective of a padded batch: ``L_k + 0.1 L_size + L_off`` (paper, eq. 4) as
    the loss terms ``"heatmap"``, ``"size"`` and ``"offset"``.

    1. Targets: :func:`centernet_targets` (crowds: no peak, their area of their class ignored).
    2. ``"heatmap"``: the penalty-reduced focal loss (eq. 1,
       :func:`fdet.ops.heatmap.heatmap_focal_loss`) summed over every class and cell that
       counts.
    3. ``"size"`` (eq. 3) and ``"offset"`` (eq. 2): ``|prediction - target|`` at each object's
       centre cell, averaged over the two coordinates and summed over the objects that hold
       their cell (``regress``). Averaging the pair is what the paper's code does (it divides
       the sum by twice the number of objects).
    4. Every term has the number of objects ``N`` as its count (one tensor shared by the three)
       and its weight: ``heatmap_loss.weight``, ``size_weight`` (0.1) and ``offset_weight`` (1),
       so ``term.value()`` is ``weight · total / max(N, 1)``. (The paper's code divides the
       heatmap loss by the number of cells where ``Y = 1``; that is ``N`` unless two objects of
       one class share a centre cell.)

    Args:
        outputs: the head's ``heatmap[B, K, H, W]`` logits, ``size[B, 2, H, W]`` and
            ``offset[B, 2, H, W]``, at ``stride``.
        gt_boxes: ``[B, M, 4]`` xyxy pixels; padded slots may hold anything, even NaN.
        gt_labels: ``[B, M]`` classes in ``[0, K)`` on valid slots.
        gt_valid: ``[B, M]`` True for real annotations (crowd ones included).
        gt_crowd: ``[B, M]`` True for crowd regions, or None for none.

    Returns:
        ``{"heatmap", "size", "offset"}`` terms of float32 scalars, also when the outputs are
        bfloat16/float16 (autocast). An image without objects teaches only "background"; a
        batch without any gives size and offset totals of 0 and a count of 0.
    """
    heat = outputs.heatmap.float()  # [B, K, H, W]
    _, num_classes, height, width = heat.shape
    targets = centernet_targets(
        gt_boxes,
        gt_labels,
        gt_valid,
        gt_crowd,
        num_classes=num_classes,
        size=(height, width),
        stride=stride,
        radius=radius,
    )
    focal = heatmap_focal_loss(
        heat, targets.heatmap, alpha=heatmap_loss.alpha, beta=heatmap_loss.beta
    )  # [B, K, H, W]
    heatmap_total = masked_sum(focal, targets.heatmap_counted)

    size = gather_cells(outputs.size.float(), targets.centre_index)  # [B, M, 2]
    offset = gather_cells(outputs.offset.float(), targets.centre_index)  # [B, M, 2]
    size_total = masked_sum(l1_loss(size, targets.size).mean(dim=-1), targets.regress)
    offset_total = masked_sum(l1_loss(offset, targets.offset).mean(dim=-1), targets.regress)
    count = targets.num_objects
    return {
        "heatmap": Term(heatmap_total, count, float(heatmap_loss.weight)),
        "size": Term(size_total, count, float(size_weight)),
        "offset": Term(offset_total, count, float(offset_weight)),
    }


def centernet_postprocess(
    outputs: CenterNetOutputs,
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    stride: int,
    postprocess: specs.CenterNetPostprocess = _POSTPROCESS,
) -> Detections:
    """Detections ``[B, topk]``: heatmap peaks decoded to boxes, without NMS (paper, section 4).

    1. Scores ``sigmoid(heatmap)``; peaks are the cells that are the maximum of their
       ``kernel × kernel`` neighbourhood in their class, and the ``topk`` best of all classes
       and cells are kept (:func:`fdet.ops.heatmap.heatmap_peaks`).
    2. A peak at cell ``(x̂, ŷ)`` with offset ``(δx̂, δŷ)`` and size ``(ŵ, ĥ)`` (both read at
       that cell) is the box ``(x̂ + δx̂ ∓ ŵ/2, ŷ + δŷ ∓ ĥ/2) · stride`` in pixels; negative
       predicted sizes count as 0.
    3. Boxes are clipped to ``image_sizes`` (height, width); a detection is valid where its score
       is above ``score_threshold``. Valid detections come first, by score; the rest are
       padding (``valid`` False, zeros).
    """
    scores = torch.sigmoid(outputs.heatmap.float())  # [B, K, H, W]
    width = scores.shape[-1]
    peaks = heatmap_peaks(scores, kernel=postprocess.kernel, topk=postprocess.topk)  # [B, N]
    index = peaks.ys * width + peaks.xs  # [B, N]
    size = gather_cells(outputs.size.float(), index).clamp(min=0)  # [B, N, 2]
    offset = gather_cells(outputs.offset.float(), index)  # [B, N, 2]
    cx = (peaks.xs + offset[..., 0]) * stride  # [B, N]
    cy = (peaks.ys + offset[..., 1]) * stride  # [B, N]
    half_w, half_h = size[..., 0] * (stride / 2), size[..., 1] * (stride / 2)  # [B, N]
    boxes = torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)  # [B, N, 4]
    boxes = clip_boxes(boxes, image_sizes)
    valid = peaks.scores > postprocess.score_threshold  # [B, N]
    return top_detections(boxes, peaks.scores, peaks.labels, valid, max_detections=postprocess.topk)


class CenterNet(DenseDetector):
    """A CenterNet on the detector contract: ``forward`` gives the head's
    :class:`CenterNetOutputs`; ``loss`` and ``postprocess`` apply the pure functions of this
    file with the detector's hyperparameters; ``predict`` is the shared one.

    The hyperparameters are frozen specs and numbers kept as plain attributes
    (``radius_spec``, ``heatmap_loss_spec``, ``size_weight``, ``offset_weight``,
    ``postprocess_spec``, ``stride``); parameters are the module's only state.

    Args:
        backbone, neck, head: modules with ``head(neck(backbone(x)))`` returning
            :class:`CenterNetOutputs` on a map of stride ``stride``.
        stride: the output stride in input pixels (4 for C5 up-sampled three times).
        radius, heatmap_loss, size_weight, offset_weight, postprocess: the specs and weights
            of those steps.
        mean, std, input_range: input normalization, ``(x / input_range - mean) / std``.
    """

    box_terms = frozenset({"size", "offset"})
    """The box size and the centre's sub-pixel offset. (The heatmap's Gaussian radius also
    follows the box size, but the heatmap is the classifier: it learns from every pseudo-label.)"""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        head: nn.Module,
        stride: int = 4,
        radius: specs.GaussianRadius = _RADIUS,
        heatmap_loss: specs.HeatmapFocalLoss = _HEATMAP_LOSS,
        size_weight: float = 0.1,
        offset_weight: float = 1.0,
        postprocess: specs.CenterNetPostprocess = _POSTPROCESS,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_range: float = 255.0,
    ) -> None:
        super().__init__(
            backbone=backbone, neck=neck, head=head, mean=mean, std=std, input_range=input_range
        )
        if stride <= 0:
            raise ValueError(f"CenterNet stride must be > 0, got {stride}")
        self.stride = int(stride)
        self.radius_spec = radius
        self.heatmap_loss_spec = heatmap_loss
        self.size_weight = float(size_weight)
        self.offset_weight = float(offset_weight)
        self.postprocess_spec = postprocess

    def loss(self, outputs: CenterNetOutputs, batch: Targets) -> LossTerms:
        """:func:`centernet_loss` of ``outputs`` against ``batch``'s ``gt_boxes``, ``gt_labels``,
        ``gt_valid`` and ``gt_crowd`` (``gt_crowd`` may be missing or None)."""
        return centernet_loss(
            outputs,
            batch.gt_boxes,
            batch.gt_labels,
            batch.gt_valid,
            getattr(batch, "gt_crowd", None),
            stride=self.stride,
            radius=self.radius_spec,
            heatmap_loss=self.heatmap_loss_spec,
            size_weight=self.size_weight,
            offset_weight=self.offset_weight,
        )

    def postprocess(
        self, outputs: CenterNetOutputs, image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"]
    ) -> Detections:
        """:func:`centernet_postprocess` of ``outputs``; boxes clipped to ``image_sizes[B, 2]``
        (height, width)."""
        return centernet_postprocess(
            outputs, image_sizes, stride=self.stride, postprocess=self.postprocess_spec
        )


@register(specs.CenterNet)
def build_centernet(spec: specs.CenterNet) -> CenterNet:
    """A :class:`CenterNet` with the modules and the hyperparameters of ``spec``."""
    return CenterNet(
        **build_dense_parts(spec, head_input="out_channels"),
        stride=spec.stride,
        radius=spec.radius,
        heatmap_loss=spec.heatmap_loss,
        size_weight=spec.size_weight,
        offset_weight=spec.offset_weight,
        postprocess=spec.postprocess,
    )
