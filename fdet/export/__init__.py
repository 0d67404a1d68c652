"""Exporting a trained detector with its postprocessing: ONNX (:func:`export_onnx`) and
``torch.export`` (:func:`export_program`, :func:`load_program`).

Both capture :class:`DetectionGraph`: float32 images ``[B, 3, H, W]`` with pixel values 0–255
in; ``boxes [B, N, 4]`` (xyxy, input pixels), ``scores [B, N]``, ``labels [B, N]`` (int64,
contiguous class index) and ``valid [B, N]`` (bool) out. docs/inference.md has the details.
"""

from typing import Any

__all__ = [
    "DetectionGraph",
    "ExportError",
    "default_image_size",
    "export_onnx",
    "export_program",
    "load_program",
]

_HOMES = {
    "DetectionGraph": "graph",
    "ExportError": "graph",
    "default_image_size": "graph",
    "export_onnx": "onnx",
    "export_program": "program",
    "load_program": "program",
}


def __getattr__(name: str) -> Any:
    """The names above, imported on first use: ``fdet``'s command parser imports
    ``fdet.export.cli`` and should not pay for torch and the models."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fdet.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"fdet.export.{home}"), name)
