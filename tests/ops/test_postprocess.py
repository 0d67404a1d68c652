from __future__ import annotations

import contextlib
import itertools
import math
from unittest import mock

import hypothesis.strategies as st
import pytest
import torch
import torchvision
from hypothesis import given
from torch import nn
from torchvision.models.detection.retinanet import RetinaNet

from fdet.ops import postprocess as postprocess_module
from fdet.ops.postprocess import (
    Detections,
    batched_nms,
    nms_keep_mask,
    postprocess_dense,
    select_topk_per_level,
)
from tests.strategies import random_boxes, seeds

# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


class DenseCase:
    """Random RetinaNet-style head outputs over a few levels, with anchors and image sizes."""

    def __init__(
        self,
        seed: int,
        *,
        batch: int,
        num_classes: int,
        level_sizes: tuple[int, ...],
        empty_images: tuple[int, ...] = (),
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.anchors = [  # some reach outside the image, so clipping matters
            random_boxes(g, (n,), image_size=600.0, min_size=4.0, max_size=300.0) - 40.0
            for n in level_sizes
        ]
        self.cls_logits = [
            torch.randn(batch, n, num_classes, generator=g) * 1.5 - 3.5 for n in level_sizes
        ]
        for b in empty_images:
            for logits in self.cls_logits:
                logits[b] = -10.0  # every score below any threshold used here
        self.box_deltas = []
        for n in level_sizes:
            deltas = torch.randn(batch, n, 4, generator=g) * 0.5
            wild = torch.rand(batch, n, 1, generator=g) < 0.05
            deltas[..., 2:] = torch.where(wild, 6.0, deltas[..., 2:])  # past the scale clip
            self.box_deltas.append(deltas)
        heights = torch.randint(200, 600, (batch,), generator=g)
        widths = torch.randint(200, 600, (batch,), generator=g)
        self.image_sizes = torch.stack((heights, widths), dim=1)

    def args(self):
        return self.cls_logits, self.box_deltas, self.anchors, self.image_sizes


class _NoBackbone(nn.Module):
    out_channels = 8


def torchvision_postprocess(case: DenseCase, **config) -> list[dict[str, torch.Tensor]]:
    model = RetinaNet(_NoBackbone(), num_classes=case.cls_logits[0].shape[-1], **config)
    batch = case.cls_logits[0].shape[0]
    head_outputs = {"cls_logits": case.cls_logits, "bbox_regression": case.box_deltas}
    image_shapes = [(int(h), int(w)) for h, w in case.image_sizes]
    with torch.no_grad():
        return model.postprocess_detections(head_outputs, [case.anchors] * batch, image_shapes)


def nms_inputs(g: torch.Generator, batch: int, num: int, num_labels: int, valid_fraction: float):
    boxes = random_boxes(g, (batch, num), image_size=100.0, max_size=60.0, degenerate_fraction=0.1)
    scores = torch.rand(batch, num, generator=g)
    labels = torch.randint(0, num_labels, (batch, num), generator=g)
    valid = torch.rand(batch, num, generator=g) < valid_fraction
    return boxes, scores, labels, valid


def assert_well_formed(det: Detections, max_detections: int) -> None:
    batch = det.scores.shape[0]
    assert det.boxes.shape == (batch, max_detections, 4)
    assert det.scores.shape == det.labels.shape == det.valid.shape == (batch, max_detections)
    assert det.labels.dtype == torch.int64 and det.valid.dtype == torch.bool
    count = det.valid.sum(dim=1, keepdim=True)
    slot = torch.arange(max_detections)
    assert torch.equal(det.valid, slot < count), "valid slots must come first"
    ordered = det.scores[:, :-1] >= det.scores[:, 1:]
    assert (ordered | ~det.valid[:, 1:]).all(), "valid slots must be sorted by score"
    pad = ~det.valid
    assert (det.scores[pad] == 0).all() and (det.labels[pad] == 0).all()
    assert (det.boxes[pad] == 0).all()


# ------------------------------------------------------------------------------------------------
# postprocess_dense against torchvision's RetinaNet
# ------------------------------------------------------------------------------------------------

PARITY_CASES = [
    pytest.param(
        dict(seed=0, batch=3, num_classes=5, level_sizes=(300, 80, 6), empty_images=(1,)),
        dict(score_thresh=0.05, nms_thresh=0.5, detections_per_img=40, topk_candidates=50),
        id="truncated-one-image-empty",
    ),
    pytest.param(
        dict(seed=1, batch=2, num_classes=3, level_sizes=(120, 30)),
        dict(score_thresh=0.2, nms_thresh=0.3, detections_per_img=100, topk_candidates=1000),
        id="k-above-level-size-padded",
    ),
    pytest.param(
        dict(seed=2, batch=2, num_classes=8, level_sizes=(600, 150, 40, 10)),
        dict(score_thresh=0.05, nms_thresh=0.4, detections_per_img=600, topk_candidates=200),
        id="four-levels",
    ),
    pytest.param(
        dict(seed=3, batch=2, num_classes=4, level_sizes=(50, 20), empty_images=(0, 1)),
        dict(score_thresh=0.05, nms_thresh=0.5, detections_per_img=10, topk_candidates=30),
        id="all-empty",
    ),
]


@pytest.mark.parametrize(("case_kwargs", "config"), PARITY_CASES)
def test_postprocess_dense_matches_torchvision_retinanet(case_kwargs, config):
    case = DenseCase(**case_kwargs)
    refs = torchvision_postprocess(case, **config)
    det = postprocess_dense(
        *case.args(),
        score_threshold=config["score_thresh"],
        topk_per_level=config["topk_candidates"],
        iou_threshold=config["nms_thresh"],
        max_detections=config["detections_per_img"],
    )
    assert_well_formed(det, config["detections_per_img"])
    for b, ref in enumerate(refs):
        n = int(det.valid[b].sum())
        assert n == len(ref["scores"]), f"image {b}"
        torch.testing.assert_close(det.boxes[b, :n], ref["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(det.scores[b, :n], ref["scores"], rtol=1e-6, atol=0)
        assert torch.equal(det.labels[b, :n], ref["labels"])
    assert det.valid.any() == any(len(ref["scores"]) for ref in refs)


@given(
    seed=seeds,
    level_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    k=st.integers(1, 60),
    threshold=st.sampled_from([0.0, 0.3, 0.6]),
)
def test_select_topk_per_level_is_threshold_then_topk(seed, level_sizes, k, threshold):
    g = torch.Generator().manual_seed(seed)
    num_classes = 3
    scores = [torch.rand(2, n, num_classes, generator=g) for n in level_sizes]
    cand = select_topk_per_level(scores, k=k, score_threshold=threshold)
    total = sum(min(k, n * num_classes) for n in level_sizes)
    assert cand.scores.shape == cand.anchor_index.shape == cand.labels.shape == (2, total)
    all_scores = torch.cat(scores, dim=1)  # [B, A, K]
    gathered = all_scores[torch.arange(2)[:, None], cand.anchor_index, cand.labels]
    assert torch.equal(gathered, cand.scores)
    start, first_anchor = 0, 0
    for level in scores:
        flat = level.flatten(1)
        k_l = min(k, flat.shape[1])
        for b in range(2):
            above = flat[b][flat[b] > threshold]
            expected = above.sort(descending=True).values[:k_l]
            got = cand.scores[b, start : start + k_l][cand.valid[b, start : start + k_l]]
            assert torch.equal(got, expected)
        index = cand.anchor_index[:, start : start + k_l]
        assert ((index >= first_anchor) & (index < first_anchor + level.shape[1])).all()
        start, first_anchor = start + k_l, first_anchor + level.shape[1]


# ------------------------------------------------------------------------------------------------
# batched_nms
# ------------------------------------------------------------------------------------------------


@given(
    seed=seeds,
    batch=st.integers(1, 3),
    num=st.integers(0, 40),
    num_labels=st.integers(1, 4),
    valid_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    iou_threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0]),
    max_detections=st.integers(1, 50),
)
def test_batched_nms_matches_torchvision_per_image(
    seed, batch, num, num_labels, valid_fraction, iou_threshold, max_detections
):
    g = torch.Generator().manual_seed(seed)
    boxes, scores, labels, valid = nms_inputs(g, batch, num, num_labels, valid_fraction)
    det = batched_nms(
        boxes, scores, labels, valid, iou_threshold=iou_threshold, max_detections=max_detections
    )
    assert_well_formed(det, max_detections)
    for b in range(batch):
        v = valid[b]
        keep = torchvision.ops.batched_nms(boxes[b][v], scores[b][v], labels[b][v], iou_threshold)
        keep = keep[:max_detections]
        n = int(det.valid[b].sum())
        assert n == len(keep), f"image {b}"
        assert torch.equal(det.scores[b, :n], scores[b][v][keep])
        assert torch.equal(det.boxes[b, :n], boxes[b][v][keep])
        assert torch.equal(det.labels[b, :n], labels[b][v][keep])


@given(
    seed=seeds,
    extra=st.integers(1, 20),
    extra_images=st.integers(0, 2),
    shift=st.sampled_from([0.0, -500.0, 1e4]),
)
def test_padding_and_translation_are_invisible(seed, extra, extra_images, shift):
    g = torch.Generator().manual_seed(seed)
    boxes, scores, labels, valid = nms_inputs(g, 2, 25, 3, 0.7)
    kwargs = dict(iou_threshold=0.5, max_detections=30)
    ref = batched_nms(boxes, scores, labels, valid, **kwargs)
    # Invalid candidates with garbage boxes, top scores and unseen labels, scattered among the
    # real ones, and whole padded images at the end of the batch.
    total = 25 + extra
    pad_boxes = torch.full((2, total, 4), float("nan"))
    pad_boxes[:, :, 2:] = 1e9
    pad_scores = torch.full((2, total), 2.0)
    pad_labels = torch.full((2, total), 7)
    pad_valid = torch.zeros(2, total, dtype=torch.bool)
    slots = torch.randperm(total, generator=g)[:25].sort().values
    pad_boxes[:, slots], pad_scores[:, slots] = boxes, scores
    pad_labels[:, slots], pad_valid[:, slots] = labels, valid

    def more_images(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((t, t[:1].expand(extra_images, *t.shape[1:])))

    padded = batched_nms(
        more_images(pad_boxes) + shift,
        more_images(pad_scores),
        more_images(pad_labels),
        torch.cat((pad_valid, torch.zeros(extra_images, total, dtype=torch.bool))),
        **kwargs,
    )
    assert torch.equal(padded.valid[:2], ref.valid)
    assert not padded.valid[2:].any()
    assert torch.equal(padded.scores[:2], ref.scores)
    assert torch.equal(padded.labels[:2], ref.labels)
    expected_boxes = torch.where(ref.valid[..., None], ref.boxes + shift, 0.0)
    torch.testing.assert_close(padded.boxes[:2], expected_boxes, rtol=0, atol=0)


def test_nms_separates_images_and_labels():
    box = torch.tensor([10.0, 10.0, 50.0, 50.0])
    boxes = box.expand(2, 3, 4)  # the same box everywhere
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    labels = torch.tensor([[0, 0, 1], [0, 1, 1]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    keep = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=0.5)
    assert keep.tolist() == [[True, False, True], [True, True, False]]
    # An invalid candidate never suppresses a valid one, whatever its score.
    valid_first_invalid = torch.tensor([[False, True, True], [True, True, True]])
    keep = nms_keep_mask(boxes, scores, labels, valid_first_invalid, iou_threshold=0.5)
    assert keep.tolist() == [[False, True, True], [True, True, False]]


@pytest.mark.parametrize("iou_threshold", [-0.1, float("nan")])
def test_nms_keep_mask_rejects_a_threshold_below_zero(iou_threshold):
    g = torch.Generator().manual_seed(0)
    boxes, scores, labels, valid = nms_inputs(g, 1, 5, 2, 1.0)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms_keep_mask(boxes, scores, labels, valid, iou_threshold=iou_threshold)


def test_call_ends_pack_whole_groups():
    assert postprocess_module._call_ends([3, 1, 1, 300, 2], 4) == [4, 5, 305, 307]
    assert postprocess_module._call_ends([2, 2], 1) == [2, 4]
    assert postprocess_module._call_ends([5], 100) == [5]
    assert postprocess_module._call_ends([], 100) == [0]


@given(sizes=st.lists(st.integers(1, 40), max_size=30), max_size=st.integers(1, 100))
def test_call_ends_are_greedy_runs_of_whole_groups(sizes, max_size):
    ends = postprocess_module._call_ends(sizes, max_size)
    group_ends = list(itertools.accumulate(sizes))
    assert ends[-1] == sum(sizes)  # covers everything
    if not sizes:
        return
    starts = [0, *ends[:-1]]
    assert all(a < b for a, b in zip(starts, ends))  # in order, no empty run
    assert set(ends) <= set(group_ends)  # runs end where groups end: groups stay whole
    for i, (start, end) in enumerate(zip(starts, ends)):
        groups = [size for size, e in zip(sizes, group_ends) if start < e <= end]
        assert end - start <= max_size or len(groups) == 1  # only a lone group is larger
        if i + 1 < len(ends):  # greedy: the next group would not have fitted
            next_group = sizes[group_ends.index(end) + 1]
            assert end - start + next_group > max_size


def test_call_size_depends_on_the_device_type():
    assert postprocess_module._call_size(torch.device("cpu")) == postprocess_module._CPU_CALL_SIZE
    cuda = postprocess_module._CUDA_CALL_SIZE
    assert postprocess_module._call_size(torch.device("cuda")) == cuda
    assert postprocess_module._call_size(torch.device("cuda", 1)) == cuda
    # A CUDA call's suppression mask, C × ceil(C / 64) int64 words, stays within a few MiB.
    assert cuda * math.ceil(cuda / 64) * 8 <= 4 * 2**20


@contextlib.contextmanager
def nms_calls(call_size: int):
    """Sets the CPU run size and records the size of every NMS kernel call."""
    sizes: list[int] = []
    kernel = torch.ops.torchvision.nms

    def spy(boxes, scores, iou_threshold):
        sizes.append(len(boxes))
        return kernel(boxes, scores, iou_threshold)

    with (
        mock.patch.object(postprocess_module, "_CPU_CALL_SIZE", call_size),
        mock.patch.object(torch.ops.torchvision, "nms", spy),
    ):
        yield sizes


def group_sizes(labels: torch.Tensor, valid: torch.Tensor) -> list[int]:
    """Sizes of the (image, label) groups of the valid candidates."""
    return [
        int(count)
        for image_labels, image_valid in zip(labels, valid)
        for count in image_labels[image_valid].unique(return_counts=True)[1]
    ]


@st.composite
def nms_batches(draw: st.DrawFn):
    """Boxes, scores, labels and valid of 0 to 3 images; rows all valid, half or all invalid;
    few labels, so that groups are often larger than the run sizes used with them."""
    g = torch.Generator().manual_seed(draw(seeds))
    batch = draw(st.integers(0, 3))
    num = draw(st.integers(0, 50))
    boxes, scores, labels, _ = nms_inputs(g, batch, num, draw(st.integers(1, 3)), 1.0)
    fractions = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0]), min_size=batch, max_size=batch))
    fraction = torch.tensor(fractions).reshape(batch, 1)
    valid = torch.rand(batch, num, generator=g) < fraction
    return boxes, scores, labels, valid


