"""The best and worst images of a validation set: COCO AP of each image, and a gallery of those
that score highest and lowest, each drawn with its ground truth next to its predictions and the
mistakes marked.

- :func:`per_image_ap`: COCO AP at IoU 0.5:0.95 of every image, exactly what ``pycocotools``'
  ``COCOeval`` reports with ``params.imgIds = [image_id]`` (from one evaluation of all images:
  its per-image matches are accumulated image by image).
- :func:`match_image`: true positives, false positives and missed ground truth of one image,
  matched greedily by score within each class (what the gallery marks).
- :func:`best_worst_images`: PNGs of the ``count`` images of highest and of lowest AP.

An image's COCO AP is the mean over the categories *that have ground truth in the image* (COCO
leaves a category without ground truth out of the mean), so a detection of a class absent from
the image does not lower it; the gallery counts and marks such a detection as a false positive.
An image without (non-crowd) ground truth has no AP: NaN, and it is left out of the rankings.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

from fdet.analysis.metrics import (
    GroundTruth,
    IouType,
    Results,
    _index_copy,
    _results_api,
    category_names,
    load_ground_truth,
    load_results,
)
from fdet.atomic import atomic_write
from fdet.data.coco import read_image
from fdet.viz.draw import draw_boxes, label_color

__all__ = [
    "ERROR_COLOR",
    "GalleryImage",
    "ImageMatch",
    "best_worst_images",
    "match_image",
    "per_image_ap",
]

ERROR_COLOR: tuple[int, int, int] = (255, 0, 0)
"""The color of false positives and missed ground truth in the gallery (drawn thicker, captioned
``FP`` / ``MISS``); matched boxes keep their class color."""


def per_image_ap(
    coco_gt: GroundTruth, results: Results, *, iou_type: IouType = "bbox"
) -> dict[int, float]:
    """COCO AP at IoU 0.5:0.95 (all areas, 100 detections) of each image of ``coco_gt``, by image
    id, in id order: the ``AP`` that ``COCOeval`` summarizes when run with
    ``params.imgIds = [image_id]``. NaN for an image without non-crowd ground truth (with or
    without detections): COCO's AP is undefined there."""
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"per_image_ap: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    gt = _index_copy(load_ground_truth(coco_gt))
    records = load_results(results, gt, iou_type=iou_type)
    dt = _results_api(gt, records, iou_type)
    image_ids = sorted(gt.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.params.catIds = sorted(gt.getCatIds())
        evaluator.evaluate()  # per image and category: independent of the other images
        full_params, full_eval, every = evaluator.params, evaluator._paramsEval, evaluator.evalImgs
        num_cats, num_areas = len(full_eval.catIds), len(full_eval.areaRng)
        num_images = len(image_ids)
        out: dict[int, float] = {}
        for index, image_id in enumerate(image_ids):
            # accumulate() over this image's evaluations alone (they are ordered category,
            # area range, image): what COCOeval gives with params.imgIds = [image_id]
            evaluator.evalImgs = [
                every[(k * num_areas + a) * num_images + index]
                for k in range(num_cats)
                for a in range(num_areas)
            ]
            for name in ("params", "_paramsEval"):
                params = copy.copy(getattr(evaluator, name))
                params.imgIds = [image_id]
                setattr(evaluator, name, params)
            evaluator.accumulate()
            precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [T, R, K] all areas, 100
            defined = precision[precision > -1]
            out[image_id] = float(np.mean(defined)) if defined.size else math.nan
            evaluator.params, evaluator._paramsEval = full_params, full_eval
    return out


@attrs.frozen(kw_only=True)
class ImageMatch:
    """The detections (scoring at least the threshold) and ground truth of one image, matched.

    Indices are into the image's result records (in the order given) and its annotations (in
    ``coco.getAnnIds`` order); crowd ground truth is in none of the lists.
    """

    true_positives: tuple[int, ...]
    false_positives: tuple[int, ...]
    ignored: tuple[int, ...]
    """Unmatched detections on a crowd region of their class: neither right nor wrong."""
    matched_gt: tuple[int, ...]
    missed: tuple[int, ...]


def _iou_xywh(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU ``[N, M]`` of xywh boxes, and the intersection over the area of ``a`` (for crowd)."""
    a_lo, a_hi = a[:, None, :2], a[:, None, :2] + a[:, None, 2:]
    b_lo, b_hi = b[None, :, :2], b[None, :, :2] + b[None, :, 2:]
    wh = np.clip(np.minimum(a_hi, b_hi) - np.maximum(a_lo, b_lo), 0, None)
    inter = wh[..., 0] * wh[..., 1]  # [N, M]
    area_a = (a[:, 2] * a[:, 3])[:, None]
    area_b = (b[:, 2] * b[:, 3])[None, :]
    union = area_a + area_b - inter
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    ioa = np.where(area_a > 0, inter / np.where(area_a > 0, area_a, 1), 0.0)
    return iou, ioa


def match_image(
    detections: list[Mapping[str, Any]],
    annotations: list[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> ImageMatch:
    """Match one image's result records to its annotations, class by class: detections scoring
    at least ``score_threshold``, in descending score (ties in the given order), each take the
    unmatched non-crowd gt of their category with the highest box IoU, if that IoU is at least
    ``iou_threshold`` (a true positive); otherwise a detection is *ignored* when it covers a
    crowd gt of its category (intersection over the detection's area at least
    ``iou_threshold``, as COCO measures crowd) and a false positive when not. Non-crowd gts left
    unmatched are missed. Detections below ``score_threshold`` are in no list."""
    kept = [i for i, d in enumerate(detections) if float(d["score"]) >= score_threshold]
    kept.sort(key=lambda i: -float(detections[i]["score"]))  # stable: ties keep their order
    gt_boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    gt_cats = np.array([a["category_id"] for a in annotations]).reshape(-1)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool).reshape(-1)
    taken = np.zeros(len(annotations), dtype=bool)
    tps: list[int] = []
    fps: list[int] = []
    ignored: list[int] = []
    for i in kept:
        det = detections[i]
        box = np.array(det["bbox"], dtype=np.float64).reshape(1, 4)
        iou, ioa = _iou_xywh(box, gt_boxes)
        same = gt_cats == det["category_id"]
        candidates = same & ~crowd & ~taken & (iou[0] >= iou_threshold)
        if candidates.any():
            j = int(np.argmax(np.where(candidates, iou[0], -1.0)))
            taken[j] = True
            tps.append(i)
        elif (same & crowd & (ioa[0] >= iou_threshold)).any():
            ignored.append(i)
        else:
            fps.append(i)
    matched = tuple(int(j) for j in np.flatnonzero(taken))
    missed = tuple(int(j) for j in np.flatnonzero(~taken & ~crowd))
    return ImageMatch(
        true_positives=tuple(tps),
        false_positives=tuple(fps),
        ignored=tuple(ignored),
        matched_gt=matched,
        missed=missed,
    )


@attrs.frozen(kw_only=True)
class GalleryImage:
    """One drawn image of the gallery: the PNG at ``path``, the image's id, file name and COCO
    AP (:func:`per_image_ap`), and the counts of :func:`match_image` at the gallery's
    thresholds."""

    path: Path
    image_id: int
    file_name: str
    ap: float
    true_positives: int
    false_positives: int
    missed: int


def _fit(image: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """``image`` resized so that its longer side is ``size`` pixels, and the factor."""
    height, width = image.shape[-2:]
    factor = size / max(height, width, 1)
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    resized = F.interpolate(
        image[None].float(), size=(new_h, new_w), mode="bilinear", antialias=factor < 1
    )[0]
    return resized.round().clamp(0, 255).to(torch.uint8), factor


def _xyxy(records: list[Mapping[str, Any]], factor: float) -> torch.Tensor:
    boxes = torch.tensor([list(r["bbox"]) for r in records], dtype=torch.float32).reshape(-1, 4)
    return torch.cat((boxes[:, :2], boxes[:, :2] + boxes[:, 2:]), 1) * factor  # [N, 4]


def _draw_panel(
    image: torch.Tensor,
    records: list[Mapping[str, Any]],
    wrong: set[int],
    *,
    factor: float,
    cat_index: dict[int, int],
    names: list[str],
    mark: str,
    with_scores: bool,
) -> torch.Tensor:
    """``image`` with ``records`` drawn: right ones in their class color, the indices in
    ``wrong`` in :data:`ERROR_COLOR`, thicker and captioned ``mark``, on top."""
    num = len(names)
    right = [i for i in range(len(records)) if i not in wrong]
    for group, width in ((right, 1), (sorted(wrong), 3)):
        if not group:
            continue
        chosen = [records[i] for i in group]
        labels = torch.tensor(
            [
                cat_index[int(r["category_id"])] + (num if i in wrong else 0)
                for i, r in zip(group, chosen)
            ]
        )
        colors = [
            ERROR_COLOR if i in wrong else label_color(cat_index[int(r["category_id"])])
            for i, r in zip(group, chosen)
        ]
        scores = torch.tensor([float(r["score"]) for r in chosen]) if with_scores else None
        image = draw_boxes(
            image,
            _xyxy(chosen, factor),
            labels=labels,
            scores=scores,
            names=names + [f"{mark} {n}" for n in names],
            colors=colors,
            width=width,
        )
    return image


def _write_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def best_worst_images(
    coco_gt: GroundTruth,
    results: Results,
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    count: int = 6,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
    panel_size: int = 256,
) -> dict[str, list[GalleryImage]]:
    """Draw the ``count`` images of highest COCO AP (``"best"``, highest first) and of lowest
    (``"worst"``, lowest first) as PNGs under ``out_dir`` (``best_01_<id>.png`` ...), and
    return them by key.

    Images without non-crowd ground truth (AP NaN, :func:`per_image_ap`) are ranked in neither
    list. Equal APs are ordered by their number of mistakes (false positives + missed: fewest
    first among the best, most first among the worst), then by image id. With fewer than
    ``2 · count`` ranked images the two lists share images.

    Each PNG, ``(2 · panel_size + 8) × (panel_size + 48)`` pixels, shows, under two lines with
    the image's id, file name, AP and counts, the image (resized so its longer side is
    ``panel_size``) with its ground truth on the left and its
    detections scoring at least ``score_threshold`` on the right, matched by
    :func:`match_image` at ``iou_threshold``: missed ground truth and false positives are drawn
    in :data:`ERROR_COLOR` (pure red, three pixels wide, captioned ``MISS`` /
    ``FP``), the rest in their class colors (detections on a crowd region too: neither right nor
    wrong; crowd regions themselves are not drawn).

    Images are read with :func:`fdet.data.coco.read_image` from ``image_dir / file_name``; only
    the drawn ones are read, and a missing one raises ``FileNotFoundError`` naming its path and
    image id.
    """
    if count < 1:
        raise ValueError(f"best_worst_images: count must be >= 1, got {count}")
    if panel_size < 16:
        raise ValueError(f"best_worst_images: panel_size must be >= 16, got {panel_size}")
    gt: COCO = load_ground_truth(coco_gt)
    records = load_results(results, gt)
    aps = per_image_ap(gt, records)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_image.setdefault(r["image_id"], []).append(r)
    cat_ids = sorted(gt.getCatIds())
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    names_by_id = category_names(gt)
    names = [names_by_id[c] for c in cat_ids]

    matches: dict[int, tuple[ImageMatch, list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for image_id in aps:
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        dets = by_image.get(image_id, [])
        match = match_image(
            dets, anns, iou_threshold=iou_threshold, score_threshold=score_threshold
        )
        matches[image_id] = (match, dets, anns)

    def errors(image_id: int) -> int:
        match = matches[image_id][0]
        return len(match.false_positives) + len(match.missed)

    ranked = [i for i, ap in aps.items() if not math.isnan(ap)]
    best = sorted(ranked, key=lambda i: (-aps[i], errors(i), i))[:count]
    worst = sorted(ranked, key=lambda i: (aps[i], -errors(i), i))[:count]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_root = Path(image_dir)
    gallery: dict[str, list[GalleryImage]] = {}
    for key, chosen in (("best", best), ("worst", worst)):
        drawn = []
        for rank, image_id in enumerate(chosen, start=1):
            match, dets, anns = matches[image_id]
            info = gt.imgs[image_id]
            file_name = str(info.get("file_name", ""))
            source = image_root / file_name
            if not source.is_file():
                raise FileNotFoundError(
                    f"best_worst_images: image file not found: {source} "
                    f"(image id {image_id}, file_name {file_name!r} under {image_root})"
                )
            image = read_image(source)
            small, factor = _fit(image, panel_size)
            gt_records = [
                {**a, "score": 1.0} for a in anns if not a.get("iscrowd", 0)
            ]  # crowd regions are not drawn
            non_crowd = [j for j, a in enumerate(anns) if not a.get("iscrowd", 0)]
            missed = {non_crowd.index(j) for j in match.missed}
            left = _draw_panel(
                small,
                gt_records,
                missed,
                factor=factor,
                cat_index=cat_index,
                names=names,
                mark="MISS",
                with_scores=False,
            )
            shown = sorted(match.true_positives + match.false_positives + match.ignored)
            shown_dets = [dets[i] for i in shown]
            fps = {shown.index(i) for i in match.false_positives}
            right = _draw_panel(
                small,
                shown_dets,
                fps,
                factor=factor,
                cat_index=cat_index,
                names=names,
                mark="FP",
                with_scores=True,
            )
            path = out / f"{key}_{rank:02d}_{image_id}.png"
            ap = aps[image_id]
            tp, fp, miss = len(match.true_positives), len(match.false_positives), len(missed)
            header = (
                f"image {image_id} ({file_name})  AP {ap:.3f}\n"
                f"TP {tp}  FP {fp}  missed {miss}  (score >= {score_threshold:g}, "
                f"IoU >= {iou_threshold:g})"
            )
            _write_png(_compose(left, right, header, panel_size), path)
            drawn.append(
                GalleryImage(
                    path=path,
                    image_id=int(image_id),
                    file_name=file_name,
                    ap=ap,
                    true_positives=tp,
                    false_positives=fp,
                    missed=miss,
                )
            )
        gallery[key] = drawn
    return gallery


HEADER = 48
GAP = 8


def _compose(left: torch.Tensor, right: torch.Tensor, header: str, size: int) -> Image.Image:
    """The two panels side by side on a ``(2 · size + GAP) × (size + HEADER)`` canvas, titled
    ``header``, with the panels' names above them."""
    canvas = Image.new("RGB", (2 * size + GAP, size + HEADER), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), header, fill=(0, 0, 0))
    draw.text((2, HEADER - 13), "ground truth (red: missed)", fill=(0, 0, 0))
    draw.text((size + GAP + 2, HEADER - 13), "predictions (red: false positive)", fill=(0, 0, 0))
    for x, panel in ((0, left), (size + GAP, right)):
        canvas.paste(Image.fromarray(panel.permute(1, 2, 0).numpy()), (x, HEADER))
    return canvas
