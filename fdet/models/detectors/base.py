"""The detector contract: what every detector family provides, and all that the engine knows.

A detector is an ``nn.Module`` holding parameters; everything else is a pure function of its
outputs::

    outputs = detector(images)                                  # the family's NamedTuple
    terms = detector.loss(outputs, batch)                       # {"cls": Term, "box": Term, ...}
    detections = detector.postprocess(outputs, image_sizes)     # Detections [B, N]
    detections = detector.predict(images, image_sizes)          # shared: eval mode, no grad

``loss`` returns **loss terms**: for each name, the loss *summed* over the batch, the count that
normalizes it (positives, sampled RoIs, matched boxes, a weight sum ...) and its weight. The
training step (:mod:`fdet.train.step`) adds the counts of every micro-batch and every process
(one all-reduce of a vector, no host sync) and back-propagates ``Σ weight · total / max(count, 1)``,
so gradient accumulation and data-parallel training give exactly the gradient of the whole
batch whatever terms a family defines. Terms that share a normalizer should share the count
tensor (the same object): the step then back-propagates them together.

A new family subclasses :class:`Detector`, implements the three methods, registers a builder
for its spec (``@fdet.register(MySpec)``), and trains with ``fdet train`` unchanged
(``examples/custom_detector.py`` does it from outside the package).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet.ops.postprocess import Detections

__all__ = ["Detector", "LossTerms", "Targets", "Term", "term_values", "total_loss"]


class Term(NamedTuple):
    """One named part of a detector's objective.

    ``total`` is summed over the batch (never averaged inside the loss), ``count`` is the number
    that normalizes it (float, not clamped; the step clamps the step-wide count to 1), and
    ``weight`` multiplies the normalized value. Both tensors are float32 scalars.
    """

    total: Float[Tensor, ""]
    count: Float[Tensor, ""]  # type: ignore[assignment]  # (shadows tuple.count on purpose)
    weight: float = 1.0

    def value(self, count: Tensor | None = None) -> Float[Tensor, ""]:
        """``weight · total / max(count, 1)``, with this term's own count or the one given
        (e.g. the count over all micro-batches and processes of a step)."""
        count = self.count if count is None else count
        return self.weight * self.total / count.to(self.total.dtype).clamp(min=1.0)


LossTerms = Mapping[str, Term]
"""What ``Detector.loss`` returns: terms by name (``"cls"``, ``"box"``, ``"rpn_cls"`` ...)."""


def term_values(terms: LossTerms) -> dict[str, Tensor]:
    """Each term's normalized, weighted value by name, and their sum as ``"loss"`` (a term may
    not be called ``loss``)."""
    values = {name: term.value() for name, term in terms.items()}
    if "loss" in values:
        raise ValueError("a loss term may not be named 'loss' (the name of the total)")
    values["loss"] = total_loss(terms)
    return values


def total_loss(terms: LossTerms) -> Float[Tensor, ""]:
    """``Σ weight · total / max(count, 1)`` over the terms: the objective of one batch."""
    values = [term.value() for term in terms.values()]
    if not values:
        raise ValueError("a detector's loss returned no terms")
    return torch.stack(values).sum()


class Targets(Protocol):
    """What ``Detector.loss`` reads of a batch (:class:`fdet.data.Batch` has it all)."""

    gt_boxes: Float[Tensor, "B M 4"]
    gt_labels: Int[Tensor, "B M"]
    gt_valid: Bool[Tensor, "B M"]


class Detector(nn.Module):
    """The base of every detector: input normalization, the three methods of the contract, and
    the shared :meth:`predict`.

    Subclasses implement ``forward(images) -> outputs`` (apply :meth:`normalize` first),
    ``loss(outputs, batch) -> LossTerms`` and ``postprocess(outputs, image_sizes) ->
    Detections``; ``num_classes`` is the number of classes the detector predicts;
    ``box_terms`` names the terms of ``loss`` that learn box geometry.

    Args:
        mean, std, input_range: input normalization, ``(x / input_range - mean) / std``.
    """

    input_mean: Tensor
    input_std: Tensor
    num_classes: int

    box_terms: frozenset[str] = frozenset()
    """The names of the loss terms that learn box geometry from the ground-truth boxes: the
    regression, and targets computed from a box's shape (centerness, a box's size or sub-pixel
    offset, a mask cropped by the box). A semi-supervised step (:mod:`fdet.train.semi`) trains
    these only on reliable pseudo-labels and the other terms (classification) on all of them.
    Each family declares its own; empty by default (every term learns from every pseudo-label).
    """

    def __init__(
        self,
        *,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        input_range: float = 255.0,
    ) -> None:
        super().__init__()
        self.input_range = float(input_range)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("input_mean", mean_t, persistent=False)
        self.register_buffer("input_std", std_t, persistent=False)

    def normalize(self, images: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 3 H W"]:
        """``(images / input_range - mean) / std`` in float32 (the buffers' dtype).

        Written out rather than folded into one multiply-add, so that float images in ``[0, 1]``
        are normalized bit for bit as torchvision's ``GeneralizedRCNNTransform`` does.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        x = images.to(self.input_mean.dtype)
        if self.input_range != 1.0:
            x = x / self.input_range
        return (x - self.input_mean) / self.input_std

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> Any:
        """The raw outputs (a NamedTuple of tensors) for ``images`` in ``[0, input_range]``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def loss(self, outputs: Any, batch: Targets) -> LossTerms:
        """The loss terms of ``outputs`` against the padded ground truth of ``batch``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement loss")

    def postprocess(
        self, outputs: Any, image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"]
    ) -> Detections:
        """Padded detections ``[B, N]``; boxes clipped to ``image_sizes`` (height, width)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement postprocess")

    @torch.no_grad()
    def predict(
        self,
        images: Float[Tensor, "B 3 H W"],
        image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"] | None = None,
    ) -> Detections:
        """Detections of ``images`` in eval mode without gradients (the module's train/eval mode
        is restored afterwards). ``image_sizes`` ``[B, 2]`` (height, width) clip the boxes;
        default: the padded size of ``images``."""
        if image_sizes is None:
            height, width = images.shape[-2:]
            image_sizes = torch.tensor([height, width], device=images.device).expand(
                images.shape[0], 2
            )
        was_training = self.training
        self.eval()
        try:
            return self.postprocess(self(images), image_sizes)
        finally:
            self.train(was_training)
