"""Child processes for the dev services: free ports on 127.0.0.1, start, wait until serving, stop."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from unitedllm.errors import CommError, ConfigError, ConfigProblem

__all__ = ["HOST", "Service", "check_port", "free_port", "port_free"]

HOST = "127.0.0.1"


def check_port(port: int | None, flag: str) -> None:
    """Refuse a port outside 1..65535 as a config error naming the option (``None``: pick a free one)."""
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(ConfigProblem(flag, f"{port} is not a TCP port; use 1..65535", flag))


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the services themselves: a restart must not be refused over old TIME_WAIT connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, with_grpc: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (and, ``with_grpc``, port + 10000 free too, as SeaweedFS wants)."""
    for _ in range(500):
        port = random.randint(20000, 55000)
        if port_free(port) and (not with_grpc or port_free(port + 10000)):
            return port
    raise CommError("no free TCP port found on 127.0.0.1 in 20000..55000")


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Service:
    """A child process with a log file: start, wait until its ports answer, stop."""

    name = "service"
    start_timeout_s = 30.0

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ports(self) -> list[int]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write config files before the first start."""

    async def _ready(self) -> bool:
        return all([await _accepts(port) for port in self._ports()])

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Start the process and wait until it serves; raises CommError with the log tail if it does not."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        command = self._command()
        if shutil.which(command[0]) is None:
            raise CommError(f"{self.name}: {command[0]!r} not found on PATH ({self._install_hint()})")
        busy = [port for port in self._ports() if not port_free(port)]
        if busy:
            # Checked first: otherwise whatever holds the port would answer our readiness probe.
            raise CommError(f"{self.name}: port {busy[0]} on {HOST} is already in use")
        self._log = open(self.log_path, "ab")  # noqa: SIM115, ASYNC230 - closed in stop(); opening is instant
        self._process = subprocess.Popen(  # noqa: ASYNC220 - spawning returns at once; we poll it below
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout_s
        while loop.time() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                await self.stop()
                raise CommError(
                    f"{self.name} exited with code {code} at start; log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if await self._ready():
                return
            await asyncio.sleep(0.2)
        await self.stop()
        raise CommError(
            f"{self.name} did not answer within {self.start_timeout_s:g}s; log {self.log_path}:\n{_tail(self.log_path)}"
        )

    async def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 10 s); harmless when not running."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        if self._log is not None:
            self._log.close()
            self._log = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait()

    def _install_hint(self) -> str:
        return ""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
