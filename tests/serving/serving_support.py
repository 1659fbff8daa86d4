"""Helpers of the serving tests: the ``unitedllm`` command, and real ``unitedllm serve`` processes on free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
START_DEADLINE_S = 180.0


def cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m unitedllm ARGS`` (``env``: more environment variables) and return what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "unitedllm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**child_env(), **(env or {})},
        cwd=ROOT,
    )


def child_env() -> dict[str, str]:
    # One torch thread per process: the tests share two cores with the server and with each other.
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def quickstart_args(out: Path, *, rounds: int, run_id: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "run",
        str(QUICKSTART),
        "--run-id",
        run_id,
        "-q",
        "--set",
        f"train_args.comm_round={rounds}",
        "--set",
        f"train_args.output_dir={out}",
        "--set",
        f"data_args.cache_dir={out.parent / 'cache'}",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running ``unitedllm serve`` process."""

    process: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """The value of one sample on ``/metrics`` (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=30).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@contextmanager
def serving(*args: str, log_dir: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start ``unitedllm serve ARGS --port <free>``, wait until ``/health`` answers, stop it afterwards.

    ``env``: more environment variables for the server (service logins, rank keys).
    """
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "unitedllm", "serve", *args, "--port", str(port), "--threads", "1"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            env={**child_env(), **(env or {})},
            cwd=ROOT,
        )
    server = Server(process, port, log)
    try:
        _wait_healthy(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"unitedllm serve exited with {server.process.returncode}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"unitedllm serve did not answer /health within {START_DEADLINE_S:.0f} s:\n{server.output()}")
