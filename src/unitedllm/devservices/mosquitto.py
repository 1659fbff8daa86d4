"""A password-protected mosquitto broker on 127.0.0.1, with an optional TLS listener."""

from __future__ import annotations

import getpass
import secrets
import shutil
import subprocess
from pathlib import Path

from unitedllm.comm.settings import MqttSettings
from unitedllm.devservices.process import HOST, Service, free_port
from unitedllm.devservices.tls import TlsFiles, make_tls_files
from unitedllm.errors import CommError

__all__ = ["Mosquitto"]


class Mosquitto(Service):
    """A mosquitto broker on 127.0.0.1 that requires a password, with an optional TLS listener.

    Ports are picked once and kept across :meth:`restart`, so clients reconnect to the same address.
    """

    name = "mosquitto"
    start_timeout_s = 20.0

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        tls: bool = True,
        username: str = "unitedllm",
        password: str | None = None,
        binary: str = "mosquitto",
    ):
        super().__init__(workdir)
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        self.username = username
        self.password = password or secrets.token_urlsafe(16)
        self.binary = shutil.which(binary) or (
            f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else binary
        )
        self.tls_files: TlsFiles | None = None
        self.config_path = workdir / "mosquitto.conf"

    def _install_hint(self) -> str:
        return "install it: apt-get install -y mosquitto"

    def _prepare(self) -> None:
        password_file = self.workdir / "passwd"
        if not password_file.exists():
            tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            try:
                subprocess.run(
                    [tool, "-b", "-c", str(password_file), self.username, self.password],
                    check=True,
                    capture_output=True,
                )
            except (OSError, subprocess.CalledProcessError) as exc:
                raise CommError(
                    f"mosquitto_passwd failed ({exc}); install it: apt-get install -y mosquitto"
                ) from exc
            password_file.chmod(0o600)
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {password_file}",
            "persistence false",
            f"user {getpass.getuser()}",  # as root, mosquitto would otherwise drop to a user that cannot read our files
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"listener {self.port} {HOST}",
        ]
        if self.tls_port is not None:
            self.tls_files = self.tls_files or make_tls_files(self.workdir / "tls")
            lines += [
                f"listener {self.tls_port} {HOST}",
                f"cafile {self.tls_files.ca_file}",
                f"certfile {self.tls_files.cert_file}",
                f"keyfile {self.tls_files.key_file}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def _ports(self) -> list[int]:
        return [self.port] + ([self.tls_port] if self.tls_port is not None else [])

    def settings(self, *, tls: bool = False, keepalive: int = 60) -> MqttSettings:
        """Settings that log in to this broker (over the TLS listener with ``tls``)."""
        if tls:
            if self.tls_port is None or self.tls_files is None:
                raise CommError("this mosquitto has no TLS listener (started with tls=False)")
            return MqttSettings(
                host=HOST,
                port=self.tls_port,
                username=self.username,
                password=self.password,
                keepalive=keepalive,
                tls_ca_file=str(self.tls_files.ca_file),
            )
        return MqttSettings(
            host=HOST, port=self.port, username=self.username, password=self.password, keepalive=keepalive
        )
