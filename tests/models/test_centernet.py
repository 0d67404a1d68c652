"""CenterNet: targets, objective and postprocess on padded batches, the module on the detector
contract, and its specs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import attrs
import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from fdet import build, specs
from fdet.data.sample import Batch
from fdet.models.detectors.base import Term, total_loss
from fdet.models.detectors.centernet import (
    CenterNet,
    centernet_loss,
    centernet_postprocess,
    centernet_targets,
)
from fdet.models.heads.centernet import CenterNetOutputs
from fdet.models.necks.centernet import CenterNetNeck, bilinear_kernel
from fdet.ops.heatmap import heatmap_focal_loss
from tests.strategies import random_boxes, seeds

IMAGE = 128
STRIDE = 4
OUT = IMAGE // STRIDE
K = 3
ROOT = Path(__file__).resolve().parents[2]


class Gts(NamedTuple):
    boxes: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    crowd: torch.Tensor


def random_gts(g: torch.Generator, counts: list[int], crowd_fraction: float = 0.0) -> Gts:
    """Padded gts inside the image; padded slots hold garbage (NaN boxes, out-of-range labels,
    crowd flags)."""
    m = max(counts, default=0)
    boxes = random_boxes(g, (len(counts), m), image_size=IMAGE - 50, min_size=3, max_size=48)
    labels = torch.randint(0, K, (len(counts), m), generator=g)
    valid = torch.arange(m)[None, :] < torch.tensor(counts)[:, None]
    crowd = (torch.rand(len(counts), m, generator=g) < crowd_fraction) & valid
    boxes = torch.where(valid[..., None], boxes, math.nan)
    labels = torch.where(valid, labels, -7)
    crowd = crowd | (~valid & (torch.rand(len(counts), m, generator=g) < 0.5))
    return Gts(boxes, labels, valid, crowd)


def random_outputs(g: torch.Generator, batch: int, *, grad: bool = False) -> CenterNetOutputs:
    return CenterNetOutputs(
        heatmap=(torch.randn(batch, K, OUT, OUT, generator=g) * 2 - 2).requires_grad_(grad),
        size=(torch.rand(batch, 2, OUT, OUT, generator=g) * 12).requires_grad_(grad),
        offset=torch.rand(batch, 2, OUT, OUT, generator=g).requires_grad_(grad),
    )


def loss_of(outputs: CenterNetOutputs, gts: Gts, **kw) -> dict[str, Term]:
    terms = centernet_loss(outputs, *gts, stride=STRIDE, **kw)
    assert list(terms) == ["heatmap", "size", "offset"]
    count = terms["heatmap"].count
    assert all(t.count is count for t in terms.values())  # one normalizer: one backward pass
    assert all(t.total.dtype == t.count.dtype == torch.float32 for t in terms.values())
    return terms


def totals(terms: dict[str, Term]) -> torch.Tensor:
    return torch.stack([terms["heatmap"].count, *(t.total for t in terms.values())])


@st.composite
def cases(draw: st.DrawFn, *, max_batch: int = 3) -> tuple[CenterNetOutputs, Gts]:
    g = torch.Generator().manual_seed(draw(seeds))
    counts = draw(st.lists(st.integers(0, 6), min_size=1, max_size=max_batch))
    crowd = draw(st.sampled_from([0.0, 0.0, 0.3]))
    return random_outputs(g, len(counts)), random_gts(g, counts, crowd)


# --- targets -----------------------------------------------------------------------------------


def test_targets_by_hand() -> None:
    boxes = torch.tensor(
        [
            [8.0, 12.0, 40.0, 28.0],  # cells (2, 3, 10, 7): centre (6, 5), size (8, 4)
            [9.0, 10.0, 30.0, 31.0],  # cells (2.25, 2.5, 7.5, 7.75): centre (4.875, 5.125)
            [100.0, 100.0, 100.0, 120.0],  # empty: not an object
            [60.0, 60.0, 90.0, 90.0],  # crowd: not an object
        ]
    )[None]
    labels = torch.tensor([[1, 2, 0, 1]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    crowd = torch.tensor([[False, False, False, True]])
    t = centernet_targets(boxes, labels, valid, crowd, num_classes=K, size=(OUT, OUT), stride=4)
    assert t.objects.tolist() == [[True, True, False, False]]
    assert t.regress.tolist() == [[True, True, False, False]]
    assert t.num_objects == 2
    assert t.centre_index[0, :2].tolist() == [5 * OUT + 6, 5 * OUT + 4]
    torch.testing.assert_close(t.size[0, :2], torch.tensor([[8.0, 4.0], [5.25, 5.25]]))
    torch.testing.assert_close(t.offset[0, :2], torch.tensor([[0.0, 0.0], [0.875, 0.125]]))
    assert t.heatmap[0, 1, 5, 6] == 1.0 and t.heatmap[0, 2, 5, 4] == 1.0
    assert (t.heatmap == 1).sum() == 2  # nothing for the empty box or the crowd
    # radius of an 8 × 4 box at 0.3 (exact rule) is 1.16 -> 1 cell: σ = 1/2
    assert t.heatmap[0, 1, 5, 7].item() == pytest.approx(math.exp(-2))
    assert t.heatmap[0, 1, 5, 8] == 0.0
    # the crowd box (cells 15..22.5) is left out of its class's heatmap loss, only there
    counted = t.heatmap_counted[0]
    assert not counted[1, 15:22, 15:22].any() and counted[1, 23:, :].all()
    assert counted[0].all() and counted[2].all()


def test_one_object_a_cell_for_size_and_offset() -> None:
    """Centres in one cell: the smaller box wins the cell, whatever the slot order; between
    equal areas, the lower slot. Every object keeps its peak and its count."""
    big = [10.0, 10.0, 30.0, 30.0]  # centre (20, 20) -> cell (5, 5)
    small = [17.0, 18.0, 23.0, 22.5]  # centre (20, 20.25) -> cell (5, 5)
    other = [60.0, 60.0, 70.0, 70.0]
    same_area = [12.0, 10.0, 32.0, 30.0]  # centre (22, 20) -> cell (5, 5), the area of big
    for order in ([big, small, other], [small, big, other]):
        boxes = torch.tensor([order])
        t = centernet_targets(
            boxes,
            torch.tensor([[0, 1, 2]]),
            torch.ones(1, 3, dtype=torch.bool),
            num_classes=K,
            size=(OUT, OUT),
            stride=4,
        )
        winner = order.index(small)
        assert t.regress[0].tolist() == [i == winner or i == 2 for i in range(3)]
        assert t.num_objects == 3
        assert (t.heatmap[0, :2, 5, 5] == 1).all()  # a peak on both classes
    t = centernet_targets(
        torch.tensor([[same_area, big]]),
        torch.zeros(1, 2, dtype=torch.long),
        torch.ones(1, 2, dtype=torch.bool),
        num_classes=K,
        size=(OUT, OUT),
        stride=4,
    )
    assert t.regress.tolist() == [[True, False]]
    # the loss sees the winner's targets only: a size map equal to them costs nothing
    outputs = random_outputs(torch.Generator().manual_seed(0), 1)
    size = outputs.size.clone()
    size[0, :, 5, 5] = torch.tensor([1.5, 1.125])  # the small box in cells
    boxes = torch.tensor([[big, small]])
    gts = Gts(boxes, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool), None)
    assert loss_of(outputs._replace(size=size), gts)["size"].total == 0


@settings(max_examples=30)
@given(case=cases(), extra=st.integers(1, 4))
def test_padding_is_invisible(case, extra) -> None:
    outputs, gts = case
    b = gts.valid.shape[0]
    g = torch.Generator().manual_seed(extra)
    garbage = Gts(
        boxes=torch.cat(
            (torch.full((b, 1, 4), math.nan), torch.randn(b, extra - 1, 4, generator=g) * 1e4),
            dim=1,
        ),
        labels=torch.randint(-5, 1000, (b, extra), generator=g),
        valid=torch.zeros(b, extra, dtype=torch.bool),
        crowd=torch.rand(b, extra, generator=g) < 0.5,
    )
    padded = Gts(*(torch.cat((x, y), dim=1) for x, y in zip(gts, garbage)))
    got, want = totals(loss_of(outputs, padded)), totals(loss_of(outputs, gts))
    # the count and the heatmap total (a sum over [B, K, H, W]) are exact; the size and offset
    # totals sum over [B, M], where more slots change the order of the additions
    torch.testing.assert_close(got[:2], want[:2], rtol=0, atol=0)
    torch.testing.assert_close(got[2:], want[2:], rtol=1e-6, atol=1e-6)


@settings(max_examples=30)
@given(case=cases())
def test_batched_equals_per_image(case) -> None:
    """Each total of the batch is the sum of the images' totals, and so is the count."""
    outputs, gts = case
    whole = totals(loss_of(outputs, gts))
    parts = sum(
        totals(
            loss_of(
                CenterNetOutputs(*(x[i : i + 1] for x in outputs)),
                Gts(*(x[i : i + 1] for x in gts)),
            )
        )
        for i in range(gts.valid.shape[0])
    )
    torch.testing.assert_close(whole, parts)


