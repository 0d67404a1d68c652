"""torchvision's Faster R-CNN (``fasterrcnn_resnet50_fpn`` and its v2) and Mask R-CNN
(``maskrcnn_resnet50_fpn``) converted to fdet and trained one step on both: the same images,
targets (and instance masks) and sampled anchors and RoIs give the same losses (four, and
Mask R-CNN's ``"mask"``) and the same gradient for every parameter.

Both models run in training mode on a padded batch of two images of different sizes. The
backbone's batch norms (``BatchNorm2d``: the models are built without pretrained weights) and,
in v2, the FPN's and the box head's compute their statistics over the batch, so the inputs they
see must be equal, padding included:

- torchvision's transform resizes nothing here (its ``resize`` is replaced by the identity) and
  pads after normalizing, with zeros; fdet normalizes the padded batch, so its padding holds the
  normalization mean, which normalizes to exactly zero;
- both samplers make the same choice: fdet's keys decide; torchvision's ``fg_bg_sampler`` (of
  the RPN and of the RoI heads) is replaced by one that returns fdet's draw, mapped onto
  torchvision's candidates (an image's valid proposals, found among fdet's by their boxes:
  the two lists agree up to the order of tied scores, then its valid gts);
- fdet pads an image's RoI sample when it has fewer candidates than
  ``box_batch_size_per_image``. The v1 box head (two fully connected layers) treats each row
  alone, so the v1 case samples more RoIs than the images have (padded slots in both images)
  and must still agree. The v2 box head's batch norm computes its statistics over every row it
  is given, padded rows included, where torchvision's sees the sampled RoIs only (the losses
  then differ by about 1 %, the gradients by far more); so the v2 case samples fewer RoIs than
  every image has, and asserts that no slot is padded;
- Mask R-CNN's masks are ellipses inside the boxes, away from the images' edges: fdet's are
  padded to the batch's size with zeros, torchvision's keep each image's size, and RoI Align
  reads the two differently within a pixel past an image's bottom or right edge.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection import (
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
    maskrcnn_resnet50_fpn,
)

from fdet.compat.torchvision import load_torchvision, state_dict_from_torchvision
from fdet.models.detectors.base import term_values
from fdet.models.detectors.two_stage.faster_rcnn import FasterRCNN, FasterRCNNOutputs
from fdet.models.detectors.two_stage.rpn import rpn_targets

K = 3  # object classes
SIZES = ((128, 160), (96, 128))  # (H, W) of the two images; the batch is padded to 128 × 160
PADDED = (128, 160)
# RoIs an image: v1 more than an image's proposals + gts (padded slots, which must change
# nothing), v2 fewer (no padded slot: they would enter its box head's batch norm statistics)
ROI_SAMPLES = {"v1": 160, "v2": 64, "mask": 64}
TERMS = {  # fdet's term: torchvision's loss
    "rpn_cls": "loss_objectness",
    "rpn_box": "loss_rpn_box_reg",
    "roi_cls": "loss_classifier",
    "roi_box": "loss_box_reg",
}
MASK_TERMS = {**TERMS, "mask": "loss_mask"}
GT_BOXES = torch.tensor(  # [B, M, 4]; image 1 has two gts and one padded slot
    [
        [[10.0, 20.0, 90.0, 100.0], [95.0, 30.0, 155.0, 120.0], [40.0, 60.0, 70.0, 90.0]],
        [[5.0, 5.0, 60.0, 50.0], [70.0, 40.0, 125.0, 90.0], [0.0, 0.0, 0.0, 0.0]],
    ]
)
GT_LABELS = torch.tensor([[0, 2, 1], [1, 0, 0]])  # fdet's classes 0 .. K-1
GT_VALID = torch.tensor([[True, True, True], [True, True, False]])


class Step(NamedTuple):
    """One training step of both models: their loss values and their gradients by fdet's
    parameter name."""

    fdet: dict[str, Tensor]
    tv: dict[str, Tensor]
    fdet_grads: dict[str, Tensor]
    tv_grads: dict[str, Tensor]
    roi_samples: Tensor  # [B] valid sampled RoIs an image (fdet)
    roi_slots: int  # the sample size an image, S
    version: str
    terms: dict[str, str]  # fdet's term: torchvision's loss


def make_pair(version: str) -> tuple[TVFasterRCNN, FasterRCNN]:
    torch.manual_seed(0)
    make = {
        "v1": fasterrcnn_resnet50_fpn,
        "v2": fasterrcnn_resnet50_fpn_v2,
        "mask": maskrcnn_resnet50_fpn,
    }[version]
    tv = make(
        weights=None,
        weights_backbone=None,
        num_classes=K + 1,
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=120,
        rpn_batch_size_per_image=64,
        box_batch_size_per_image=ROI_SAMPLES[version],
    )
    with torch.no_grad():  # an RPN that varies more than its 0.01-std initialisation
        for p in tv.rpn.head.parameters():
            p.normal_(0.0, 0.05)
    tv.transform.resize = lambda image, target=None: (image, target)  # type: ignore[method-assign]
    tv.train()
    det = load_torchvision(tv)
    if version == "mask":  # the mask head on the sample's most positives an image, not all slots
        det.mask_head.max_rois = int(
            ROI_SAMPLES[version] * tv.roi_heads.fg_bg_sampler.positive_fraction
        )
    return tv, det


def images_and_batch(det: FasterRCNN) -> tuple[list[Tensor], Tensor, SimpleNamespace]:
    """torchvision's image list (values in [0, 1]), fdet's padded batch (padding at the
    normalization mean) and fdet's targets."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, h, w, generator=g) for h, w in SIZES]
    padded = det.input_mean.view(3, 1, 1).expand(len(images), 3, *PADDED).clone()
    for b, image in enumerate(images):
        padded[b, :, : image.shape[1], : image.shape[2]] = image
    batch = SimpleNamespace(
        gt_boxes=GT_BOXES,
        gt_labels=GT_LABELS,
        gt_valid=GT_VALID,
        image_sizes=torch.tensor(SIZES),
        gt_masks=ellipse_masks(GT_BOXES, PADDED) & GT_VALID[..., None, None],
    )
    return images, padded, batch