@given(
    case=nms_batches(),
    call_size=st.integers(1, 24),
    iou_threshold=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
)
def test_nms_keep_mask_in_runs_equals_one_call_and_torchvision(case, call_size, iou_threshold):
    boxes, scores, labels, valid = case
    with nms_calls(10**9) as one:
        ref = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=iou_threshold)
    with nms_calls(call_size) as runs:
        keep = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=iou_threshold)
    assert torch.equal(keep, ref)
    assert keep.shape == valid.shape and not keep[~valid].any()
    groups = group_sizes(labels, valid)
    assert len(one) == (1 if groups else 0) and sum(runs) == sum(groups)
    assert all(size <= call_size or size in groups for size in runs)
    for b in range(valid.shape[0]):
        v = valid[b]
        kept = torchvision.ops.batched_nms(boxes[b][v], scores[b][v], labels[b][v], iou_threshold)
        expected = torch.zeros(int(v.sum()), dtype=torch.bool).index_fill(0, kept, True)
        assert torch.equal(keep[b][v], expected), f"image {b}"


@pytest.mark.parametrize("call_size", [None, 64, postprocess_module._CUDA_CALL_SIZE])
def test_nms_keep_mask_matches_torchvision_on_crowded_images(call_size):
    # Several thousand candidates an image, labels of very different sizes (one group larger
    # than a kernel call of 64), a wide coordinate range and ties: the packing into calls and
    # the group offsets must not change what is kept. With the CUDA run size the CPU kernel
    # runs what the CUDA path runs.
    g = torch.Generator().manual_seed(3)
    batch, num = 3, 3000
    boxes = random_boxes(g, (batch, num), image_size=2000.0, max_size=400.0) - 700.0
    scores = (torch.rand(batch, num, generator=g) * 50).round() / 50  # many ties
    labels = torch.minimum(torch.randint(0, 40, (batch, num), generator=g), torch.tensor(30))
    valid = torch.rand(batch, num, generator=g) < 0.9
    size = postprocess_module._CPU_CALL_SIZE if call_size is None else call_size
    with nms_calls(size) as calls:
        keep = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=0.5)
    groups = group_sizes(labels, valid)
    assert sum(calls) == int(valid.sum()) and len(calls) > 1
    assert all(c <= size or c in groups for c in calls)
    for b in range(batch):
        v = valid[b]
        ref = torchvision.ops.batched_nms(boxes[b][v], scores[b][v], labels[b][v], 0.5)
        expected = torch.zeros(int(v.sum()), dtype=torch.bool).index_fill(0, ref, True)
        assert torch.equal(keep[b][v], expected), f"image {b}"
        assert not keep[b][~v].any()