@settings(max_examples=20)
@given(case=cases())
def test_terms_are_the_formulas(case) -> None:
    """The heatmap term is the focal loss summed over the counted cells; the size and offset
    terms are the mean absolute error of the pair at each object's centre; the weights are the
    paper's (1, 0.1, 1)."""
    outputs, gts = case
    terms = loss_of(outputs, gts)
    t = centernet_targets(*gts, num_classes=K, size=(OUT, OUT), stride=STRIDE)
    focal = heatmap_focal_loss(outputs.heatmap, t.heatmap)
    torch.testing.assert_close(terms["heatmap"].total, focal[t.heatmap_counted].sum())
    for name, target in (("size", t.size), ("offset", t.offset)):
        want = torch.zeros(())
        for b, m in t.regress.nonzero().tolist():  # one object at a time
            y, x = divmod(int(t.centre_index[b, m]), OUT)
            predicted = getattr(outputs, name)[b, :, y, x]
            want = want + (predicted - target[b, m]).abs().mean()
        torch.testing.assert_close(terms[name].total, want)
    assert terms["heatmap"].count == t.objects.sum()
    assert [term.weight for term in terms.values()] == [1.0, 0.1, 1.0]


def test_images_without_objects_give_finite_losses() -> None:
    g = torch.Generator().manual_seed(1)
    outputs = random_outputs(g, 2, grad=True)
    gts = random_gts(g, [3, 0])
    terms = loss_of(outputs, gts)
    total_loss(terms).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in outputs)
    assert outputs.heatmap.grad[1].abs().sum() > 0  # the empty image teaches "background"
    assert outputs.size.grad[1].abs().sum() == 0  # ... and nothing about boxes
    assert outputs.size.grad[0].abs().sum() > 0
    # a batch without objects, with padded slots or none: zero targets everywhere
    logits = outputs.heatmap.detach()
    expected = heatmap_focal_loss(logits, torch.zeros_like(logits)).sum()
    detached = CenterNetOutputs(*(x.detach() for x in outputs))
    for empty in (gts._replace(valid=torch.zeros_like(gts.valid)), Gts(*(x[:, :0] for x in gts))):
        terms = loss_of(detached, empty)
        assert terms["heatmap"].count == 0
        assert terms["size"].total == 0 and terms["offset"].total == 0
        torch.testing.assert_close(terms["heatmap"].total, expected)
        assert total_loss(terms).isfinite()


