"""The quickstart through the platform with the controller or an agent restarted between rounds (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from platform_helpers import AgentProcess, Controller, build_quickstart_packages, wait_for_state, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]

ADAPTER = Path("node_0") / "final" / "adapter_model.safetensors"


def _quickstart_with(restart: Callable[[], None], tmp_path: Path, controller: Controller) -> None:
    """Run the quickstart (4 rounds) through the platform, ``restart`` something after round 0, and
    check the final adapter is byte-identical to ``unitedllm run``'s."""
    project, server_zip, client_zip = build_quickstart_packages(tmp_path)
    rounds = ["train_args.comm_round=4", "train_args.local_max_steps=8"]
    with controller.client() as client:
        server, client_pkg = (client.push(z)["digest"] for z in (server_zip, client_zip))
        run_id = client.launch(
            server_package=server,
            client_package=client_pkg,
            server_device="agg",
            client_devices=["c1", "c2"],
            overrides=[f"train_args.output_dir={tmp_path}/out/{{run_id}}", *rounds],
        )["id"]
        wait_until("round 0", lambda: client.rounds(run_id), timeout=300)
    restart()
    with controller.client() as client:
        run = wait_for_state(client, run_id, "FINISHED", "FAILED", timeout=600)
        assert run["state"] == "FINISHED"
        assert [r["round"] for r in client.rounds(run_id)] == [0, 1, 2, 3]
    local = subprocess.run(
        [sys.executable, "-m", "unitedllm", "run", "config/fedml_config.yaml", "--quiet", "--run-id", run_id,
         "--set", "comm_args.backend=LOCAL", "--set", f"train_args.output_dir={tmp_path}/local/{{run_id}}",
         *(x for r in rounds for x in ("--set", r))],
        cwd=project, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    ours, theirs = tmp_path / "out" / run_id / ADAPTER, tmp_path / "local" / run_id / ADAPTER
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_controller_restart_mid_run_leaves_the_final_model_unchanged(
    tmp_path: Path, controller: Controller, agents: dict[str, AgentProcess]
) -> None:
    _quickstart_with(controller.restart, tmp_path, controller)


def test_an_aggregator_agent_restart_mid_run_leaves_the_final_model_unchanged(
    tmp_path: Path, controller: Controller, agents: dict[str, AgentProcess]
) -> None:
    def restart_agent() -> None:
        agents["agg"].kill()
        agents["agg"].start()

    _quickstart_with(restart_agent, tmp_path, controller)
    assert "re-attached to rank 0's running role" in agents["agg"].log.read_text()
