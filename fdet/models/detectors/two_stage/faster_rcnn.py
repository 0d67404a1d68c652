"""Faster R-CNN on the detector contract: backbone → FPN (→ max-pooled extra levels) → region
proposal network → RoI Align → box head → per-class detections.

The contract gives ``forward`` the images only, while the RoIs a Faster R-CNN trains its box
head on are sampled against the ground truth. So the work is split where the ground truth
enters::

    outputs = detector(images)            # FasterRCNNOutputs: pyramid features + RPN outputs
    terms = detector.loss(outputs, batch)
        # RPN loss; proposals (training top-k, detached); RoIs sampled with the batch's gts;
        # the RoI head on the pyramid features at those RoIs; Fast R-CNN loss
        # -> {"rpn_cls", "rpn_box", "roi_cls", "roi_box"}
    detections = detector.postprocess(outputs, image_sizes)
        # proposals (testing top-k) -> RoI head -> per-class scores and boxes -> NMS

The RoI head's parameters thus run inside ``loss`` and ``postprocess``; gradients reach them,
and through the pooled features the neck and backbone, as they would from ``forward``. The
proposals carry no gradient (neither here nor in torchvision). When the features come in
float16 / bfloat16 (``forward`` ran under autocast) and ``loss`` or ``postprocess`` run
outside it, as the training step calls ``loss``, the RoI head runs under an autocast of the
features' dtype, so the box head computes in the precision ``forward`` would have given it.

Everything after the backbone is batched, with static shapes and no host sync: the NMS of the
proposals and of the detections is the ``fdet::nms_keep_mask`` custom operator, the sampling
takes random keys (``torch.rand``) or the ones given, so ``loss`` and ``postprocess`` run under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import Detector, LossTerms, Targets, Term
from fdet.models.detectors.two_stage.roi_heads import (
    RoIHeads,
    RoIOutputs,
    roi_loss,
    roi_postprocess,
    roi_targets,
)
from fdet.models.detectors.two_stage.rpn import RPN, RPNOutputs
from fdet.ops.boxes import clip_boxes
from fdet.ops.coding import decode_deltas
from fdet.ops.postprocess import Detections
from fdet.ops.proposals import Proposals
from fdet.ops.roi import SampledRoIs, select_class_deltas
from fdet.registry import build, register

__all__ = [
    "FasterRCNN",
    "FasterRCNNOutputs",
    "FasterRCNNTraining",
    "TwoStageDetector",
    "autocast_like",
    "build_faster_rcnn",
    "max_pool_levels",
]


class FasterRCNNOutputs(NamedTuple):
    """What :meth:`FasterRCNN.forward` returns: the feature pyramid (the neck's levels, then the
    max-pooled ones, finest first), the RPN's outputs on it, and the padded input size
    ``(H, W)`` (a Python pair: static under ``torch.compile``)."""

    features: tuple[Float[Tensor, "B C H_l W_l"], ...]
    rpn: RPNOutputs
    image_size: tuple[int, int]


class FasterRCNNTraining(NamedTuple):
    """The intermediate results of :meth:`FasterRCNN.training_outputs`: the proposals, the RoIs
    sampled from them and the RoI head's outputs on those RoIs."""

    proposals: Proposals
    sampled: SampledRoIs
    roi: RoIOutputs


def max_pool_levels(
    features: Sequence[Float[Tensor, "B C H W"]], num_levels: int
) -> tuple[Float[Tensor, "B C H_l W_l"], ...]:
    """``features`` with ``num_levels`` levels appended, each a max-pool with kernel 1 and
    stride 2 of the level before it: every other pixel, ``ceil(H / 2) × ceil(W / 2)``
    (torchvision's ``LastLevelMaxPool``)."""
    out = tuple(features)
    for _ in range(num_levels):  # a loop over pyramid levels
        out += (F.max_pool2d(out[-1], kernel_size=1, stride=2, padding=0),)
    return out


def autocast_like(features: Sequence[Tensor]) -> contextlib.AbstractContextManager:
    """An autocast to the features' dtype when it is a half precision, else nothing: the RoI
    stages run under it, so they compute in the precision ``forward`` gave the features even
    when ``loss`` or ``postprocess`` are called outside the autocast of ``forward``."""
    dtype = features[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type=features[0].device.type, dtype=dtype)
    return contextlib.nullcontext()