def test_crowds_give_no_peak_and_are_not_penalized_inside() -> None:
    g = torch.Generator().manual_seed(2)
    outputs = random_outputs(g, 1)
    crowd_box = torch.tensor([8.0, 8.0, 72.0, 72.0])  # cells 2..18
    inside = torch.tensor([20.0, 20.0, 44.0, 44.0])  # an object in it: centre cell (8, 8)
    gts = Gts(
        torch.stack((crowd_box, inside))[None],
        torch.tensor([[1, 1]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([[True, False]]),
    )
    base = loss_of(outputs, gts)
    assert base["heatmap"].count == 1
    logits = outputs.heatmap.clone()
    logits[0, 1, 3:18, 3:18] = 30.0  # confident "object" all over the crowd, its own class
    logits[0, 1, 8, 8] = outputs.heatmap[0, 1, 8, 8]  # the real object's peak stays as it was
    moved = loss_of(outputs._replace(heatmap=logits), gts)
    torch.testing.assert_close(totals(moved), totals(base), rtol=0, atol=0)
    logits[0, 1, 8, 8] = -30.0  # but missing the real object inside it costs
    assert (
        loss_of(outputs._replace(heatmap=logits), gts)["heatmap"].total > base["heatmap"].total + 20
    )
    other = outputs.heatmap.clone()
    other[0, 0, 3:18, 3:18] = 30.0  # another class is penalized there as anywhere
    assert loss_of(outputs._replace(heatmap=other), gts)["heatmap"].total > 1000


# --- postprocess -----------------------------------------------------------------------------


def perfect_outputs(gts: Gts) -> CenterNetOutputs:
    """What a perfect head predicts: a peak logit at each centre (and low ones around it, below
    the score threshold), the target size and offset at each centre cell."""
    t = centernet_targets(*gts, num_classes=K, size=(OUT, OUT), stride=STRIDE)
    heatmap = torch.where(t.heatmap == 1, 8.0, -10.0 + 4.0 * t.heatmap)
    b = gts.valid.shape[0]
    size = torch.zeros(b, 2, OUT * OUT)
    offset = torch.zeros(b, 2, OUT * OUT)
    index = torch.where(t.regress, t.centre_index, OUT * OUT)  # losers go to a spare column
    spare = torch.zeros(b, 2, 1)
    size = torch.cat((size, spare), 2).scatter(2, index[:, None].expand(-1, 2, -1), t.size.mT)
    offset = torch.cat((offset, spare), 2).scatter(2, index[:, None].expand(-1, 2, -1), t.offset.mT)
    shape = (b, 2, OUT, OUT)
    return CenterNetOutputs(heatmap, size[..., :-1].reshape(shape), offset[..., :-1].reshape(shape))


@settings(max_examples=30)
@given(case=cases())
def test_perfect_predictions_decode_to_the_ground_truth(case) -> None:
    _, gts = case
    outputs = perfect_outputs(gts)
    image_sizes = torch.full((gts.valid.shape[0], 2), IMAGE)
    det = centernet_postprocess(outputs, image_sizes, stride=STRIDE)
    assert det.boxes.shape == (gts.valid.shape[0], 100, 4)
    t = centernet_targets(*gts, num_classes=K, size=(OUT, OUT), stride=STRIDE)
    for b in range(gts.valid.shape[0]):
        objects = t.objects[b].nonzero().flatten().tolist()
        peaks = {(int(gts.labels[b, m]), int(t.centre_index[b, m])) for m in objects}
        assert int(det.valid[b].sum()) == len(peaks)  # one detection per (class, cell)
        assert (det.scores[b, : len(peaks)] == torch.sigmoid(torch.tensor(8.0))).all()
        assert not det.valid[b, len(peaks) :].any() and (det.boxes[b, len(peaks) :] == 0).all()
        found = det.boxes[b, : len(peaks)]
        for m in t.regress[b].nonzero().flatten().tolist():  # each box comes back exactly
            distance = (found - gts.boxes[b, m]).abs().amax(-1)
            match = (distance < 1e-4) & (det.labels[b, : len(peaks)] == gts.labels[b, m])
            assert match.any(), (b, m, gts.boxes[b, m])


def test_postprocess_by_hand() -> None:
    heatmap = torch.full((1, K, OUT, OUT), -9.0)
    heatmap[0, 2, 10, 5] = 3.0  # a peak
    heatmap[0, 2, 10, 6] = 2.0  # its neighbour: suppressed
    heatmap[0, 0, 31, 31] = 1.0  # at the corner, its box clipped to the image
    heatmap[0, 1, 0, 0] = -4.7  # sigmoid 0.009: below the threshold
    size = torch.zeros(1, 2, OUT, OUT)
    offset = torch.zeros(1, 2, OUT, OUT)
    size[0, :, 10, 5] = torch.tensor([6.0, 2.0])
    offset[0, :, 10, 5] = torch.tensor([0.25, 0.5])
    size[0, :, 31, 31] = torch.tensor([4.0, -3.0])  # a negative size counts as 0
    det = centernet_postprocess(
        CenterNetOutputs(heatmap, size, offset),
        torch.tensor([[126, 127]]),
        stride=4,
        postprocess=specs.CenterNetPostprocess(topk=5),
    )
    assert det.valid.tolist() == [[True, True, False, False, False]]
    assert det.labels[0, :2].tolist() == [2, 0]
    torch.testing.assert_close(det.scores[0, :2], torch.sigmoid(torch.tensor([3.0, 1.0])))
    # centre (5.25, 10.5) · 4 = (21, 42), size (24, 8)
    torch.testing.assert_close(det.boxes[0, 0], torch.tensor([9.0, 38.0, 33.0, 46.0]))
    # centre (124, 124), size (16, 0), clipped to width 127 and height 126
    torch.testing.assert_close(det.boxes[0, 1], torch.tensor([116.0, 124.0, 127.0, 124.0]))
    assert (det.boxes[0, 2:] == 0).all() and (det.scores[0, 2:] == 0).all()


# --- the module --------------------------------------------------------------------------------


def tiny_spec(**kw) -> specs.CenterNet:
    return specs.CenterNet(
        backbone=specs.ResNet(
            depth=18, norm=specs.BatchNorm(), frozen_stages=-1, out_levels=(5,), width=16
        ),
        neck=specs.CenterNetNeck(channels=(32, 32, 16)),
        head=specs.CenterNetHead(num_classes=K, channels=16),
        **kw,
    )


def tiny_batch(g: torch.Generator, counts: list[int]) -> Batch:
    gts = random_gts(g, counts, crowd_fraction=0.3)
    b = len(counts)
    return Batch(
        images=torch.randint(0, 256, (b, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=g),
        image_sizes=torch.full((b, 2), IMAGE),
        gt_boxes=gts.boxes,
        gt_labels=gts.labels,
        gt_valid=gts.valid,
        gt_crowd=gts.crowd,
        image_ids=torch.arange(b),
        scales=torch.ones(b, 2),
    )


def test_build_forward_shapes_and_initialization() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec())
    assert isinstance(model, CenterNet) and model.stride == 4 and model.num_classes == K
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8)
    out = model(images)
    assert isinstance(out, CenterNetOutputs)
    assert out.heatmap.shape == (2, K, 24, 32)
    assert out.size.shape == out.offset.shape == (2, 2, 24, 32)
    assert model.head.heatmap[-1].bias.detach().allclose(torch.tensor(math.log(0.1 / 0.9)))
    assert model.head.heatmap[-1].bias[0].item() == pytest.approx(-2.197, abs=1e-3)
    # the up-sampling starts bilinear: the transposed conv is bilinear ×2 of each channel
    deconv = model.neck.stages[0][3]
    x = torch.randn(1, deconv.in_channels, 6, 5)
    torch.testing.assert_close(
        deconv(x)[..., 1:-1, 1:-1],
        F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)[..., 1:-1, 1:-1],
    )
    assert bilinear_kernel(4)[0].tolist() == pytest.approx([1 / 16, 3 / 16, 3 / 16, 1 / 16])
    det = model.predict(images, torch.tensor([[96, 128], [80, 100]]))
    assert det.boxes.shape == (2, 100, 4) and det.valid.dtype == torch.bool
    assert (det.boxes[1, :, 0::2] <= 100).all() and (det.boxes[1, :, 1::2] <= 80).all()