def ellipse_masks(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, M, H, W]`` uint8: the ellipse inscribed in each box (pixel centres inside)."""
    ys = torch.arange(size[0]) + 0.5
    xs = torch.arange(size[1]) + 0.5
    x1, y1, x2, y2 = (c[..., None] for c in boxes.unbind(-1))  # [B, M, 1] each
    dy = ((ys - (y1 + y2) / 2) / ((y2 - y1) / 2).clamp(min=0.5)) ** 2  # [B, M, H]
    dx = ((xs - (x1 + x2) / 2) / ((x2 - x1) / 2).clamp(min=0.5)) ** 2  # [B, M, W]
    return (dy[..., :, None] + dx[..., None, :] <= 1).to(torch.uint8)


def fixed_sampler(
    pos: list[Tensor], neg: list[Tensor], seen: list[Tensor]
) -> Callable[[list[Tensor]], tuple[list[Tensor], list[Tensor]]]:
    """A stand-in for torchvision's ``BalancedPositiveNegativeSampler`` returning the given
    masks (and recording the labels it is called with)."""

    def sampler(labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        seen.extend(labels)
        assert [len(x) for x in labels] == [len(p) for p in pos]
        return [p.to(torch.uint8) for p in pos], [n.to(torch.uint8) for n in neg]

    return sampler


class RoISample(NamedTuple):
    """fdet's RoI sample over its candidates (``[B, R + M]``) and its proposals."""

    positive: Tensor  # [B, R + M] chosen positives
    chosen: Tensor  # [B, R + M] chosen RoIs
    proposals: Tensor  # [B, R, 4]
    proposal_valid: Tensor  # [B, R]
    per_image: Tensor  # [B] sampled RoIs


