"""Faults and insiders against a whole run: real processes, real mosquitto and SeaweedFS, bounded time.

Each test starts an aggregator and clients as separate processes (the fast linear trainer, each
rank with its own key), breaks something at a chosen moment (a client SIGKILLed mid-round, an S3
outage, junk planted on the run's topics by someone holding only the broker login) and asserts
what a user sees: the run completes with the final model byte-identical to an undisturbed run,
or it fails cleanly with every process exiting non-zero.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from services import service_env

from faults.proxy import FaultyProxy
from faults.runs import MODEL, Federation, reference_model, run_config
from unitedllm.comm.mqtt import presence_topic, to_topic

pytest_plugins = ["conftest_services"]
pytestmark = [pytest.mark.services, pytest.mark.timeout(400)]

Make = Callable[..., Federation]


@pytest.fixture
def federation(request: pytest.FixtureRequest, tmp_path: Path, run_id: str) -> Iterator[Make]:
    """A factory of process federations on the session's services; kills whatever is left."""
    mqtt = request.getfixturevalue("mqtt_settings")
    s3 = request.getfixturevalue("s3_settings")
    made: list[Federation] = []

    def make(
        raw: dict[str, Any],
        *,
        name: str = "run",
        s3_endpoint: str | None = None,
        broker: Any = None,
        s3_service: Any = None,
        shared_secret: str | None = None,
    ) -> Federation:
        env = service_env(broker or mqtt, s3_service or s3)
        if s3_endpoint is not None:
            env["UNITEDLLM_S3_ENDPOINT_URL"] = s3_endpoint
        tmp = tmp_path / name
        tmp.mkdir()
        fed = Federation(tmp, f"{run_id}-{name}", raw, env, shared_secret=shared_secret)
        made.append(fed)
        return fed

    try:
        yield make
    finally:
        for fed in made:
            fed.kill_all()


def assert_completed_like_undisturbed(fed: Federation, tmp_path: Path, raw: dict[str, Any]) -> None:
    rounds = int(raw["train_args"]["comm_round"])
    assert fed.aggregated() == {r: [1, 2] for r in range(rounds)}, fed.logs()
    ours = (fed.output_dir / MODEL).read_bytes()
    assert ours == reference_model(tmp_path, raw), "the final model differs from an undisturbed run's"


def test_client_killed_mid_round_and_restarted_rejoins_the_open_round(
    federation: Make, tmp_path: Path
) -> None:
    # Every update is needed (no quorum below 2) and the deadline is long: only a rejoin finishes in time.
    raw = run_config(tmp_path, round_timeout_s=300)
    fed = federation(raw)
    server = fed.node(0)
    first = fed.node(1)
    victim = fed.node(2, sleep_s=4.0)
    fed.wait_for(lambda e: e.get("event") == "round_start" and e.get("round") == 1)
    fed.wait_for(lambda e: e.get("event") == "train" and e.get("round") == 1 and e.get("rank") == 1)
    fed.kill(victim)  # rank 2 is still inside its 4 s of round 1
    back = fed.node(2)
    codes = [fed.wait(p, timeout=120) for p in (server, first, back)]
    assert codes == [0, 0, 0], fed.logs()
    resent = fed.events("round_start_resent")
    assert resent and {(e["round"], e["rank"]) for e in resent} == {(1, 2)}, (
        "round 1's start went to rank 2 again"
    )
    assert_completed_like_undisturbed(fed, tmp_path, raw)


def test_a_client_that_never_returns_leaves_the_run_to_the_quorum(federation: Make, tmp_path: Path) -> None:
    raw = run_config(tmp_path, round_timeout_s=300, min_updates_per_round=1)
    fed = federation(raw)
    server = fed.node(0)
    survivor = fed.node(1)
    victim = fed.node(2, sleep_s=3.0)
    fed.wait_for(lambda e: e.get("event") == "round_start" and e.get("round") == 1)
    fed.kill(victim)
    assert [fed.wait(p, timeout=120) for p in (server, survivor)] == [0, 0], fed.logs()
    assert fed.aggregated() == {0: [1, 2], 1: [1], 2: [1]}


