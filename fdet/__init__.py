"""fdet: functional object detection on PyTorch.

>>> from fdet import specs, build
"""

from fdet import specs
from fdet.registry import build, register

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__", "build", "register", "specs"]


def __getattr__(name: str) -> object:
    # ``fdet.Predictor`` is imported on first use, so that ``import fdet`` stays light.
    if name == "Predictor":
        from fdet.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'fdet' has no attribute {name!r}")
