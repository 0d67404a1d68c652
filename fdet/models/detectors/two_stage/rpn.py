"""The region proposal network (RPN) of two-stage detectors: a small head over every pyramid
level scoring anchors for objectness and regressing them, its objective (max-IoU assignment,
balanced sampling, binary cross-entropy and smooth L1) and its proposals (top-k per level,
decode, NMS per level, the best overall), as pure functions of a padded batch::

    outputs = rpn(features, image_size=(H, W))        # RPNOutputs: objectness [B, A], anchors
    terms = rpn_loss(outputs, gt_boxes, gt_valid, gt_crowd, spec=spec)  # {"rpn_cls", "rpn_box"}
    proposals = rpn_proposals(outputs, image_sizes, spec=spec, training=False)  # Proposals [B, R]

:class:`RPN` holds the head and the spec; ``rpn.loss(outputs, batch)`` and
``rpn.proposals(outputs, image_sizes)`` call the functions above with its spec (proposals with
the training or testing top-k as the module's mode says). Everything is batched, static in shape
and free of host syncs (NMS is one custom operator), so it runs under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.models.detectors.base import Term
from fdet.models.detectors.dense import box_coder, box_loss_per_anchor, matched_targets
from fdet.models.detectors.retinanet import retinanet_anchors, retinanet_assign
from fdet.ops.anchors import level_counts
from fdet.ops.assign import NEGATIVE, POSITIVE, Assignment
from fdet.ops.losses import masked_sum
from fdet.ops.proposals import Proposals, generate_proposals
from fdet.ops.sample import Sampled, sample_balanced
from fdet.registry import register

__all__ = [
    "RPN",
    "RPNHead",
    "RPNHeadOutputs",
    "RPNOutputs",
    "RPNTargets",
    "build_rpn",
    "rpn_anchors",
    "rpn_loss",
    "rpn_proposals",
    "rpn_targets",
]

_SPEC = specs.RPN()


class RPNHeadOutputs(NamedTuple):
    """What :class:`RPNHead` predicts, levels concatenated in anchor order (row-major locations,
    then the anchors of each location: the order of :func:`fdet.ops.anchors.grid_anchors`)."""

    objectness: Float[Tensor, "B A"]  # logits
    deltas: Float[Tensor, "B A 4"]
    feature_sizes: tuple[tuple[int, int], ...]  # (H_l, W_l) of each level


class RPNOutputs(NamedTuple):
    """What :class:`RPN` returns: the head's predictions and the anchors they refer to.

    ``num_per_level`` (``H_l · W_l · a`` a level) and ``image_size`` (the padded input size the
    anchors were placed for, or None) are Python values: static under ``torch.compile``.
    """

    objectness: Float[Tensor, "B A"]
    deltas: Float[Tensor, "B A 4"]
    anchors: Float[Tensor, "A 4"]
    num_per_level: tuple[int, ...]
    feature_sizes: tuple[tuple[int, int], ...]
    image_size: tuple[int, int] | None = None


class RPNHead(nn.Module):
    """``num_convs`` 3×3 convs with ReLU at ``in_channels`` channels, shared over the levels,
    then two 1×1 predictors: ``num_anchors`` objectness logits and ``num_anchors × 4`` deltas a
    location.

    Parameters are named as in torchvision's ``RPNHead`` (``conv.{i}.0``, ``cls_logits``,
    ``bbox_pred``), so its state dict loads as it is. Weights start normal with std 0.01, biases
    at 0, as there.
    """

    def __init__(self, *, in_channels: int, num_anchors: int, num_convs: int = 1) -> None:
        super().__init__()
        self.num_anchors = num_anchors
        self.conv = nn.Sequential(
            *(
                nn.Sequential(
                    nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True)
                )
                for _ in range(num_convs)
            )
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]

    def forward(self, features: Sequence[Float[Tensor, "B C H W"]]) -> RPNHeadOutputs:
        logits, deltas, sizes = [], [], []
        a = self.num_anchors
        for x in features:  # a loop over pyramid levels
            t = self.conv(x)
            b, _, h, w = t.shape
            # [B, a, H, W] -> [B, H, W, a] -> [B, H*W*a]
            logits.append(self.cls_logits(t).permute(0, 2, 3, 1).reshape(b, h * w * a))
            # [B, a*4, H, W] -> [B, a, 4, H, W] -> [B, H, W, a, 4] -> [B, H*W*a, 4]
            box = self.bbox_pred(t).view(b, a, 4, h, w).permute(0, 3, 4, 1, 2)
            deltas.append(box.reshape(b, h * w * a, 4))
            sizes.append((int(h), int(w)))
        return RPNHeadOutputs(torch.cat(logits, dim=1), torch.cat(deltas, dim=1), tuple(sizes))


def rpn_anchors(
    feature_sizes: Sequence[tuple[int, int]],
    *,
    spec: specs.Anchors,
    image_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> Float[Tensor, "A 4"]:
    """The anchors of every level in the head's order: the same grid as RetinaNet's
    (:func:`fdet.models.detectors.retinanet.retinanet_anchors`, which see for ``placement``)."""
    return retinanet_anchors(feature_sizes, spec=spec, image_size=image_size, device=device)


class RPNTargets(NamedTuple):
    """The per-anchor training targets of a batch: the assignment and the sampled anchors."""

    assignment: Assignment
    sampled: Sampled


def _with_one_slot(
    gt_boxes: Tensor, gt_valid: Tensor, gt_crowd: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A batch with no gt slots gets one padded slot (a static decision on the shape)."""
    if gt_valid.shape[1] > 0:
        return gt_boxes, gt_valid, gt_crowd
    batch = gt_valid.shape[0]
    crowd = None if gt_crowd is None else gt_crowd.new_zeros(batch, 1)
    return gt_boxes.new_zeros(batch, 1, 4), gt_valid.new_zeros(batch, 1), crowd


