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

# Hypothesis profiles (README, Development):
# - "default", what CI and `nox -s tests` run: 60 examples a test, derandomized, so that every
#   run replays the same examples and a failure reproduces anywhere;
# - "thorough", for longer local runs: 1000 examples a test, freshly random on every run (a
#   failing example is saved in .hypothesis/ and replayed first next time, and printed with a
#   @reproduce_failure blob). `nox -s tests -- --hypothesis-profile thorough`, or
#   HYPOTHESIS_PROFILE=thorough. Tests that set their own max_examples keep it.
settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    derandomize=False,  # explicit: a profile inherits the loaded one, which may be "default"
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
