"""Fixtures for the platform tests: a real controller process and real agent processes on 127.0.0.1,
using the session's mosquitto and SeaweedFS (``tests/conftest_services.py``), and sleeper packages
(``platform_helpers.SLEEPER``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_helpers import SLEEPER, AgentProcess, Controller, wait_until
from services import service_env, unique_name


@pytest.fixture(scope="module")
def platform_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment of every platform process: the session's broker and store, a bucket of its own."""
    services = request.getfixturevalue("services")
    mqtt = services.mqtt.settings()
    s3 = services.s3.settings(bucket=unique_name("platform"))
    return {**os.environ, **service_env(mqtt, s3), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def controller(
    tmp_path_factory: pytest.TempPathFactory, platform_env: dict[str, str]
) -> Iterator[Controller]:
    root = tmp_path_factory.mktemp("controller")
    ctl = Controller(root / "data", platform_env)
    ctl.start()
    try:
        yield ctl
    finally:
        ctl.kill()


@pytest.fixture(scope="module")
def agents(
    tmp_path_factory: pytest.TempPathFactory, controller: Controller, platform_env: dict[str, str]
) -> Iterator[dict[str, AgentProcess]]:
    """An aggregator and two clients, enrolled and online."""
    root = tmp_path_factory.mktemp("agents")
    made: dict[str, AgentProcess] = {}
    with controller.client() as client:
        for name, role in (("agg", "server"), ("c1", "client"), ("c2", "client")):
            agent = AgentProcess(name, role, root / name, platform_env, controller.url)
            agent.start(client.enrol_token(role))
            made[name] = agent
        wait_until(
            "three agents online",
            lambda: {"agg", "c1", "c2"} <= {d["name"] for d in client.devices() if d["online"]},
        )
    try:
        yield made
    finally:
        for agent in made.values():
            agent.stop()


@pytest.fixture(scope="module")
def sleeper_zips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sleeper server and client packages, built by ``unitedllm-build``."""
    project = tmp_path_factory.mktemp("sleeper") / "proj"
    build = str(Path(sys.executable).parent / "unitedllm-build")
    subprocess.run([build, "init", str(project)], check=True, capture_output=True)
    (project / "launch.py").write_text(SLEEPER)
    for kind in ("server", "client"):
        subprocess.run(
            [build, "-t", kind, "-sf", str(project), "-ep", "launch.py", "-cf", str(project / "config"),
             "-df", str(project / "build"), "-ig", "build,scripts"],
            check=True, capture_output=True,
        )  # fmt: skip
    return {
        kind: project / "build" / "dist-packages" / f"{kind}-package.zip" for kind in ("server", "client")
    }


@pytest.fixture(scope="module")
def sleeper_packages(controller: Controller, sleeper_zips: dict[str, Path]) -> dict[str, str]:
    """Digests of the sleeper packages, pushed to the controller."""
    with controller.client() as client:
        return {kind: str(client.push(path)["digest"]) for kind, path in sleeper_zips.items()}
