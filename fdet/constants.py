"""Numbers shared by the spec layer and the ops, in a module that imports nothing but ``math``
(``fdet.specs`` never imports ``fdet.ops``, and ``fdet.ops`` never imports a spec)."""

import math

__all__ = ["DEFAULT_SCALE_CLIP"]

DEFAULT_SCALE_CLIP = math.log(1000.0 / 16)
"""The default bound on decoded log-scale box deltas (``dw``, ``dh`` before ``exp``): a decoded
box is at most 1000/16 times its anchor's width or height."""
