"""Runs on the platform with real agent processes: launch, logs, keys, stop, busy devices, restarts."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from platform_helpers import AgentProcess, Controller, launch, wait_for_state, wait_running, wait_until

from unitedllm.platform.errors import PlatformError

pytestmark = pytest.mark.services


def steps(seconds: float) -> str:
    """The override that makes a sleeper role run about ``seconds``."""
    return f"train_args.local_max_steps={max(1, int(seconds / 0.2))}"


def _logs(controller: Controller, run_id: str) -> str:
    with controller.client() as client:
        return "".join(batch["text"] for batch in client.logs(run_id))


def s3_client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["UNITEDLLM_S3_ENDPOINT_URL"],
        aws_access_key_id=env["UNITEDLLM_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=env["UNITEDLLM_S3_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def test_run_finishes_with_logs_and_each_rank_gets_only_its_keys(
    controller: Controller,
    agents: dict[str, AgentProcess],
    sleeper_packages: dict[str, str],
    platform_env: dict[str, str],
) -> None:
    with controller.client() as client:
        run_id = launch(client, sleeper_packages, steps(1))
        run = wait_for_state(client, run_id, "FINISHED", "FAILED")
        assert run["state"] == "FINISHED", _logs(controller, run_id)
        assert [m["state"] for m in run["members"]] == ["FINISHED"] * 3
        states = [(e["rank"], e["state"]) for e in client.events(run_id) if e["rank"] == 1]
        assert states == [(1, "INITIALIZING"), (1, "RUNNING"), (1, "FINISHED")]
        text = _logs(controller, run_id)
        assert "authenticated by the platform's signature" in text
        # The aggregator holds every client's key, a client only its own (names only are logged).
        assert "sleeper rank 0 started; keys: UNITEDLLM_RANK_KEY_1,UNITEDLLM_RANK_KEY_2;" in text
        assert "sleeper rank 1 started; keys: UNITEDLLM_RANK_KEY_1;" in text
        assert "sleeper rank 2 started; keys: UNITEDLLM_RANK_KEY_2;" in text
        assert "tick 4" in text
        # The aggregator's metrics.jsonl reached the controller: its one round is listed.
        assert [r["round"] for r in client.rounds(run_id)] == [0]
        assert all(d["state"] == "IDLE" and d["run_id"] is None for d in client.devices() if d["online"])
        # Each device's whole log was archived to S3 when the run ended.
        archive = wait_until("the log archive", lambda: client.run(run_id)["log_archive"])
        assert archive.keys() == {m["device_id"] for m in run["members"]}
        c1 = agents["c1"].device_id
        bucket, key = archive[c1]["url"].removeprefix("s3://").split("/", 1)
        stored = s3_client(platform_env).get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        assert stored == "".join(b["text"] for b in client.logs(run_id, device=c1))


def test_a_failing_role_fails_the_run_with_its_exit_code(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    with controller.client() as client:
        run_id = launch(client, sleeper_packages, steps(0.2), "common_args.random_seed=3")
        run = wait_for_state(client, run_id, "FINISHED", "FAILED")
        assert run["state"] == "FAILED"
        assert {m["exit_code"] for m in run["members"]} == {3}


def test_stop_kills_every_role_and_leaves_no_process(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    with controller.client() as client:
        run_id = launch(client, sleeper_packages, steps(300))
        wait_running(client, run_id)
        wait_until("the roles' output", lambda: "tick 1" in _logs(controller, run_id))
        groups = [wait_until("a role record", a.role_record)["handle"]["pid"] for a in agents.values()]
        client.stop(run_id)
        run = wait_for_state(client, run_id, "KILLED", "FAILED", "FINISHED")
        assert run["state"] == "KILLED"
        assert [m["state"] for m in run["members"]] == ["KILLED"] * 3
        for pgid in groups:
            with pytest.raises(ProcessLookupError):
                os.killpg(pgid, 0)  # the whole process group is gone: no orphaned entry point


def test_abort_kills_roles_that_ignore_the_stop_signal_at_once(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    with controller.client() as client:
        run_id = launch(client, sleeper_packages, steps(300), "train_args.seed=99")
        wait_running(client, run_id)
        wait_until("the roles' output", lambda: "tick 1" in _logs(controller, run_id))
        groups = [wait_until("a role record", a.role_record)["handle"]["pid"] for a in agents.values()]
        client.abort(run_id)
        # Well inside the 20 s a stop would give a role that ignores SIGTERM.
        run = wait_for_state(client, run_id, "KILLED", "FAILED", "FINISHED", timeout=15)
        assert run["state"] == "KILLED"
        assert {
            e["detail"] for e in client.events(run_id) if e["state"] == "KILLED" and e["rank"] is not None
        } == {"aborted"}
        for pgid in groups:
            with pytest.raises(ProcessLookupError):
                os.killpg(pgid, 0)


def test_a_device_is_never_bound_to_two_runs(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    with controller.client() as client:
        first = launch(client, sleeper_packages, steps(300), clients=("c1",))
        with pytest.raises(PlatformError, match="busy with run") as refused:
            launch(client, sleeper_packages, clients=("c2",))  # the aggregator is taken
        assert refused.value.status == 409
        with pytest.raises(PlatformError, match="is a client, rank 0 needs a server"):
            client.launch(
                server_package=sleeper_packages["server"],
                client_package=sleeper_packages["client"],
                server_device="c2",
                client_devices=["c2"],
            )
        client.stop(first)
        wait_for_state(client, first, "KILLED")


def test_agent_killed_mid_run_reattaches_to_its_role(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    with controller.client() as client:
        run_id = launch(client, sleeper_packages, steps(6))
        wait_running(client, run_id)
        c1 = agents["c1"]
        pid = wait_until("c1's role record", c1.role_record)["handle"]["pid"]
        c1.kill()
        os.kill(pid, 0)  # the role outlives its agent
        c1.start()
        run = wait_for_state(client, run_id, "FINISHED", "FAILED")
        assert run["state"] == "FINISHED"
        assert f"run {run_id}: re-attached to rank 1's running role" in c1.log.read_text()
        assert "tick 29" in _logs(controller, run_id)  # the log after the restart reached the controller


def test_agent_restart_after_its_role_died_reports_failed_not_a_zombie(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    with controller.client() as client:
        run_id = launch(client, sleeper_packages, steps(300))
        wait_running(client, run_id)
        c2 = agents["c2"]
        pgid = wait_until("c2's role record", c2.role_record)["handle"]["pid"]
        c2.kill()
        os.killpg(pgid, signal.SIGKILL)  # the role dies while nobody watches it
        c2.start()
        wait_until("rank 2 FAILED", lambda: client.run(run_id)["members"][2]["state"] == "FAILED")
        client.stop(run_id)
        assert wait_for_state(client, run_id, "KILLED")["state"] == "KILLED"


def test_controller_restart_mid_run_the_run_goes_on(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    with controller.client() as client:
        run_id = launch(client, sleeper_packages, steps(6))
        wait_running(client, run_id)
    controller.restart()
    with controller.client() as client:
        run = wait_for_state(client, run_id, "FINISHED", "FAILED")
        assert run["state"] == "FINISHED"
        assert "tick 29" in _logs(controller, run_id)


def test_a_silent_device_is_shown_offline(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    c2 = agents["c2"]
    with controller.client() as client:
        c2.kill()
        wait_until("c2 OFFLINE", lambda: client.device("c2")["state"] == "OFFLINE", timeout=30)
        c2.start()
        wait_until("c2 back", lambda: client.device("c2")["online"], timeout=30)


def test_two_runs_on_disjoint_devices_run_at_once(
    tmp_path: Path,
    controller: Controller,
    agents: dict[str, AgentProcess],
    sleeper_packages: dict[str, str],
    platform_env: dict[str, str],
) -> None:
    second = AgentProcess("agg2", "server", tmp_path / "agg2", platform_env, controller.url)
    with controller.client() as client:
        second.start(client.enrol_token("server"))
        try:
            wait_until(
                "agg2 online", lambda: any(d["name"] == "agg2" and d["online"] for d in client.devices())
            )
            first = launch(client, sleeper_packages, steps(4), clients=("c1",))
            other = client.launch(
                server_package=sleeper_packages["server"],
                client_package=sleeper_packages["client"],
                server_device="agg2",
                client_devices=["c2"],
                overrides=[steps(4)],
            )["id"]
            wait_running(client, first)
            wait_running(client, other)  # both under way at the same time
            for run_id in (first, other):
                assert wait_for_state(client, run_id, "FINISHED", "FAILED")["state"] == "FINISHED"
        finally:
            second.stop()