def test_nms_keep_mask_op_passes_opcheck():
    g = torch.Generator().manual_seed(0)
    boxes, scores, labels, valid = nms_inputs(g, 2, 30, 3, 0.7)
    torch.library.opcheck(torch.ops.fdet.nms_keep_mask.default, (boxes, scores, labels, valid, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("call_size", [None, 100])
def test_nms_keep_mask_on_cuda_equals_cpu(call_size):
    g = torch.Generator().manual_seed(1)
    boxes, scores, labels, valid = nms_inputs(g, 4, 3000, 6, 0.8)
    ref = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=0.5)
    args = (boxes.cuda(), scores.cuda(), labels.cuda(), valid.cuda())
    size = postprocess_module._CUDA_CALL_SIZE if call_size is None else call_size
    with mock.patch.object(postprocess_module, "_CUDA_CALL_SIZE", size):
        keep = nms_keep_mask(*args, iou_threshold=0.5)
    assert keep.device.type == "cuda"
    assert torch.equal(keep.cpu(), ref)


def test_batched_nms_on_empty_inputs():
    det = batched_nms(
        torch.zeros(2, 0, 4),
        torch.zeros(2, 0),
        torch.zeros(2, 0, dtype=torch.int64),
        torch.zeros(2, 0, dtype=torch.bool),
        iou_threshold=0.5,
        max_detections=5,
    )
    assert_well_formed(det, 5)
    assert not det.valid.any()


# ------------------------------------------------------------------------------------------------
# Against greedy NMS written out
# ------------------------------------------------------------------------------------------------


def iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy boxes; 0 when both are empty."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_nms(boxes, scores, labels, valid, iou_threshold: float) -> list[list[int]]:
    """Per image, the indices kept by textbook greedy NMS, best first: visit the valid
    candidates by score descending and keep one unless a kept candidate of its label overlaps
    it with IoU > ``iou_threshold``."""
    kept_per_image = []
    for b in range(len(boxes)):
        order = sorted(
            (c for c in range(len(boxes[b])) if valid[b][c]), key=lambda c: -scores[b][c]
        )
        kept: list[int] = []
        for c in order:
            if all(
                labels[b][k] != labels[b][c] or iou(boxes[b][k], boxes[b][c]) <= iou_threshold
                for k in kept
            ):
                kept.append(c)
        kept_per_image.append(kept)
    return kept_per_image


@st.composite
def grid_nms_cases(draw: st.DrawFn):
    """Boxes on a coarse grid (with a binary scale, so every IoU is computed exactly): many
    duplicates, touching and empty boxes, and IoUs exactly at the thresholds; distinct scores
    (ties have no defined winner); invalid candidates with garbage boxes."""
    batch = draw(st.integers(1, 3))
    num = draw(st.integers(0, 24))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 8.0]))
    coords = st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(0, 8), st.integers(0, 8))
    cells = draw(st.lists(coords, min_size=batch * num, max_size=batch * num))
    boxes = torch.tensor(
        [[x * scale, y * scale, (x + w) * scale, (y + h) * scale] for x, y, w, h in cells],
        dtype=torch.float32,
    ).reshape(batch, num, 4)
    ranks = draw(
        st.lists(st.integers(0, 10**6), min_size=batch * num, max_size=batch * num, unique=True)
    )
    scores = (torch.tensor(ranks, dtype=torch.float64) / 10**6).float().reshape(batch, num)
    num_labels = draw(st.integers(1, 3))
    labels = draw(
        st.lists(st.integers(0, num_labels - 1), min_size=batch * num, max_size=batch * num)
    )
    labels = torch.tensor(labels, dtype=torch.int64).reshape(batch, num)
    flags = draw(st.lists(st.booleans(), min_size=batch * num, max_size=batch * num))
    valid = torch.tensor(flags, dtype=torch.bool).reshape(batch, num)
    boxes = torch.where(valid[..., None], boxes, float("nan"))
    return boxes, scores, labels, valid


