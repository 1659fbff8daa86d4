"""Benchmark: one model update aggregator -> client -> aggregator over MQTT_S3, against raw S3 put+get.

    python bench/transport.py [--params 1e6,1e7,1e8] [--repeats 3]

Starts its own mosquitto + SeaweedFS on 127.0.0.1 and prints JSON. For each update size P (fp32
parameters, safetensors-encoded) it times the full exchange: the aggregator puts the global
weights and sends RoundStart, the client receives it, fetches and verifies the blob, puts its
update and sends Update, and the aggregator receives and fetches/verifies that. Beside it, in the
same run against the same server, the raw baseline: ``aioboto3`` ``put_object`` + ``get_object``
of the same bytes in both directions. ``ratio`` = MQTT_S3 / raw (target <= 1.2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
import uuid
from typing import Any

from unitedllm.comm.base import Presence
from unitedllm.comm.mqtt import MqttTransport
from unitedllm.comm.s3 import S3BlobStore, boto_config
from unitedllm.devservices import DevServices, dev_services
from unitedllm.protocol.messages import Message, RoundStart, TrainSpec, Update
from unitedllm.protocol.payload import encode_tensors

SECRET = b"bench-secret"


def payload(params: int, salt: int) -> bytes:
    """A safetensors update of ``params`` fp32 values, different for each ``salt`` (no dedup by digest)."""
    import torch

    generator = torch.Generator().manual_seed(salt)
    return encode_tensors({"delta": torch.randn(params, generator=generator)})


async def _next_message(stream: Any) -> Message:
    while True:
        item = await asyncio.wait_for(anext(stream), 300)
        if not isinstance(item, Presence):
            return item  # type: ignore[no-any-return]


async def mqtt_s3_exchange(services: DevServices, global_bytes: bytes, update_bytes: bytes) -> float:
    """Seconds for the full aggregator -> client -> aggregator exchange (connections already up)."""
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    mqtt = services.mqtt.settings()
    s3 = services.s3.settings(bucket="bench")
    async with (
        MqttTransport(mqtt, rank=0, run_id=run_id, secret=SECRET, peers={1}) as agg,
        MqttTransport(mqtt, rank=1, run_id=run_id, secret=SECRET, peers={0}) as client,
        S3BlobStore(s3, run_id=run_id) as agg_store,
        S3BlobStore(s3, run_id=run_id) as client_store,
    ):
        agg_in, client_in = agg.incoming(), client.incoming()
        spec = TrainSpec(local_max_steps=1, local_num_train_epochs=1.0)
        started = time.perf_counter()
        ref = await agg_store.put(global_bytes)
        await agg.send(1, RoundStart(run_id=run_id, round=1, sender=0, global_ref=ref, spec=spec))
        start = await _next_message(client_in)
        assert isinstance(start, RoundStart)
        assert len(await client_store.get(start.global_ref)) == len(global_bytes)
        delta = await client_store.put(update_bytes)
        await client.send(0, Update(run_id=run_id, round=1, sender=1, delta_ref=delta, num_samples=1))
        update = await _next_message(agg_in)
        assert isinstance(update, Update)
        assert len(await agg_store.get(update.delta_ref)) == len(update_bytes)
        return time.perf_counter() - started


async def raw_s3_exchange(services: DevServices, global_bytes: bytes, update_bytes: bytes) -> float:
    """Seconds for put_object + get_object of the same bytes both ways with plain aioboto3."""
    import aioboto3

    s3 = services.s3.settings(bucket="bench")
    session = aioboto3.Session(
        aws_access_key_id=s3.access_key_id, aws_secret_access_key=s3.secret_access_key, region_name=s3.region
    )
    async with session.client("s3", endpoint_url=s3.endpoint_url, config=boto_config()) as client:
        with_bucket = {"Bucket": s3.bucket}
        started = time.perf_counter()
        for data in (global_bytes, update_bytes):
            key = f"raw/{uuid.uuid4().hex}"
            await client.put_object(**with_bucket, Key=key, Body=data)
            answer = await client.get_object(**with_bucket, Key=key)
            async with answer["Body"] as body:
                assert len(await body.read()) == len(data)
        return time.perf_counter() - started


async def main(params_list: list[int], repeats: int) -> dict[str, Any]:
    results = []
    async with dev_services(tls=False) as services:
        async with S3BlobStore(services.s3.settings(bucket="bench"), run_id="warmup") as store:
            await store.put(b"warm up the volume servers")
        for params in params_list:
            ours, raw = [], []
            for rep in range(repeats):
                global_bytes, update_bytes = payload(params, 2 * rep), payload(params, 2 * rep + 1)
                # Alternate the order so drift in the shared machine's load hits both sides alike.
                if rep % 2 == 0:
                    ours.append(await mqtt_s3_exchange(services, global_bytes, update_bytes))
                    raw.append(await raw_s3_exchange(services, global_bytes, update_bytes))
                else:
                    raw.append(await raw_s3_exchange(services, global_bytes, update_bytes))
                    ours.append(await mqtt_s3_exchange(services, global_bytes, update_bytes))
                del global_bytes, update_bytes
            mqtt_s3_s, raw_s3_s = statistics.median(ours), statistics.median(raw)
            results.append(
                {
                    "params": params,
                    "bytes": 4 * params,
                    "repeats": repeats,
                    "mqtt_s3_s": round(mqtt_s3_s, 4),
                    "raw_s3_s": round(raw_s3_s, 4),
                    "ratio": round(mqtt_s3_s / raw_s3_s, 3),
                    "mqtt_s3_all_s": [round(x, 4) for x in ours],
                    "raw_s3_all_s": [round(x, 4) for x in raw],
                }
            )
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return {
        "benchmark": "transport: update aggregator->client->aggregator, MQTT_S3 vs raw aioboto3 put+get",
        "target_ratio": 1.2,
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        "results": results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params", default="1e6,1e7,1e8", help="comma-separated update sizes in fp32 parameters"
    )
    parser.add_argument("--repeats", type=int, default=3, help="exchanges per size (the median is reported)")
    args = parser.parse_args()
    sizes = [int(float(p)) for p in args.params.split(",")]
    print(json.dumps(asyncio.run(main(sizes, args.repeats)), indent=2))
