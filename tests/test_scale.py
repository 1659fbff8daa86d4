"""Rounds with many clients over the real broker and store: what used to grow with the client count stays flat.

Sixty clients in one process with the aggregator, over the session's mosquitto and SeaweedFS (the
bench, ``bench/scale.py``, measures 500). Each client must hear only of the aggregator and itself
(on the presence wildcard it was sent every other client's presence: N x N messages a round), the
process's clients must share one S3 connection pool (each had its own botocore client, ~13 MiB and
its own sockets), and the round's blobs must be gone from the store afterwards (deleted in one batch).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import boto3
import msgspec
import psutil
import pytest
from linear_trainer import LinearTrainer
from services import service_env

import unitedllm
from unitedllm.comm.mqtt import MqttTransport
from unitedllm.comm.s3 import boto_config
from unitedllm.comm.settings import MqttSettings, S3Settings
from unitedllm.config.types import Config

pytest_plugins = ["conftest_services"]
pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]

CLIENTS = 60
ROUNDS = 2
S3_POOL = 8  # an S3BlobStore's pool: 2 x its default max_concurrency of 4


def make_config(tmp_path: Path) -> Config:
    raw = {
        "train_args": {
            "comm_round": ROUNDS,
            "client_num_in_total": CLIENTS,
            "client_num_per_round": CLIENTS,
            "local_max_steps": 1,
            "output_dir": str(tmp_path / "{run_id}"),
        },
        "validation_args": {"is_aggregator_test": False, "test_on_clients": "no"},
        "comm_args": {
            "backend": "MQTT_S3",
            "run_secret": "scale-test",
            "round_timeout_s": 240,
            "join_timeout_s": 240,
        },
    }
    return msgspec.convert(raw, Config)


async def s3_connections_peak(port: int, stop: asyncio.Event) -> int:
    """The most TCP connections this process held to the S3 endpoint at once (sampled)."""
    me, peak = psutil.Process(), 0
    while not stop.is_set():
        peak = max(peak, sum(1 for c in me.net_connections("tcp") if c.raddr and c.raddr.port == port))
        await asyncio.sleep(0.05)
    return peak


async def federate(cfg: Config, run_id: str, s3_port: int) -> tuple[Any, list[MqttTransport], int]:
    aggregator = unitedllm.Aggregator(cfg, run_id=run_id, trainer=LinearTrainer(0))
    clients = [
        unitedllm.Client(cfg, rank=rank, run_id=run_id, trainer=LinearTrainer(rank))
        for rank in range(1, CLIENTS + 1)
    ]

    async def serve(client: unitedllm.Client) -> None:
        async with client:
            await client.run()

    async def lead() -> Any:
        async with aggregator:
            return await aggregator.run()

    stop = asyncio.Event()
    sampling = asyncio.create_task(s3_connections_peak(s3_port, stop))
    async with asyncio.TaskGroup() as group:
        result = group.create_task(lead())
        for client in clients:
            group.create_task(serve(client))
    stop.set()
    transports = [c.transport for c in clients]
    assert all(isinstance(t, MqttTransport) for t in transports)
    return result.result(), transports, await sampling  # type: ignore[return-value]


def test_sixty_clients_finish_their_rounds_hearing_only_the_aggregator_over_one_s3_pool(
    tmp_path: Path,
    mqtt_settings: MqttSettings,
    s3_settings: S3Settings,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    for key, value in service_env(mqtt_settings, s3_settings).items():
        monkeypatch.setenv(key, value)
    port = int(s3_settings.endpoint_url.rsplit(":", 1)[1].split("/")[0])

    result, transports, s3_peak = asyncio.run(federate(make_config(tmp_path), run_id, port))

    everyone = list(range(1, CLIENTS + 1))
    assert [r.aggregated for r in result.rounds] == [everyone] * ROUNDS
    # A client hears the aggregator's presence, its own, its round starts and the run's end: a
    # handful, however many clients there are (on the wildcard it was sent all 59 others' twice).
    assert max(t.delivered for t in transports) < CLIENTS // 2, [t.delivered for t in transports]
    # Sixty clients' stores shared one pool; each had its own connections before.
    assert 0 < s3_peak <= S3_POOL
    # Every round's updates and global weights were deleted from the store once used: what stays
    # is the final model, for the clients to fetch.
    raw = boto3.client(
        "s3",
        endpoint_url=s3_settings.endpoint_url,
        aws_access_key_id=s3_settings.access_key_id,
        aws_secret_access_key=s3_settings.secret_access_key,
        region_name=s3_settings.region,
        config=boto_config(),
    )
    left = raw.list_objects_v2(Bucket=s3_settings.bucket, Prefix=f"{s3_settings.prefix.strip('/')}")
    assert len([o["Key"] for o in left.get("Contents", []) if run_id in o["Key"]]) == 1


def test_tiny_updates_are_fetched_many_at_a_time_and_folded_in_arrival_order() -> None:
    """Five hundred clients' tiny updates fetched one round trip after another made a round's tail
    seconds long; a small model's updates are fetched up to ``prefetch_max`` at once (a large
    model's two at most, as ``test_codec_rounds`` checks)."""
    import torch

    from unitedllm.protocol.messages import BlobRef, Update
    from unitedllm.round_collection import RoundFold

    held: set[int] = set()
    most = 0
    folded: list[int] = []

    async def fetch(_fold: RoundFold, message: Update) -> int:
        nonlocal most
        held.add(message.sender)
        most = max(most, len(held))
        await asyncio.sleep(0.02)  # a round trip to the store
        return message.sender

    async def fold_one(fold: RoundFold, message: Update) -> None:
        got = await fold.fetched(message)
        held.discard(got)
        folded.append(got)

    async def main() -> None:
        fold = RoundFold({"w": torch.zeros(65)}, None, fold_one, fetch)

        async def collect() -> list[Update]:
            for rank in range(1, 41):
                ref = BlobRef(digest=f"{rank:064x}", size=300)
                fold.submit(Update(run_id="r", round=0, sender=rank, delta_ref=ref, num_samples=1))
            return []

        await fold.alongside(collect())
        await fold.drained()

    asyncio.run(main())
    assert folded == list(range(1, 41))
    assert most == RoundFold.prefetch_max
