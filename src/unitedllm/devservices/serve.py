"""Both dev services together, and ``unitedllm dev-services``: run them until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from unitedllm.devservices.mosquitto import Mosquitto
from unitedllm.devservices.process import HOST, check_port
from unitedllm.devservices.seaweedfs import SeaweedS3

__all__ = ["DevServices", "dev_services", "serve"]


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
    check_port(mqtt_port, "--mqtt-port")
    check_port(s3_port, "--s3-port")
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
