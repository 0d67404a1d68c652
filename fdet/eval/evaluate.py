"""The evaluation loop: run a detector over a loader, collect COCO results, compute metrics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from fdet.data.sample import Batch
from fdet.eval.coco import Backend, CocoMetrics, detections_to_coco, evaluate_coco
from fdet.ops.postprocess import Detections

__all__ = ["CocoSource", "Predictor", "evaluate_model"]


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


def evaluate_model(
    model: Predictor,
    loader: Iterable[Batch],
    dataset: CocoSource,
    *,
    max_images: int | None = None,
    backend: Backend = "faster",
    device: torch.device | str = "cpu",
) -> tuple[CocoMetrics, list[dict[str, Any]]]:
    """COCO metrics of ``model`` on the batches of ``loader``, and the results they came from.

    The model runs in eval mode under ``torch.inference_mode()`` (its previous mode is restored
    afterwards) on ``batch.images`` and ``batch.image_sizes`` moved to ``device``. Detections
    become COCO records in original image pixels (``batch.scales``, ``batch.image_ids``,
    ``dataset.label_to_category_id``), and only the images seen are evaluated against
    ``dataset.coco``: a loader over a subset gives that subset's metrics. With ``max_images``,
    evaluation stops after that many images (the last batch is cut).
    """
    if max_images is not None and max_images < 0:
        raise ValueError(f"evaluate_model: max_images must be >= 0, got {max_images}")
    was_training = model.training
    model.train(False)
    results: list[dict[str, Any]] = []
    seen: list[int] = []
    try:
        with torch.inference_mode():
            for batch in loader:
                if max_images is not None and len(seen) >= max_images:
                    break
                count = batch.images.shape[0]
                if max_images is not None:
                    count = min(count, max_images - len(seen))
                detections = model.predict(
                    batch.images[:count].to(device), batch.image_sizes[:count].to(device)
                )
                results.extend(
                    detections_to_coco(
                        detections,
                        image_ids=batch.image_ids[:count],
                        scales=batch.scales[:count],
                        label_to_category_id=dataset.label_to_category_id,
                    )
                )
                seen.extend(int(i) for i in batch.image_ids[:count].tolist())
    finally:
        model.train(was_training)
    metrics = evaluate_coco(dataset.coco, results, backend=backend, image_ids=seen)
    return metrics, results
