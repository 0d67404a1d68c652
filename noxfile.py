"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s typecheck`, `nox -s bench`."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

_SOURCES = ("fdet", "tests", "specs", "benchmarks", "examples", "noxfile.py")
LINT_PATHS = [p for p in _SOURCES if os.path.exists(p)]


@nox.session
def tests(session: nox.Session) -> None:
    """Install fdet with its test extra into this session's virtualenv and run pytest.

    Arguments after ``--`` are added to the defaults (a later ``-n`` wins):
    ``nox -s tests -- --hypothesis-profile thorough`` for a longer, freshly random run of the
    property tests, ``nox -s tests -- tests/ops -x`` for a part of the suite.
    """
    session.install("-e", ".[test]")
    workers = os.environ.get("FDET_TEST_WORKERS", "2")
    session.run("pytest", "-n", workers, "--durations=15", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the pure layers (ops, specs) and the registry."""
    session.install("-e", ".[dev]")
    session.run("mypy", "fdet/ops", "fdet/specs", "fdet/registry.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmark script under benchmarks/ (results go to stdout)."""
    session.install("-e", ".[test]")
    scripts = sorted(
        f for f in os.listdir("benchmarks") if f.endswith(".py") and not f.startswith("_")
    )
    if not scripts:
        session.log("no benchmark scripts yet")
    for script in scripts:
        session.run("python", os.path.join("benchmarks", script), *session.posargs)
