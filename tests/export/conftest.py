"""Tiny detectors of every exportable family with many detections, NMS that really suppresses,
and one image of the batch without any detection; and a comparison of detections as sets."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import numpy as np
import torch

from fdet import build, specs
from fdet.export import DetectionGraph

SHAPES = Path(__file__).resolve().parents[2] / "specs" / "shapes"
SIZE = 64
MAX_DETECTIONS = 300
EXPORTED = [
    "retinanet_r18_fpn",
    "fcos_r18_fpn",
    "atss_r18_fpn",
    "gfl_r18_fpn",
    "centernet_r18",
    "faster_rcnn_r18_fpn",
]  # and cascade_rcnn_r18_fpn, exported in test_cli_export.py

# Boxes that overlap some but not all: FCOS's distances start near 0 (boxes of a pixel or two),
# GFL's distributions flat (every box the whole image); bins of GFL ordered (l, t, r, b) × 17
BIAS_SHIFTS = {
    "fcos_r18_fpn": {"head.box_ltrb.bias": torch.tensor(2.0)},
    "gfl_r18_fpn": {"head.box_dists.bias": -0.3 * torch.arange(17.0).repeat(4)},
}


def tiny_spec(name: str) -> Any:
    """The model of ``specs/shapes/NAME.py`` with a backbone of width 16."""
    model = specs.load(SHAPES / f"{name}.py", specs.Experiment).model
    return attrs.evolve(model, backbone=attrs.evolve(model.backbone, width=16))


def evolve_postprocess(spec: Any, **changes: Any) -> Any:
    """``spec`` with ``changes`` applied to the postprocess spec(s) that have those fields:
    dense and CenterNet ``postprocess``, Faster R-CNN's ``roi_head.postprocess``, every
    Cascade R-CNN stage's."""

    def evolve(post: Any) -> Any:
        return attrs.evolve(post, **{k: v for k, v in changes.items() if hasattr(post, k)})

    if hasattr(spec, "postprocess"):
        return attrs.evolve(spec, postprocess=evolve(spec.postprocess))
    if hasattr(spec, "roi_head"):
        head = spec.roi_head
        return attrs.evolve(spec, roi_head=attrs.evolve(head, postprocess=evolve(head.postprocess)))
    stages = tuple(attrs.evolve(s, postprocess=evolve(s.postprocess)) for s in spec.stages)
    return attrs.evolve(spec, stages=stages)


def candidate_images(count: int = 6) -> torch.Tensor:
    """``[count, 3, 64, 64]`` float pixel values 0–255: flat grays, a gradient, and noise."""
    g = torch.Generator().manual_seed(1)
    flat = [torch.full((3, SIZE, SIZE), v) for v in (0.0, 128.0, 255.0)]
    ramp = torch.linspace(0, 255, SIZE)
    gradient = torch.stack([ramp[None, :].expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE)])
    gradient = torch.cat([gradient, gradient[:1].flip(-1)])
    noise = [torch.rand(3, SIZE, SIZE, generator=g) * 255 for _ in range(count - 4)]
    return torch.stack([*flat, gradient, *noise])


