"""The hypothesis profiles of tests/conftest.py: CI replays fixed examples, `thorough` explores."""

from __future__ import annotations

from hypothesis import settings


def test_default_profile_is_deterministic_and_thorough_is_random() -> None:
    default, thorough = settings.get_profile("default"), settings.get_profile("thorough")
    assert default.derandomize and default.max_examples == 60
    assert not thorough.derandomize and thorough.max_examples == 1000
    assert thorough.deadline is None and thorough.print_blob
