"""Tiny trained runs for the analysis tests: the session fixtures of the inference tests."""

from tests.inference.conftest import make_tiny_run, tiny_run  # noqa: F401