def fdet_roi_sample(det: FasterRCNN, outputs: FasterRCNNOutputs, batch, keys: Tensor) -> RoISample:
    with torch.no_grad():
        second = det.training_outputs(outputs, batch, roi_keys=keys)
    sampled, proposals = second.sampled, second.proposals
    # slots past the candidates (an image with fewer than S) index padding: never valid
    width = max(keys.shape[1], sampled.roi_index.shape[1])
    empty = torch.zeros(keys.shape[0], width, dtype=torch.bool)
    chosen = empty.scatter(1, sampled.roi_index, sampled.valid)[:, : keys.shape[1]]
    positive = empty.scatter(1, sampled.roi_index, sampled.positive)[:, : keys.shape[1]]
    return RoISample(positive, chosen, proposals.boxes, proposals.valid, sampled.valid.sum(dim=1))


def match_boxes(boxes: Tensor, ours: Tensor) -> Tensor:
    """For each of ``boxes[n, 4]``, a different row of ``ours[n, 4]`` holding the same box
    (within 1e-3 px; equal boxes, e.g. clipped to the same image corner, may pair either way:
    they are the same RoI)."""
    distance = torch.cdist(boxes.double(), ours.double(), p=float("inf"))  # [n, n]
    index = []
    for row in distance:  # the test's bookkeeping
        row = row.clone()
        row[index] = float("inf")
        index.append(int(row.argmin()))
        assert row[index[-1]] <= 1e-3
    return torch.tensor(index, dtype=torch.int64)


