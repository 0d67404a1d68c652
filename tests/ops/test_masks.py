"""Mask ops (fdet.ops.masks): targets, loss and pasting against torchvision's Mask R-CNN
functions, hand-computed cases, padding, batching and the compiler."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torchvision.models.detection.roi_heads import (
    expand_boxes,
    maskrcnn_loss,
    paste_masks_in_image,
    project_masks_on_boxes,
)

from fdet.ops.masks import (
    mask_loss,
    mask_targets,
    pack_positive_rois,
    paste_masks,
    select_mask_channel,
    take_positive_rois,
)
from tests.strategies import random_boxes, seeds


def random_masks(
    g: torch.Generator, shape: tuple[int, ...], height: int, width: int
) -> torch.Tensor:
    """uint8 masks ``[*shape, H, W]``: a random rectangle each, with random holes."""
    n = 1
    for d in shape:
        n *= d
    masks = torch.zeros(n, height, width, dtype=torch.uint8)
    corners = torch.rand(n, 4, generator=g)
    for i in range(n):
        x0, x1 = sorted((corners[i, :2] * width).long().tolist())
        y0, y1 = sorted((corners[i, 2:] * height).long().tolist())
        masks[i, y0 : y1 + 1, x0 : x1 + 1] = 1
    holes = torch.rand(n, height, width, generator=g) < 0.1
    masks[holes] = 0
    return masks.reshape(*shape, height, width)


def rois_in(g: torch.Generator, shape: tuple[int, ...], size: int) -> torch.Tensor:
    return random_boxes(g, shape, image_size=size * 0.9, min_size=0.5, max_size=size * 0.6)


# --- mask_targets ---------------------------------------------------------------------------


@settings(max_examples=10)
@given(seed=seeds, b=st.integers(1, 3), m=st.integers(1, 4), s=st.integers(0, 7))
def test_targets_equal_torchvision_projection(seed: int, b: int, m: int, s: int) -> None:
    g = torch.Generator().manual_seed(seed)
    height, width = 40, 56
    gt_masks = random_masks(g, (b, m), height, width)
    rois = rois_in(g, (b, s), 48)
    gt_index = torch.randint(0, m, (b, s), generator=g)
    ours = mask_targets(gt_masks, rois, gt_index, size=14)
    assert ours.shape == (b, s, 14, 14)
    for i in range(b):
        ref = project_masks_on_boxes(gt_masks[i], rois[i], gt_index[i], 14)
        torch.testing.assert_close(ours[i], ref, rtol=0, atol=0)


def test_targets_by_hand() -> None:
    """A mask of the left half (columns 0..7) of a 16-wide image. ``aligned=False`` puts
    pixel ``k``'s value at coordinate ``k``: a RoI over the whole image, 4 bins across with 4
    samples each (at x = 0.5, 1.5, ... 15.5), reads 1 in bin 0 and (1 + 1 + 1 + 0.5) / 4 in
    bin 1 (x = 7.5 lies between pixels 7 and 8); a RoI inside the mask is all ones, one
    outside it all zeros."""
    masks = torch.zeros(1, 2, 8, 16, dtype=torch.uint8)
    masks[0, 0, :, :8] = 1
    masks[0, 1, 2:6, 10:14] = 1
    rois = torch.tensor([[[0.0, 0.0, 16.0, 8.0], [1.0, 1.0, 6.0, 6.0], [10.0, 0.0, 15.0, 8.0]]])
    targets = mask_targets(masks, rois, torch.tensor([[0, 0, 0]]), size=4)
    torch.testing.assert_close(targets[0, 0], torch.tensor([1.0, 0.875, 0.0, 0.0]).expand(4, 4))
    assert (targets[0, 1] == 1).all()
    assert (targets[0, 2] == 0).all()
    # The second RoI again, matched to the other gt: nothing of it there.
    other = mask_targets(masks, rois, torch.tensor([[0, 1, 0]]), size=4)
    assert (other[0, 1] == 0).all()
    torch.testing.assert_close(other[0, [0, 2]], targets[0, [0, 2]])


def test_aligned_targets_by_hand() -> None:
    """``aligned=True`` puts pixel ``k``'s value at ``k + 0.5``: over the whole 16-wide image
    with 4 bins of 4 samples (at x = 0.5, ..., 15.5) the left-half mask reads 1 1 0 0 exactly
    (sample x = 7.5 is pixel 7's centre)."""
    masks = torch.zeros(1, 1, 8, 16, dtype=torch.uint8)
    masks[0, 0, :, :8] = 1
    rois = torch.tensor([[[0.0, 0.0, 16.0, 8.0]]])
    targets = mask_targets(masks, rois, torch.zeros(1, 1, dtype=torch.long), size=4, aligned=True)
    torch.testing.assert_close(targets[0, 0], torch.tensor([1.0, 1.0, 0.0, 0.0]).expand(4, 4))


def test_aligned_targets_paste_back_closer_to_the_mask() -> None:
    """The objects of eight shapes-set images (fdet.data.shapes.render, 8 to 64 pixels) cut at
    their own tight boxes into 28 × 28 targets and pasted back at those boxes: with
    ``aligned=True`` the round trip keeps more of the masks than with torchvision's
    ``aligned=False``, which samples half a pixel off the place :func:`paste_masks` puts the
    values back (measured: mean IoU 0.94 against 0.87 on the val set's first 32 images)."""
    from fdet.data.shapes import render

    ious: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    for index in range(8):
        r = render(0, "val", index, size=128, min_object_size=8, max_objects=12)
        masks = torch.from_numpy(r.masks).to(torch.uint8)[None]  # [1, N, H, W]
        boxes = torch.from_numpy(r.boxes).float()[None]  # [1, N, 4]
        index_ = torch.arange(masks.shape[1])[None]
        for aligned in (False, True):
            targets = mask_targets(masks, boxes, index_, size=28, aligned=aligned)
            back = paste_masks(targets, boxes, (128, 128), padding=1, threshold=0.5)[0]
            gt = masks[0].bool()
            inter = (back & gt).flatten(1).sum(1).float()
            ious[aligned].append(inter / (back | gt).flatten(1).sum(1).float())
    mean = {k: torch.cat(v).mean().item() for k, v in ious.items()}
    assert mean[True] >= 0.9 and mean[True] > mean[False] + 0.03, mean


def test_targets_without_gt_slots_or_rois_are_empty() -> None:
    rois = torch.tensor([[[0.0, 0.0, 4.0, 4.0]]])
    assert (
        mask_targets(torch.zeros(1, 0, 8, 8), rois, torch.zeros(1, 1, dtype=torch.long)) == 0
    ).all()
    empty = mask_targets(torch.ones(2, 3, 8, 8), torch.zeros(2, 0, 4), torch.zeros(2, 0).long())
    assert empty.shape == (2, 0, 28, 28)


@settings(max_examples=6)
@given(seed=seeds, extra=st.integers(1, 3))
def test_targets_ignore_padded_gt_slots(seed: int, extra: int) -> None:
    g = torch.Generator().manual_seed(seed)
    gt_masks = random_masks(g, (2, 3), 32, 32)
    rois = rois_in(g, (2, 5), 32)
    gt_index = torch.randint(0, 3, (2, 5), generator=g)
    padded = torch.cat((gt_masks, random_masks(g, (2, extra), 32, 32)), dim=1)
    torch.testing.assert_close(
        mask_targets(padded, rois, gt_index, size=7),
        mask_targets(gt_masks, rois, gt_index, size=7),
        rtol=0,
        atol=0,
    )


# --- mask_loss ------------------------------------------------------------------------------


@settings(max_examples=10)
@given(seed=seeds, b=st.integers(1, 3), s=st.integers(1, 8), k=st.integers(1, 4))
def test_loss_equals_torchvision_maskrcnn_loss(seed: int, b: int, s: int, k: int) -> None:
    """fdet channel ``c`` is torchvision's ``c + 1`` (its channel 0 is the background's,
    never read by the loss); the mean over the positives' pixels is the sum over
    ``num_pos · m²``."""
    g = torch.Generator().manual_seed(seed)
    m, size = 3, 14
    gt_masks = random_masks(g, (b, m), 36, 36)
    gt_labels = torch.randint(0, k, (b, m), generator=g)
    rois = rois_in(g, (b, s), 36)
    gt_index = torch.randint(0, m, (b, s), generator=g)
    positive = torch.rand(b, s, generator=g) < 0.6
    logits = torch.randn(b, s, k, size, size, generator=g) * 3
    labels = gt_labels.gather(1, gt_index)
    targets = mask_targets(gt_masks, rois, gt_index, size=size)
    per_roi = mask_loss(logits, targets, labels, positive)
    assert (per_roi[~positive] == 0).all()
    ours = per_roi.sum() / (positive.sum() * size * size).clamp(min=1)

    tv_logits = torch.cat((torch.randn(b, s, 1, size, size, generator=g), logits), dim=2)
    ref = maskrcnn_loss(
        tv_logits[positive],
        [rois[i][positive[i]] for i in range(b)],
        [gt_masks[i] for i in range(b)],
        [gt_labels[i] + 1 for i in range(b)],
        [gt_index[i][positive[i]] for i in range(b)],
    )
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_loss_by_hand_and_gradients_only_on_the_label_channel() -> None:
    logits = torch.zeros(1, 2, 3, 2, 2, requires_grad=True)
    targets = torch.tensor([[[[1.0, 0.0], [0.5, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    labels = torch.tensor([[2, 0]])
    positive = torch.tensor([[True, False]])
    loss = mask_loss(logits, targets, labels, positive)
    # BCE of logit 0 is log 2 whatever the target.
    torch.testing.assert_close(loss, torch.tensor([[4 * 0.6931472, 0.0]]))
    loss.sum().backward()
    grad = logits.grad
    assert grad is not None
    assert (grad[0, 1] == 0).all() and (grad[0, 0, :2] == 0).all()
    torch.testing.assert_close(grad[0, 0, 2], 0.5 - targets[0, 0])


def test_non_finite_logits_of_negative_rois_are_invisible() -> None:
    logits = torch.zeros(1, 2, 2, 4, 4)
    logits[0, 1] = float("nan")
    targets = torch.rand(1, 2, 4, 4)
    loss = mask_loss(logits, targets, torch.tensor([[0, 5]]), torch.tensor([[True, False]]))
    assert loss.isfinite().all() and loss[0, 1] == 0


def test_select_mask_channel_clamps_labels() -> None:
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 2, 2)
    out = select_mask_channel(logits, torch.tensor([[1, 7]]))
    torch.testing.assert_close(out[0, 0], logits[0, 0, 1])
    torch.testing.assert_close(out[0, 1], logits[0, 1, 2])


# --- take_positive_rois ---------------------------------------------------------------------


def test_take_positive_rois_by_hand() -> None:
    positive = torch.tensor([[False, True, False, True, True], [False] * 5])
    taken = take_positive_rois(positive, max_rois=4)
    assert taken.roi_index.tolist() == [[1, 3, 4, 0], [0, 0, 0, 0]]
    assert taken.valid.tolist() == [[True, True, True, False], [False] * 4]
    fewer = take_positive_rois(positive, max_rois=2)
    assert fewer.roi_index.tolist() == [[1, 3], [0, 0]]
    assert take_positive_rois(positive, max_rois=9).roi_index.shape == (2, 5)


@settings(max_examples=20)
@given(seed=seeds, b=st.integers(1, 3), s=st.integers(1, 12), p=st.integers(1, 14))
def test_take_positive_rois_properties(seed: int, b: int, s: int, p: int) -> None:
    """Each image: ``min(P, S)`` slots; the valid ones are its first positives in RoI order,
    as many as fit; padding points at RoI 0; batched equals image by image."""
    g = torch.Generator().manual_seed(seed)
    positive = torch.rand(b, s, generator=g) < torch.rand(b, 1, generator=g)
    taken = take_positive_rois(positive, max_rois=p)
    assert taken.roi_index.shape == taken.valid.shape == (b, min(p, s))
    for i in range(b):
        expected = torch.arange(s)[positive[i]][: min(p, s)].tolist()
        count = len(expected)
        assert taken.roi_index[i, :count].tolist() == expected
        assert taken.valid[i, :count].all() and not taken.valid[i, count:].any()
        assert (taken.roi_index[i, count:] == 0).all()
        one = take_positive_rois(positive[i : i + 1], max_rois=p)
        assert torch.equal(one.roi_index[0], taken.roi_index[i])


def test_pack_positive_rois_by_hand() -> None:
    valid = torch.tensor([[True, True, False, False], [False, False, False, False], [True] * 4])
    packed = pack_positive_rois(valid, multiple=4)
    assert packed.index.tolist() == [0, 1, 8, 9, 10, 11, 0, 0]  # 6 valid, padded to 8
    assert packed.image.tolist() == [0, 0, 2, 2, 2, 2, 0, 0]
    assert packed.valid.tolist() == [True] * 6 + [False] * 2
    assert pack_positive_rois(valid, multiple=6).index.shape == (6,)
    assert pack_positive_rois(valid, multiple=16).index.shape == (12,)  # at most B · P
    none = pack_positive_rois(torch.zeros(2, 3, dtype=torch.bool), multiple=4)
    assert none.index.shape == (4,) and not none.valid.any()


@settings(max_examples=20)
@given(seed=seeds, b=st.integers(1, 4), p=st.integers(1, 12), multiple=st.integers(1, 8))
def test_pack_positive_rois_keeps_every_valid_slot_in_order(
    seed: int, b: int, p: int, multiple: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, p, generator=g) < torch.rand(b, 1, generator=g)
    packed = pack_positive_rois(valid, multiple=multiple)
    count = int(valid.sum())
    slots = packed.index.shape[0]
    assert slots == min(b * p, max(multiple, math.ceil(count / multiple) * multiple))
    assert packed.valid[:count].all() and not packed.valid[count:].any()
    assert packed.index[:count].tolist() == valid.reshape(-1).nonzero().squeeze(1).tolist()
    images, rows = valid.nonzero().unbind(1)
    assert packed.image[:count].tolist() == images.tolist()
    assert (packed.index[:count] % p).tolist() == rows.tolist()


def test_mask_targets_of_packed_rois_are_those_of_each_image() -> None:
    """With ``image``, RoIs of several images in one row are cut from their own image's
    masks: the same targets as the ``[B, S]`` layout."""
    g = torch.Generator().manual_seed(5)
    gt_masks = random_masks(g, (3, 2), 32, 40)
    rois = rois_in(g, (3, 4), 32)
    gt_index = torch.randint(0, 2, (3, 4), generator=g)
    whole = mask_targets(gt_masks, rois, gt_index, size=7, aligned=True)
    image = torch.arange(3).repeat_interleave(4)[None]  # [1, 12]
    packed = mask_targets(
        gt_masks,
        rois.reshape(1, 12, 4),
        gt_index.reshape(1, 12),
        size=7,
        aligned=True,
        image=image,
    )
    torch.testing.assert_close(packed.reshape(3, 4, 7, 7), whole, rtol=0, atol=0)


# --- paste_masks ----------------------------------------------------------------------------


def paste_reference(
    probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], padding: int = 1
) -> torch.Tensor:
    """torchvision's paste, box by box: ``[B, N, m, m]`` -> ``[B, N, H, W]``. Its loop fails
    on a box whose window misses the image, which must be empty: those are zeros here."""
    height, width = size
    m = probs.shape[-1]
    scale = (m + 2 * padding) / m
    windows = expand_boxes(boxes.reshape(-1, 4), scale).long().reshape(*boxes.shape)
    out = torch.zeros(*boxes.shape[:2], height, width)
    for i in range(boxes.shape[0]):
        for j in range(boxes.shape[1]):
            x0, y0, x1, y1 = windows[i, j].tolist()
            if x0 < width and y0 < height and x1 >= 0 and y1 >= 0:
                out[i, j] = paste_masks_in_image(
                    probs[i, j][None, None], boxes[i, j][None], size, padding=padding
                )[0, 0]
    return out


def paste_case(g: torch.Generator, b: int, n: int, height: int, width: int, m: int):
    xy = torch.rand(b, n, 2, generator=g) * torch.tensor([width + 20.0, height + 20.0]) - 10
    wh = torch.rand(b, n, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
    wh = torch.where(torch.rand(b, n, 1, generator=g) < 0.1, 0.0, wh)  # a few empty boxes
    boxes = torch.cat((xy, xy + wh), dim=-1)
    probs = torch.rand(b, n, m, m, generator=g)
    return probs, boxes


@settings(max_examples=12)
@given(
    seed=seeds,
    b=st.integers(1, 2),
    n=st.integers(0, 6),
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    m=st.sampled_from([1, 4, 7, 28]),
    padding=st.sampled_from([0, 1, 2]),
)
def test_paste_equals_torchvision(
    seed: int, b: int, n: int, height: int, width: int, m: int, padding: int
) -> None:
    """Boxes inside, across the border of and outside the image, empty ones included: the
    same probabilities as torchvision's per-box loop, to a float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    probs, boxes = paste_case(g, b, n, height, width, m)
    ours = paste_masks(probs, boxes, (height, width), padding=padding)
    ref = paste_reference(probs, boxes, (height, width), padding)
    assert ours.shape == (b, n, height, width)
    torch.testing.assert_close(ours, ref, rtol=0, atol=3e-7)
    binary = paste_masks(probs, boxes, (height, width), padding=padding, threshold=0.5)
    assert binary.dtype == torch.bool
    assert torch.equal(binary, ours > 0.5)


def test_paste_binarized_iou_with_torchvision() -> None:
    """50 masks of the 28 × 28 resolution at 128 × 192: binarized at 0.5, the IoU with
    torchvision's pasted masks is 1 to within a pixel or two in all (docs/masks.md)."""
    g = torch.Generator().manual_seed(0)
    probs, boxes = paste_case(g, 1, 50, 128, 192, 28)
    probs = torch.sigmoid(torch.randn(1, 50, 28, 28, generator=g) * 4)
    ours = paste_masks(probs, boxes, (128, 192), threshold=0.5)
    ref = paste_reference(probs, boxes, (128, 192)) > 0.5
    iou = (ours & ref).sum() / (ours | ref).sum()
    assert iou >= 0.9999


def test_paste_outside_the_image_is_empty() -> None:
    probs = torch.ones(1, 3, 4, 4)
    boxes = torch.tensor(
        [[[30.0, 2.0, 40.0, 8.0], [2.0, 25.0, 8.0, 30.0], [-20.0, -9.0, -8.0, -3.0]]]
    )
    assert not paste_masks(probs, boxes, (20, 24)).any()


def test_paste_by_hand() -> None:
    """A 2 × 2 mask of ones without padding on the box (1, 1, 3, 2): truncated corners
    (1, 1) and (3, 2), a window 3 wide and 2 high, all ones; 0 elsewhere."""
    probs = torch.ones(1, 1, 2, 2)
    boxes = torch.tensor([[[1.0, 1.0, 3.0, 2.0]]])
    out = paste_masks(probs, boxes, (4, 5), padding=0)
    expected = torch.zeros(4, 5)
    expected[1:3, 1:4] = 1
    torch.testing.assert_close(out[0, 0], expected)


@settings(max_examples=6)
@given(seed=seeds, extra=st.integers(1, 4))
def test_paste_batched_equals_per_image_and_padding_is_invisible(seed: int, extra: int) -> None:
    g = torch.Generator().manual_seed(seed)
    probs, boxes = paste_case(g, 3, 4, 24, 30, 7)
    whole = paste_masks(probs, boxes, (24, 30))
    for i in range(3):
        torch.testing.assert_close(
            whole[i : i + 1], paste_masks(probs[i : i + 1], boxes[i : i + 1], (24, 30))
        )
    more_probs, more_boxes = paste_case(g, 3, extra, 24, 30, 7)
    padded = paste_masks(
        torch.cat((probs, more_probs), 1), torch.cat((boxes, more_boxes), 1), (24, 30)
    )
    torch.testing.assert_close(padded[:, :4], whole, rtol=0, atol=0)


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    def run(gt_masks, rois, gt_index, logits, labels, positive, probs, boxes):
        targets = mask_targets(gt_masks, rois, gt_index, size=14)
        loss = mask_loss(logits, targets, labels, positive)
        taken = take_positive_rois(positive, max_rois=3)
        pasted = paste_masks(probs, boxes, (40, 48))
        return targets, loss, taken.roi_index, taken.valid, pasted

    compiled = torch.compile(run, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        gt_masks = random_masks(g, (2, 3), 40, 48)
        rois = rois_in(g, (2, 6), 40)
        gt_index = torch.randint(0, 3, (2, 6), generator=g)
        logits = torch.randn(2, 6, 4, 14, 14, generator=g)
        labels = torch.randint(0, 4, (2, 6), generator=g)
        positive = torch.rand(2, 6, generator=g) < 0.5
        probs, boxes = paste_case(g, 2, 5, 40, 48, 14)
        args = (gt_masks, rois, gt_index, logits, labels, positive, probs, boxes)
        eager = run(*args)
        for a, e in zip(compiled(*args), eager):
            if e.is_floating_point():
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(a, e)


def test_paste_gradients_reach_the_probabilities() -> None:
    probs = torch.rand(1, 2, 5, 5, requires_grad=True)
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 15.0], [0.0, 0.0, 8.0, 8.0]]])
    paste_masks(probs, boxes, (20, 24)).sum().backward()
    assert probs.grad is not None and (probs.grad > 0).all()


def test_paste_limits_to_each_image_and_valid_slot() -> None:
    """``image_sizes`` and ``valid`` zero what lies outside each image of a padded batch and
    the padded slots: the full paste masked afterwards."""
    g = torch.Generator().manual_seed(4)
    probs, boxes = paste_case(g, 2, 5, 40, 48, 7)
    sizes = torch.tensor([[30, 48], [40, 25]])
    valid = torch.tensor([[True, True, False, True, True], [True, False, True, True, False]])
    full = paste_masks(probs, boxes, (40, 48))
    rows = torch.arange(40) < sizes[:, :1]
    cols = torch.arange(48) < sizes[:, 1:]
    keep = rows[:, None, :, None] & cols[:, None, None, :] & valid[..., None, None]
    got = paste_masks(probs, boxes, (40, 48), image_sizes=sizes, valid=valid)
    torch.testing.assert_close(got, torch.where(keep, full, 0.0), rtol=0, atol=0)
    binary = paste_masks(probs, boxes, (40, 48), threshold=0.5, image_sizes=sizes, valid=valid)
    assert torch.equal(binary, keep & (full > 0.5)) and binary.any()
    with pytest.raises(ValueError, match="threshold"):
        paste_masks(probs, boxes, (40, 48), threshold=-0.1)


def test_paste_rejects_non_square_masks() -> None:
    with pytest.raises(ValueError, match="square"):
        paste_masks(torch.zeros(1, 1, 4, 5), torch.zeros(1, 1, 4), (8, 8))


def test_paste_agrees_with_interpolate_on_a_box_at_integer_corners() -> None:
    """Independent of torchvision: a box whose expanded corners are integers pastes the
    padded mask resized with F.interpolate onto exactly its window."""
    probs = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    # padding 1: s = 6, scale 1.5; box of width 8 about centre 10 expands to [4, 16].
    boxes = torch.tensor([[[6.0, 2.0, 14.0, 10.0]]])
    out = paste_masks(probs, boxes, (20, 20))
    padded = F.pad(probs, (1, 1, 1, 1))
    window = F.interpolate(padded, size=(13, 13), mode="bilinear", align_corners=False)[0, 0]
    expected = torch.zeros(20, 20)
    expected[0:13, 4:17] = window  # y window [0, 12]: centre 6, half 6 -> [0, 12]
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-7)
