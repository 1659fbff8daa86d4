"""The CLI mirror (`unitedllm platform devices|packages|runs ... --json`) and `unitedllm-build push`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from platform_helpers import AgentProcess, Controller, wait_for_state, wait_until
from typer.testing import CliRunner

from unitedllm.platform.cli import platform_app

pytestmark = pytest.mark.services

runner = CliRunner()


def cli(controller: Controller, *args: str) -> tuple[int, str]:
    result = runner.invoke(
        platform_app,
        list(args),
        env={"UNITEDLLM_PLATFORM_URL": controller.url, "UNITEDLLM_PLATFORM_TOKEN": controller.token},
    )
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def as_json(controller: Controller, *args: str) -> Any:
    code, out = cli(controller, *args, "--json")
    assert code == 0, out
    return json.loads(out)


def test_build_push_then_launch_watch_and_stop_from_the_command_line(
    tmp_path: Path,
    controller: Controller,
    agents: dict[str, AgentProcess],
    sleeper_packages: dict[str, str],
    sleeper_zips: dict[str, Path],
) -> None:
    server_zip = sleeper_zips["server"]
    pushed = subprocess.run(
        [str(Path(sys.executable).parent / "unitedllm-build"), "push", str(server_zip)],
        env={"PATH": "/usr/bin:/bin", "UNITEDLLM_PLATFORM_URL": controller.url, "UNITEDLLM_PLATFORM_TOKEN": controller.token},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    assert (
        f"server package {sleeper_packages['server']}" in pushed.stdout
        and "signed by the platform" in pushed.stdout
    )

    packages = as_json(controller, "packages", "list")
    assert {p["digest"]: p["kind"] for p in packages} == {
        sleeper_packages["server"]: "server",
        sleeper_packages["client"]: "client",
    }
    devices = {d["name"]: d for d in as_json(controller, "devices", "list")}
    assert {"agg", "c1", "c2"} <= devices.keys() and devices["agg"]["role"] == "server"
    assert devices["c1"]["hardware"]["cpus"] >= 1
    assert as_json(controller, "devices", "show", "c1")["id"] == devices["c1"]["id"]

    run = as_json(
        controller, "runs", "create",
        "--server-package", sleeper_packages["server"][:12], "--client-package", sleeper_packages["client"][:12],
        "--server", "agg", "--client", "c1", "--client", "c2", "--set", "train_args.local_max_steps=1500",
    )  # fmt: skip
    run_id = run["id"]
    assert [m["rank"] for m in run["members"]] == [0, 1, 2]
    assert run_id in {r["id"] for r in as_json(controller, "runs", "list")}
    with controller.client() as client:
        wait_for_state(client, run_id, "RUNNING")
        wait_until(
            "rank 2's output", lambda: "sleeper rank 2 started" in cli(controller, "runs", "logs", run_id)[1]
        )
    code, out = cli(controller, "runs", "stop", run_id)
    assert code == 0 and run_id in out
    with controller.client() as client:
        assert wait_for_state(client, run_id, "KILLED", "FAILED", "FINISHED")["state"] == "KILLED"
    assert as_json(controller, "runs", "show", run_id)["state"] == "KILLED"
    code, out = cli(controller, "runs", "logs", run_id, "--device", devices["c1"]["id"])
    assert code == 0 and "sleeper rank 1 started" in out and "sleeper rank 2" not in out
    # A stopped run has no final model to download.
    code, out = cli(controller, "runs", "model", run_id, "--out", str(tmp_path))
    assert code == 2 and out.strip() == (
        f"error: GET /api/runs/{run_id}/model: run {run_id} has no final model (yet) (HTTP 404)"
    )
    assert list(tmp_path.iterdir()) == []


def test_command_line_mistakes_are_one_clear_line(controller: Controller) -> None:
    code, out = cli(controller, "devices", "show", "no-such-device")
    assert (
        code == 2
        and out.strip() == "error: GET /api/devices/no-such-device: no device 'no-such-device' (HTTP 404)"
    )
    result = runner.invoke(
        platform_app, ["runs", "list"], env={"UNITEDLLM_PLATFORM_URL": "", "UNITEDLLM_PLATFORM_TOKEN": ""}
    )
    assert result.exit_code == 2 or result.exit_code == 1
    assert (
        result.output.strip() == "error: no platform URL: give --platform URL or set UNITEDLLM_PLATFORM_URL"
    )
    result = runner.invoke(
        platform_app,
        ["runs", "list"],
        env={"UNITEDLLM_PLATFORM_URL": controller.url, "UNITEDLLM_PLATFORM_TOKEN": "wrong"},
    )
    assert result.exit_code == 1
    assert (
        "log in" in result.output
        and "HTTP 401" in result.output
        and len(result.output.strip().splitlines()) == 1
    )


def test_applications_projects_and_saved_configurations_drive_a_launch(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    code, out = cli(controller, "configs", "save", "short", "--set", "train_args.local_max_stepz=5")
    assert code == 2
    assert out.strip().splitlines() == [
        "error: PUT /api/configs/short: configuration 'short': train_args.local_max_stepz: unknown key"
        " 'local_max_stepz' in train_args; did you mean 'local_max_steps'? (in override"
        " 'train_args.local_max_stepz') (HTTP 422)"
    ]
    assert as_json(controller, "configs", "save", "short", "--set", "train_args.local_max_steps=5")[
        "overrides"
    ] == {"train_args.local_max_steps": 5}
    as_json(controller, "configs", "save", "short", "--set", "train_args.local_max_steps=6")  # an edit
    assert {c["name"]: c["overrides"] for c in as_json(controller, "configs", "list")}["short"] == {
        "train_args.local_max_steps": 6
    }
    server, client = sleeper_packages["server"], sleeper_packages["client"]
    app = as_json(
        controller, "apps", "save", "sleeper", "--server-package", server, "--client-package", client
    )
    assert [v["version"] for v in app["versions"]] == [1]
    again = as_json(
        controller, "apps", "save", "sleeper", "--server-package", server, "--client-package", client
    )
    assert [v["version"] for v in again["versions"]] == [1], "the same packages are not a new version"
    code, out = cli(controller, "apps", "save", "bad", "--server-package", client, "--client-package", client)
    assert code == 2 and "is a client package, not a server one" in out
    assert (
        as_json(controller, "projects", "create", "nightly", "--app", "sleeper")["application"] == "sleeper"
    )

    run = as_json(
        controller, "runs", "create", "--project", "nightly", "--config", "short", "--server", "agg", "--client", "c1",
        "--set", "common_args.random_seed=0",
    )  # fmt: skip
    assert run["overrides"] == ["train_args.local_max_steps=6", "common_args.random_seed=0"]
    assert run["project_id"] == as_json(controller, "projects", "list")[0]["id"]
    with controller.client() as client_api:
        assert wait_for_state(client_api, run["id"], "FINISHED", "FAILED")["state"] == "FINISHED"
    code, out = cli(controller, "configs", "delete", "short")
    assert code == 0 and all(c["name"] != "short" for c in as_json(controller, "configs", "list"))
