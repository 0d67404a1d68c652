"""The Predictor: a trained detector as a function from images to detections in their own pixels.

::

    predictor = fdet.Predictor.from_checkpoint("runs/retinanet_r18_fpn", device="cuda")
    for p in predictor(["a.jpg", pil_image, hwc_array, chw_tensor], batch_size="auto"):
        print(p.source, p.boxes, p.scores, p.names)

Each input is read and converted (:mod:`fdet.inference.inputs`), resized by the run's validation
transforms, and grouped with the inputs of the same padded size (the run's ``pad_divisor``), so
that an image gives the same detections in any company as alone; each group runs in batches of
``batch_size`` under ``torch.inference_mode``. Boxes come back in the original image's pixels.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from fdet import specs
from fdet.data.coco import DataError
from fdet.data.collate import collate
from fdet.data.sample import Sample
from fdet.data.transforms import build_transform
from fdet.inference.inputs import ImageInput, input_name, load_image
from fdet.ops.postprocess import Detections

__all__ = ["CPU_AUTO_BATCH_SIZE", "BatchSize", "Prediction", "Predictor"]

BatchSize = int | Literal["auto"]

CPU_AUTO_BATCH_SIZE = 4
"""What ``batch_size="auto"`` means on a device other than CUDA: a CPU gains little from larger
batches, and memory is rarely what limits them there."""

_MAX_AUTO_BATCH_SIZE = 64
_AUTO_MEMORY_SHARE = 0.6  # of the free GPU memory, for one batch's activations


@attrs.frozen(kw_only=True, eq=False)
class Prediction:
    """The detections of one input image, best first.

    ``boxes`` xyxy float32 ``[n, 4]`` in the pixels of the image as given (before any resize);
    ``scores`` ``[n]``; ``labels`` int64 ``[n]``, the model's contiguous class indices;
    ``names`` the class name of each detection; ``masks`` bool ``[n, H, W]`` at the image's
    size for models that predict masks, else None. ``source`` names the input (its path, or
    ``input <i>``); ``image_size`` is its (height, width). ``error`` is None, or, for an input
    passed over with ``skip_bad``, what is wrong with it (and the detections are empty).
    All tensors are on the CPU.
    """

    boxes: Float[Tensor, "n 4"]
    scores: Float[Tensor, " n"]
    labels: Int[Tensor, " n"]
    names: tuple[str, ...]
    masks: Bool[Tensor, "n H W"] | None
    source: str
    image_size: tuple[int, int]
    error: str | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def _bad(source: str, error: str) -> Prediction:
    return Prediction(
        boxes=torch.zeros(0, 4),
        scores=torch.zeros(0),
        labels=torch.zeros(0, dtype=torch.int64),
        names=(),
        masks=None,
        source=source,
        image_size=(0, 0),
        error=error,
    )


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


class Predictor:
    """A detector with its run's validation transforms and class names, called on images.

    Args:
        model: a detector (the contract of :mod:`fdet.models.detectors.base`); moved to
            ``device`` and put in eval mode.
        experiment: its experiment spec: ``val_transforms`` (resize and ``pad_divisor``) and,
            when ``class_names`` are not given, the data they are read from.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        class_names: a name a label; default: the run's (:func:`fdet.eval.classes.
            run_class_names`), else the label numbers as text.
        score_threshold: detections scoring below it are left out (besides the model's own
            threshold).
        tta: a :class:`fdet.specs.TTA`: detections come from
            :func:`fdet.inference.tta.predict_tta` (flipped and rescaled views, merged).
        compile: run the network through ``torch.compile`` (the first batch of each new
            shape compiles).
    """

    def __init__(
        self,
        model: nn.Module,
        experiment: specs.Experiment,
        *,
        device: str | torch.device = "cpu",
        class_names: Sequence[str] | None = None,
        score_threshold: float = 0.0,
        tta: Any = None,
        compile: bool = False,
    ) -> None:
        from fdet.train.distributed import check_device

        if not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"score_threshold: must lie in [0, 1], got {score_threshold}")
        self.device = check_device(device)
        self.model = model.to(self.device).eval()
        self.experiment = experiment
        self.score_threshold = float(score_threshold)
        self.tta = tta
        self.compile = compile
        num_classes = getattr(model, "num_classes", None) or getattr(
            experiment.model, "num_classes", None
        )
        if class_names is None:
            from fdet.eval.classes import run_class_names

            class_names = run_class_names(experiment)
        if class_names is None:
            class_names = [str(k) for k in range(int(num_classes or 0))]
        self.class_names: tuple[str, ...] = tuple(class_names)
        if num_classes is not None and len(self.class_names) != int(num_classes):
            raise ValueError(
                f"class_names: {len(self.class_names)} names for a model of {num_classes} classes"
            )
        self.transform = build_transform(experiment.val_transforms, train=False)
        self.pad_divisor = int(experiment.val_transforms.pad_divisor)
        self._network: nn.Module = torch.compile(self.model) if compile else self.model  # type: ignore[assignment]
        self._bytes_per_pixel: float | None = None  # measured once, for batch_size="auto"
        self.checkpoint: Path | None = None

    @classmethod
    def from_checkpoint(
        cls,
        run_dir_or_checkpoint: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        ema: bool = True,
        best: bool = False,
        score_threshold: float = 0.0,
        tta: Any = None,
        compile: bool = False,
    ) -> Predictor:
        """The predictor of a run folder (its newest checkpoint, or ``best.pt`` with ``best``)
        or of a checkpoint file, loaded with ``weights_only``. ``ema``: the EMA weights where
        the checkpoint has them (False: the raw weights). An unusable checkpoint is a one-line
        :class:`~fdet.train.checkpoint.CheckpointError` (a ``ValueError``) naming the file; a
        missing one a ``FileNotFoundError``."""
        from fdet.eval.classes import run_class_names
        from fdet.train.checkpoint import checkpoint_entries
        from fdet.train.run_dir import load_run, resolve_checkpoint

        checkpoint = resolve_checkpoint(Path(run_dir_or_checkpoint), best=best)
        exp, model = load_run(checkpoint, device=device, ema=ema)
        names = run_class_names(exp, checkpoint_entries(checkpoint))
        predictor = cls(
            model,
            exp,
            device=device,
            class_names=names,
            score_threshold=score_threshold,
            tta=tta,
            compile=compile,
        )
        predictor.checkpoint = checkpoint
        return predictor

    # --- calling -----------------------------------------------------------------------------

    def __call__(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        *,
        batch_size: BatchSize = 8,
        skip_bad: bool = False,
    ) -> list[Prediction]:
        """One :class:`Prediction` an input, in the order given (a single input gives a list
        of one). ``inputs``: one image or a list or tuple of them, of any kinds and sizes
        (:data:`fdet.inference.inputs.ImageInput`).

        ``batch_size``: images a forward pass, or ``"auto"`` (CUDA: from the free memory,
        halved and retried on out-of-memory; elsewhere :data:`CPU_AUTO_BATCH_SIZE`).
        An input that cannot be read raises a :class:`~fdet.data.coco.DataError` naming it
        before any image is run; with ``skip_bad`` its result carries the ``error`` instead
        and the other inputs are run as usual."""
        items: list[Any] = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        return list(self.predict_iter(items, batch_size=batch_size, skip_bad=skip_bad))

    def predict_iter(
        self,
        inputs: Iterable[ImageInput],
        *,
        batch_size: BatchSize = 8,
        skip_bad: bool = False,
        window: int | None = None,
    ) -> Iterator[Prediction]:
        """:meth:`__call__` over an iterable of any length (a video's frames, a long list of
        files), in order, holding at most ``window`` images at once (default: 8 batches,
        at least 32): each window is read, grouped by size and run before the next is read."""
        _check_batch_size(batch_size)
        if window is None:
            window = max(32, 8 * (batch_size if isinstance(batch_size, int) else 8))
        if window < 1:
            raise ValueError(f"window: must be >= 1, got {window}")
        numbered = enumerate(inputs)
        while chunk := list(itertools.islice(numbered, window)):
            yield from self._predict_chunk(chunk, batch_size, skip_bad)

    def _predict_chunk(
        self, chunk: list[tuple[int, Any]], batch_size: BatchSize, skip_bad: bool
    ) -> list[Prediction]:
        results: dict[int, Prediction] = {}
        samples: dict[int, tuple[str, Sample]] = {}
        for index, item in chunk:  # every input is read before any is run
            source = input_name(item, index)
            try:
                image = load_image(item, name=source)
            except DataError as e:
                if not skip_bad:
                    raise
                results[index] = _bad(source, str(e))
                continue
            samples[index] = (source, self._sample(image, index))
        groups: dict[tuple[int, int], list[int]] = {}
        for index, (_, sample) in samples.items():
            h, w = sample.image.shape[-2:]
            key = (_round_up(int(h), self.pad_divisor), _round_up(int(w), self.pad_divisor))
            groups.setdefault(key, []).append(index)
        for size, indices in groups.items():
            group = [samples[i] for i in indices]
            for index, prediction in zip(indices, self._run_group(group, size, batch_size)):
                results[index] = prediction
        return [results[index] for index, _ in chunk]

    def _sample(self, image: Tensor, index: int) -> Sample:
        h, w = image.shape[-2:]
        sample = Sample(
            image=image,
            boxes=torch.zeros(0, 4),
            labels=torch.zeros(0, dtype=torch.int64),
            crowd=torch.zeros(0, dtype=torch.bool),
            image_id=index,
            orig_size=(int(h), int(w)),
        )
        return self.transform(sample, torch.Generator())

    # --- batches -------------------------------------------------------------------------------

    def _run_group(
        self, group: list[tuple[str, Sample]], size: tuple[int, int], batch_size: BatchSize
    ) -> list[Prediction]:
        """The predictions of images of one padded ``size``, in batches."""
        out: list[Prediction] = []
        start = 0
        size_now: int | None = None
        while start < len(group):
            if size_now is None:
                size_now = self._batch_size_for(size, batch_size, len(group) - start)
            part = group[start : start + size_now]
            measured = self._bytes_per_pixel is not None
            try:
                out.extend(self._run_batch(part))
            except torch.cuda.OutOfMemoryError:
                if batch_size != "auto" or size_now == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                size_now = max(1, size_now // 2)
                if self._bytes_per_pixel is not None:  # later groups start smaller too
                    self._bytes_per_pixel *= 2
                continue
            start += len(part)
            if not measured and self._bytes_per_pixel is not None:
                size_now = None  # the first image measured the memory: size the next batches
        return out

    def _batch_size_for(self, size: tuple[int, int], batch_size: BatchSize, count: int) -> int:
        if batch_size != "auto":
            return int(batch_size)
        if self.device.type != "cuda":
            return CPU_AUTO_BATCH_SIZE
        if self._bytes_per_pixel is None:
            return 1  # the first batch measures the memory an image of a pixel costs
        free, _ = torch.cuda.mem_get_info(self.device)
        # what the caching allocator holds but no tensor uses is free for this process too
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        per_image = self._bytes_per_pixel * size[0] * size[1]
        fits = int(_AUTO_MEMORY_SHARE * free / max(per_image, 1.0))
        return max(1, min(_MAX_AUTO_BATCH_SIZE, fits, count))

    def _run_batch(self, part: list[tuple[str, Sample]]) -> list[Prediction]:
        batch = collate([s for _, s in part], pad_divisor=self.pad_divisor)
        measure = self.device.type == "cuda" and self._bytes_per_pixel is None and len(part) == 1
        if measure:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            images = batch.images.to(self.device, non_blocking=True)
            sizes = batch.image_sizes.to(self.device, non_blocking=True)
            detections = self.detect(images, sizes)
        if measure:
            peak = torch.cuda.max_memory_allocated(self.device) - before
            pixels = int(images.shape[-2]) * int(images.shape[-1])
            self._bytes_per_pixel = peak / max(pixels, 1)
        return self._to_predictions(detections, part, batch.scales)

    def detect(
        self, images: Tensor, image_sizes: Int[Tensor, "B 2"] | Float[Tensor, "B 2"]
    ) -> Detections:
        """The model's detections of a padded batch (uint8 ``[B, 3, H, W]`` in ``[0, 255]``,
        already resized), with test-time augmentation when the predictor has a ``tta``; in
        the batch's pixels."""
        self.model.eval()
        with torch.inference_mode():
            if self.tta is not None:
                from fdet.inference.tta import predict_tta

                return predict_tta(
                    _Network(self.model, self._network),
                    images,
                    image_sizes,
                    self.tta,
                    size_divisor=self.pad_divisor,
                )
            return _Network(self.model, self._network).predict(images, image_sizes)

    def _to_predictions(
        self, detections: Detections, part: list[tuple[str, Sample]], scales: Tensor
    ) -> list[Prediction]:
        from fdet.eval.coco import masks_to_original
        from fdet.ops.masks import paste_masks

        boxes, scores, labels, valid = (t.cpu() for t in detections[:4])  # one transfer each
        masks = detections.masks
        keep = valid & (scores >= self.score_threshold)  # [B, N]
        out = []
        for b, (source, sample) in enumerate(part):
            sy, sx = float(scales[b, 0]), float(scales[b, 1])
            factor = torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
            kept = keep[b]
            image_boxes = (boxes[b][kept].double() / factor).float()  # [n, 4]
            image_labels = labels[b][kept].long()
            image_masks = None
            if masks is not None:
                chosen = masks[b][kept.to(masks.device)]
                if chosen.is_floating_point():  # box-frame probabilities: pasted at full size
                    image_masks = paste_masks(
                        chosen[None],
                        image_boxes.to(chosen.device)[None],
                        sample.orig_size,
                        padding=1,
                        threshold=0.5,
                    )[0].cpu()
                else:
                    image_masks = masks_to_original(chosen.bool(), (sy, sx), sample.orig_size).cpu()
            out.append(
                Prediction(
                    boxes=image_boxes,
                    scores=scores[b][kept].float(),
                    labels=image_labels,
                    names=tuple(self._name(int(x)) for x in image_labels.tolist()),
                    masks=image_masks,
                    source=source,
                    image_size=sample.orig_size,
                )
            )
        return out

    def _name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)


class _Network:
    """``predict`` through the (possibly compiled) network: what test-time augmentation calls
    for each view."""

    def __init__(self, model: nn.Module, network: nn.Module) -> None:
        self.model = model
        self.network = network

    def predict(self, images: Tensor, image_sizes: Tensor) -> Detections:
        return self.model.postprocess(self.network(images), image_sizes)  # type: ignore[operator]


def _check_batch_size(batch_size: Any) -> None:
    if batch_size == "auto":
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer or 'auto', got {batch_size!r}")
