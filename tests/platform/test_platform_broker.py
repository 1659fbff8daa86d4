"""Per-device broker identities: with the ACLs the controller writes, device A cannot publish as
device B on a real mosquitto, nor read B's inbox; an unknown password is refused."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiomqtt
import pytest
from services import skip_without_services

from unitedllm.platform.broker import BrokerAccess, Grant, device_username
from unitedllm.platform.demo import _ManagedMosquitto

pytestmark = pytest.mark.services


async def test_a_device_can_publish_only_on_its_own_topics(tmp_path: Path) -> None:
    skip_without_services()
    broker_dir = tmp_path / "broker"
    mosquitto = _ManagedMosquitto(tmp_path / "mosquitto", broker_dir=broker_dir)
    run = f"run-{uuid.uuid4().hex[:8]}"
    base = f"unitedllm/{run}"
    async with mosquitto:
        access = BrokerAccess(broker_dir)
        passwords = {"a": "pass-a", "b": "pass-b", "agg": "pass-agg"}
        await asyncio.to_thread(
            access.write, passwords, [Grant("agg", run, 0), Grant("a", run, 1), Grant("b", run, 2)]
        )

        def client(device: str, password: str | None = None) -> aiomqtt.Client:
            return aiomqtt.Client(
                "127.0.0.1",
                mosquitto.port,
                username=device_username(device),
                password=password or passwords[device],
                identifier=f"test-{device}-{uuid.uuid4().hex[:6]}",
            )

        operator = aiomqtt.Client(
            "127.0.0.1", mosquitto.port, username=mosquitto.username, password=mosquitto.password
        )
        async with operator, client("a") as a, client("b") as b:
            await operator.subscribe(f"{base}/#", qos=1)
            await b.subscribe(f"{base}/to/2", qos=1)
            await a.subscribe(f"{base}/to/2", qos=1)  # B's inbox: not A's to read
            # A tries to speak as B, then speaks as itself; QoS 1 keeps one sender's order.
            await a.publish(f"{base}/presence/2", b"forged", qos=1)
            await a.publish(f"{base}/to/2", b"forged-direct", qos=1)
            await a.publish(f"{base}/presence/1", b"a-online", qos=1)
            await a.publish(f"{base}/to/0", b"a-update", qos=1)
            seen = []
            async with asyncio.timeout(20):
                async for message in operator.messages:
                    seen.append((message.topic.value, bytes(message.payload)))  # type: ignore[arg-type]
                    if message.payload == b"a-update":
                        break
            assert (f"{base}/presence/1", b"a-online") in seen
            assert all(payload not in (b"forged", b"forged-direct") for _, payload in seen), seen
            # The aggregator may write to B's inbox; B reads it and A does not.
            async with client("agg") as agg:
                await agg.publish(f"{base}/to/2", b"for-b", qos=1)
            async with asyncio.timeout(20):
                message = await anext(aiter(b.messages))
            assert message.payload == b"for-b"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1):
                    await anext(aiter(a.messages))

        with pytest.raises(aiomqtt.MqttError):
            async with client("a", password="wrong"):
                pass