@given(
    case=grid_nms_cases(),
    iou_threshold=st.sampled_from([0.0, 0.25, 1 / 3, 0.5, 0.7, 1.0]),
    max_detections=st.integers(1, 30),
)
def test_nms_equals_greedy_nms_written_out(case, iou_threshold, max_detections):
    boxes, scores, labels, valid = case
    expected = greedy_nms(
        boxes.tolist(), scores.tolist(), labels.tolist(), valid.tolist(), iou_threshold
    )
    keep = nms_keep_mask(boxes, scores, labels, valid, iou_threshold=iou_threshold)
    for b, kept in enumerate(expected):
        assert sorted(keep[b].nonzero().flatten().tolist()) == sorted(kept), f"image {b}"
    det = batched_nms(
        boxes, scores, labels, valid, iou_threshold=iou_threshold, max_detections=max_detections
    )
    assert_well_formed(det, max_detections)
    for b, kept in enumerate(expected):
        top = torch.tensor(kept[:max_detections], dtype=torch.int64)
        n = len(top)
        assert det.valid[b].sum() == n, f"image {b}"
        assert torch.equal(det.scores[b, :n], scores[b, top])
        assert torch.equal(det.labels[b, :n], labels[b, top])
        assert torch.equal(det.boxes[b, :n], boxes[b, top])


