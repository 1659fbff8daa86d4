"""Presence by the broker's last will, on a real mosquitto whose identities and ACLs the controller
writes: a killed agent is shown OFFLINE from its will (the heartbeat window here is three minutes,
far beyond the wait), and comes back ONLINE when restarted; a device cannot publish presence for
another (the broker refuses it), and the controller refuses a presence not signed by its device."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from platform_helpers import AgentProcess, Controller, controller_core, wait_until
from services import skip_without_services

from unitedllm.agent.identity import AgentState
from unitedllm.agent.link import PlatformLink
from unitedllm.platform.demo import _ManagedMosquitto
from unitedllm.platform.errors import PlatformError
from unitedllm.platform.presence import open_presence, presence_payload, presence_topic
from unitedllm.platform.signing import KeyPair

HEARTBEAT_WINDOW_ARGS = ("--heartbeat-s", "60")  # offline by heartbeats only after 180 s


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    skip_without_services()
    root = tmp_path_factory.mktemp("presence-broker")
    mosquitto = _ManagedMosquitto(root / "mosquitto", broker_dir=root / "broker")
    asyncio.run(mosquitto.start())
    try:
        yield mosquitto
    finally:
        asyncio.run(mosquitto.stop())


@pytest.fixture(scope="module")
def presence_platform(
    tmp_path_factory: pytest.TempPathFactory, broker: Any, platform_env: dict[str, str]
) -> Iterator[tuple[Controller, dict[str, AgentProcess], dict[str, str]]]:
    """A controller managing the broker's identities and two client agents, online on the broker."""
    env = {
        **platform_env,
        "UNITEDLLM_MQTT_HOST": "127.0.0.1",
        "UNITEDLLM_MQTT_PORT": str(broker.port),
        "UNITEDLLM_MQTT_USERNAME": broker.username,
        "UNITEDLLM_MQTT_PASSWORD": broker.password,
    }
    root = tmp_path_factory.mktemp("presence")
    ctl = Controller(
        root / "data", env, args=(*HEARTBEAT_WINDOW_ARGS, "--broker-dir", str(broker.broker_dir))
    )
    ctl.start()
    agents: dict[str, AgentProcess] = {}
    try:
        with ctl.client() as client:
            for name in ("pa", "pb"):
                agents[name] = AgentProcess(name, "client", root / name, env, ctl.url)
                agents[name].start(client.enrol_token("client"))
            wait_until(
                "both agents online on the broker",
                lambda: _presences(ctl) == {"pa": "online", "pb": "online"},
            )
        yield ctl, agents, env
    finally:
        for agent in agents.values():
            agent.stop()
        ctl.kill()


def _devices(ctl: Controller) -> dict[str, dict[str, Any]]:
    with ctl.client() as client:
        return {d["name"]: d for d in client.devices()}


def _presences(ctl: Controller) -> dict[str, Any]:
    return {name: d["presence"] for name, d in _devices(ctl).items()}


def _identity(agent: AgentProcess) -> dict[str, str]:
    """The agent's broker login, asked for as the agent does (a request signed with its key)."""
    state = AgentState(agent.state_dir)
    with PlatformLink(agent.url, keys=state.keys(), device_id=agent.device_id) as link:
        return {k: str(v) for k, v in link.post("/api/agent/broker", {}).items()}


@pytest.mark.services
def test_a_killed_agent_is_shown_offline_from_its_last_will_and_online_again_when_restarted(
    presence_platform: tuple[Controller, dict[str, AgentProcess], dict[str, str]],
) -> None:
    ctl, agents, _env = presence_platform
    assert _devices(ctl)["pa"]["state"] == "IDLE"
    agents["pa"].kill()  # SIGKILL: no goodbye, only the broker's will
    device = wait_until(
        "the will to mark pa offline", lambda: (d := _devices(ctl)["pa"])["presence"] == "offline" and d
    )
    assert device["state"] == "OFFLINE" and device["online"] is False
    # Its last heartbeat is recent: the heartbeat window alone would still call it online.
    assert time.time() - device["last_seen"] < 3 * 60
    assert _devices(ctl)["pb"]["state"] == "IDLE"

    agents["pa"].start()
    device = wait_until("pa online again", lambda: (d := _devices(ctl)["pa"])["presence"] == "online" and d)
    assert device["state"] == "IDLE" and device["online"] is True


