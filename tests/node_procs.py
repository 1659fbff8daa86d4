"""A run's nodes as OS processes for tests: start, read their metrics, wait, kill, and show their logs.

Shared by the process tests (``unitedllm server``/``client`` commands) and the fault tests
(``faults.node``); each subclass says how a node is started and calls :meth:`NodeProcesses.spawn`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

Event = dict[str, Any]


class NodeProcesses:
    """Processes of one run, each logging to ``<tmp>/<name>-<n>.log``; whatever is left is killed at the end."""

    run_limit_s: float = 300.0
    log_tail_chars = 3000

    def __init__(self, tmp: Path, output_dir: Path):
        self.tmp = tmp
        self.output_dir = output_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def metrics(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def spawn(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def events(self, kind: str | None = None) -> list[Event]:
        if not self.metrics.is_file():
            return []
        found = []
        for line in self.metrics.read_text().splitlines():
            if not line.strip():
                continue
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                continue
        return [e for e in found if kind is None or e.get("event") == kind]

    def aggregated(self) -> dict[int, list[int]]:
        """Round → the client ranks whose updates went into its aggregate (the last record wins after a resume)."""
        return {e["round"]: e["aggregated"] for e in self.events("round")}

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float | None = None) -> Event:
        """The first metrics event matching ``predicate``; fails early when every node has exited."""
        timeout = self.run_limit_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            if self.procs and all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        pytest.fail(f"no matching metrics event within {timeout:g}s\n{self.logs()}")

    def wait(self, proc: subprocess.Popen[bytes], timeout: float | None = None) -> int:
        timeout = self.run_limit_s if timeout is None else timeout
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {proc.args!r} still running after {timeout:g}s\n{self.logs()}")

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        """Everything the ``name`` processes (e.g. ``server``) wrote so far."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob(f"{name}-*.log")))

    def logs(self) -> str:
        tail = self.log_tail_chars
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.tmp.glob("*.log"))
        )

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)
