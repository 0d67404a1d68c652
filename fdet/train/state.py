"""Training state besides the weights, and the random generators' state: what a checkpoint
carries so that a resumed run continues bit for bit."""

from __future__ import annotations

import random
from typing import Any, cast

import attrs
import numpy as np
import torch

__all__ = ["TrainState", "rng_state", "seed_everything", "set_rng_state"]


@attrs.define
class TrainState:
    """The loop's counters: saved in every checkpoint (``attrs.asdict``) and restored on resume."""

    iteration: int = 0
    best_ap: float = -1.0
    best_iteration: int = 0
    stale_evals: int = 0


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random generator's state, in a form ``torch.load(weights_only=True)`` accepts."""
    version, keys, gauss = random.getstate()
    np_state = cast(tuple, np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(keys), gauss],
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys_np.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