@pytest.mark.services
async def test_a_device_cannot_publish_presence_for_another_and_forged_presence_is_refused(
    presence_platform: tuple[Controller, dict[str, AgentProcess], dict[str, str]], broker: Any
) -> None:
    ctl, agents, _env = presence_platform
    a, b = agents["pa"], agents["pb"]
    wait_until("both online", lambda: _presences(ctl) == {"pa": "online", "pb": "online"})
    login = _identity(a)
    assert login["username"] == f"device-{a.device_id}" and login["topic"] == presence_topic(a.device_id)
    a_keys = AgentState(a.state_dir).keys()
    late = time.time() + 3600  # newer than any real presence, were it believed
    forged_by_a = presence_payload(a_keys, b.device_id, "offline", late)

    operator = aiomqtt.Client("127.0.0.1", broker.port, username=broker.username, password=broker.password)
    as_a = aiomqtt.Client(
        "127.0.0.1", broker.port, username=login["username"], password=login["password"],
        identifier=f"test-a-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    async with operator, as_a:
        await operator.subscribe("unitedllm/devices/#", qos=1)
        # A, logged in as itself, publishes B's offline; then a marker on a topic of its own.
        await as_a.publish(presence_topic(b.device_id), forged_by_a, qos=1)
        await as_a.publish(presence_topic(a.device_id), b"", qos=1)  # not retained: only a marker
        seen = []
        async with asyncio.timeout(20):
            async for message in operator.messages:
                seen.append((message.topic.value, bytes(message.payload)))  # type: ignore[arg-type]
                if message.topic.value == presence_topic(a.device_id) and message.payload == b"":
                    break
        assert all(payload != forged_by_a for _topic, payload in seen), "the broker let A speak for B"

        # On B's topic (published with the operator's login, which may write anywhere), a presence
        # signed by A's key is refused by the controller.
        await operator.publish(presence_topic(b.device_id), forged_by_a, qos=1)
        wait_until(
            "the controller to refuse the forged presence",
            lambda: f"the signature is not device {b.device_id!r}'s" in ctl.log.read_text(),
        )
    assert _devices(ctl)["pb"]["presence"] == "online" and _devices(ctl)["pb"]["state"] == "IDLE"


def test_presence_applies_in_connection_order_and_only_from_its_device(tmp_path: Path) -> None:
    core = controller_core(tmp_path / "platform.db", samples_kept=5)
    keys = {name: KeyPair.generate() for name in ("a", "b")}
    ids = {
        name: core.enrol(
            token=core.create_enrol_token("client"),
            name=name,
            role="client",
            public_key=k.public_text,
            hardware={},
        )["device_id"]
        for name, k in keys.items()
    }

    def send(
        name: str, status: str, since: float, *, signer: str | None = None, topic_of: str | None = None
    ) -> bool:
        payload = presence_payload(keys[signer or name], ids[name], status, since)
        presence = open_presence(presence_topic(ids[topic_of or name]), payload, core.public_key_of)
        return bool(core.apply_presence(presence))

    def shown(name: str) -> tuple[str, str]:
        device = core.device(name)
        return device["presence"], device["state"]

    core.heartbeat(ids["a"], {}, None)
    assert send("a", "online", 100.0) and shown("a") == ("online", "IDLE")
    assert send("a", "offline", 100.0) and shown("a") == ("offline", "OFFLINE")  # its will
    assert send("a", "online", 200.0) and shown("a") == ("online", "IDLE")  # restarted
    assert not send("a", "offline", 100.0) and shown("a") == ("online", "IDLE")  # a late, older will
    assert not send("a", "online", 150.0)
    with pytest.raises(PlatformError, match="signature is not device"):
        send("a", "offline", 300.0, signer="b")  # signed by another device's key
    with pytest.raises(PlatformError, match="speaks for device"):
        send("a", "offline", 300.0, topic_of="b")  # a's statement on b's topic
    with pytest.raises(PlatformError, match="not a signed presence message"):
        open_presence(presence_topic(ids["a"]), b"offline", core.public_key_of)
    assert shown("a") == ("online", "IDLE") and shown("b") == (None, "IDLE")  # nothing reached b
    core.db.close()
