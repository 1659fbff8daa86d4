"""Pytest fixtures for the real services; enable with ``pytest_plugins = ["conftest_services"]``.

One mosquitto + SeaweedFS pair serves the whole session (SeaweedFS opens many ports); tests keep
apart by unique run ids and bucket names. ``own_broker`` is a per-test broker that a test may stop
and restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from services import (
    skip_without_services,
    start_broker,
    start_services,
    stop_service,
    stop_services,
    unique_name,
)

from unitedllm.comm.settings import MqttSettings, S3Settings
from unitedllm.devservices import DevServices, Mosquitto


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServices]:
    """mosquitto (password, TLS listener) and SeaweedFS (enforced keys) on 127.0.0.1 for the session."""
    skip_without_services()
    running = start_services(tmp_path_factory.mktemp("services"))
    try:
        yield running
    finally:
        stop_services(running)


@pytest.fixture
def mqtt_settings(services: DevServices) -> MqttSettings:
    """Settings for the session broker's plain listener."""
    return services.mqtt.settings()


@pytest.fixture
def s3_settings(services: DevServices) -> S3Settings:
    """Settings for the session store, with a bucket of this test's own."""
    return services.s3.settings(bucket=unique_name("test"))


@pytest.fixture
def run_id() -> str:
    return unique_name("run")


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker only this test uses, free to be stopped and restarted on the same port."""
    skip_without_services()
    broker = start_broker(tmp_path / "broker")
    try:
        yield broker
    finally:
        stop_service(broker)
