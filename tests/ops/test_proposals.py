"""Region proposals (fdet.ops.proposals.generate_proposals): against a per-image reading built
from torchvision's own box ops, padding, batching and the compiler."""

from __future__ import annotations

import math
from typing import NamedTuple

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from fdet.constants import DEFAULT_SCALE_CLIP
from fdet.ops.proposals import Proposals, generate_proposals
from tests.strategies import random_boxes, seeds


class Case(NamedTuple):
    objectness: torch.Tensor  # [B, A]
    deltas: torch.Tensor  # [B, A, 4]
    anchors: torch.Tensor  # [A, 4]
    num_per_level: list[int]
    image_sizes: torch.Tensor  # [B, 2]
    pre_nms_topk: int
    post_nms_topk: int
    nms_threshold: float
    min_size: float
    score_threshold: float

    def run(self, **changes) -> Proposals:
        c = self._replace(**changes)
        return generate_proposals(
            c.objectness,
            c.deltas,
            c.anchors,
            c.num_per_level,
            c.image_sizes,
            pre_nms_topk=c.pre_nms_topk,
            post_nms_topk=c.post_nms_topk,
            nms_threshold=c.nms_threshold,
            min_size=c.min_size,
            score_threshold=c.score_threshold,
        )


@st.composite
def proposal_cases(draw: st.DrawFn) -> Case:
    """Up to three levels of scattered anchors (some empty), moderate logits (no ties in the
    sigmoid), deltas sometimes wild enough to hit the clip, images of different sizes."""
    g = torch.Generator().manual_seed(draw(seeds))
    b = draw(st.integers(1, 3))
    num_per_level = draw(st.lists(st.integers(0, 30), min_size=1, max_size=3))
    a = sum(num_per_level)
    anchors = random_boxes(g, (a,), image_size=64.0, min_size=2.0, max_size=40.0) - 8.0
    objectness = torch.randn(b, a, generator=g) * 2
    deltas = torch.randn(b, a, 4, generator=g) * draw(st.sampled_from([0.1, 0.5, 6.0]))
    image_sizes = torch.randint(24, 65, (b, 2), generator=g)
    return Case(
        objectness,
        deltas,
        anchors,
        num_per_level,
        image_sizes,
        pre_nms_topk=draw(st.integers(1, 20)),
        post_nms_topk=draw(st.integers(1, 30)),
        nms_threshold=draw(st.sampled_from([0.3, 0.5, 0.7])),
        min_size=draw(st.sampled_from([1e-3, 4.0])),
        score_threshold=draw(st.sampled_from([0.0, 0.3, 0.6])),
    )


