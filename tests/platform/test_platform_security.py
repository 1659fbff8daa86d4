"""Refusals: forged, replayed, expired and misaddressed commands; unenrolled devices; used enrol
tokens; read-only logins; tampered packages. And no run secret in clear anywhere."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from platform_helpers import AgentProcess, Controller, launch, wait_for_state

from unitedllm.agent.agent import Agent, enrol
from unitedllm.agent.identity import AgentState
from unitedllm.agent.link import PlatformLink
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.signing import KeyPair, seal_command

pytestmark = pytest.mark.services


@pytest.fixture
def lone_agent(tmp_path: Path, controller: Controller) -> Agent:
    """An enrolled agent in this process (its commands are handed to it by the test)."""
    state = AgentState(tmp_path / "lone")
    with controller.client() as client:
        enrol(state, platform=controller.url, token=client.enrol_token("client"), name="lone", role="client")
    return Agent(state)


def platform_keys(controller: Controller) -> KeyPair:
    return KeyPair.load_or_create(controller.data_dir / "platform_key.pem")[0]


def command(agent: Agent, **changes: Any) -> dict[str, Any]:
    payload = {
        "kind": "start",
        "device_id": agent.device_id,
        "run_id": "run-forged",
        "rank": 1,
        "nonce": f"n-{time.time_ns()}",
        "expires_at": time.time() + 60,
        "package": {"digest": "0" * 64, "size": 1, "signature": "x"},
        **changes,
    }
    return payload


@pytest.mark.parametrize(
    "case, reason",
    [
        ("unsigned", "unsigned"),
        ("other key", "signature does not match the platform's key"),
        ("edited after signing", "signature does not match the platform's key"),
        ("expired", "expired at"),
        ("other device", "addressed to device"),
    ],
)
def test_agent_refuses_commands_the_platform_did_not_sign_for_it_now(
    lone_agent: Agent, controller: Controller, caplog: pytest.LogCaptureFixture, case: str, reason: str
) -> None:
    keys = platform_keys(controller)
    match case:
        case "unsigned":
            envelope: dict[str, Any] = {"payload": command(lone_agent)}
        case "other key":
            envelope = seal_command(KeyPair.generate(), command(lone_agent))
        case "edited after signing":
            envelope = seal_command(keys, command(lone_agent))
            envelope["payload"]["run_id"] = "run-elsewhere"
        case "expired":
            envelope = seal_command(keys, command(lone_agent, expires_at=time.time() - 1))
        case _:
            envelope = seal_command(keys, command(lone_agent, device_id="someone-else"))
    with caplog.at_level(logging.WARNING, logger="unitedllm.agent"):
        lone_agent.handle(envelope)
    assert f"command refused: {reason}" in caplog.text
    assert lone_agent.role is None and lone_agent.state.role() is None
    assert not (lone_agent.state.root / "runs").exists(), "a refused command must start nothing"


def test_agent_refuses_a_replayed_command(
    lone_agent: Agent, controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    envelope = seal_command(platform_keys(controller), command(lone_agent, kind="stop"))
    lone_agent.handle(envelope)
    assert "refused" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="unitedllm.agent"):
        lone_agent.handle(envelope)
        # A restarted agent remembers the nonces it has seen.
        Agent(lone_agent.state).handle(envelope)
    assert caplog.text.count("was already used (replay)") == 2


def test_unenrolled_devices_and_stale_or_forged_requests_are_refused(
    tmp_path: Path, controller: Controller, lone_agent: Agent
) -> None:
    stranger = KeyPair.generate()
    for device_id, keys in (("not-enrolled", stranger), (lone_agent.device_id, stranger)):
        with PlatformLink(controller.url, keys=keys, device_id=device_id) as link:
            with pytest.raises(PlatformError) as refused:
                link.post("/api/agent/heartbeat", {"metrics": {}})
            assert refused.value.status == 401
    stale = lone_agent.state.keys()
    body, stamp = b"{}", str(time.time() - 3600)
    from unitedllm.platform.signing import request_message

    response = httpx.post(
        f"{controller.url}/api/agent/commands",
        content=body,
        headers={
            "x-device-id": lone_agent.device_id,
            "x-timestamp": stamp,
            "x-signature": stale.sign(request_message("POST", "/api/agent/commands", stamp, body)),
        },
    )
    assert response.status_code == 401 and "away from the controller's clock" in response.text


def test_an_enrol_token_works_once(tmp_path: Path, controller: Controller) -> None:
    with controller.client() as client:
        token = client.enrol_token("client")
    enrol(AgentState(tmp_path / "a"), platform=controller.url, token=token, name="a", role="client")
    with pytest.raises(PlatformError, match="enrol token is unknown or already used"):
        enrol(AgentState(tmp_path / "b"), platform=controller.url, token=token, name="b", role="client")
    result = subprocess.run(
        [sys.executable, "-m", "unitedllm", "agent", "--platform", controller.url, "--enrol", token,
         "--name", "c", "--state-dir", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: /api/agent/enrol: enrol token is unknown or already used (HTTP 403)"
    ]


def test_read_only_logins_can_look_but_not_launch_and_strangers_see_nothing(
    controller: Controller, sleeper_packages: dict[str, str]
) -> None:
    admin_token = controller.token
    from unitedllm.platform.auth import READ
    from unitedllm.platform.controller import Controller as Service
    from unitedllm.platform.db import Database

    # A read-only token, made the way an admin would (straight in the controller's database).
    db = Database(f"sqlite:///{controller.data_dir / 'platform.db'}")
    read_token = Service(db, keys=KeyPair.generate(), master_secret=b"x", store=None).create_api_token(  # type: ignore[arg-type]
        "viewer", READ
    )
    db.close()
    with controller.client(read_token) as viewer:
        assert {p["digest"] for p in viewer.packages()} >= set(sleeper_packages.values())
        with pytest.raises(PlatformError, match="needs an admin token") as refused:
            launch(viewer, sleeper_packages)
        assert refused.value.status == 403
    assert httpx.get(f"{controller.url}/api/devices").status_code == 401
    assert (
        httpx.get(f"{controller.url}/api/devices", headers={"authorization": "Bearer nope"}).status_code
        == 401
    )
    assert admin_token not in (controller.data_dir / "platform.db").read_bytes().decode(errors="replace")


def rewrite_and_remanifest(source: Path, target: Path) -> Path:
    """The attack the manifest alone cannot catch: change a file and rewrite the manifest to match."""
    with zipfile.ZipFile(source) as src:
        entries = {info.filename: src.read(info) for info in src.infolist()}
    launch_name = next(n for n in entries if n.endswith("fedml/launch.py"))
    entries[launch_name] = b"print('backdoor')\n" + entries[launch_name]
    manifest_name = next(n for n in entries if n.endswith("manifest.json"))
    manifest = json.loads(entries[manifest_name])
    relative = launch_name.split("/", 1)[1]
    for entry in manifest["files"]:
        if entry["path"] == relative:
            entry["sha256"] = hashlib.sha256(entries[launch_name]).hexdigest()
            entry["size"] = len(entries[launch_name])
    manifest["total_size"] = sum(e["size"] for e in manifest["files"])
    entries[manifest_name] = json.dumps(manifest, indent=2).encode()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in entries.items():
            out.writestr(name, data)
    return target


def test_a_tampered_and_remanifested_package_in_the_store_is_never_run(
    tmp_path: Path,
    controller: Controller,
    agents: dict[str, AgentProcess],
    sleeper_packages: dict[str, str],
    platform_env: dict[str, str],
) -> None:
    with controller.client() as client:
        original = tmp_path / "original.zip"
        digest = sleeper_packages["client"]
        response = httpx.get(
            f"{controller.url}/api/packages", headers={"authorization": f"Bearer {controller.token}"}
        )
        assert response.status_code == 200
        # Someone with write access to the bucket swaps the stored client package.
        s3 = boto3.client(
            "s3",
            endpoint_url=platform_env["UNITEDLLM_S3_ENDPOINT_URL"],
            aws_access_key_id=platform_env["UNITEDLLM_S3_ACCESS_KEY_ID"],
            aws_secret_access_key=platform_env["UNITEDLLM_S3_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        bucket, key = platform_env["UNITEDLLM_S3_BUCKET"], f"unitedllm/packages/{digest}"
        original.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        tampered = rewrite_and_remanifest(original, tmp_path / "tampered.zip")
        s3.put_object(Bucket=bucket, Key=key, Body=tampered.read_bytes())
        try:
            run_id = launch(client, sleeper_packages)
            run = wait_for_state(client, run_id, "FAILED", "FINISHED", "KILLED")
            # The sleeper aggregator does not wait for clients; each client refused its package.
            assert [m["state"] for m in run["members"][1:]] == ["FAILED", "FAILED"]
            assert all(m["exit_code"] is None for m in run["members"][1:]), "the role never started"
            details = " ".join(e["detail"] for e in client.events(run_id) if e["rank"] in (1, 2))
            assert "the stored bytes changed" in details
            assert "backdoor" not in "".join(b["text"] for b in client.logs(run_id))
        finally:
            s3.put_object(Bucket=bucket, Key=key, Body=original.read_bytes())
        # A package whose manifest was not rewritten is refused when pushed.
        broken = tmp_path / "broken.zip"
        with zipfile.ZipFile(original) as src, zipfile.ZipFile(broken, "w") as out:
            for info in src.infolist():
                data = src.read(info)
                out.writestr(info, b"# changed\n" + data if info.filename.endswith("launch.py") else data)
        with pytest.raises(
            PlatformError,
            match=r"broken\.zip failed verification: fedml/launch\.py: size \d+ bytes, manifest says",
        ):
            client.push(broken)


def test_no_run_secret_or_rank_key_in_clear_anywhere(
    controller: Controller, agents: dict[str, AgentProcess], sleeper_packages: dict[str, str]
) -> None:
    from unitedllm.platform.controller import Controller as Service

    with controller.client() as client:
        run_id = launch(client, sleeper_packages)
        assert wait_for_state(client, run_id, "FINISHED", "FAILED")["state"] == "FINISHED"
        seen = json.dumps(
            [client.run(run_id), client.runs(), client.events(run_id), client.logs(run_id), client.devices()]
        )
    master = (controller.data_dir / "master.secret").read_bytes()
    service = Service(None, keys=KeyPair.generate(), master_secret=master, store=None)  # type: ignore[arg-type]
    secrets = [service.derive(f"run:{run_id}"), *(service.derive(f"rank:{run_id}:{r}") for r in (1, 2))]
    places = {"API answers": seen.encode()}
    for path in [
        *controller.data_dir.parent.rglob("*"),
        *next(iter(agents.values())).state_dir.parent.rglob("*"),
    ]:
        if path.is_file() and path.name not in ("master.secret",):
            places[str(path)] = path.read_bytes()
    for secret in secrets:
        leaks = [where for where, data in places.items() if secret.encode() in data]
        assert not leaks, f"a run secret appears in clear in {leaks}"
