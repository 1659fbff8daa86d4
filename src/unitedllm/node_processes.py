"""The processes a node starts around a role: its bootstrap script, then a launcher or entry point.

``unitedllm client`` (through :mod:`unitedllm.silo.launcher`) and ``unitedllm package run``
(:mod:`unitedllm.packaging.runner`) both run ``environment_args.bootstrap`` with
:func:`run_bootstrap` and wait on the process they start with :func:`wait_forwarding_signals`,
so a bootstrap's output, its failure message and what Ctrl-C or SIGTERM do are the same for both.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from unitedllm.errors import UnitedLLMError

__all__ = [
    "PACKAGE_DIR_ENV",
    "BootstrapError",
    "run_bootstrap",
    "run_node_bootstrap",
    "wait_forwarding_signals",
]

log = logging.getLogger(__name__)

# Set by ``unitedllm package run`` for its entry point: the package's folder; its bootstrap has run.
PACKAGE_DIR_ENV = "UNITEDLLM_PACKAGE_DIR"

TAIL_LINES = 20


class BootstrapError(UnitedLLMError):
    """The bootstrap script exited with a non-zero code; the message ends with the tail of its output."""

    def __init__(self, script: Path, returncode: int, tail: list[str]):
        self.script = script
        self.returncode = returncode
        self.tail = tail
        shown = "\n".join(f"  | {line}" for line in tail) if tail else "  (no output)"
        super().__init__(
            f"environment_args.bootstrap: {script} exited with code {returncode}; the client was not started. "
            f"Last lines of its output:\n{shown}"
        )


def run_bootstrap(script: Path, *, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run ``bash script``, streaming each line of its output to the log; raise BootstrapError on failure.

    ``env`` is added to this process's environment.
    """
    log.info("bootstrap: bash %s", script)
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        process = subprocess.Popen(
            ["bash", str(script)],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:
        raise BootstrapError(script, 127, [f"cannot start bash: {exc}"]) from exc
    assert process.stdout is not None
    with process.stdout:
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            log.info("bootstrap: %s", line)
    code = process.wait()
    if code != 0:
        raise BootstrapError(script, code, list(tail))
    log.info("bootstrap: done in %.1fs", time.monotonic() - started)


def run_node_bootstrap(script: Path, *, config: Path, rank: int, run_id: str) -> None:
    """Run client ``rank``'s bootstrap ``script`` on this node, with the variables a package's gets.

    The script sees ``UNITEDLLM_RANK``, ``UNITEDLLM_RUN_ID`` and ``UNITEDLLM_CONFIG``, as under
    ``unitedllm package run``.
    """
    env = {"UNITEDLLM_RANK": str(rank), "UNITEDLLM_RUN_ID": run_id, "UNITEDLLM_CONFIG": str(config)}
    run_bootstrap(script, env=env)


def bootstrapped_by_package() -> bool:
    """Whether ``unitedllm package run`` started this process, and so has run the bootstrap already."""
    return bool(os.environ.get(PACKAGE_DIR_ENV))


def wait_forwarding_signals(child: subprocess.Popen[bytes]) -> int:
    """Wait for ``child`` and return its exit code; SIGTERM and Ctrl-C are passed on to it.

    The child decides how to stop (a role says goodbye to the broker first); whatever way this
    wait ends, no child outlives it: one still running then is killed.
    """

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    # Handlers can only be set from the main thread; elsewhere the caller owns the signals.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if main else None
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                child.send_signal(signal.SIGINT)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.kill()
            child.wait()