def test_an_aborted_run_fails_every_process(federation: Make, tmp_path: Path) -> None:
    # Rank 2 needs 8 s a round, the deadline is 2 s and every update is needed: round 0 cannot close.
    raw = run_config(tmp_path, round_timeout_s=2)
    fed = federation(raw)
    procs = [fed.node(0), fed.node(1), fed.node(2, sleep_s=8.0)]
    codes = [fed.wait(p, timeout=120) for p in procs]
    assert codes == [1, 1, 1], f"every process of a failed run exits non-zero, got {codes}\n{fed.logs()}"
    assert "the aggregator ended the run: aborted" in fed.logs()


def test_junk_planted_on_the_run_topics_with_only_the_broker_login_does_not_stall(
    federation: Make, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import aiomqtt

    mqtt = request.getfixturevalue("mqtt_settings")
    raw = run_config(tmp_path)
    fed = federation(raw)
    junk = [b"", b"junk", b"\x93\xc3\xcf\xff\xff\xff\xff\xff\xff\xff\xff\x80", b"\x92\xc4\x00\xc4\x00"]

    async def plant() -> None:
        async with aiomqtt.Client(
            mqtt.host, mqtt.port, username=mqtt.username, password=mqtt.password
        ) as raw_client:
            for rank in (0, 1, 2):
                for payload in junk:
                    await raw_client.publish(to_topic(fed.run_id, rank), payload or b"x", qos=1, retain=True)
                    await raw_client.publish(
                        presence_topic(fed.run_id, rank), payload or b"x", qos=1, retain=True
                    )

    asyncio.run(plant())  # before anyone starts
    server = fed.node(0)
    time.sleep(4)  # the aggregator is up and announced; now its retained presence is overwritten
    asyncio.run(plant())
    clients = [fed.node(1), fed.node(2)]
    codes = [fed.wait(p, timeout=120) for p in (server, *clients)]
    assert codes == [0, 0, 0], fed.logs()
    assert_completed_like_undisturbed(fed, tmp_path, raw)


def test_a_ten_second_s3_outage_mid_run_costs_time_not_the_run(
    federation: Make, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    s3 = request.getfixturevalue("s3_settings")
    target = urlsplit(s3.endpoint_url)
    assert target.hostname is not None and target.port is not None
    raw = run_config(tmp_path)
    with FaultyProxy(target.hostname, target.port) as proxy:
        fed = federation(raw, s3_endpoint=f"http://127.0.0.1:{proxy.port}")
        procs = [fed.node(0), fed.node(1), fed.node(2, sleep_s=1.0)]
        fed.wait_for(lambda e: e.get("event") == "round_start" and e.get("round") == 1)
        proxy.down()
        back = threading.Timer(10.0, proxy.up)
        back.start()
        try:
            codes = [fed.wait(p, timeout=150) for p in procs]
        finally:
            back.join()
    assert codes == [0, 0, 0], fed.logs()
    assert "trying again" in fed.logs(), "the outage was met by retries"
    assert_completed_like_undisturbed(fed, tmp_path, raw)


# ---- the long campaign (nox -s slow) ---------------------------------------------------------------


@pytest.mark.slow
def test_broker_restarted_mid_run(federation: Make, tmp_path: Path, own_broker: Any) -> None:
    raw = run_config(tmp_path)
    fed = federation(raw, broker=own_broker.settings())
    procs = [fed.node(0), fed.node(1), fed.node(2, sleep_s=1.0)]
    fed.wait_for(lambda e: e.get("event") == "round_start" and e.get("round") == 1)
    asyncio.run(own_broker.stop())
    time.sleep(5)
    asyncio.run(own_broker.start())
    assert [fed.wait(p, timeout=150) for p in procs] == [0, 0, 0], fed.logs()
    assert_completed_like_undisturbed(fed, tmp_path, raw)


@pytest.mark.slow
def test_aggregator_killed_with_junk_on_presence_while_it_is_down_resumes(
    federation: Make, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import aiomqtt

    mqtt = request.getfixturevalue("mqtt_settings")
    raw = run_config(tmp_path, rounds=4)
    fed = federation(raw)
    server = fed.node(0)
    clients = [fed.node(1), fed.node(2)]
    fed.wait_for(lambda e: e.get("event") == "round" and e.get("round") == 1)
    fed.kill(server)

    async def plant() -> None:
        async with aiomqtt.Client(
            mqtt.host, mqtt.port, username=mqtt.username, password=mqtt.password
        ) as raw_client:
            for rank in (0, 1, 2):
                await raw_client.publish(presence_topic(fed.run_id, rank), b"junk", qos=1, retain=True)

    asyncio.run(plant())
    resumed = fed.node(0, "--resume")
    assert [fed.wait(p, timeout=150) for p in (resumed, *clients)] == [0, 0, 0], fed.logs()
    assert_completed_like_undisturbed(fed, tmp_path, raw)


@pytest.mark.slow
def test_a_max_seq_frame_signed_with_the_shared_secret_does_not_silence_a_rank(
    federation: Make, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import aiomqtt

    from unitedllm.protocol.messages import Hello
    from unitedllm.protocol.signing import seal

    mqtt = request.getfixturevalue("mqtt_settings")
    raw = run_config(tmp_path)
    secret = "campaign-shared-secret"
    fed = federation(raw, shared_secret=secret)
    server = fed.node(0)
    forged = Hello(run_id=fed.run_id, round=-1, sender=1, seq=2**63 - 1)

    async def inject() -> None:
        async with aiomqtt.Client(
            mqtt.host, mqtt.port, username=mqtt.username, password=mqtt.password
        ) as raw_client:
            await raw_client.subscribe(presence_topic(fed.run_id, 0), qos=1)
            # Once the aggregator's presence is there, it is subscribed to its inbox.
            await asyncio.wait_for(anext(aiter(raw_client.messages)), 60)
            await raw_client.publish(to_topic(fed.run_id, 0), seal(forged, secret.encode()), qos=1)

    asyncio.run(inject())
    clients = [fed.node(1), fed.node(2)]
    assert [fed.wait(p, timeout=150) for p in (server, *clients)] == [0, 0, 0], fed.logs()
    assert "ahead of this clock" in fed.logs(), "the forged frame was refused, not obeyed"
    assert_completed_like_undisturbed(fed, tmp_path, raw)


@pytest.mark.slow
def test_seaweedfs_stopped_and_restarted_mid_run(federation: Make, tmp_path: Path) -> None:
    from unitedllm.devservices import SeaweedS3

    store = SeaweedS3(tmp_path / "seaweedfs")
    asyncio.run(store.start())
    try:
        raw = run_config(tmp_path)
        fed = federation(raw, s3_service=store.settings(bucket="campaign"))
        procs = [fed.node(0), fed.node(1), fed.node(2, sleep_s=1.0)]
        fed.wait_for(lambda e: e.get("event") == "round_start" and e.get("round") == 1)
        asyncio.run(store.stop())
        time.sleep(10)
        asyncio.run(store.start())
        assert [fed.wait(p, timeout=200) for p in procs] == [0, 0, 0], fed.logs()
    finally:
        asyncio.run(store.stop())
    assert_completed_like_undisturbed(fed, tmp_path, raw)


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 0.7, 1.9, 3.1])
def test_a_client_killed_at_any_moment_of_a_round_rejoins(
    federation: Make, tmp_path: Path, delay_s: float
) -> None:
    raw = run_config(tmp_path, round_timeout_s=300)
    fed = federation(raw)
    server, first, victim = fed.node(0), fed.node(1), fed.node(2, sleep_s=3.5)
    fed.wait_for(lambda e: e.get("event") == "round_start" and e.get("round") == 1)
    time.sleep(delay_s)
    fed.kill(victim)
    back = fed.node(2)
    assert [fed.wait(p, timeout=150) for p in (server, first, back)] == [0, 0, 0], fed.logs()
    assert_completed_like_undisturbed(fed, tmp_path, raw)
