"""Device system-metrics history in the database: the newest samples of each device are kept (and no
more), the page's load plot reads them, and they survive a controller restart."""

from __future__ import annotations

from pathlib import Path

import pytest
from platform_helpers import AgentProcess, Controller, controller_core, wait_until

from unitedllm.platform import signing
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.page import _load_plot


def test_only_the_newest_samples_of_each_device_are_kept_and_the_load_plot_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "platform.db"
    core = controller_core(path, samples_kept=5)
    devices = []
    for name in ("edge-1", "edge-2"):
        token = core.create_enrol_token("client")
        key = signing.KeyPair.generate().public_text
        devices.append(
            core.enrol(token=token, name=name, role="client", public_key=key, hardware={})["device_id"]
        )
    for beat in range(8):
        for device_id in devices:
            core.heartbeat(device_id, {"cpu_percent": float(beat), "memory_percent": 50.0}, None)
    core.db.close()

    restarted = controller_core(path, samples_kept=5)  # a new controller on the same database
    for device_id in devices:
        kept = restarted.device_samples(device_id)
        assert [s["metrics"]["cpu_percent"] for s in kept] == [3.0, 4.0, 5.0, 6.0, 7.0]
    plot = _load_plot(restarted, devices[0], since=0.0)
    assert plot is not None and "CPU %" in plot
    with pytest.raises(PlatformError, match="no device 'nope'"):
        restarted.device_samples("nope")
    restarted.db.close()


@pytest.mark.services
def test_device_metrics_survive_a_controller_restart(tmp_path: Path, platform_env: dict[str, str]) -> None:
    ctl = Controller(tmp_path / "data", platform_env)
    ctl.start()
    agent = AgentProcess("metered", "client", tmp_path / "metered", platform_env, ctl.url)
    try:
        with ctl.client() as client:
            agent.start(client.enrol_token("client"))
            wait_until("the agent to enrol", lambda: "metered" in {d["name"] for d in client.devices()})
            before = wait_until(
                "three heartbeats", lambda: len(s := client.device_metrics("metered")) >= 3 and s
            )
        assert all("cpu_percent" in s["metrics"] for s in before)
        ctl.restart()  # SIGKILL, then a new process on the same data folder
        with ctl.client() as client:
            after = client.device_metrics("metered")
            assert after[: len(before)] == before
            wait_until("heartbeats to go on", lambda: len(client.device_metrics("metered")) > len(before))
    finally:
        agent.stop()
        ctl.kill()