def test_greedy_nms_reference_on_a_worked_example():
    """The reference itself. A suppresses B (IoU 1/2); B would suppress C (IoU 1/3) but is gone,
    and A overlaps C less (IoU 1/5); D has another label; E, the best, is invalid."""
    a, b, c = [0, 0, 2, 1], [0, 0, 1, 1], [-0.5, 0, 0.5, 1]
    boxes = [[a, b, c, a, a]]
    scores = [[0.9, 0.8, 0.7, 0.6, 1.0]]
    labels = [[0, 0, 0, 1, 0]]
    valid = [[True, True, True, True, False]]
    assert (iou(a, b), iou(b, c), iou(a, c)) == (0.5, 1 / 3, 0.2)
    assert greedy_nms(boxes, scores, labels, valid, 0.3) == [[0, 2, 3]]
    assert greedy_nms(boxes, scores, labels, valid, 0.5) == [[0, 1, 2, 3]]  # 1/2 is not > 1/2
    assert greedy_nms(boxes, scores, labels, valid, 0.1) == [[0, 3]]
    assert greedy_nms([[a, a]], [[0.5, 0.6]], [[0, 0]], [[True, True]], 1.0) == [[1, 0]]


# ------------------------------------------------------------------------------------------------
# Compiled and exported
# ------------------------------------------------------------------------------------------------

