"""Runs a role's command and writes its exit code to a file, so a restarted agent can learn it.

``python -m unitedllm.agent.role_wrapper EXIT_FILE -- COMMAND...``. The agent starts this in a
session of its own; stopping the role signals the whole process group, which this wrapper
outlives long enough to record how the command ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def _note(_signum: int, _frame: object) -> None:
    """Outlive the stop signal; the command gets it too and ends."""


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m unitedllm.agent.role_wrapper EXIT_FILE -- COMMAND...", file=sys.stderr)
        return 2
    exit_file = Path(argv[0])
    # The group's SIGTERM reaches the command directly; this wrapper waits to record the outcome.
    # A handler, not SIG_IGN: an ignored signal would stay ignored in the command after exec.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _note)
    child = subprocess.Popen(argv[2:])
    code = child.wait()
    partial = exit_file.with_suffix(".tmp")
    partial.write_text(str(code))
    os.replace(partial, exit_file)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
