"""``environment_args.bootstrap``: the node's preparation script, run once before the client starts."""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from unitedllm.errors import UnitedLLMError

__all__ = ["BootstrapError", "run_bootstrap"]

log = logging.getLogger(__name__)

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
    """Run ``bash script``, streaming each line of its output to the log; raise BootstrapError on failure."""
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
