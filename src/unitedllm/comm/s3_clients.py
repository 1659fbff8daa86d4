"""The S3 clients of one process: stores that log in alike share one botocore client and its pool.

A botocore client costs ~10 MiB and its own connections, so hundreds of simulated clients in one
process, each with its own store, would otherwise cost gigabytes and thousands of sockets. Stores
of one event loop with the same endpoint, key, region and pool size share one
(:data:`shared_clients`); it is closed when the last of them closes.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from unitedllm.comm.settings import S3Settings
from unitedllm.errors import MissingDependency

__all__ = ["SharedClient", "SharedClients", "boto_config", "shared_clients"]


def boto_config(max_pool_connections: int = 16) -> Any:
    """The botocore client config UnitedLLM uses (path-style addressing, no extra checksums).

    Request checksums are only computed where S3 requires them: every blob is verified by its
    sha256 anyway, and the CRC would cost a second pass over multi-GB payloads.
    """
    from botocore.config import Config as BotoConfig

    return BotoConfig(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=120,
    )


@dataclass
class SharedClient:
    """One botocore S3 client, the stores using it, and the buckets already checked through it."""

    client: Any
    stack: AsyncExitStack
    users: int = 0
    buckets: dict[str, asyncio.Task[None]] = field(default_factory=dict)


class SharedClients:
    """The S3 clients of this process: one per event loop, endpoint, login and pool size.

    ``acquire`` opens one on first use (concurrent first users wait for the same opening);
    ``release`` closes it when its last store closes.
    """

    def __init__(self) -> None:
        self._clients: dict[tuple[Any, ...], asyncio.Task[SharedClient]] = {}

    def __len__(self) -> int:
        return len(self._clients)

    async def acquire(self, settings: S3Settings, pool: int) -> tuple[tuple[Any, ...], SharedClient]:
        key = (
            asyncio.get_running_loop(),
            settings.endpoint_url,
            settings.access_key_id,
            settings.secret_access_key,
            settings.region,
            pool,
        )
        opening = self._clients.get(key)
        if opening is None:
            opening = self._clients[key] = asyncio.ensure_future(_open_client(settings, pool))
        try:
            shared = await asyncio.shield(opening)
        except BaseException:
            if opening.done() and self._clients.get(key) is opening:
                del self._clients[key]  # a failed opening is not kept: the next store tries again
            raise
        shared.users += 1
        return key, shared

    async def release(self, key: tuple[Any, ...], shared: SharedClient) -> None:
        shared.users -= 1
        if shared.users == 0:
            self._clients.pop(key, None)
            await shared.stack.aclose()


async def _open_client(settings: S3Settings, pool: int) -> SharedClient:
    try:
        import aioboto3
    except ImportError:
        raise MissingDependency("aioboto3", "mqtt-s3", "the MQTT_S3 backend") from None
    session = aioboto3.Session(
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        region_name=settings.region,
    )
    stack = AsyncExitStack()
    client = await stack.enter_async_context(
        session.client("s3", endpoint_url=settings.endpoint_url, config=boto_config(pool))
    )
    return SharedClient(client, stack)


shared_clients = SharedClients()