class TwoStageDetector(Detector):
    """What the region-based detectors share: ``forward`` (backbone, neck, max-pooled levels,
    RPN) and the image sizes a training batch clips its proposals to. Subclasses set
    ``backbone``, ``neck``, ``rpn`` and ``pool_levels``."""

    backbone: nn.Module
    neck: nn.Module
    rpn: RPN
    pool_levels: int

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> FasterRCNNOutputs:
        """The pyramid features and the RPN's outputs for ``images[B, 3, H, W]`` (values in
        ``[0, input_range]``)."""
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        features = self.neck(self.backbone(self.normalize(images)))
        features = max_pool_levels(features, self.pool_levels)
        return FasterRCNNOutputs(
            features=features, rpn=self.rpn(features, image_size=image_size), image_size=image_size
        )

    @staticmethod
    def batch_image_sizes(outputs: FasterRCNNOutputs, batch: Any) -> Int[Tensor, "B 2"]:
        """``batch.image_sizes`` (height, width) where the batch has them, else the padded
        input size for every image."""
        sizes = getattr(batch, "image_sizes", None)
        if sizes is not None:
            return sizes
        device = outputs.rpn.objectness.device
        batch_size = outputs.rpn.objectness.shape[0]
        return torch.tensor(outputs.image_size, device=device).expand(batch_size, 2)


