from __future__ import annotations

import os
import tempfile

# One inductor cache per xdist worker: concurrent compiles never share cache files.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fdet-inductor-{_worker}")
)

import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Hypothesis: a modest, deterministic budget by default; `HYPOTHESIS_PROFILE=thorough` for more.
settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
