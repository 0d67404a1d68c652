"""ONNX export of a detector with its postprocessing: normalization, network, decoding and NMS
in one graph (:class:`fdet.export.graph.DetectionGraph`).

**Exporter.** The graph is captured by ``torch.export`` and converted by PyTorch's dynamo-based
ONNX exporter (``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``). fdet's two
custom operators, opaque to the tracer, are translated to standard ONNX operators through the
exporter's ``custom_translation_table``:

- ``fdet::nms_keep_mask`` (class-aware NMS of a padded batch) becomes one
  ``NonMaxSuppression``: the candidates' scores are spread over ``[B, K, C]`` (a class's row
  holds the scores of the valid candidates with that label, ``-inf`` elsewhere, below the
  operator's score threshold), so that the operator's per-class suppression is exactly the
  per-(image, label) suppression of the PyTorch operator; its selected ``(image, class, box)``
  triples are scattered back into the ``[B, C]`` keep mask.
- ``fdet::roi_align_levels`` (RoI Align, each RoI from its own pyramid level) becomes, per
  level, the RoIs of that level (``NonZero``, ``Gather``), one ``RoiAlign`` (``avg``,
  ``output_half_pixel``, or ``half_pixel`` for ``aligned`` models, as torchvision's kernel)
  and a ``ScatterND`` into the output.

Everything else is ordinary ATen that the exporter converts itself. The TorchScript exporter
(``dynamo=False``) is not used: it stops at the custom operators, it records the batch size of
its example input, and PyTorch no longer develops it. The same ``torch.export`` capture also
gives :func:`fdet.export.export_program`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fdet
from fdet.atomic import atomic_write
from fdet.export._opset import MIN_OPSET
from fdet.export.graph import (
    INPUT_NAME,
    OUTPUT_NAMES,
    DetectionGraph,
    ExportError,
    check_image_size,
)

__all__ = ["MIN_OPSET", "export_onnx", "onnx_metadata"]

_LOWEST_FLOAT32 = -3.4028234663852886e38


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the onnx and onnxscript packages ({e.name} is missing): "
            "pip install 'fdet[export]'"
        ) from None


def _translation_table() -> dict[Any, Callable[..., Any]]:
    """ONNX translations of fdet's custom operators, for ``custom_translation_table``."""
    from onnxscript import opset18

    op: Any = opset18  # onnxscript's operator stubs type ONNX values, not these graph values

    def nms_keep_mask(
        boxes: Any, scores: Any, labels: Any, valid: Any, iou_threshold: float
    ) -> Any:
        # boxes [B, C, 4], scores [B, C], labels [B, C], valid [B, C] -> keep [B, C] bool
        labels = op.Cast(labels, to=7)  # int64
        num_classes = op.Add(op.ReduceMax(labels, keepdims=0), op.Constant(value_int=1))
        classes = op.Range(op.Constant(value_int=0), num_classes, op.Constant(value_int=1))  # [K]
        of_class = op.Equal(op.Unsqueeze(labels, [1]), op.Unsqueeze(classes, [0, 2]))  # [B, K, C]
        take = op.And(of_class, op.Unsqueeze(valid, [1]))  # [B, K, C]
        class_scores = op.Where(
            take, op.Unsqueeze(op.Cast(scores, to=1), [1]), op.Constant(value_float=-float("inf"))
        )  # [B, K, C], -inf below the score threshold: never selected, never suppressing
        num_candidates = op.Slice(op.Shape(boxes), [1], [2])  # [1]
        selected = op.NonMaxSuppression(
            op.Cast(boxes, to=1),
            class_scores,
            num_candidates,
            op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[_LOWEST_FLOAT32]),
        )  # [S, 3] (image, class, candidate)
        where = op.Gather(selected, [0, 2], axis=1)  # [S, 2] (image, candidate)
        ones = op.Expand(op.Constant(value_int=1), op.Slice(op.Shape(selected), [0], [1]))  # [S]
        zeros = op.Expand(op.Constant(value_int=0), op.Shape(valid))  # [B, C]
        return op.Cast(op.ScatterND(zeros, where, ones), to=9)  # bool

    def roi_align_levels(
        features: list[Any],
        rois: Any,
        level: Any,
        scales: list[float],
        pooled_height: int,
        pooled_width: int,
        sampling_ratio: int,
        aligned: bool,
    ) -> Any:
        # features: per level [B, C, H_l, W_l]; rois [N, 5] (image, x1, y1, x2, y2); level [N]
        # (an index into features, -1 for none) -> [N, C, h, w], zeros for level -1
        mode = "half_pixel" if aligned else "output_half_pixel"
        num_rois = op.Slice(op.Shape(rois), [0], [1])  # [1]
        channels = op.Slice(op.Shape(features[0]), [1], [2])  # [1]
        out_shape = op.Concat(
            num_rois, channels, op.Constant(value_ints=[pooled_height, pooled_width]), axis=0
        )
        out = op.Expand(op.CastLike(op.Constant(value_float=0.0), rois), out_shape)
        for i, (feature, scale) in enumerate(zip(features, scales, strict=True)):
            index = op.Reshape(op.NonZero(op.Equal(level, op.Constant(value_int=i))), [-1])  # [n]
            level_rois = op.Gather(rois, index, axis=0)  # [n, 5]
            image = op.Cast(op.Gather(level_rois, op.Constant(value_int=0), axis=1), to=7)  # [n]
            pooled = op.RoiAlign(
                feature,
                op.Slice(level_rois, [1], [5], [1]),
                image,
                mode="avg",
                output_height=pooled_height,
                output_width=pooled_width,
                sampling_ratio=sampling_ratio,
                spatial_scale=scale,
                coordinate_transformation_mode=mode,
            )  # [n, C, h, w]
            out = op.ScatterND(out, op.Unsqueeze(index, [1]), pooled)
        return out

    import fdet.ops.postprocess
    import fdet.ops.roi  # noqa: F401

    return {
        torch.ops.fdet.nms_keep_mask.default: nms_keep_mask,
        torch.ops.fdet.roi_align_levels.default: roi_align_levels,
    }


