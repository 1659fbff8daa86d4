"""How an agent starts a role: a small interface, and the local-process launcher.

A launcher turns a :class:`RoleSpec` (command, environment, folder, log file) into a running
:class:`RoleHandle`, and can find a role it started again after the agent restarts
(:meth:`Launcher.attach` with the record the handle wrote). A Kubernetes Job or Slurm launcher
is one more file implementing these two classes: :mod:`unitedllm.agent.kubernetes` and
:mod:`unitedllm.agent.slurm` (see ``docs/platform.md``, "Beyond one machine").
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Launcher", "LocalProcessLauncher", "RoleHandle", "RoleSpec", "job_name", "require_tool"]


@dataclass(frozen=True)
class RoleSpec:
    """One role of a run to start: the command, its extra environment, where it runs and logs."""

    run_id: str
    rank: int
    command: list[str]
    workdir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)  # holds the run's keys


class RoleHandle(abc.ABC):
    """A started role: ask whether it ended, stop it, and describe it for :meth:`Launcher.attach`."""

    @abc.abstractmethod
    def poll(self) -> int | None:
        """The exit code once the role has ended, else ``None``."""

    @abc.abstractmethod
    def stop(self, grace_s: float = 20.0) -> None:
        """End the role and everything it started: politely first, by force after ``grace_s``."""

    @abc.abstractmethod
    def record(self) -> dict[str, Any]:
        """Plain data that lets :meth:`Launcher.attach` find this role again."""


class Launcher(abc.ABC):
    """Starts roles and re-attaches to them."""

    name = "launcher"

    @abc.abstractmethod
    def start(self, spec: RoleSpec) -> RoleHandle: ...

    @abc.abstractmethod
    def attach(self, record: dict[str, Any]) -> RoleHandle | None:
        """The role a record describes, or ``None`` when it is gone without a trace of how it ended."""


def job_name(run_id: str, rank: int) -> str:
    """A name for a role's job on a scheduler (DNS-1123: lower case, digits and dashes, <= 63 chars)."""
    stem = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:40]
    return f"unitedllm-{stem}-rank-{rank}"


def require_tool(tool: str, launcher: str) -> str:
    """The path of a tool a launcher needs; one clear line (PlatformError) when it is not installed."""
    from unitedllm.platform.errors import PlatformError

    found = shutil.which(tool)
    if found is None:
        raise PlatformError(f"--launcher {launcher}: {tool} is not installed (not found on PATH)")
    return found


def run_tool(
    args: list[str],
    *,
    what: str | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> str:
    """Run a cluster tool (kubectl, sbatch, ...) and give its output; "" when it failed and ``check`` is off.

    A failure to start it, a timeout, or (with ``check``) a non-zero exit is one PlatformError line
    naming ``what`` (default: the tool's name) and the tool's last line of error output.
    """
    from unitedllm.platform.errors import PlatformError

    what = what or os.path.basename(args[0])
    try:
        result = subprocess.run(
            args, input=stdin, capture_output=True, text=True, timeout=120, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PlatformError(f"{what} failed: {exc}") from None
    if check and result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise PlatformError(f"{what} failed: {last}")
    return result.stdout if result.returncode == 0 else ""


# -- local processes ---------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (ended, not yet reaped by its parent) counts as ended.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalProcess(RoleHandle):
    """A role running as a process group on this machine (its leader is the role wrapper)."""

    def __init__(self, pid: int, exit_file: Path, process: subprocess.Popen[bytes] | None = None):
        self.pid = pid
        self.exit_file = exit_file
        self._process = process

    def poll(self) -> int | None:
        if self._process is not None:
            code = self._process.poll()
            if code is None:
                return None
        elif _alive(self.pid):
            return None
        if self.exit_file.is_file():
            with contextlib.suppress(ValueError):
                return int(self.exit_file.read_text().strip())
        return -int(signal.SIGKILL)  # ended without recording a code: it was killed

    def stop(self, grace_s: float = 20.0) -> None:
        steps = [(signal.SIGTERM, grace_s)] if grace_s > 0 else []
        for signum, wait_s in [*steps, (signal.SIGKILL, 10.0)]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signum)
            deadline = time.monotonic() + wait_s
            while _group_alive(self.pid) and time.monotonic() < deadline:
                if self._process is not None:
                    self._process.poll()  # reap the leader so the group can empty
                time.sleep(0.1)
            if not _group_alive(self.pid):
                break
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)

    def record(self) -> dict[str, Any]:
        return {"launcher": "local", "pid": self.pid, "exit_file": str(self.exit_file)}


class LocalProcessLauncher(Launcher):
    """Starts the role as a local process in a session of its own, its output appended to the log."""

    name = "local"

    def start(self, spec: RoleSpec) -> RoleHandle:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        exit_file = spec.workdir / "exit_code"
        exit_file.unlink(missing_ok=True)
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        with spec.log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "unitedllm.agent.role_wrapper", str(exit_file), "--", *spec.command],
                cwd=spec.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return LocalProcess(process.pid, exit_file, process)

    def attach(self, record: dict[str, Any]) -> RoleHandle | None:
        if record.get("launcher") != self.name:
            return None
        handle = LocalProcess(int(record["pid"]), Path(record["exit_file"]))
        if not _alive(handle.pid) and not handle.exit_file.is_file():
            return None
        return handle
