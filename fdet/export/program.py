"""``torch.export`` of a detector with its postprocessing: an ``ExportedProgram`` file of
:class:`fdet.export.graph.DetectionGraph` (normalization, network, decoding, NMS) that loads
back without the spec or the model's Python classes.

The program calls fdet's two custom operators (``fdet::nms_keep_mask``,
``fdet::roi_align_levels``) as they are: a process that loads it must have fdet installed and
its operators registered, which :func:`load_program` does (``import fdet.ops``).
"""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from fdet.atomic import atomic_write
from fdet.export.graph import DetectionGraph, ExportError, check_image_size

__all__ = ["export_program", "load_program", "trace_program"]


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def trace_program(
    model: nn.Module, *, image_size: tuple[int, int], dynamic_batch: bool = False
) -> torch.export.ExportedProgram:
    """The ``ExportedProgram`` of ``model`` and its postprocessing, for float32 images
    ``[B, 3, H, W]`` (pixel values 0–255) with ``(H, W) = image_size`` and ``B`` 1 (or any
    size with ``dynamic_batch``), traced in eval mode (the model's mode is restored after) on
    its device. Its module returns ``(boxes, scores, labels, valid)`` as
    :class:`~fdet.export.graph.DetectionGraph` does."""
    height, width = check_image_size(image_size)
    was_training = model.training
    graph = DetectionGraph(model).eval()
    device = next(model.parameters()).device
    example = torch.zeros(2 if dynamic_batch else 1, 3, height, width, device=device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(graph, (example,), dynamic_shapes=dynamic_shapes)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(
            f"cannot export {type(model).__name__} with torch.export: {_first_line(e)}"
        ) from e
    finally:
        model.train(was_training)


def export_program(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: tuple[int, int],
    dynamic_batch: bool = False,
) -> Path:
    """Save the ``ExportedProgram`` of ``model`` and its postprocessing (:func:`trace_program`)
    to ``path`` with ``torch.export.save``, atomically; returns the path. Load it with
    :func:`load_program`."""
    program = trace_program(model, image_size=image_size, dynamic_batch=dynamic_batch)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    return atomic_write(path, lambda f: f.write(data))


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """The ``ExportedProgram`` saved by :func:`export_program` at ``path``, with fdet's
    operators registered. Call ``load_program(path).module()(images)`` for ``(boxes, scores,
    labels, valid)``.

    Raises ``FileNotFoundError`` for a missing file and :class:`~fdet.export.graph.ExportError`
    for one that is not a saved program (or is damaged)."""
    import fdet.ops.postprocess
    import fdet.ops.roi  # noqa: F401  (registers fdet::roi_align_levels)

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no exported program at {path}")
    if not path.is_file():
        raise ExportError(f"{path}: not an exported program file (a folder?)")
    if not zipfile.is_zipfile(path):
        raise ExportError(f"{path}: not an exported program (truncated, damaged or another file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(path)
    except Exception as e:
        raise ExportError(f"{path}: cannot load the exported program: {_first_line(e)}") from e
