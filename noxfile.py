"""Developer sessions: `nox -s tests` (default), `nox -s slow`, `nox -s lint`, `nox -s schema`.

Sessions run in the current environment (set up by scripts/setup.sh), so torch is not
reinstalled per session.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "none"


@nox.session
def tests(session: nox.Session) -> None:
    """The default test suite (everything not marked slow), against real mosquitto and SeaweedFS."""
    session.run("python", "-m", "unitedllm.schemas", "--check")
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session(default=False)
def slow(session: nox.Session) -> None:
    """Long suites: multi-process runs, large blobs, real-data runs."""
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(default=False)
def lint(session: nox.Session) -> None:
    """Static checks: ruff (lint and formatting) and mypy on src/."""
    session.run("ruff", "check", "src", "tests", "bench")
    session.run("ruff", "format", "--check", "src", "tests", "bench", "noxfile.py")
    session.run("mypy", "src")


@nox.session(default=False)
def schema(session: nox.Session) -> None:
    """Regenerate every committed JSON Schema under schemas/ from the types."""
    session.run("python", "-m", "unitedllm.schemas")
