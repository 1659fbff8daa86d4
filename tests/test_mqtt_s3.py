"""The MQTT_S3 backend against real services: mosquitto and SeaweedFS on 127.0.0.1, started by fixtures."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from unitedllm.comm.base import Incoming, Presence
from unitedllm.comm.mqtt import Backoff, MqttTransport, presence_topic, to_topic
from unitedllm.comm.s3 import S3BlobStore, boto_config
from unitedllm.comm.settings import MqttSettings, S3Settings
from unitedllm.devservices import DevServices, Mosquitto
from unitedllm.errors import CommError, IntegrityError
from unitedllm.protocol.messages import BlobRef, Hello, RoundStart, TrainSpec, Update
from unitedllm.protocol.signing import seal, seal_presence

pytest_plugins = ["conftest_services"]
pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]

SECRET = b"test-run-secret"
FAST = Backoff(initial=0.2, maximum=1.0)
MIB = 1024 * 1024


def transport(
    settings: MqttSettings, rank: int, run_id: str, *, clients: int = 2, **kwargs: object
) -> MqttTransport:
    peers = set(range(1, clients + 1)) if rank == 0 else {0}
    return MqttTransport(settings, rank=rank, run_id=run_id, secret=SECRET, peers=peers, **kwargs)  # type: ignore[arg-type]


async def next_message(stream: AsyncIterator[Incoming], timeout: float = 10.0) -> Incoming:
    """The next admitted message, skipping presence events."""
    while True:
        item = await asyncio.wait_for(anext(stream), timeout)
        if not isinstance(item, Presence):
            return item


async def next_presence(stream: AsyncIterator[Incoming], rank: int, timeout: float = 10.0) -> Presence:
    while True:
        item = await asyncio.wait_for(anext(stream), timeout)
        if isinstance(item, Presence) and item.rank == rank:
            return item


def hello(run_id: str, sender: int) -> Hello:
    return Hello(run_id=run_id, round=0, sender=sender, capabilities=["lora"])


def raw_s3(settings: S3Settings) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        region_name=settings.region,
        config=boto_config(),
    )


# -- MQTT ------------------------------------------------------------------------------------


async def test_messages_round_trip_between_aggregator_and_client(
    mqtt_settings: MqttSettings, run_id: str
) -> None:
    async with transport(mqtt_settings, 0, run_id) as agg, transport(mqtt_settings, 1, run_id) as client:
        agg_in, client_in = agg.incoming(), client.incoming()
        await client.send(0, hello(run_id, 1))
        assert await next_presence(agg_in, 1) == Presence(1, True)
        got = await next_message(agg_in)
        assert isinstance(got, Hello) and got.sender == 1 and got.capabilities == ["lora"]

        ref = BlobRef(digest="ab" * 32, size=123)
        spec = TrainSpec(local_max_steps=5, local_num_train_epochs=1.0)
        await agg.send(1, RoundStart(run_id=run_id, round=1, sender=0, global_ref=ref, spec=spec))
        got = await next_message(client_in)
        assert isinstance(got, RoundStart) and got.global_ref == ref and got.spec == spec


async def test_tls_listener_carries_messages(services: DevServices, run_id: str) -> None:
    tls = services.mqtt.settings(tls=True)
    assert tls.port == services.mqtt.tls_port and tls.tls_ca_file is not None
    async with transport(tls, 0, run_id) as agg, transport(tls, 1, run_id) as client:
        await client.send(0, hello(run_id, 1))
        got = await next_message(agg.incoming())
        assert isinstance(got, Hello) and got.sender == 1


async def test_tls_with_an_unknown_ca_is_refused(services: DevServices, run_id: str, tmp_path: Path) -> None:
    from unitedllm.devservices import make_tls_files

    other_ca = make_tls_files(tmp_path / "other").ca_file
    tls = services.mqtt.settings(tls=True)
    wrong = MqttSettings(
        host=tls.host, port=tls.port, username=tls.username, password=tls.password, tls_ca_file=str(other_ca)
    )
    with pytest.raises(CommError, match="could not connect.*certificate"):
        async with transport(wrong, 1, run_id, connect_timeout_s=3):
            pass


async def test_wrong_broker_password_is_a_clear_comm_error(mqtt_settings: MqttSettings, run_id: str) -> None:
    wrong = MqttSettings(
        host=mqtt_settings.host, port=mqtt_settings.port, username=mqtt_settings.username, password="nope"
    )

    async def log_in() -> None:
        # With ten minutes to connect and to retry, only an answer at the first refusal ends this in time.
        async with transport(wrong, 1, run_id, connect_timeout_s=600, retry_window_s=600):
            pass

    with pytest.raises(CommError, match=f"refused the login of user '{mqtt_settings.username}'"):
        await asyncio.wait_for(log_in(), timeout=120)


async def test_presence_goes_offline_by_last_will_when_a_client_process_dies(
    services: DevServices, run_id: str
) -> None:
    child = (
        "import asyncio, sys\n"
        "from unitedllm.comm.mqtt import MqttTransport\n"
        "from unitedllm.comm.settings import resolve_mqtt\n"
        "from unitedllm.config.types import CommArgs\n"
        "async def main():\n"
        f"    async with MqttTransport(resolve_mqtt(CommArgs()), rank=1, run_id={run_id!r}, secret={SECRET!r}, peers={{0}}):\n"
        "        print('connected', flush=True)\n"
        "        await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, **services.env()}
    async with transport(services.mqtt.settings(), 0, run_id) as agg:
        stream = agg.incoming()
        process = subprocess.Popen([sys.executable, "-c", child], env=env, stdout=subprocess.PIPE)  # noqa: ASYNC220
        try:
            assert process.stdout is not None
            assert (await asyncio.to_thread(process.stdout.readline)).strip() == b"connected"
            assert await next_presence(stream, 1) == Presence(1, True)
            assert agg.is_online(1)
            process.kill()  # no DISCONNECT packet: only the broker's last-will can tell
            await asyncio.to_thread(process.wait)
            assert await next_presence(stream, 1) == Presence(1, False)
            assert not agg.is_online(1)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


async def test_clean_close_announces_offline(mqtt_settings: MqttSettings, run_id: str) -> None:
    async with transport(mqtt_settings, 0, run_id) as agg:
        stream = agg.incoming()
        async with transport(mqtt_settings, 1, run_id):
            assert await next_presence(stream, 1) == Presence(1, True)
        assert await next_presence(stream, 1) == Presence(1, False)


async def test_forged_foreign_unknown_and_replayed_frames_are_dropped(
    mqtt_settings: MqttSettings, run_id: str
) -> None:
    import aiomqtt

    async with transport(mqtt_settings, 0, run_id) as agg:
        stream = agg.incoming()
        topic = to_topic(run_id, 0)
        genuine = seal(
            Update(run_id=run_id, round=1, sender=1, seq=10, delta_ref=BlobRef("cd" * 32, 9), num_samples=4),
            SECRET,
        )
        frames = [
            seal(hello(run_id, 1), b"not-the-run-secret"),  # forged HMAC
            seal(Hello(run_id="another-run", round=0, sender=1, seq=5), SECRET),  # wrong run id
            seal(Hello(run_id=run_id, round=0, sender=7, seq=5), SECRET),  # rank 7 is not in this run
            genuine,
            genuine,  # replay
            seal(Hello(run_id=run_id, round=0, sender=1, seq=3), SECRET),  # older seq than seen: replay too
            b"\x00garbage",
        ]
        s = mqtt_settings
        async with aiomqtt.Client(s.host, s.port, username=s.username, password=s.password) as raw:
            for frame in frames:
                await raw.publish(topic, frame, qos=1)
        got = await next_message(stream)
        assert isinstance(got, Update) and got.seq == 10 and got.num_samples == 4
        with pytest.raises(TimeoutError):
            await next_message(stream, timeout=1.0)
        reasons = "\n".join(agg.guard.dropped)
        assert "bad signature" in reasons
        assert "another-run" in reasons
        assert "sender rank 7" in reasons
        assert reasons.count("replayed message from rank 1") == 2
        assert "malformed" in reasons


async def test_forged_and_replayed_presence_cannot_mark_a_live_client_gone(
    mqtt_settings: MqttSettings, run_id: str
) -> None:
    import aiomqtt

    async with transport(mqtt_settings, 0, run_id) as agg:
        stream = agg.incoming()
        async with transport(mqtt_settings, 1, run_id) as first:
            assert await next_presence(stream, 1) == Presence(1, True)
            old_epoch = first._epoch
        assert await next_presence(stream, 1) == Presence(1, False)  # a clean close says so, signed
        async with transport(mqtt_settings, 1, run_id) as client:
            assert await next_presence(stream, 1) == Presence(1, True)
            topic = presence_topic(run_id, 1)
            forged = [
                b"offline",  # the unsigned form an attacker with broker access would try first
                seal_presence(
                    b"not-the-run-secret", run_id=run_id, rank=1, online=False, epoch=client._epoch + 1
                ),
                seal_presence(SECRET, run_id="another-run", rank=1, online=False, epoch=client._epoch + 1),
                seal_presence(SECRET, run_id=run_id, rank=1, online=False, epoch=old_epoch),  # replayed
            ]
            s = mqtt_settings
            async with aiomqtt.Client(s.host, s.port, username=s.username, password=s.password) as raw:
                for payload in forged:
                    await raw.publish(topic, payload, qos=1)
                # Put the genuine retained presence back, as the live client would on its next connect.
                await raw.publish(topic, client._presence(True), qos=1, retain=True)
            await client.send(0, hello(run_id, 1))
            seen: list[Incoming] = []
            while not isinstance(seen[-1:] and seen[-1], Hello):
                seen.append(await asyncio.wait_for(anext(stream), 10))
            assert Presence(1, False) not in seen, seen
            assert 1 in agg._reachable
            reasons = "\n".join(agg.presence_guard.dropped)
            assert reasons.count("malformed presence") == 1
            assert reasons.count("bad signature") == 2
            assert "replayed presence of rank 1" in reasons


async def test_sending_to_a_rank_outside_the_run_fails(mqtt_settings: MqttSettings, run_id: str) -> None:
    async with transport(mqtt_settings, 1, run_id) as client:
        with pytest.raises(CommError, match="no rank 2 in this run"):
            await client.send(2, hello(run_id, 1))


async def test_messages_wait_for_a_peer_that_is_not_online_yet(
    mqtt_settings: MqttSettings, run_id: str
) -> None:
    async with transport(mqtt_settings, 1, run_id) as client:
        await client.send(0, hello(run_id, 1))  # the aggregator is not up yet
        async with transport(mqtt_settings, 0, run_id) as agg:
            got = await next_message(agg.incoming())
            assert isinstance(got, Hello) and got.sender == 1


async def test_close_sends_what_it_can_and_does_not_wait_for_absent_peers(
    mqtt_settings: MqttSettings, run_id: str
) -> None:
    async with transport(mqtt_settings, 1, run_id) as client:
        # Ten minutes to flush: a close that waited for client 2 would outlast the bound below.
        agg = transport(mqtt_settings, 0, run_id, flush_timeout_s=600)
        await agg.open()
        await next_presence(agg.incoming(), 1)
        await agg.send(1, hello(run_id, 0))  # client 1 is online: must go out before close returns
        await agg.send(2, hello(run_id, 0))  # client 2 never came: must not hold the close up
        await asyncio.wait_for(agg.close(), timeout=120)
        assert isinstance(await next_message(client.incoming()), Hello)


async def test_connection_stays_up_while_a_worker_thread_trains(services: DevServices, run_id: str) -> None:
    settings = services.mqtt.settings(keepalive=5)
    async with transport(settings, 0, run_id) as agg, transport(settings, 1, run_id) as client:
        # A local round longer than two keepalive periods, in a worker thread as the Client runs it.
        await asyncio.to_thread(time.sleep, 11)
        await client.send(0, hello(run_id, 1))
        got = await next_message(agg.incoming())
        assert isinstance(got, Hello)
        assert client.connections == 1 and agg.connections == 1, "the connection dropped during the round"


async def lost_connections(caplog: pytest.LogCaptureFixture, count: int, timeout: float = 60.0) -> None:
    """Wait until ``count`` ranks have logged that they lost the broker (a bound only for a hung test)."""

    def lost() -> int:
        return sum("lost the MQTT connection" in r.getMessage() for r in caplog.records)

    async def wait() -> None:
        while lost() < count:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(wait(), timeout)


async def test_transport_survives_a_broker_restart_and_delivers_what_was_queued(
    own_broker: Mosquitto, run_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="unitedllm.comm.mqtt")
    settings = own_broker.settings()
    async with (
        transport(settings, 0, run_id, backoff=FAST) as agg,
        transport(settings, 1, run_id, backoff=FAST) as client,
    ):
        stream = agg.incoming()
        await client.send(0, hello(run_id, 1))
        assert isinstance(await next_message(stream), Hello)

        await own_broker.stop()
        for round_idx in (1, 2, 3):
            await client.send(
                0,
                Update(
                    run_id=run_id,
                    round=round_idx,
                    sender=1,
                    delta_ref=BlobRef("ef" * 32, 1),
                    num_samples=round_idx,
                ),
            )
        await lost_connections(caplog, 2)  # both sides noticed the loss and are reconnecting
        await own_broker.start()

        rounds = [(await next_message(stream, timeout=20)).round for _ in range(3)]
        assert rounds == [1, 2, 3]
        assert client.connections >= 2 and agg.connections >= 2
        await agg.send(1, hello(run_id, 0))  # and the other direction works again
        assert isinstance(await next_message(client.incoming()), Hello)


async def test_unreachable_broker_fails_within_the_connect_timeout(run_id: str) -> None:
    from unitedllm.devservices import free_port

    nowhere = MqttSettings(host="127.0.0.1", port=free_port())
    with pytest.raises(
        CommError, match=r"could not connect to the MQTT broker at mqtt://127\.0\.0\.1:\d+ within 2s"
    ):
        async with transport(nowhere, 1, run_id, connect_timeout_s=2, backoff=FAST):
            pass


async def test_closing_twice_is_harmless(
    mqtt_settings: MqttSettings, s3_settings: S3Settings, run_id: str
) -> None:
    t = transport(mqtt_settings, 1, run_id)
    store = S3BlobStore(s3_settings, run_id=run_id)
    async with t, store:
        pass
    await t.close()
    await store.close()
    with pytest.raises(CommError, match="closed"):
        await t.send(0, hello(run_id, 1))


# -- S3 --------------------------------------------------------------------------------------


async def test_small_blob_round_trips_and_is_content_addressed(s3_settings: S3Settings, run_id: str) -> None:
    async with S3BlobStore(s3_settings, run_id=run_id) as store:
        ref = await store.put(b"safetensors bytes")
        assert ref.size == 17
        assert await store.get(ref) == b"safetensors bytes"
        head = raw_s3(s3_settings).head_object(
            Bucket=s3_settings.bucket, Key=f"unitedllm/{run_id}/{ref.digest}"
        )
        assert head["ContentLength"] == 17
        assert await store.put(b"safetensors bytes") == ref  # same bytes, same address


async def test_large_blob_round_trips_through_multipart(s3_settings: S3Settings, run_id: str) -> None:
    size = 300 * 1024 * 1024
    data = os.urandom(1024 * 1024) * 300  # 300 MiB; the repetition keeps generation cheap
    async with S3BlobStore(s3_settings, run_id=run_id, part_size_mb=32) as store:
        ref = await store.put(data)
        assert ref.size == size
        head = raw_s3(s3_settings).head_object(Bucket=s3_settings.bucket, Key=store.key_for(ref.digest))
        assert head["ContentLength"] == size
        assert head["ETag"].strip('"').endswith("-10"), f"not a 10-part multipart object: {head['ETag']}"
        back = await store.get(ref)
        assert back == data
        del back


async def test_large_blob_is_read_into_one_buffer(s3_settings: S3Settings, run_id: str) -> None:
    import tracemalloc

    size, part = 128 * MIB, 8 * MIB
    data = os.urandom(MIB) * 128
    async with S3BlobStore(s3_settings, run_id=run_id, part_size_mb=8, max_concurrency=2) as store:
        ref = await store.put(data)
        tracemalloc.start()
        try:
            back = await store.get(ref)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert back == data
        # The blob once, plus the ranges in flight (each read buffer and its copy): not the blob twice.
        assert peak < size + 2 * 2 * part + 16 * MIB, (
            f"peak {peak / MIB:.0f} MiB for a {size // MIB} MiB blob"
        )


async def test_corrupted_object_is_refused(s3_settings: S3Settings, run_id: str) -> None:
    data = b"\x01" * 4096
    async with S3BlobStore(s3_settings, run_id=run_id) as store:
        ref = await store.put(data)
        raw = raw_s3(s3_settings)
        key = store.key_for(ref.digest)
        raw.put_object(
            Bucket=s3_settings.bucket, Key=key, Body=b"\x01" * 4095 + b"\x02"
        )  # same size, one bit off
        with pytest.raises(IntegrityError, match=ref.digest):
            await store.get(ref)
        raw.put_object(Bucket=s3_settings.bucket, Key=key, Body=data + b"tail")  # different size
        with pytest.raises(IntegrityError, match="4100 bytes, expected 4096"):
            await store.get(ref)


async def test_missing_bucket_is_created(s3_settings: S3Settings, run_id: str) -> None:
    raw = raw_s3(s3_settings)
    assert s3_settings.bucket not in [b["Name"] for b in raw.list_buckets()["Buckets"]]
    async with S3BlobStore(s3_settings, run_id=run_id) as store:
        await store.put(b"x")
    assert s3_settings.bucket in [b["Name"] for b in raw.list_buckets()["Buckets"]]


async def test_missing_blob_is_a_comm_error(s3_settings: S3Settings, run_id: str) -> None:
    async with S3BlobStore(s3_settings, run_id=run_id) as store:
        with pytest.raises(CommError, match="not found"):
            await store.get(BlobRef("00" * 32, 10))


async def test_wrong_s3_credentials_give_a_clear_comm_error(s3_settings: S3Settings, run_id: str) -> None:
    wrong = S3Settings(
        endpoint_url=s3_settings.endpoint_url,
        bucket=s3_settings.bucket,
        access_key_id=s3_settings.access_key_id,
        secret_access_key="wrong-secret",
    )
    with pytest.raises(CommError, match=f"refused.*check the access key '{s3_settings.access_key_id}'"):
        async with S3BlobStore(wrong, run_id=run_id):
            pass


async def test_unreachable_s3_endpoint_is_a_comm_error(s3_settings: S3Settings, run_id: str) -> None:
    from unitedllm.devservices import free_port

    nowhere = S3Settings(
        endpoint_url=f"http://127.0.0.1:{free_port()}", bucket="b-x", access_key_id="a", secret_access_key="b"
    )
    with pytest.raises(CommError, match="cannot reach the S3 endpoint"):
        async with S3BlobStore(nowhere, run_id=run_id, retry_window_s=1.0):
            pass


# -- an insider with the logins, and outages ------------------------------------------------------


async def test_a_planted_same_size_object_is_replaced_not_trusted(
    s3_settings: S3Settings, run_id: str
) -> None:
    data = b"\x07" * 4096
    async with S3BlobStore(s3_settings, run_id=run_id) as store:
        from unitedllm.protocol.payload import digest_of

        key = store.key_for(digest_of(data))
        # Someone with the S3 login plants junk of the same size at the key the upload will use.
        raw_s3(s3_settings).put_object(Bucket=s3_settings.bucket, Key=key, Body=b"\x00" * 4096)
        assert not await store.exists(BlobRef(digest_of(data), 4096)), "a same-size object is not the blob"
        ref = await store.put(data)
        assert await store.exists(ref)
        assert await store.get(ref) == data, "the upload repaired the planted object"
        assert await store.put(data) == ref  # the genuine object is found, checked and kept


async def test_junk_retained_on_a_presence_topic_does_not_hide_a_live_rank(
    mqtt_settings: MqttSettings, run_id: str
) -> None:
    import aiomqtt

    s = mqtt_settings
    async with transport(mqtt_settings, 0, run_id) as agg:
        async with aiomqtt.Client(s.host, s.port, username=s.username, password=s.password) as raw:
            # After the aggregator announced itself, junk takes its retained presence, and junk
            # waits on the inbox of the client that is about to start.
            await raw.publish(presence_topic(run_id, 0), b"junk", qos=1, retain=True)
            await raw.publish(to_topic(run_id, 1), b"retained junk frame", qos=1, retain=True)
        async with transport(mqtt_settings, 1, run_id) as client:
            stream = client.incoming()
            assert await next_presence(stream, 0, timeout=15) == Presence(0, True)
            await client.send(0, hello(run_id, 1))
            assert isinstance(await next_message(agg.incoming(), timeout=15), Hello)
            assert agg.repairs >= 1, "the aggregator put its presence back over the junk"
            assert not client.guard.dropped, "the retained junk on the inbox was cleared before subscribing"


async def test_transport_gives_up_after_the_retry_window(own_broker: Mosquitto, run_id: str) -> None:
    settings = own_broker.settings()
    async with transport(settings, 1, run_id, backoff=FAST, retry_window_s=2.0) as client:
        stream = client.incoming()
        await own_broker.stop()
        with pytest.raises(CommError, match=r"no connection to the MQTT broker .* for 2s.*retry_window_s"):
            await asyncio.wait_for(next_message(stream, timeout=60), 60)
    await own_broker.start()


async def test_reconnect_backoff_starts_again_after_a_successful_reconnect(
    own_broker: Mosquitto, run_id: str
) -> None:
    """A broker that drops twice: the second outage's first pause is the initial one, not the last one's."""
    client = transport(own_broker.settings(), 1, run_id, backoff=Backoff(initial=0.1, maximum=30.0))
    pauses: list[float] = []
    original = client._pause

    async def recorded(seconds: float) -> None:
        pauses.append(seconds)
        await original(min(seconds, 0.2))  # the delays asked for are checked; the test need not sit them out

    client._pause = recorded  # type: ignore[method-assign]
    async with client:
        await own_broker.stop()
        while len(pauses) < 6:  # six failed attempts: the backoff has grown to 3.2 s
            await asyncio.sleep(0.05)
        assert pauses[:6] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
        await own_broker.start()
        while client.connections < 2:
            await asyncio.sleep(0.05)
        first_outage = len(pauses)
        await own_broker.stop()
        while len(pauses) < first_outage + 2:
            await asyncio.sleep(0.05)
        assert pauses[first_outage : first_outage + 2] == pytest.approx([0.1, 0.2])
        await own_broker.start()


async def test_a_short_s3_outage_costs_time_not_the_upload(s3_settings: S3Settings, run_id: str) -> None:
    import threading
    from urllib.parse import urlsplit

    from faults.proxy import FaultyProxy

    target = urlsplit(s3_settings.endpoint_url)
    assert target.hostname is not None and target.port is not None
    with FaultyProxy(target.hostname, target.port) as proxy:
        through = S3Settings(
            endpoint_url=f"http://127.0.0.1:{proxy.port}",
            bucket=s3_settings.bucket,
            access_key_id=s3_settings.access_key_id,
            secret_access_key=s3_settings.secret_access_key,
            region=s3_settings.region,
        )
        data = os.urandom(64 * 1024)
        async with S3BlobStore(through, run_id=run_id, retry_window_s=60) as store:
            proxy.down()
            stop = threading.Event()

            def restore_once_retried() -> None:
                # The store comes back only after the outage outlasted botocore's own attempts and our
                # retry took over (a bound only for a hung test).
                deadline = time.monotonic() + 50
                while store.retries < 1 and time.monotonic() < deadline and not stop.is_set():
                    time.sleep(0.05)
                proxy.up()

            back = threading.Thread(target=restore_once_retried)
            back.start()
            try:
                ref = await store.put(data)
            finally:
                stop.set()
                back.join()
            assert store.retries >= 1, "the outage was noticed and retried"
            assert await store.get(ref) == data
