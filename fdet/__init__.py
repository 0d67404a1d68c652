"""fdet: functional object detection on PyTorch.

>>> from fdet import specs, build
"""

from fdet import specs
from fdet.registry import build, register

__version__ = "0.1.0"

__all__ = ["__version__", "build", "register", "specs"]
