"""Fixtures for the serving tests: one small trained run, and a server on it, shared by the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_support import Server, cli, quickstart_args, serving


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-round quickstart run folder (rounds 0 and 1, three clients), shared by every serving test."""
    out = tmp_path_factory.mktemp("serving") / "run"
    done = cli(*quickstart_args(out, rounds=2, run_id="serving-run"))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="session")
def run_server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on the trained run, with client 2's round-1 model also served as the named adapter 'client2'."""
    client2 = trained_run / "node_2" / "round_1_before_agg"
    with serving(
        str(trained_run), "--adapter", f"client2={client2}", log_dir=tmp_path_factory.mktemp("logs")
    ) as server:
        yield server
