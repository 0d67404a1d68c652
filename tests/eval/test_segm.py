"""Mask evaluation (fdet.eval): detections with masks -> RLE results in original pixels ->
segm AP through pycocotools (and faster-coco-eval), beside bbox AP; ground truth as polygons,
compressed and uncompressed RLEs and crowd RLEs."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from fdet.data.sample import Batch
from fdet.eval import (
    detections_to_coco,
    evaluate_coco,
    evaluate_coco_types,
    evaluate_model_types,
    format_table,
    has_segmentations,
)
from fdet.eval.coco import Backend, encode_masks, masks_to_original
from fdet.ops.postprocess import Detections

BACKENDS: tuple[Backend, ...] = ("faster", "pycocotools")
CATEGORY_IDS = (1, 4)
SCALE = 2  # network input = original image × 2 (integer: the perfect masks map back exactly)


def _rle_of(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def make_gt() -> dict[str, Any]:
    """Three images: a polygon, a compressed RLE and a crowd region as an uncompressed RLE in
    the first; an uncompressed RLE (not crowd) in the second; two polygons in the third."""
    images = [
        {"id": 1, "height": 40, "width": 50, "file_name": "a.png"},
        {"id": 2, "height": 36, "width": 64, "file_name": "b.png"},
        {"id": 3, "height": 30, "width": 30, "file_name": "c.png"},
    ]
    disc = np.zeros((40, 50), bool)
    yy, xx = np.mgrid[:40, :50]
    disc[(yy - 25) ** 2 + (xx - 30) ** 2 < 70] = True
    crowd = np.zeros((40, 50), bool)
    crowd[2:10, 35:48] = True
    blob = np.zeros((36, 64), bool)
    blob[5:30, 10:50] = True
    blob[12:20, 20:30] = False  # a hole
    segmentations: list[tuple[int, int, Any, int]] = [
        (1, 1, [[3.0, 4.0, 20.0, 4.0, 20.0, 18.0, 3.0, 18.0]], 0),
        (1, 4, _rle_of(disc), 0),
        (1, 1, _uncompressed(crowd), 1),
        (2, 4, _uncompressed(blob), 0),
        (3, 1, [[2.0, 2.0, 14.0, 3.0, 8.0, 15.0]], 0),
        (3, 4, [[16.0, 16.0, 28.0, 16.0, 28.0, 27.0, 16.0, 27.0]], 0),
    ]
    annotations = []
    for k, (image_id, category_id, segmentation, iscrowd) in enumerate(segmentations):
        h, w = images[image_id - 1]["height"], images[image_id - 1]["width"]
        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
        elif isinstance(segmentation["counts"], list):
            rle = mask_utils.frPyObjects(segmentation, h, w)
        else:
            rle = segmentation
        annotations.append(
            {
                "id": k + 1,
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": segmentation,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": iscrowd,
            }
        )
    categories = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def index(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_masks(coco: COCO, image_id: int, *, crowd: bool = False) -> list[tuple[dict, np.ndarray]]:
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    return [(a, coco.annToMask(a).astype(bool)) for a in anns if bool(a["iscrowd"]) == crowd]


def shift(mask: np.ndarray, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    out[:, dx:] = mask[:, : mask.shape[1] - dx]
    return out


def detections_of(
    coco: COCO, image_ids: list[int], *, shifted: dict[int, int] | None = None
) -> tuple[Detections, Tensor, Tensor, Tensor]:
    """Detections of the non-crowd gts of ``image_ids`` in a batch whose input is each image
    scaled by SCALE and padded to a common size, masks nearest-upsampled (annotation id ->
    shift in original pixels for ``shifted``); padded slots hold garbage masks."""
    shifted = shifted or {}
    sizes = [(coco.imgs[i]["height"], coco.imgs[i]["width"]) for i in image_ids]
    height = max(h for h, _ in sizes) * SCALE
    width = max(w for _, w in sizes) * SCALE + 6
    slots = 3
    b = len(image_ids)
    boxes = torch.zeros(b, slots, 4)
    labels = torch.zeros(b, slots, dtype=torch.long)
    valid = torch.zeros(b, slots, dtype=torch.bool)
    masks = torch.ones(b, slots, height, width, dtype=torch.bool)  # garbage on padding
    for i, image_id in enumerate(image_ids):
        for n, (ann, mask) in enumerate(gt_masks(coco, image_id)):
            mask = shift(mask, shifted.get(ann["id"], 0))
            up = torch.from_numpy(mask).repeat_interleave(SCALE, 0).repeat_interleave(SCALE, 1)
            masks[i, n] = F.pad(up, (0, width - up.shape[1], 0, height - up.shape[0]))
            x, y, w, h = ann["bbox"]
            boxes[i, n] = torch.tensor([x, y, x + w, y + h]) * SCALE
            labels[i, n] = CATEGORY_IDS.index(ann["category_id"])
            valid[i, n] = True
    scores = torch.linspace(0.9, 0.5, slots).expand(b, slots).contiguous()
    detections = Detections(boxes, scores, labels, valid, masks)
    scales = torch.full((b, 2), float(SCALE))
    orig = torch.tensor(sizes)
    return detections, torch.tensor(image_ids), scales, orig


def results_of(coco: COCO, **kwargs: Any) -> list[dict[str, Any]]:
    detections, ids, scales, orig = detections_of(coco, sorted(coco.imgs), **kwargs)
    return detections_to_coco(
        detections,
        image_ids=ids,
        scales=scales,
        label_to_category_id=CATEGORY_IDS,
        orig_sizes=orig,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_masks_give_segm_ap_1(backend: Backend) -> None:
    coco = index(make_gt())
    results = results_of(coco)
    assert len(results) == 5 and all("segmentation" in r for r in results)
    metrics = evaluate_coco(coco, results, backend=backend, iou_type="segm")
    assert metrics.AP == 1.0 and metrics.AP50 == 1.0 and metrics.AR100 == 1.0
    assert metrics.num_detections == 5
    # Each RLE decodes to the gt mask in original pixels.
    for r in results:
        decoded = mask_utils.decode(r["segmentation"]).astype(bool)
        matches = [
            m for a, m in gt_masks(coco, r["image_id"]) if a["category_id"] == r["category_id"]
        ]
        assert any(np.array_equal(decoded, m) for m in matches)


def test_shifted_mask_lowers_segm_ap_as_pycocotools_computes() -> None:
    """One mask shifted by 4 original pixels: the whole path gives the stats that
    pycocotools' COCOeval computes from the RLEs of the same shifted masks."""
    dataset = make_gt()
    coco = index(dataset)
    moves = {2: 4}  # the disc, shifted right
    ours = evaluate_coco(
        coco, results_of(coco, shifted=moves), backend="pycocotools", iou_type="segm"
    )

    expected_results = []
    for image_id in sorted(coco.imgs):
        for n, (ann, mask) in enumerate(gt_masks(coco, image_id)):
            expected_results.append(
                {
                    "image_id": image_id,
                    "category_id": ann["category_id"],
                    "segmentation": _rle_of(shift(mask, moves.get(ann["id"], 0))),
                    "score": [0.9, 0.7, 0.5][n],
                }
            )
    reference = index(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(reference, reference.loadRes(expected_results), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    np.testing.assert_allclose(ours.stats, evaluator.stats[:12], rtol=0, atol=1e-12)
    assert ours.AP < 1.0 and ours.AP50 == 1.0
    faster = evaluate_coco(coco, results_of(coco, shifted=moves), backend="faster", iou_type="segm")
    np.testing.assert_allclose(faster.stats, ours.stats, atol=1e-6)


def test_segm_ignores_the_boxes_and_leaves_results_alone() -> None:
    coco = index(make_gt())
    results = results_of(coco, shifted={2: 4})
    expected = evaluate_coco(coco, results, backend="pycocotools", iou_type="segm")
    for r in results:
        r["bbox"] = [0.0, 0.0, 1000.0, 1000.0]
    metrics = evaluate_coco(coco, results, backend="pycocotools", iou_type="segm")
    assert metrics.stats == expected.stats
    assert results[0]["bbox"] == [0.0, 0.0, 1000.0, 1000.0]


def test_types_are_keyed_and_tabled_apart() -> None:
    coco = index(make_gt())
    results = results_of(coco, shifted={2: 4})
    metrics = evaluate_coco_types(coco, results, backend="pycocotools")
    assert list(metrics) == ["bbox", "segm"]
    assert metrics["bbox"].AP == 1.0  # the boxes are exact
    assert metrics["segm"].AP < 1.0
    assert format_table(metrics["segm"], iou_type="segm").startswith(
        "COCO segm evaluation: 3 images"
    )
    assert format_table(metrics["bbox"]).startswith("COCO evaluation: 3 images")
    without_masks = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    assert list(evaluate_coco_types(coco, without_masks, backend="pycocotools")) == ["bbox"]
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco_types(coco, results, iou_types=("keypoints",))  # type: ignore[arg-type]


def test_ground_truth_without_segmentations_is_refused_for_segm() -> None:
    dataset = make_gt()
    assert has_segmentations(dataset)
    del dataset["annotations"][0]["segmentation"]
    assert not has_segmentations(dataset)
    coco = index(dataset)
    results = results_of(index(make_gt()))
    assert list(evaluate_coco_types(coco, results, backend="pycocotools")) == ["bbox"]
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_coco(coco, results, backend="pycocotools", iou_type="segm")


def test_masks_need_orig_sizes() -> None:
    coco = index(make_gt())
    detections, ids, scales, _ = detections_of(coco, [1])
    with pytest.raises(ValueError, match="orig_sizes"):
        detections_to_coco(
            detections, image_ids=ids, scales=scales, label_to_category_id=CATEGORY_IDS
        )
    plain = detections_to_coco(
        detections._replace(masks=None),
        image_ids=ids,
        scales=scales,
        label_to_category_id=CATEGORY_IDS,
    )
    assert all("segmentation" not in r for r in plain)


def test_masks_to_original_by_hand() -> None:
    masks = torch.zeros(1, 6, 8, dtype=torch.bool)
    masks[0, 1, 3] = True  # input pixel (1, 3)
    masks[0, 5, 7] = True  # in the padding of a 4 × 6 image at scale 1
    crop = masks_to_original(masks, (1.0, 1.0), (4, 6))
    assert crop.shape == (1, 4, 6) and torch.equal(crop, masks[:, :4, :6])
    # Scale 2: original pixel (i, j) reads input pixel (2i + 1, 2j + 1): (0, 1) and (2, 3).
    up = masks_to_original(masks, (2.0, 2.0), (3, 4))
    assert up.shape == (1, 3, 4) and up[0, 0, 1] and up[0, 2, 3] and up.sum() == 2
    # Scale 0.5 (the input is smaller): original pixels (2, 6..7) and (3, 6..7) read (1, 3).
    down = masks_to_original(masks, (0.5, 0.5), (12, 16))
    assert down[0, 2:4, 6:8].all() and down.sum() == 4 + 4  # and (10..11, 14..15) read (5, 7)


def test_encode_masks_round_trips() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 7, 9, generator=g) < 0.5
    rles = encode_masks(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [7, 9] for r in rles)
    decoded = np.stack([mask_utils.decode(r) for r in rles])
    assert np.array_equal(decoded.astype(bool), masks.numpy())
    assert encode_masks(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


class MaskModel(nn.Module):
    """Answers each predict call with the next prepared Detections."""

    def __init__(self, answers: list[Detections]) -> None:
        super().__init__()
        self.answers = answers

    def predict(self, images: Tensor, image_sizes: Tensor) -> Detections:
        return self.answers.pop(0)


class MaskDataset:
    def __init__(self, coco: COCO) -> None:
        self.coco = coco
        self.label_to_category_id = CATEGORY_IDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_model_types_with_masks(backend: Backend) -> None:
    coco = index(make_gt())
    batches, answers = [], []
    for ids in ([1, 2], [3]):
        detections, image_ids, scales, orig = detections_of(coco, ids)
        height, width = detections.masks.shape[-2:]  # type: ignore[union-attr]
        batches.append(
            Batch(
                images=torch.zeros(len(ids), 3, height, width, dtype=torch.uint8),
                image_sizes=orig * SCALE,
                gt_boxes=torch.zeros(len(ids), 1, 4),
                gt_labels=torch.zeros(len(ids), 1, dtype=torch.long),
                gt_valid=torch.zeros(len(ids), 1, dtype=torch.bool),
                gt_crowd=torch.zeros(len(ids), 1, dtype=torch.bool),
                image_ids=image_ids,
                scales=scales,
            )
        )
        answers.append(detections)
    metrics, results = evaluate_model_types(
        MaskModel(answers), batches, MaskDataset(coco), backend=backend
    )
    assert set(metrics) == {"bbox", "segm"}
    assert metrics["segm"].AP == 1.0 and metrics["bbox"].AP == 1.0
    assert len(results) == 5


def test_shapes_set_masks_through_resize_collate_and_back_give_segm_ap_1(tmp_path) -> None:
    """The shapes set's val split read with masks, resized up (64 -> 100 × 90 px: a
    non-integer scale), collated, and its own gt masks and boxes answered as detections:
    mapped back to the original pixels they are the annotation file's RLEs, segm AP 1."""
    from fdet.data import generate_shapes
    from fdet.data.coco import CocoDataset
    from fdet.data.collate import collate
    from fdet.data.transforms import resize_to

    paths = generate_shapes(tmp_path / "set", train=1, val=4, size=64, seed=1, min_object_size=6)
    dataset = CocoDataset(paths.val_images, paths.val_annotations, with_masks=True)
    samples = [resize_to(dataset[i], (100, 90)) for i in range(len(dataset))]
    batch = collate(samples, pad_divisor=32)
    assert batch.gt_masks is not None
    valid = batch.gt_valid & ~batch.gt_crowd
    answer = Detections(
        batch.gt_boxes,
        valid.float(),
        batch.gt_labels,
        valid,
        batch.gt_masks.bool() & valid[..., None, None],
    )
    metrics, results = evaluate_model_types(
        MaskModel([answer]), [batch], dataset, backend="pycocotools"
    )
    assert len(results) == int(valid.sum()) > 4
    assert metrics["segm"].AP == 1.0
    assert metrics["bbox"].AP > 0.95  # boxes scaled back in float: IoU just under 1 at 0.95


def test_box_frame_probabilities_are_pasted_at_the_original_size_as_torchvision_does() -> None:
    """Float masks ``[B, N, m, m]`` (``mask_postprocess(paste=False)``): each image's masks
    are pasted on its boxes in original pixels at its original size and binarized at > 0.5:
    torchvision's maskrcnn_inference + paste_masks_in_image, mask for mask."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    b, n, m = 2, 5, 28
    orig = torch.tensor([[40, 50], [36, 64]])
    scales = torch.tensor([[1.6, 1.6], [2.0, 1.5]])
    xy = torch.rand(b, n, 2, generator=g) * 30
    boxes = torch.cat((xy, xy + 4 + torch.rand(b, n, 2, generator=g) * 40), dim=-1)
    labels = torch.randint(0, 2, (b, n), generator=g)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    probs = torch.sigmoid(torch.randn(b, n, m, m, generator=g) * 3)
    detections = Detections(boxes, torch.rand(b, n, generator=g), labels, valid, probs)
    records = detections_to_coco(
        detections,
        image_ids=[1, 2],
        scales=scales,
        label_to_category_id=CATEGORY_IDS,
        orig_sizes=orig,
    )
    assert len(records) == 8
    k = 0
    for i in range(b):
        h, w = orig[i].tolist()
        sy, sx = scales[i].tolist()
        orig_boxes = (
            boxes[i].double() / torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
        ).float()
        ref = paste_masks_in_image(probs[i][:, None], orig_boxes, (h, w))[:, 0] > 0.5
        for j in range(int(valid[i].sum())):
            decoded = mask_utils.decode(records[k]["segmentation"]).astype(bool)
            assert np.array_equal(decoded, ref[j].numpy())
            k += 1