DENSE_CONFIG = dict(score_threshold=0.05, topk_per_level=40, iou_threshold=0.5, max_detections=30)


class DensePostprocess(nn.Module):
    def forward(self, l0, l1, d0, d1, a0, a1, image_sizes):
        det = postprocess_dense([l0, l1], [d0, d1], [a0, a1], image_sizes, **DENSE_CONFIG)
        return tuple(det)


class BatchedNms(nn.Module):
    def forward(self, boxes, scores, labels, valid):
        return tuple(batched_nms(boxes, scores, labels, valid, iou_threshold=0.5, max_detections=8))


def _dense_module_args(case: DenseCase):
    return (*case.cls_logits, *case.box_deltas, *case.anchors, case.image_sizes)


def _assert_same_detections(ours, ref) -> None:
    ours, ref = Detections(*ours), Detections(*ref)
    assert torch.equal(ours.valid, ref.valid)
    assert torch.equal(ours.scores, ref.scores)
    assert torch.equal(ours.labels, ref.labels)
    torch.testing.assert_close(ours.boxes, ref.boxes, rtol=0, atol=1e-4)


@pytest.mark.compile
def test_postprocess_dense_compiled_equals_eager():
    case = DenseCase(4, batch=2, num_classes=4, level_sizes=(80, 20), empty_images=(1,))
    compiled = torch.compile(postprocess_dense, fullgraph=True)
    _assert_same_detections(
        compiled(*case.args(), **DENSE_CONFIG), postprocess_dense(*case.args(), **DENSE_CONFIG)
    )