def graph_outputs(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return DetectionGraph(model).eval()(images)


class Case(NamedTuple):
    """A tiny detector with random weights, images, and the image with no detection (None
    where no image of the set scores low enough))."""

    name: str
    spec: Any  # the model's spec
    model: torch.nn.Module
    images: torch.Tensor  # [B, 3, 64, 64] float 0-255
    empty: int | None


def widest_gap(scores: torch.Tensor, low: float, high: float) -> float:
    """The middle of the widest gap between ``scores`` in ``[low, high]`` (ends included): a
    threshold that no score is near, so that rounding differences never move a detection
    across it."""
    inside = scores[(scores > low) & (scores < high)].double()
    edges = torch.cat([torch.tensor([low, high], dtype=torch.float64), inside]).sort().values
    widest = int((edges[1:] - edges[:-1]).argmax())
    return float((edges[widest] + edges[widest + 1]) / 2)


def make_case(name: str) -> Case:
    """Build ``name`` (seeded) and choose its score threshold on ``candidate_images``:

    - if one image's best score is below the tenth best of every other image, the threshold is
      between the two: the image has no detection, the others at least 10 (two-stage detectors
      and CenterNet, whose scores follow the image's contrast);
    - otherwise (dense heads with group norm, whose scores barely depend on it) below the
      sixtieth best score of every image (or its last): every image has at least 20.

    Within those bounds the threshold is the middle of the widest gap between scores.
    The model is rebuilt with that threshold and the same weights. Checks that NMS (where the
    family has one) removes some detections."""
    torch.manual_seed(0)
    spec = evolve_postprocess(
        tiny_spec(name), score_threshold=0.0, max_detections=MAX_DETECTIONS, topk=MAX_DETECTIONS
    )
    weights = build(spec).eval().state_dict()
    for key, shift in BIAS_SHIFTS.get(name, {}).items():
        weights[key] = weights[key] + shift
    images = candidate_images()

    def built(**changes: Any) -> torch.nn.Module:
        model = build(evolve_postprocess(spec, **changes)).eval()
        model.load_state_dict(weights)
        return model

    _, scores, _, valid = graph_outputs(built(), images)
    ranked = torch.where(valid, scores, -math.inf).sort(dim=1, descending=True).values  # [B, N]
    lowest = int(ranked[:, 0].argmin())
    others = torch.cat([ranked[:lowest], ranked[lowest + 1 :]])
    empty: int | None = None
    if bool((others[:, 9] > ranked[lowest, 0]).all()):
        empty = lowest
        low, high = float(ranked[lowest, 0]), float(others[:, 9].min())
    else:
        k = min(60, int(valid.sum(dim=1).min()))
        low = float(ranked[:, 149].max().clamp(min=0)) if ranked.shape[1] >= 150 else 0.0
        high = float(ranked[:, k - 1].min())
    threshold = widest_gap(scores[valid], low, high)
    spec = evolve_postprocess(spec, score_threshold=threshold)
    model = built()
    counts = graph_outputs(model, images)[3].sum(dim=1)  # [B]
    if empty is not None:
        assert counts[empty] == 0, (name, counts)
        assert (torch.cat([counts[:empty], counts[empty + 1 :]]) >= 10).all(), (name, counts)
    else:
        assert (counts >= 20).all(), (name, counts)
    assert (counts < MAX_DETECTIONS).all(), (name, counts)
    if name != "centernet_r18":  # CenterNet takes peaks, without NMS
        unsuppressed = graph_outputs(built(nms_iou=1.0), images)[3]
        assert (unsuppressed.sum(dim=1) > counts).any(), (name, "NMS suppresses nothing")
    return Case(name, spec, model, images, empty)


def match_detections(
    ours: tuple[Any, ...],
    reference: tuple[Any, ...],
    *,
    box_tol: float = 1e-3,
    score_tol: float = 1e-4,
) -> int:
    """Assert that two sets of padded detections ``(boxes, scores, labels, valid)`` (tensors or
    arrays) are the same, image by image: the same number of valid slots, and every reference
    detection paired with one of ours of the same label, score within ``score_tol`` and box
    within ``box_tol`` (pairs are found as sets, so equal scores in another order still pair).
    Returns the number of valid detections compared."""
    ours_np = [np.asarray(x) for x in ours]
    ref_np = [np.asarray(x) for x in reference]
    total = 0
    for i in range(ref_np[0].shape[0]):
        r_valid, o_valid = ref_np[3][i].astype(bool), ours_np[3][i].astype(bool)
        assert r_valid.sum() == o_valid.sum(), f"image {i}: {o_valid.sum()} != {r_valid.sum()}"
        n = int(r_valid.sum())
        # valid slots come first
        assert r_valid[:n].all() and o_valid[:n].all(), f"image {i}: valid slots not first"
        r_boxes, r_scores, r_labels = (ref_np[k][i][:n] for k in range(3))
        o_boxes, o_scores, o_labels = (ours_np[k][i][:n] for k in range(3))
        assert np.all(np.diff(o_scores) <= 0), f"image {i}: scores not descending"
        box_diff = np.abs(r_boxes[:, None, :] - o_boxes[None, :, :]).max(-1)  # [n, n]
        score_diff = np.abs(r_scores[:, None] - o_scores[None, :])  # [n, n]
        fits = (score_diff <= score_tol) & (r_labels[:, None] == o_labels[None, :])
        fits &= box_diff <= box_tol
        used = np.zeros(n, dtype=bool)
        for j in range(n):
            free = np.flatnonzero(fits[j] & ~used)
            assert free.size, (
                f"image {i}: detection {j} (label {r_labels[j]}, score {r_scores[j]:.6f}, box "
                f"{r_boxes[j]}) has no counterpart"
            )
            used[free[np.argmin(box_diff[j, free])]] = True
        # padded slots are zeros
        for k in range(3):
            assert not np.any(ours_np[k][i][n:]), f"image {i}: padded slots not zero"
        total += n
    return total


def write_run(case: Case, folder: Path) -> Path:
    """A run folder holding ``case``'s model as its checkpoint (with the shapes experiment cut
    to 64-pixel images, so that the default export size is 64 × 64). Returns the folder."""
    exp = specs.load(SHAPES / f"{case.name}.py", specs.Experiment)
    transforms = attrs.evolve(exp.val_transforms, min_size=(SIZE,), max_size=SIZE)
    exp = attrs.evolve(exp, model=case.spec, val_transforms=transforms)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "spec.json").write_text(specs.to_json(exp) + "\n")
    payload = {"model": case.model.state_dict(), "spec": specs.to_json(exp)}
    torch.save(payload, folder / "checkpoints" / "iter_00000004.pt")
    return folder