def rpn_targets(
    anchors: Float[Tensor, "A 4"],
    gt_boxes: Float[Tensor, "B M 4"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    assigner: specs.MaxIoUAssigner = _SPEC.assigner,
    sampler: specs.Sampler = _SPEC.sampler,
    keys: Float[Tensor, "B A"] | None = None,
    generator: torch.Generator | None = None,
) -> RPNTargets:
    """Max-IoU assignment of the anchors (:func:`fdet.ops.assign.assign_max_iou` with the
    ``assigner`` spec: crowd gts never matched, anchors covered by crowds IGNORE), then a
    balanced sample of the POSITIVE and NEGATIVE anchors of each image
    (:func:`fdet.ops.sample.sample_balanced` with the ``sampler`` spec; ``keys`` fix the draw).
    An image without valid gts samples negatives only."""
    assignment = retinanet_assign(anchors, gt_boxes, gt_valid, gt_crowd, assigner=assigner)
    sampled = sample_balanced(
        assignment.label == POSITIVE,
        assignment.label == NEGATIVE,
        num_samples=sampler.num_samples,
        positive_fraction=sampler.positive_fraction,
        keys=keys,
        generator=generator,
    )
    return RPNTargets(assignment, sampled)


def rpn_loss(
    outputs: RPNOutputs,
    gt_boxes: Float[Tensor, "B M 4"],
    gt_valid: Bool[Tensor, "B M"],
    gt_crowd: Bool[Tensor, "B M"] | None = None,
    *,
    spec: specs.RPN = _SPEC,
    keys: Float[Tensor, "B A"] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Term]:
    """The RPN objective of a padded batch, as the loss terms ``"rpn_cls"`` and ``"rpn_box"``.

    1. Targets (:func:`rpn_targets`): max-IoU labels with ``spec.assigner``, then per image
       ``spec.sampler.num_samples`` anchors, at most ``positive_fraction`` of them positive
       (drawn uniformly; ``keys[B, A]`` or ``generator`` fix the draw).
    2. ``"rpn_cls"``: binary cross-entropy of the objectness logit against 1 (sampled
       positives) or 0 (sampled negatives), summed over the sampled anchors, weight
       ``spec.objectness_weight``.
    3. ``"rpn_box"``: ``spec.box_loss`` (smooth L1 with ``beta = 1/9``: summed over the 4
       deltas, against the matched gt encoded with ``spec.coder``) over the sampled positives,
       summed, weight ``spec.box_loss.weight``.
    4. Both terms share one count tensor: the number of sampled anchors in the batch. So
       ``term.value()`` is torchvision's ``loss_objectness`` (a mean over the sampled anchors)
       and ``loss_rpn_box_reg`` (a sum over the positives divided by the sampled count).

    Images without valid gts contribute negatives only; a batch without gts gives a box total of
    0. Returns float32 scalars, also for float16/bfloat16 outputs.
    """
    gt_boxes, gt_valid, gt_crowd = _with_one_slot(gt_boxes, gt_valid, gt_crowd)
    objectness = outputs.objectness.float()  # [B, A]
    deltas = outputs.deltas.float()  # [B, A, 4]
    anchors = outputs.anchors.float()  # [A, 4]
    if objectness.shape[1] != anchors.shape[0]:
        raise ValueError(
            f"the head predicts for {objectness.shape[1]} anchors but there are "
            f"{anchors.shape[0]} anchors"
        )
    gt_boxes = gt_boxes.float()
    targets = rpn_targets(
        anchors,
        gt_boxes,
        gt_valid,
        gt_crowd,
        assigner=spec.assigner,
        sampler=spec.sampler,
        keys=keys,
        generator=generator,
    )
    positive, negative = targets.sampled  # [B, A] each
    sampled = positive | negative
    count = sampled.sum(dtype=torch.float32)

    bce = F.binary_cross_entropy_with_logits(objectness, positive.float(), reduction="none")
    cls_total = masked_sum(bce, sampled)

    batch_anchors = anchors.expand_as(deltas)  # [B, A, 4]
    matched = matched_targets(gt_boxes, targets.assignment.gt_index, positive, batch_anchors)
    safe_deltas = torch.where(positive[..., None], deltas, torch.zeros_like(deltas))
    per_anchor = box_loss_per_anchor(
        spec.box_loss, box_coder(spec.coder), safe_deltas, batch_anchors, matched
    )  # [B, A]
    box_total = masked_sum(per_anchor, positive)
    return {
        "rpn_cls": Term(cls_total, count, float(spec.objectness_weight)),
        "rpn_box": Term(box_total, count, float(getattr(spec.box_loss, "weight", 1.0))),
    }


def rpn_proposals(
    outputs: RPNOutputs,
    image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"],
    *,
    spec: specs.RPN = _SPEC,
    training: bool,
) -> Proposals:
    """The proposals of a batch (:func:`fdet.ops.proposals.generate_proposals`): per level the
    ``spec.pre_nms_topk(training)`` best anchors, decoded with ``spec.coder`` and clipped to
    ``image_sizes`` (height, width), small (``spec.min_size``) and low-scoring
    (``spec.score_threshold``, on the probability) ones invalid, NMS per level at
    ``spec.nms_threshold``, then the ``R = spec.post_nms_topk(training)`` best. Scores are
    objectness probabilities. No gradient flows into the proposals."""
    coder = spec.coder
    if not isinstance(coder, specs.DeltaXYWHCoder):  # pragma: no cover - the spec's type
        raise TypeError(f"rpn_proposals decodes DeltaXYWHCoder deltas, got {type(coder)}")
    return generate_proposals(
        outputs.objectness,
        outputs.deltas,
        outputs.anchors,
        outputs.num_per_level,
        image_sizes,
        pre_nms_topk=spec.pre_nms_topk(training),
        post_nms_topk=spec.post_nms_topk(training),
        nms_threshold=spec.nms_threshold,
        min_size=spec.min_size,
        score_threshold=spec.score_threshold,
        means=coder.means,
        stds=coder.stds,
        clip=coder.clip,
    )


class RPN(nn.Module):
    """A region proposal network: the head's parameters and the spec's hyperparameters.

    ``rpn(features, image_size)`` runs the head on the pyramid ``features`` and places the
    anchors (``image_size``: ``(H, W)`` of the padded input, needed by
    ``Anchors(placement="image_ratio")``); :meth:`loss` and :meth:`proposals` apply
    :func:`rpn_loss` and :func:`rpn_proposals` with the spec (the training or testing top-k
    as ``self.training`` says). The spec is a plain attribute; nothing is cached.

    Args:
        head: a module mapping the features to :class:`RPNHeadOutputs`, predicting
            ``spec.anchors.per_location`` anchors a location.
        spec: the :class:`fdet.specs.RPN` hyperparameters.
    """

    def __init__(self, *, head: nn.Module, spec: specs.RPN = _SPEC) -> None:
        super().__init__()
        per_location = getattr(head, "num_anchors", spec.anchors.per_location)
        if per_location != spec.anchors.per_location:
            raise ValueError(
                f"the head predicts {per_location} anchors a location but the anchors spec "
                f"has {spec.anchors.per_location}"
            )
        self.head = head
        self.spec = spec

    def forward(
        self,
        features: Sequence[Float[Tensor, "B C H W"]],
        image_size: tuple[int, int] | None = None,
    ) -> RPNOutputs:
        if len(features) != len(self.spec.anchors.strides):
            raise ValueError(
                f"got {len(features)} feature maps for {len(self.spec.anchors.strides)} anchor "
                f"levels (anchors.strides {self.spec.anchors.strides})"
            )
        head: RPNHeadOutputs = self.head(list(features))
        anchors = rpn_anchors(
            head.feature_sizes,
            spec=self.spec.anchors,
            image_size=image_size,
            device=head.objectness.device,
        )
        counts = level_counts(head.feature_sizes, self.spec.anchors.per_location)
        return RPNOutputs(
            objectness=head.objectness,
            deltas=head.deltas,
            anchors=anchors,
            num_per_level=tuple(counts),
            feature_sizes=head.feature_sizes,
            image_size=image_size,
        )

    def loss(
        self,
        outputs: RPNOutputs,
        batch: Any,
        *,
        keys: Float[Tensor, "B A"] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Term]:
        """:func:`rpn_loss` against ``batch``'s ``gt_boxes``, ``gt_valid`` and ``gt_crowd``
        (which may be missing or None)."""
        return rpn_loss(
            outputs,
            batch.gt_boxes,
            batch.gt_valid,
            getattr(batch, "gt_crowd", None),
            spec=self.spec,
            keys=keys,
            generator=generator,
        )

    def proposals(
        self, outputs: RPNOutputs, image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"]
    ) -> Proposals:
        """:func:`rpn_proposals` with the training or testing top-k, as the module's mode."""
        return rpn_proposals(outputs, image_sizes, spec=self.spec, training=self.training)


@register(specs.RPN)
def build_rpn(spec: specs.RPN, *, in_channels: int) -> RPN:
    """An :class:`RPN` whose head reads ``in_channels``-channel features (the neck's)."""
    head = RPNHead(
        in_channels=in_channels,
        num_anchors=spec.anchors.per_location,
        num_convs=spec.num_convs,
    )
    return RPN(head=head, spec=spec)