def reference(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, torchvision's RPN filtering spelled out with torchvision's ops: top-k logits
    per level, its BoxCoder (weights 1), clip, remove small boxes, score >= threshold,
    batched NMS by level, the first post_nms_topk."""
    coder = TVBoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
    out = []
    for b in range(case.objectness.shape[0]):
        index, levels = [], []
        start = 0
        for level, count in enumerate(case.num_per_level):
            logits = case.objectness[b, start : start + count]
            top = logits.topk(min(case.pre_nms_topk, count)).indices + start
            index.append(top)
            levels.append(torch.full_like(top, level))
            start += count
        idx, lvl = torch.cat(index), torch.cat(levels)
        boxes = coder.decode_single(case.deltas[b, idx], case.anchors[idx])
        boxes = clip_boxes_to_image(boxes, tuple(case.image_sizes[b].tolist()))
        scores = torch.sigmoid(case.objectness[b, idx])
        keep = remove_small_boxes(boxes, case.min_size)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = torch.where(scores >= case.score_threshold)[0]
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes, scores, lvl, case.nms_threshold)[: case.post_nms_topk]
        out.append((boxes[keep], scores[keep]))
    return out


def assert_same(got: Proposals, want: Proposals) -> None:
    for name, g, w in zip(Proposals._fields, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert torch.equal(g, w), (name, g, w)


def test_clip_is_torchvisions() -> None:
    assert TVBoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).bbox_xform_clip == DEFAULT_SCALE_CLIP
    assert math.log(1000.0 / 16) == DEFAULT_SCALE_CLIP


@given(case=proposal_cases())
def test_proposals_are_torchvisions_per_image(case: Case) -> None:
    out = case.run()
    r = case.post_nms_topk
    assert out.boxes.shape == (case.objectness.shape[0], r, 4)
    for b, (boxes, scores) in enumerate(reference(case)):
        n = boxes.shape[0]
        assert out.valid[b].tolist() == [True] * n + [False] * (r - n)
        torch.testing.assert_close(out.boxes[b, :n], boxes, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.scores[b, :n], scores)
        assert (out.boxes[b, n:] == 0).all() and (out.scores[b, n:] == 0).all()


@given(case=proposal_cases())
def test_valid_proposals_lie_in_the_image_and_are_sorted(case: Case) -> None:
    out = case.run()
    h = case.image_sizes[:, 0, None].float()
    w = case.image_sizes[:, 1, None].float()
    x1, y1, x2, y2 = out.boxes.unbind(-1)
    v = out.valid
    assert ((x1 >= 0) & (y1 >= 0) & (x2 <= w) & (y2 <= h))[v].all()
    assert ((x2 - x1 >= case.min_size) & (y2 - y1 >= case.min_size))[v].all()
    assert (out.scores[v] >= case.score_threshold).all()
    key = torch.where(v, out.scores, -1.0)
    assert (key[:, :-1] >= key[:, 1:]).all()


@settings(max_examples=30)
@given(case=proposal_cases(), extra=st.integers(1, 10))
def test_more_slots_only_add_padding(case: Case, extra: int) -> None:
    """Asking for more proposal slots keeps the first ones and pads: when fewer proposals
    survive than there are slots, the extra slots are invalid, with zero boxes and scores."""
    small, large = case.run(), case.run(post_nms_topk=case.post_nms_topk + extra)
    r = case.post_nms_topk
    assert_same(Proposals(*(x[:, :r] for x in large)), small)
    tail = Proposals(*(x[:, r:] for x in large))
    n_all = torch.tensor([len(s) for _, s in reference(case._replace(post_nms_topk=r + extra))])
    assert torch.equal(large.valid.sum(1), n_all)
    assert (tail.boxes[~tail.valid] == 0).all() and (tail.scores[~tail.valid] == 0).all()


@settings(max_examples=30)
@given(case=proposal_cases())
def test_batched_equals_per_image(case: Case) -> None:
    whole = case.run()
    for i in range(case.objectness.shape[0]):
        one = case.run(
            objectness=case.objectness[i : i + 1],
            deltas=case.deltas[i : i + 1],
            image_sizes=case.image_sizes[i : i + 1],
        )
        # exact validity; values to the last bits (vectorized CPU kernels round by batch size)
        mine = Proposals(*(x[i : i + 1] for x in whole))
        assert torch.equal(mine.valid, one.valid)
        torch.testing.assert_close(mine.boxes, one.boxes, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(mine.scores, one.scores, atol=0, rtol=1e-6)


def test_nms_is_per_level() -> None:
    """Two equal boxes on different levels both survive; on one level only the better one."""
    anchors = torch.tensor([[10.0, 10.0, 30.0, 30.0]] * 2)
    logits = torch.tensor([[2.0, 1.0]])
    deltas = torch.zeros(1, 2, 4)
    sizes = torch.tensor([[64, 64]])
    kw = {"pre_nms_topk": 5, "post_nms_topk": 3, "nms_threshold": 0.7}
    two_levels = generate_proposals(logits, deltas, anchors, [1, 1], sizes, **kw)
    one_level = generate_proposals(logits, deltas, anchors, [2], sizes, **kw)
    assert two_levels.valid[0].tolist() == [True, True, False]
    assert one_level.valid[0].tolist() == [True, False, False]
    torch.testing.assert_close(one_level.scores[0, 0], torch.sigmoid(torch.tensor(2.0)))


def test_bad_arguments_are_errors() -> None:
    z = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="adds up to 2"):
        generate_proposals(
            z, torch.zeros(1, 3, 4), torch.zeros(3, 4), [1, 1], torch.ones(1, 2),
            pre_nms_topk=1, post_nms_topk=1, nms_threshold=0.5,
        )  # fmt: skip
    with pytest.raises(ValueError, match="must be >= 1"):
        generate_proposals(
            z, torch.zeros(1, 3, 4), torch.zeros(3, 4), [3], torch.ones(1, 2),
            pre_nms_topk=0, post_nms_topk=1, nms_threshold=0.5,
        )  # fmt: skip


@pytest.mark.compile
def test_compiled_equals_eager() -> None:
    def run(objectness, deltas, anchors, sizes):
        return generate_proposals(
            objectness, deltas, anchors, [40, 20, 6], sizes,
            pre_nms_topk=16, post_nms_topk=24, nms_threshold=0.6, min_size=1.0,
        )  # fmt: skip

    compiled = torch.compile(run, fullgraph=True, dynamic=False, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(g, (66,), image_size=64.0, min_size=4.0, max_size=40.0)
    for _ in range(2):  # the same shapes: one graph, two batches
        objectness = torch.randn(2, 66, generator=g)
        deltas = torch.randn(2, 66, 4, generator=g) * 0.3
        sizes = torch.randint(32, 65, (2, 2), generator=g)
        eager = run(objectness, deltas, anchors, sizes)
        assert eager.valid.sum() > 10
        assert_same(compiled(objectness, deltas, anchors, sizes), eager)
