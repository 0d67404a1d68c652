"""Inference: :class:`Predictor` (a trained run called on images), input reading, video, and
the ``fdet infer`` command. ``Predictor`` and ``Prediction`` are imported on first use, so that
the command's parser stays light."""

from typing import Any

__all__ = ["Prediction", "Predictor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fdet.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'fdet.inference' has no attribute {name!r}")