def roi_sampler(
    sample: RoISample, gt_valid: Tensor, tv_proposals: list[Tensor], seen: list[Tensor]
) -> Callable[[list[Tensor]], tuple[list[Tensor], list[Tensor]]]:
    """torchvision's RoI sampler returning fdet's draw: each of torchvision's candidates (an
    image's proposals, then its gts) is found among fdet's (the same box; proposals whose scores
    tie may come in another order), and takes fdet's choice."""

    def sampler(labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        seen.extend(labels)
        num_proposals = sample.proposals.shape[1]
        pos, neg = [], []
        for b, proposals in enumerate(tv_proposals):  # the test's bookkeeping, per image
            ours = sample.proposals[b, sample.proposal_valid[b]]
            assert ours.shape == proposals.shape
            index = match_boxes(proposals.detach(), ours)
            gts = num_proposals + torch.nonzero(gt_valid[b])[:, 0]
            index = torch.cat((index, gts))
            assert len(index) == len(labels[b])
            chosen = sample.chosen[b, index]
            assert chosen.sum() == sample.chosen[b].sum()  # every chosen RoI is a candidate
            positive = sample.positive[b, index]
            assert (labels[b][positive] > 0).all() and (labels[b][chosen & ~positive] == 0).all()
            pos.append(positive)
            neg.append(chosen & ~positive)
        return [p.to(torch.uint8) for p in pos], [n.to(torch.uint8) for n in neg]

    return sampler


def train_step(version: str) -> Step:
    tv, det = make_pair(version)
    images, padded, batch = images_and_batch(det)
    outputs = det(padded)
    g = torch.Generator().manual_seed(2)
    rpn_keys = torch.rand(outputs.rpn.objectness.shape, generator=g)
    num_proposals = det.rpn.spec.post_nms_topk(True)
    roi_keys = torch.rand(len(SIZES), num_proposals + GT_VALID.shape[1], generator=g)

    anchors_sampled = rpn_targets(
        outputs.rpn.anchors,
        batch.gt_boxes,
        batch.gt_valid,
        assigner=det.rpn.spec.assigner,
        sampler=det.rpn.spec.sampler,
        keys=rpn_keys,
    ).sampled
    roi_sample = fdet_roi_sample(det, outputs, batch, roi_keys)

    rpn_labels: list[Tensor] = []
    roi_labels: list[Tensor] = []
    tv.rpn.fg_bg_sampler = fixed_sampler(  # type: ignore[assignment]
        list(anchors_sampled.positive), list(anchors_sampled.negative), rpn_labels
    )
    tv_proposals: list[Tensor] = []
    tv.roi_heads.fg_bg_sampler = roi_sampler(  # type: ignore[assignment]
        roi_sample, batch.gt_valid, tv_proposals, roi_labels
    )
    hook = tv.rpn.register_forward_hook(lambda _m, _i, out: tv_proposals.extend(out[0]))
    terms = MASK_TERMS if version == "mask" else TERMS
    targets = []
    for b, (h, w) in enumerate(SIZES):  # torchvision's masks: each image's own size
        valid = GT_VALID[b]
        target = {"boxes": GT_BOXES[b, valid], "labels": GT_LABELS[b, valid] + 1}
        if version == "mask":
            target["masks"] = batch.gt_masks[b, valid, :h, :w]
        targets.append(target)
    try:
        tv_losses = tv(images, targets)
    finally:
        hook.remove()

    # the samplers were shown fdet's labels: the masks returned are a valid sample of them
    for p, n, labels in zip(anchors_sampled.positive, anchors_sampled.negative, rpn_labels):
        assert (labels[p] == 1).all() and (labels[n] == 0).all()
    assert len(roi_labels) == len(SIZES)

    values = term_values(det.loss(outputs, batch, rpn_keys=rpn_keys, roi_keys=roi_keys))
    values["loss"].backward()
    sum(tv_losses.values()).backward()
    fdet_grads = {n: p.grad for n, p in det.named_parameters() if p.grad is not None}
    # torchvision's gradients renamed (and sliced: its mask predictor's background channel) as
    # its parameters are
    tv_grads = state_dict_from_torchvision(
        {n: p.grad for n, p in tv.named_parameters() if p.grad is not None}
    )
    return Step(
        {name: values[name].detach() for name in terms},
        {name: tv_losses[key].detach() for name, key in terms.items()},
        fdet_grads,
        tv_grads,
        roi_sample.per_image,
        ROI_SAMPLES[version],
        version,
        terms,
    )


@pytest.fixture(scope="module", params=["v1", "v2", "mask"])
def step(request: pytest.FixtureRequest) -> Step:
    return train_step(request.param)


def test_losses_equal_torchvisions(step: Step) -> None:
    if step.version == "v1":
        assert (step.roi_samples < step.roi_slots).all()  # padded RoI slots in every image
    elif step.version == "v2":
        assert (step.roi_samples == step.roi_slots).all()  # no padded RoI slot
    assert set(step.fdet) == set(step.terms) == set(step.tv)
    for name in step.terms:
        assert step.fdet[name] > 0  # every term has something to compare
        torch.testing.assert_close(step.fdet[name], step.tv[name], rtol=1e-5, atol=1e-7)
    worst = max(float((step.fdet[n] / step.tv[n] - 1).abs()) for n in step.terms)
    print(f"losses {dict((n, round(float(v), 5)) for n, v in step.fdet.items())}, ", end="")
    print(f"worst relative difference {worst:.1e}")


def test_gradients_equal_torchvisions(step: Step) -> None:
    """Every parameter with a gradient on one side has one on the other (nonzero ones in every
    part of the model), and they agree relative to the largest entry of the tensor's gradient
    (where both sides sum the same terms in another order, e.g. the box head over padded
    rows, they differ by rounding)."""
    assert set(step.fdet_grads) == set(step.tv_grads)
    parts = {"backbone.", "neck.", "rpn.head.", "roi_heads.box_head.", "roi_heads.box_predictor."}
    if "mask" in step.terms:
        parts.add("mask_head.")
    nonzero = {n for n, g in step.tv_grads.items() if g.abs().max() > 0}
    assert {next(p for p in parts if n.startswith(p)) for n in nonzero} == parts
    worst = 0.0
    for name, grad in step.fdet_grads.items():
        want = step.tv_grads[name]
        scale = want.abs().max().clamp(min=1e-12)
        error = float((grad - want).abs().max() / scale)
        worst = max(worst, error)
        assert error <= 1e-4, name
    print(f"{len(step.fdet_grads)} gradients, worst relative difference {worst:.1e}")