@pytest.mark.compile
def test_postprocess_dense_exports():
    case = DenseCase(5, batch=2, num_classes=4, level_sizes=(80, 20))
    program = torch.export.export(DensePostprocess(), _dense_module_args(case), strict=False)
    # NMS is one opaque call with a static [B, C] result: no data-dependent sizes, no guards.
    targets = [node.target for node in program.graph.nodes]
    assert targets.count(torch.ops.fdet.nms_keep_mask.default) == 1
    assert torch.ops.torchvision.nms.default not in targets
    assert not program.range_constraints
    for seed, empty in [(5, ()), (6, (0,)), (7, (0, 1))]:
        other = DenseCase(seed, batch=2, num_classes=4, level_sizes=(80, 20), empty_images=empty)
        args = _dense_module_args(other)
        _assert_same_detections(program.module()(*args), DensePostprocess()(*args))


@pytest.mark.compile
def test_exported_batched_nms_runs_when_nms_keeps_fewer_than_two():
    g = torch.Generator().manual_seed(0)
    example = nms_inputs(g, 1, 4, 2, 1.0)
    program = torch.export.export(BatchedNms(), example, strict=False)
    # One valid box that suppresses its copies: the NMS kernel keeps a single candidate.
    same = torch.tensor([0.0, 0.0, 5.0, 5.0]).expand(1, 4, 4).contiguous()
    args = (same, torch.rand(1, 4, generator=g), torch.zeros(1, 4, dtype=torch.int64))
    for valid in (torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool)):
        det = Detections(*program.module()(*args, valid))
        _assert_same_detections(det, BatchedNms()(*args, valid))
        assert int(det.valid.sum()) == int(valid.any())


def test_score_threshold_is_strict():
    logits = torch.full((1, 2, 1), math.log(0.5 / 0.5))  # score exactly 0.5
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    det = postprocess_dense(
        [logits],
        [torch.zeros(1, 2, 4)],
        [anchors],
        torch.tensor([[100, 100]]),
        score_threshold=0.5,
        topk_per_level=10,
        iou_threshold=0.5,
        max_detections=4,
    )
    assert not det.valid.any()
