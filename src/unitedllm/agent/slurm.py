"""The Slurm launcher: a role runs as a batch job (``unitedllm agent --launcher slurm``).

The agent runs on a login node whose file system the compute nodes share. Each role becomes an
sbatch script that runs the role's command (this agent's interpreter, ``-m unitedllm.packaging
run ...``) with its output appended to the role's log. The role's environment (its run keys and
broker login) is never written into the script: ``sbatch`` gets it in its own environment and
passes it on (``--export=ALL``). ``squeue`` and ``sacct`` follow the job; ``scancel`` stops it,
SIGTERM first and SIGKILL after the grace period.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import time
from collections.abc import Sequence
from typing import Any

from unitedllm.agent.launcher import Launcher, RoleHandle, RoleSpec, job_name, require_tool, run_tool
from unitedllm.platform.errors import PlatformError

__all__ = ["SlurmLauncher"]

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


class SlurmLauncher(Launcher):
    """Starts each role as a Slurm batch job of one task."""

    name = "slurm"

    def __init__(
        self,
        *,
        partition: str | None = None,
        time_limit: str | None = None,
        options: Sequence[str] = (),
        check_tool: bool = True,
    ):
        self.sbatch = require_tool("sbatch", self.name) if check_tool else "sbatch"
        self.partition = partition
        self.time_limit = time_limit
        self.options = list(options)  # more #SBATCH options, e.g. --gres=gpu:1

    def script(self, spec: RoleSpec) -> str:
        """The batch script: Slurm options, then the role's command; no secret in it."""
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name={job_name(spec.run_id, spec.rank)}",
            "#SBATCH --nodes=1",
            "#SBATCH --ntasks=1",
            f"#SBATCH --chdir={shlex.quote(str(spec.workdir))}",
            f"#SBATCH --output={shlex.quote(str(spec.log_path))}",
            "#SBATCH --open-mode=append",
            "#SBATCH --export=ALL",
        ]
        if self.partition:
            lines.append(f"#SBATCH --partition={shlex.quote(self.partition)}")
        if self.time_limit:
            lines.append(f"#SBATCH --time={shlex.quote(self.time_limit)}")
        lines += [f"#SBATCH {option}" for option in self.options]
        lines += ["export PYTHONUNBUFFERED=1", f"exec {shlex.join(spec.command)}", ""]
        return "\n".join(lines)

    def start(self, spec: RoleSpec) -> RoleHandle:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env}  # the role's keys reach the job through sbatch's environment
        out = run_tool([self.sbatch, "--parsable"], stdin=self.script(spec), env=env)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise PlatformError(f"sbatch gave no job id (it printed {out.strip()[:80]!r})")
        return SlurmJob(job_id)

    def attach(self, record: dict[str, Any]) -> RoleHandle | None:
        if record.get("launcher") != self.name:
            return None
        job = SlurmJob(str(record["job_id"]))
        return job if job.state() is not None else None


def exit_code(state: str, code: str) -> int:
    """A finished job's exit code from sacct's ``State`` and ``ExitCode`` (``code:signal``)."""
    if state.startswith("CANCELLED"):
        return -int(signal.SIGKILL)
    status, _, by_signal = code.partition(":")
    with contextlib.suppress(ValueError):
        if int(by_signal or 0):
            return -int(by_signal)
        value = int(status)
        return value if value or state == "COMPLETED" else 1
    return 0 if state == "COMPLETED" else 1


class SlurmJob(RoleHandle):
    """A role's batch job, followed with ``squeue``/``sacct`` and stopped with ``scancel``."""

    def __init__(self, job_id: str):
        self.job_id = job_id

    def state(self) -> tuple[str, str] | None:
        """(State, ExitCode) of the job, or ``None`` when Slurm does not know it."""
        queued = run_tool(["squeue", "-h", "-j", self.job_id, "-o", "%T"], check=False).split()
        if queued and queued[0] in ACTIVE:
            return queued[0], ""
        out = run_tool(["sacct", "-j", self.job_id, "-n", "-P", "-X", "-o", "State,ExitCode"], check=False)
        for line in out.splitlines():
            state, _, code = line.strip().partition("|")
            if state:
                return state.split()[0], code
        return (queued[0], "") if queued else None

    def poll(self) -> int | None:
        found = self.state()
        if found is None:
            return -int(signal.SIGKILL)  # gone without a record: it was killed
        state, code = found
        return None if state in ACTIVE else exit_code(state, code)

    def stop(self, grace_s: float = 20.0) -> None:
        if grace_s > 0:
            run_tool(["scancel", "--full", "--signal=TERM", self.job_id], check=False)
            deadline = time.monotonic() + grace_s
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(1.0)
        run_tool(["scancel", self.job_id], check=False)

    def record(self) -> dict[str, Any]:
        return {"launcher": "slurm", "job_id": self.job_id}
