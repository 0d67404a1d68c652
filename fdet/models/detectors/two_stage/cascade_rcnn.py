"""Cascade R-CNN (Cai & Vasconcelos 2018) on the detector contract: Faster R-CNN's backbone,
FPN and region proposal network, then ``T`` Fast R-CNN stages, each trained at a higher IoU
threshold on the boxes that the stage before it refined; Cascade Mask R-CNN adds one mask head
on the last stage's RoIs.

    outputs = detector(images)            # FasterRCNNOutputs: pyramid features + RPN outputs
    terms = detector.loss(outputs, batch)
        # RPN loss; proposals (training top-k, detached);
        # stage t: RoIs sampled from its candidates (+ the gts) with stage t's assigner,
        #          its head on them, its loss "roi{t}_cls" / "roi{t}_box" (weights times
        #          stage_weights[t]),
        #          the sampled RoIs regressed by its deltas, clipped, detached, the gts taken out:
        #          stage t + 1's candidates
        # (Cascade Mask R-CNN) the "mask" term on the last stage's sampled positives
    detections = detector.postprocess(outputs, image_sizes)
        # proposals (testing top-k) -> stage 0 -> refine -> stage 1 -> ... -> stage T-1;
        # scores: the mean of the stages' softmax probabilities; boxes: the last stage's
        # deltas on its RoIs; NMS per class (then masks at the detections)

Every stage is the same pure functions as Faster R-CNN's one
(:func:`~fdet.models.detectors.two_stage.roi_heads.roi_targets`,
:func:`~fdet.models.detectors.two_stage.roi_heads.roi_loss`,
:func:`~fdet.models.detectors.two_stage.roi_heads.roi_postprocess`) with that stage's
:class:`fdet.specs.RoIHead`; what the cascade adds is :func:`refine_rois` between stages,
:func:`next_candidates` in training and :func:`cascade_scores` at test time. Everything is
batched with static shapes (stage ``t + 1`` samples from ``S_t`` refined slots an image plus the
gt slots) and no host sync: ``loss`` and ``postprocess`` run under
``torch.compile(fullgraph=True)``. docs/cascade_rcnn.md puts the equations next to the
functions.

Parameter names: ``backbone.*``, ``neck.*``, ``rpn.head.*`` as in Faster R-CNN;
``roi_heads.{t}.*`` for stage ``t`` (each a
:class:`~fdet.models.detectors.two_stage.roi_heads.RoIHeads`); ``mask_head.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import LossTerms, Targets, Term
from fdet.models.detectors.two_stage.faster_rcnn import (
    FasterRCNNOutputs,
    TwoStageDetector,
    autocast_like,
)
from fdet.models.detectors.two_stage.mask_head import MaskHead
from fdet.models.detectors.two_stage.roi_heads import (
    RoIHeads,
    RoIOutputs,
    roi_loss,
    roi_postprocess,
    roi_targets,
)
from fdet.models.detectors.two_stage.rpn import RPN
from fdet.ops.boxes import ImageSize, clip_boxes
from fdet.ops.coding import decode_deltas
from fdet.ops.postprocess import Detections
from fdet.ops.proposals import Proposals
from fdet.ops.roi import SampledRoIs, select_class_deltas
from fdet.registry import build, register
from fdet.specs.cascade import ScoreRoIs

__all__ = [
    "CascadeRCNN",
    "CascadeStage",
    "CascadeTraining",
    "build_cascade_rcnn",
    "cascade_scores",
    "next_candidates",
    "refine_rois",
]


class CascadeStage(NamedTuple):
    """One training stage: the candidates it sampled from (the gts are appended to them by
    its spec), the sampled RoIs, its head's outputs on them, and those RoIs regressed by its
    deltas (the next stage's candidates, with their validity)."""

    candidates: Float[Tensor, "B R 4"]
    candidate_valid: Bool[Tensor, "B R"]
    sampled: SampledRoIs
    roi: RoIOutputs
    refined: Float[Tensor, "B S 4"]
    refined_valid: Bool[Tensor, "B S"]


class CascadeTraining(NamedTuple):
    """The intermediate results of :meth:`CascadeRCNN.training_outputs`: the proposals and
    one :class:`CascadeStage` a stage."""

    proposals: Proposals
    stages: tuple[CascadeStage, ...]


# ---------------------------------------------------------------------------------------------
# Pure functions of the cascade
# ---------------------------------------------------------------------------------------------


def refine_rois(
    outputs: RoIOutputs,
    boxes: Float[Tensor, "B R 4"],
    image_sizes: ImageSize | Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    spec: specs.RoIHead,
    labels: Int[Tensor, "B R"] | None = None,
) -> Float[Tensor, "B R 4"]:
    """The RoIs ``boxes`` regressed by the stage's deltas: the boxes the next stage takes.

    ``b' = clip(decode(b, t[c], means, stds, clip))``, detached, in float32: ``t[c]`` is the
    class-agnostic column, or with class-specific deltas the column of class ``c = labels``
    (``1 + k``, e.g. the sampled RoIs' targets where positive) or, without ``labels``, of the
    best foreground class ``1 + argmax_k p[1 + k]``. Clipped to ``image_sizes`` (height,
    width). Padded rows give finite garbage for the caller to mask.
    """
    deltas = outputs.box_deltas.detach().float()  # [B, R, C, 4]
    if labels is None and deltas.shape[2] > 1:
        labels = outputs.class_logits.detach()[..., 1:].argmax(dim=-1) + 1  # [B, R]
    if labels is None:
        labels = torch.zeros(boxes.shape[:2], dtype=torch.int64, device=boxes.device)
    chosen = select_class_deltas(deltas, labels)  # [B, R, 4]
    decoded = decode_deltas(
        boxes.detach().float(),
        chosen,
        means=spec.coder.means,
        stds=spec.coder.stds,
        clip=spec.coder.clip,
    )
    return clip_boxes(decoded, image_sizes)


def next_candidates(
    sampled: SampledRoIs, refined: Float[Tensor, "B S 4"], *, num_candidates: int
) -> tuple[Float[Tensor, "B S 4"], Bool[Tensor, "B S"]]:
    """The next stage's candidates in training: the sampled RoIs' refined boxes, valid where the
    slot was sampled and held one of the ``num_candidates`` candidates rather than an appended
    gt (``roi_index < num_candidates``). The gts join the next stage's candidates afresh
    (its spec's ``add_gt_boxes``), not as their refined boxes, so each gt counts once. Invalid
    slots hold zero boxes."""
    valid = sampled.valid & (sampled.roi_index < num_candidates)  # [B, S]
    return torch.where(valid[..., None], refined, 0.0), valid


def cascade_scores(
    class_logits: Sequence[Float[Tensor, "B R K+1"]],
) -> Float[Tensor, "B R K+1"]:
    """The ensemble of the stages' classifiers: ``p = 1/T Σ_t softmax(s_t)`` over the ``K + 1``
    classes (0 = background), in float32."""
    probs = [torch.softmax(logits.float(), dim=-1) for logits in class_logits]
    return torch.stack(probs).mean(dim=0)


# ---------------------------------------------------------------------------------------------
# The detector
# ---------------------------------------------------------------------------------------------


class CascadeRCNN(TwoStageDetector):
    """A Cascade R-CNN (Cascade Mask R-CNN with ``mask_head``) on the detector contract; see
    the module docstring for the flow.

    Args:
        backbone, neck: modules with ``neck(backbone(x))`` returning the pyramid's levels.
        rpn: the :class:`~fdet.models.detectors.two_stage.rpn.RPN`.
        roi_heads: one :class:`~fdet.models.detectors.two_stage.roi_heads.RoIHeads` a stage,
            built for all pyramid levels.
        stage_specs: the :class:`fdet.specs.RoIHead` of each stage (sampling, coder, losses;
            the last one's postprocess).
        stage_weights: the factor of each stage's loss terms.
        num_classes: object classes (without the background).
        score_rois: ``"last"`` or ``"own"`` (:class:`fdet.specs.CascadeRCNN`).
        mask_head: the mask branch (:class:`~fdet.models.detectors.two_stage.mask_head.MaskHead`)
            or None.
        paste_masks: with a mask head, whether :meth:`postprocess` pastes the masks into the
            input (boolean ``[B, N, H, W]``) or leaves box-frame probabilities ``[B, N, m, m]``
            (what evaluation takes; the default).
        pool_levels: levels appended to the neck's by
            :func:`~fdet.models.detectors.two_stage.faster_rcnn.max_pool_levels`.
        mean, std, input_range: input normalization, ``(x / input_range - mean) / std``.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        rpn: RPN,
        roi_heads: Sequence[RoIHeads],
        stage_specs: Sequence[specs.RoIHead],
        stage_weights: Sequence[float],
        num_classes: int,
        score_rois: ScoreRoIs = "last",
        mask_head: MaskHead | None = None,
        paste_masks: bool = False,
        pool_levels: int = 1,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_range: float = 255.0,
    ) -> None:
        super().__init__(mean=mean, std=std, input_range=input_range)
        if not len(roi_heads) == len(stage_specs) == len(stage_weights) > 0:
            raise ValueError(
                f"{len(roi_heads)} RoI heads, {len(stage_specs)} stage specs and "
                f"{len(stage_weights)} stage weights: one of each a stage, at least one stage"
            )
        for t, head in enumerate(roi_heads):
            if getattr(head, "num_classes", num_classes) != num_classes:
                raise ValueError(
                    f"the RoI heads of stage {t} predict {head.num_classes} classes, "
                    f"not {num_classes}"
                )
        if score_rois not in ("last", "own"):
            raise ValueError(f"score_rois must be 'last' or 'own', got {score_rois!r}")
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = nn.ModuleList(roi_heads)
        self.stage_specs = tuple(stage_specs)
        self.stage_weights = tuple(float(w) for w in stage_weights)
        self.num_classes = int(num_classes)
        self.score_rois = score_rois
        self.mask_head: MaskHead | None = mask_head
        self.paste_masks = bool(paste_masks)
        self.pool_levels = int(pool_levels)
        # the terms that learn box geometry (Detector.box_terms): the RPN's and every stage's box
        # regression, and the mask (cropped by the gt boxes; it needs gt masks)
        self.box_terms = frozenset(
            {"rpn_box", *(f"roi{t}_box" for t in range(self.num_stages))}
            | ({"mask"} if mask_head is not None else set())
        )

    @property
    def num_stages(self) -> int:
        return len(self.stage_specs)

    # --- the contract ---------------------------------------------------------------------------

    def training_outputs(
        self,
        outputs: FasterRCNNOutputs,
        batch: Targets,
        *,
        roi_keys: Sequence[Float[Tensor, "B N"] | None] | None = None,
    ) -> CascadeTraining:
        """The stages of a training step. Stage 0's candidates are the proposals of
        ``outputs`` (the training or testing top-k, as the module's mode says, clipped to
        ``batch.image_sizes`` where the batch has them, else to the padded size); stage ``t``
        samples RoIs from its candidates against the batch's ground truth
        (:func:`~fdet.models.detectors.two_stage.roi_heads.roi_targets` with its spec;
        ``roi_keys[t]``, ``[B, R_t + M]``, fixes its draw), runs its head on them, and its
        :func:`refine_rois` of them (the positives by their target class) minus the appended
        gts are stage ``t + 1``'s candidates (:func:`next_candidates`): ``R_{t+1} = S_t``."""
        if roi_keys is not None and len(roi_keys) != self.num_stages:
            raise ValueError(f"roi_keys: expected {self.num_stages} entries, got {len(roi_keys)}")
        image_sizes = self.batch_image_sizes(outputs, batch)
        proposals = self.rpn.proposals(outputs.rpn, image_sizes)
        boxes, valid = proposals.boxes.detach(), proposals.valid
        gt_crowd = getattr(batch, "gt_crowd", None)
        stages: list[CascadeStage] = []
        for t, (head, spec) in enumerate(zip(self.roi_heads, self.stage_specs)):  # stages
            sampled = roi_targets(
                boxes,
                valid,
                batch.gt_boxes,
                batch.gt_labels,
                batch.gt_valid,
                gt_crowd,
                spec=spec,
                keys=None if roi_keys is None else roi_keys[t],
            )
            with autocast_like(outputs.features):
                roi = head(outputs.features, sampled.boxes)
            labels = torch.where(
                sampled.positive, sampled.labels, roi.class_logits.detach()[..., 1:].argmax(-1) + 1
            )
            refined = refine_rois(roi, sampled.boxes, image_sizes, spec=spec, labels=labels)
            refined, refined_valid = next_candidates(
                sampled, refined, num_candidates=boxes.shape[1]
            )
            stages.append(CascadeStage(boxes, valid, sampled, roi, refined, refined_valid))
            boxes, valid = refined, refined_valid
        return CascadeTraining(proposals=proposals, stages=tuple(stages))

    def loss(
        self,
        outputs: FasterRCNNOutputs,
        batch: Targets,
        *,
        rpn_keys: Float[Tensor, "B A"] | None = None,
        roi_keys: Sequence[Float[Tensor, "B N"] | None] | None = None,
    ) -> LossTerms:
        """The Cascade R-CNN objective against ``batch``'s ``gt_boxes``, ``gt_labels``,
        ``gt_valid`` and ``gt_crowd`` (which may be missing or None):

        - ``"rpn_cls"``, ``"rpn_box"``: the RPN's (``rpn_keys[B, A]`` fix its draw);
        - ``"roi{t}_cls"``, ``"roi{t}_box"`` for each stage ``t``:
          :func:`~fdet.models.detectors.two_stage.roi_heads.roi_loss` of stage ``t``'s head on
          its sampled RoIs (:meth:`training_outputs`), each weight times
          ``stage_weights[t]``; one count a stage (its sampled RoIs);
        - ``"mask"`` (with a mask head): the mask head's term on the last stage's sampled
          RoIs against ``batch.gt_masks``.

        Images without objects give finite terms (background only).
        """
        terms: dict[str, Term] = dict(self.rpn.loss(outputs.rpn, batch, keys=rpn_keys))
        second = self.training_outputs(outputs, batch, roi_keys=roi_keys)
        for t, stage in enumerate(second.stages):  # a loop over stages
            stage_terms = roi_loss(
                stage.roi, stage.sampled, spec=self.stage_specs[t], prefix=f"roi{t}"
            )
            factor = self.stage_weights[t]
            terms.update(
                {
                    name: term._replace(weight=term.weight * factor)
                    for name, term in stage_terms.items()
                }
            )
        if self.mask_head is not None:
            with autocast_like(outputs.features):
                terms["mask"] = self.mask_head.loss(
                    outputs.features, second.stages[-1].sampled, getattr(batch, "gt_masks", None)
                )
        return terms

    def postprocess(
        self,
        outputs: FasterRCNNOutputs,
        image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    ) -> Detections:
        """Detections ``[B, stages[-1].postprocess.max_detections]``: the proposals (the
        testing top-k in eval mode), stage 0 on them, :func:`refine_rois` (the best foreground
        class's deltas when class-specific), stage 1 on those, and so on; the scores
        :func:`cascade_scores` of every stage's head on the last stage's RoIs
        (``score_rois="last"``) or on its own (``"own"``); the last stage's deltas on its RoIs;
        then :func:`~fdet.models.detectors.two_stage.roi_heads.roi_postprocess` with the last
        stage's spec (NMS per class, boxes clipped to ``image_sizes``). With a mask head, the
        detections' ``masks`` (box-frame probabilities, or pasted with ``paste_masks``)."""
        proposals = self.rpn.proposals(outputs.rpn, image_sizes)
        boxes, valid = proposals.boxes, proposals.valid
        features = outputs.features
        logits: list[Tensor] = []
        last = self.num_stages - 1
        with autocast_like(features):
            for t, (head, spec) in enumerate(zip(self.roi_heads, self.stage_specs)):  # stages
                roi = head(features, boxes)
                if t < last:
                    if self.score_rois == "own":
                        logits.append(roi.class_logits)
                    boxes = refine_rois(roi, boxes, image_sizes, spec=spec)
            if self.score_rois == "last":
                logits.extend(head(features, boxes).class_logits for head in self.roi_heads[:last])
        logits.append(roi.class_logits)
        scores = cascade_scores(logits)  # [B, R, K + 1]
        # roi_detections takes logits: log p gives back p under its softmax (p sums to 1)
        final = RoIOutputs(class_logits=scores.log(), box_deltas=roi.box_deltas)
        detections = roi_postprocess(final, boxes, valid, image_sizes, spec=self.stage_specs[-1])
        if self.mask_head is not None:
            with autocast_like(features):
                detections = self.mask_head.postprocess(
                    features,
                    detections,
                    image_sizes,
                    padded_size=outputs.image_size,
                    paste=self.paste_masks,
                )
        return detections

    # --- for a semi-supervised teacher ------------------------------------------------------------

    def refine_boxes(
        self,
        outputs: FasterRCNNOutputs,
        boxes: Float[Tensor, "B N 4"],
        labels: Int[Tensor, "B N"],
        image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    ) -> Float[Tensor, "B N 4"]:
        """The cascade's refinement of given boxes: what the teacher does to jittered boxes to
        measure how reliable a box is (Soft Teacher's box jitter,
        :func:`fdet.ops.pseudo.jitter_std`).

        Stage 0 runs on ``boxes`` as its RoIs (pooled from ``outputs.features`` as in
        :meth:`postprocess`, under the features' autocast) and :func:`refine_rois` decodes its
        deltas onto them (the class-agnostic column, or with class-specific deltas the column
        of the box's class ``labels``, ``0 .. K-1``), clipped to ``image_sizes`` (height,
        width); stage 1 runs on those boxes, and so on: the last stage's boxes are returned.
        Float32, without gradient; padded rows give finite boxes for the caller to mask.
        """
        columns = labels.long() + 1  # [B, N], the deltas' column of each box's class
        boxes = boxes.detach().float()
        with autocast_like(outputs.features):
            for head, spec in zip(self.roi_heads, self.stage_specs):  # stages
                roi = head(outputs.features, boxes)
                boxes = refine_rois(roi, boxes, image_sizes, spec=spec, labels=columns)
        return boxes


@register(specs.CascadeRCNN)
def build_cascade_rcnn(spec: specs.CascadeRCNN) -> CascadeRCNN:
    """A :class:`CascadeRCNN` with the modules and the hyperparameters of ``spec``."""
    channels = spec.neck.channels
    levels = spec.pyramid_levels
    mask_head = None
    if spec.mask_head is not None:
        mask_head = build(
            spec.mask_head,
            in_channels=channels,
            num_classes=spec.num_classes,
            feature_levels=levels,
        )
    return CascadeRCNN(
        backbone=build(spec.backbone),
        neck=build(
            spec.neck,
            in_channels=spec.backbone.out_channels,
            input_levels=spec.backbone.out_levels,
        ),
        rpn=build(spec.rpn, in_channels=channels),
        roi_heads=[
            build(stage, in_channels=channels, num_classes=spec.num_classes, feature_levels=levels)
            for stage in spec.stages
        ],
        stage_specs=spec.stages,
        stage_weights=spec.stage_weights,
        num_classes=spec.num_classes,
        score_rois=spec.score_rois,
        mask_head=mask_head,
        pool_levels=spec.max_pool_levels,
        mean=spec.normalize.mean,
        std=spec.normalize.std,
        input_range=spec.normalize.input_range,
    )
