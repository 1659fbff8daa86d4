"""Developer sessions: `nox -s tests` (default), `nox -s slow`, `nox -s lint`, `nox -s schema`, `nox -s latest`.

Sessions run in the current environment (set up by scripts/setup.sh at the versions pinned in
constraints.txt), so torch is not reinstalled per session; `latest` alone builds its own.
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


@nox.session(default=False, venv_backend="venv", python="3.11")
def latest(session: nox.Session) -> None:
    """The default suite on the newest versions pyproject.toml allows (drift, found on purpose)."""
    session.run("bash", "scripts/install.sh", env={"UNITEDLLM_UNLOCKED": "1"}, external=True)
    session.run("pip", "freeze", "--exclude-editable", silent=False)
    session.run("python", "-m", "unitedllm.schemas", "--check")
    session.run("pytest", "-m", "not slow", *session.posargs)


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
