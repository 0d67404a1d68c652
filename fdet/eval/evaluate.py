"""The evaluation loop: run a detector over a loader, collect COCO results, compute metrics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from fdet.data.sample import Batch
from fdet.eval.coco import (
    Backend,
    CocoMetrics,
    IouType,
    detections_to_coco,
    evaluate_coco_types,
)
from fdet.ops.postprocess import Detections

__all__ = [
    "CocoSource",
    "Predictions",
    "Predictor",
    "evaluate_model",
    "evaluate_model_types",
    "predict_coco",
]


class Predictor(Protocol):
    """What :func:`evaluate_model` needs of a detector (an ``nn.Module`` with ``predict``)."""

    training: bool

    def train(self, mode: bool = ...) -> Any: ...

    def predict(self, images: Tensor, image_sizes: Tensor) -> Detections: ...


class CocoSource(Protocol):
    """What :func:`evaluate_model` needs of a dataset (``fdet.data.coco.CocoDataset``)."""

    @property
    def coco(self) -> Any: ...

    @property
    def label_to_category_id(self) -> Sequence[int]: ...


class Predictions(NamedTuple):
    """What :func:`predict_coco` collects: COCO results, the ids of the images seen, and (with
    ``with_loss``) each loss term summed over the images, as a ``Term`` of sums."""

    results: list[dict[str, Any]]
    image_ids: list[int]
    loss_terms: dict[str, Any]  # name -> fdet.models.detectors.Term of summed totals and counts


def predict_coco(
    model: Any,
    loader: Iterable[Batch],
    dataset: CocoSource,
    *,
    device: torch.device | str = "cpu",
    max_images: int | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    with_loss: bool = False,
    label_to_category_id: Sequence[int] | None = None,
) -> Predictions:
    """Run ``model`` over the batches of ``loader`` and collect COCO results.

    The model runs in eval mode under ``torch.inference_mode()`` (its previous mode is restored
    afterwards). Detections become COCO records in original image pixels (``batch.scales``,
    ``batch.image_ids``, the image sizes of ``dataset.coco`` for masks, and
    ``label_to_category_id``: the category id of each of the model's
    labels, by default ``dataset.label_to_category_id``; see :mod:`fdet.eval.classes` for a
    mapping by class name). With ``max_images``, it stops after that many images (the last
    batch is cut). With ``with_loss`` the model's loss terms are
    summed as well, from the same forward pass (``model`` then follows the detector contract:
    ``model(images)``, ``model.loss``, ``model.postprocess``); ``autocast`` wraps the forward.
    """
    if max_images is not None and max_images < 0:
        raise ValueError(f"evaluate_model: max_images must be >= 0, got {max_images}")
    lut = dataset.label_to_category_id if label_to_category_id is None else label_to_category_id
    was_training = model.training
    model.train(False)
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    sums: dict[str, Any] = {}
    try:
        with torch.inference_mode():
            for batch in loader:
                if max_images is not None and len(seen) >= max_images:
                    break
                count = batch.images.shape[0]
                if max_images is not None and count > max_images - len(seen):
                    count = max_images - len(seen)
                    batch = Batch(*(_head(t, count) for t in batch))
                images = batch.images.to(device)
                sizes = batch.image_sizes.to(device)
                if with_loss:
                    with autocast or contextlib.nullcontext():
                        outputs = model(images)
                    terms = model.loss(outputs, batch.to(device))
                    for name, term in terms.items():
                        held = sums.get(name)
                        sums[name] = (
                            term
                            if held is None
                            else held._replace(
                                total=held.total + term.total, count=held.count + term.count
                            )
                        )
                    detections = model.postprocess(outputs, sizes)
                elif autocast is not None:
                    with autocast:
                        detections = model.predict(images, sizes)
                else:
                    detections = model.predict(images, sizes)
                results.extend(
                    detections_to_coco(
                        detections,
                        image_ids=batch.image_ids,
                        scales=batch.scales,
                        label_to_category_id=lut,
                        orig_sizes=_orig_sizes(dataset, batch, detections),
                    )
                )
                seen.extend(int(i) for i in batch.image_ids.tolist())
    finally:
        model.train(was_training)
    return Predictions(results, seen, sums)


def _orig_sizes(
    dataset: CocoSource, batch: Batch, detections: Detections
) -> list[list[int]] | None:
    """The (height, width) on disk of each image of the batch, from the ground truth's image
    entries, when the detections have masks to map back (else None)."""
    if getattr(detections, "masks", None) is None:
        return None
    images = dataset.coco.imgs
    return [[images[i]["height"], images[i]["width"]] for i in batch.image_ids.tolist()]


def _head(value: Any, count: int) -> Any:
    return value[:count] if isinstance(value, Tensor) else value


def evaluate_model(
    model: Predictor,
    loader: Iterable[Batch],
    dataset: CocoSource,
    *,
    max_images: int | None = None,
    backend: Backend = "faster",
    device: torch.device | str = "cpu",
    label_to_category_id: Sequence[int] | None = None,
) -> tuple[CocoMetrics, list[dict[str, Any]]]:
    """COCO box metrics of ``model`` on the batches of ``loader``, and the results they came
    from: the ``"bbox"`` part of :func:`evaluate_model_types`."""
    by_type, results = evaluate_model_types(
        model,
        loader,
        dataset,
        max_images=max_images,
        backend=backend,
        device=device,
        label_to_category_id=label_to_category_id,
        iou_types=("bbox",),
    )
    return by_type["bbox"], results


def evaluate_model_types(
    model: Predictor,
    loader: Iterable[Batch],
    dataset: CocoSource,
    *,
    max_images: int | None = None,
    backend: Backend = "faster",
    device: torch.device | str = "cpu",
    label_to_category_id: Sequence[int] | None = None,
    iou_types: Sequence[IouType] | None = None,
) -> tuple[dict[str, CocoMetrics], list[dict[str, Any]]]:
    """COCO metrics of ``model`` on the batches of ``loader`` keyed by evaluation type, and the
    results they came from.

    The model runs in eval mode under ``torch.inference_mode()`` (its previous mode is restored
    afterwards) on ``batch.images`` and ``batch.image_sizes`` moved to ``device``
    (:func:`predict_coco`). Only the images seen are evaluated against ``dataset.coco``: a loader
    over a subset gives that subset's metrics. With ``max_images``, evaluation stops after that
    many images (the last batch is cut). ``label_to_category_id`` gives the category id of each
    of the model's labels (default: ``dataset.label_to_category_id``, right when the model was
    trained on data with the same category ids; :func:`fdet.eval.classes.category_ids_by_name`
    matches them by name otherwise). ``iou_types`` (default: ``"bbox"``, and ``"segm"`` when
    the model predicts masks and the ground truth has segmentations) are passed to
    :func:`fdet.eval.coco.evaluate_coco_types`.
    """
    predictions = predict_coco(
        model,
        loader,
        dataset,
        device=device,
        max_images=max_images,
        label_to_category_id=label_to_category_id,
    )
    metrics = evaluate_coco_types(
        dataset.coco,
        predictions.results,
        backend=backend,
        image_ids=predictions.image_ids,
        iou_types=iou_types,
    )
    return metrics, predictions.results