def onnx_metadata(
    model: nn.Module,
    image_size: tuple[int, int],
    *,
    class_names: list[str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The metadata fdet writes into an exported file (``metadata_props``): fdet's version, the
    detector's class, the input size, the number of classes and, when known, their names."""
    meta = {
        "fdet.version": fdet.__version__,
        "fdet.model": type(model).__name__,
        "fdet.image_size": f"{image_size[0]},{image_size[1]}",
        "fdet.num_classes": str(getattr(model, "num_classes", "")),
        "fdet.inputs": f"{INPUT_NAME}: float32 [B, 3, H, W], pixel values 0-255, RGB",
        "fdet.outputs": "boxes [B, N, 4] xyxy pixels, scores [B, N], labels [B, N] int64, "
        "valid [B, N] bool",
    }
    if class_names is not None:
        meta["fdet.class_names"] = json.dumps(list(class_names))
    meta.update(extra or {})
    return meta


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: tuple[int, int],
    dynamic_batch: bool = False,
    opset: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` with its postprocessing as one ONNX graph to ``path``; returns the path.

    The graph's input ``images`` is float32 ``[B, 3, H, W]`` with ``(H, W) = image_size``,
    pixel values in ``[0, 255]`` (RGB, as fdet reads images); ``B`` is 1, or any size with
    ``dynamic_batch``. Its outputs are ``boxes [B, N, 4]`` (xyxy, pixels of the input),
    ``scores [B, N]``, ``labels [B, N]`` (int64, the contiguous class index) and
    ``valid [B, N]`` (bool), ``N`` the model's ``max_detections`` (see
    :mod:`fdet.export.graph`). The model is traced in eval mode (its mode is restored after)
    on its own device, and the file is checked with ``onnx.checker`` before it is written
    (atomically).

    ``opset``: the ONNX opset, at least :data:`MIN_OPSET` (default: the exporter's, 20 with
    torch 2.14). ``metadata``: entries for the file's ``metadata_props`` (default:
    :func:`onnx_metadata`).

    Raises :class:`~fdet.export.graph.ExportError` for a model that cannot be exported (masks,
    an operator the exporter cannot convert), a bad size or opset, or missing packages.
    """
    _require_onnx()
    import onnx

    height, width = check_image_size(image_size)
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"opset: fdet exports to ONNX opset {MIN_OPSET} or later, got {opset}")
    was_training = model.training
    graph = DetectionGraph(model).eval()
    device = next(model.parameters()).device
    example = torch.zeros(2 if dynamic_batch else 1, 3, height, width, device=device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=_translation_table(),
                verbose=False,
            )
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: {_first_line(e)}") from e
    finally:
        model.train(was_training)
    if program is None:  # only for a TorchScript export, never this one
        raise ExportError(f"cannot export {type(model).__name__} to ONNX: no program")
    proto = program.model_proto
    meta = metadata if metadata is not None else onnx_metadata(model, (height, width))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported ONNX graph fails onnx.checker: {_first_line(e)}") from e
    data = proto.SerializeToString()
    return atomic_write(path, lambda f: f.write(data))