def test_neck_reads_its_level_among_several() -> None:
    neck = CenterNetNeck((8, 16), channels=(12, 6), in_level=4, input_levels=(3, 4))
    out = neck((torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)))
    assert out.shape == (2, 6, 16, 16) and neck.out_level == 2
    with pytest.raises(ValueError, match="input_levels"):
        CenterNetNeck((8,), in_level=5, input_levels=(4,))


def test_module_loss_trains_end_to_end_with_finite_gradients() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).train()
    batch = tiny_batch(torch.Generator().manual_seed(4), [3, 0])
    terms = model.loss(model(batch.images), batch)
    assert terms["heatmap"].count > 0
    total_loss(terms).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and gr.isfinite().all() for gr in grads)
    assert model.head.size[-1].weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_losses_are_float32_under_autocast() -> None:
    torch.manual_seed(0)
    model = build(tiny_spec()).eval()
    batch = tiny_batch(torch.Generator().manual_seed(5), [2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch.images)
        assert outputs.heatmap.dtype == torch.bfloat16
        low = model.loss(outputs, batch)
        det = model.postprocess(outputs, batch.image_sizes)
    assert all(t.total.dtype == t.count.dtype == torch.float32 for t in low.values())
    assert det.boxes.dtype == det.scores.dtype == torch.float32
    high = model.loss(CenterNetOutputs(*(x.float() for x in outputs)), batch)
    torch.testing.assert_close(totals(low), totals(high), rtol=0, atol=0)


def _objective(heatmap, size, offset, boxes, labels, valid, crowd, image_sizes):
    outputs = CenterNetOutputs(heatmap, size, offset)
    terms = centernet_loss(outputs, boxes, labels, valid, crowd, stride=STRIDE)
    return terms, centernet_postprocess(outputs, image_sizes, stride=STRIDE)


@pytest.mark.compile
def test_compiled_objective_and_postprocess_equal_eager() -> None:
    compiled = torch.compile(_objective, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(6)
    for counts in ([4, 0, 2], [1, 3, 0]):  # the same shapes: one graph, two batches
        args = (*random_outputs(g, 3), *random_gts(g, counts, 0.3), torch.full((3, 2), IMAGE))
        got_terms, got_det = compiled(*args)
        want_terms, want_det = _objective(*args)
        torch.testing.assert_close(totals(got_terms), totals(want_terms), rtol=1e-5, atol=1e-5)
        assert got_terms["heatmap"].count is got_terms["size"].count
        for a, b in zip(got_det, want_det):
            torch.testing.assert_close(a, b)


# --- specs -----------------------------------------------------------------------------------


def test_spec_round_trips_and_rejects_impossible_values() -> None:
    spec = tiny_spec(radius=specs.GaussianRadius(min_overlap=0.7, variant="cornernet"))
    assert specs.from_json(specs.to_json(spec)) == spec
    assert spec.stride == 4 and spec.num_classes == K
    assert attrs.evolve(spec, neck=specs.CenterNetNeck(channels=(32, 16))).stride == 8
    with pytest.raises(specs.SpecError, match=r"neck\.in_levels"):
        attrs.evolve(spec, backbone=attrs.evolve(spec.backbone, out_levels=(3, 4)))
    with pytest.raises(specs.SpecError, match="channels"):
        specs.CenterNetNeck(in_level=3, channels=(8, 8, 8, 8))
    with pytest.raises(specs.SpecError, match="kernel"):
        specs.CenterNetPostprocess(kernel=4)
    with pytest.raises(specs.SpecError, match="min_overlap"):
        specs.GaussianRadius(min_overlap=1.0)
    with pytest.raises(specs.SpecError, match="variant"):
        specs.GaussianRadius(variant="paper")
    with pytest.raises(specs.SpecError, match="groups"):
        specs.CenterNetNeck(channels=(32, 24), norm=specs.GroupNorm(groups=16))


@pytest.mark.parametrize(
    "path", ["specs/centernet/r18_140e_coco.py", "specs/shapes/centernet_r18.py"]
)
def test_spec_files_load_round_trip_and_build(path: str) -> None:
    exp = specs.load(ROOT / path)
    assert specs.from_json(specs.to_json(exp)) == exp
    assert isinstance(exp.model, specs.CenterNet) and exp.model.stride == 4
    with torch.device("meta"):
        model = build(exp.model)
    assert isinstance(model, CenterNet)
    if "coco" in path:
        assert exp.model.num_classes == 80
        images = exp.batch_size * exp.iterations
        assert images / 118_287 == pytest.approx(140, rel=1e-3)  # 140 COCO epochs
        assert exp.optimizer.lr == 5e-4 and exp.optimizer.weight_decay == 0  # Adam