class FasterRCNN(TwoStageDetector):
    """A Faster R-CNN on the detector contract (see the module docstring for how the work is
    split between ``forward``, ``loss`` and ``postprocess``).

    Parameter names follow torchvision's ``FasterRCNN`` where the parts match: ``backbone.*``
    (its ``backbone.body``), ``neck.*`` (its ``backbone.fpn``), ``rpn.head.*`` and
    ``roi_heads.*`` (with :func:`~fdet.models.detectors.two_stage.roi_heads.rename_torchvision_keys`
    for the box head).

    Args:
        backbone, neck: modules with ``neck(backbone(x))`` returning the pyramid's levels.
        rpn: the :class:`~fdet.models.detectors.two_stage.rpn.RPN` (head and spec), reading
            every pyramid level.
        roi_heads: the :class:`~fdet.models.detectors.two_stage.roi_heads.RoIHeads`, built for
            all pyramid levels (``feature_levels``); it pools from its own ``levels``.
        roi_spec: the :class:`fdet.specs.RoIHead` of the stage (sampling, losses, postprocess).
        num_classes: object classes (without the background).
        pool_levels: levels appended to the neck's by :func:`max_pool_levels`.
        mean, std, input_range: input normalization, ``(x / input_range - mean) / std``.
    """

    box_terms = frozenset({"rpn_box", "roi_box"})
    """The RPN's and the RoI head's box regressions."""

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        rpn: RPN,
        roi_heads: RoIHeads,
        roi_spec: specs.RoIHead,
        num_classes: int,
        pool_levels: int = 1,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_range: float = 255.0,
    ) -> None:
        super().__init__(mean=mean, std=std, input_range=input_range)
        if getattr(roi_heads, "num_classes", num_classes) != num_classes:
            raise ValueError(
                f"the RoI heads predict {roi_heads.num_classes} classes, not {num_classes}"
            )
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.roi_spec = roi_spec
        self.num_classes = int(num_classes)
        self.pool_levels = int(pool_levels)

    # --- the contract (``forward``: :class:`TwoStageDetector`) -----------------------------------

    def training_outputs(
        self,
        outputs: FasterRCNNOutputs,
        batch: Targets,
        *,
        roi_keys: Float[Tensor, "B N"] | None = None,
    ) -> FasterRCNNTraining:
        """The second stage of a training step: proposals of ``outputs`` (the training or
        testing top-k, as the module's mode says; clipped to ``batch.image_sizes`` where the
        batch has them, else to the padded size), the RoIs sampled from them against the
        batch's ground truth (:func:`~fdet.models.detectors.two_stage.roi_heads.roi_targets`;
        ``roi_keys[B, R + M]`` fix the draw) and the RoI head's outputs on those RoIs."""
        proposals = self.rpn.proposals(outputs.rpn, self.batch_image_sizes(outputs, batch))
        sampled = roi_targets(
            proposals.boxes,
            proposals.valid,
            batch.gt_boxes,
            batch.gt_labels,
            batch.gt_valid,
            getattr(batch, "gt_crowd", None),
            spec=self.roi_spec,
            keys=roi_keys,
        )
        with autocast_like(outputs.features):
            roi = self.roi_heads(outputs.features, sampled.boxes)
        return FasterRCNNTraining(proposals=proposals, sampled=sampled, roi=roi)

    def loss(
        self,
        outputs: FasterRCNNOutputs,
        batch: Targets,
        *,
        rpn_keys: Float[Tensor, "B A"] | None = None,
        roi_keys: Float[Tensor, "B N"] | None = None,
    ) -> LossTerms:
        """The Faster R-CNN objective against ``batch``'s ``gt_boxes``, ``gt_labels``,
        ``gt_valid`` and ``gt_crowd`` (which may be missing or None):

        - ``"rpn_cls"``, ``"rpn_box"``: :func:`~fdet.models.detectors.two_stage.rpn.rpn_loss`
          (one count: the sampled anchors; ``rpn_keys[B, A]`` fix the draw);
        - ``"roi_cls"``, ``"roi_box"``:
          :func:`~fdet.models.detectors.two_stage.roi_heads.roi_loss` of the RoI head on the
          RoIs of :meth:`training_outputs` (one count: the sampled RoIs).

        Images without objects give finite terms (negatives and background only).
        """
        terms: dict[str, Term] = dict(self.rpn.loss(outputs.rpn, batch, keys=rpn_keys))
        second = self.training_outputs(outputs, batch, roi_keys=roi_keys)
        terms.update(roi_loss(second.roi, second.sampled, spec=self.roi_spec))
        return terms

    def postprocess(
        self,
        outputs: FasterRCNNOutputs,
        image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    ) -> Detections:
        """Detections ``[B, roi_spec.postprocess.max_detections]``: the proposals (the testing
        top-k in eval mode), the RoI head on them, then
        :func:`~fdet.models.detectors.two_stage.roi_heads.roi_postprocess` (softmax scores,
        class-specific boxes clipped to ``image_sizes`` (height, width), NMS per class)."""
        proposals = self.rpn.proposals(outputs.rpn, image_sizes)
        with autocast_like(outputs.features):
            roi = self.roi_heads(outputs.features, proposals.boxes)
        return roi_postprocess(
            roi, proposals.boxes, proposals.valid, image_sizes, spec=self.roi_spec
        )

    # --- for a semi-supervised teacher ------------------------------------------------------------

    def refine_boxes(
        self,
        outputs: FasterRCNNOutputs,
        boxes: Float[Tensor, "B N 4"],
        labels: Int[Tensor, "B N"],
        image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    ) -> Float[Tensor, "B N 4"]:
        """The RoI head's refinement of given boxes: what the teacher does to jittered boxes
        to measure how reliable a box is (Soft Teacher's box jitter,
        :func:`fdet.ops.pseudo.jitter_std`).

        The RoI head runs on ``boxes`` as its RoIs (pooled from ``outputs.features`` as in
        :meth:`postprocess`, under the features' autocast), and each box is decoded with the
        deltas of its class ``labels`` (``0 .. K-1``; the single column of a class-agnostic
        head) by the stage's coder, as
        :func:`~fdet.models.detectors.two_stage.roi_heads.roi_postprocess` decodes a
        detection's box, then clipped to ``image_sizes`` (height, width). Float32, without
        gradient; padded rows give finite boxes for the caller to mask.
        """
        with autocast_like(outputs.features):
            roi = self.roi_heads(outputs.features, boxes)
        deltas = select_class_deltas(roi.box_deltas.detach().float(), labels.long() + 1)
        coder = self.roi_spec.coder
        decoded = decode_deltas(
            boxes.detach().float(), deltas, means=coder.means, stds=coder.stds, clip=coder.clip
        )  # [B, N, 4]
        return clip_boxes(decoded, image_sizes)


@register(specs.FasterRCNN)
def build_faster_rcnn(spec: specs.FasterRCNN) -> FasterRCNN:
    """A :class:`FasterRCNN` with the modules and the hyperparameters of ``spec``."""
    channels = spec.neck.channels
    return FasterRCNN(
        backbone=build(spec.backbone),
        neck=build(
            spec.neck,
            in_channels=spec.backbone.out_channels,
            input_levels=spec.backbone.out_levels,
        ),
        rpn=build(spec.rpn, in_channels=channels),
        roi_heads=build(
            spec.roi_head,
            in_channels=channels,
            num_classes=spec.num_classes,
            feature_levels=spec.pyramid_levels,
        ),
        roi_spec=spec.roi_head,
        num_classes=spec.num_classes,
        pool_levels=spec.max_pool_levels,
        mean=spec.normalize.mean,
        std=spec.normalize.std,
        input_range=spec.normalize.input_range,
    )
