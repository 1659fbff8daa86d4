"""Packages and runs' final models in S3, content-addressed: ``<prefix>/packages/<sha256 of the zip>``
and ``<prefix>/models/<sha256 of the zip>`` (the run store's code)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from unitedllm.comm.s3 import S3BlobStore
from unitedllm.comm.settings import S3Settings
from unitedllm.protocol.messages import BlobRef

__all__ = ["PackageStore"]

T = TypeVar("T")

PACKAGES = "packages"  # the "run id" part of the key: every package lives under one folder
MODELS = "models"  # every run's exported final model, likewise


class PackageStore:
    """Puts and gets package zips by digest; every get is checked against the digest by the S3 store."""

    def __init__(self, settings: S3Settings):
        self.settings = settings

    def location(self, digest: str) -> str:
        return S3BlobStore(self.settings, run_id=PACKAGES).url_for(digest)

    async def put(self, data: bytes, folder: str = PACKAGES) -> str:
        async with S3BlobStore(self.settings, run_id=folder) as store:
            ref = await store.put(data, codec="zip")
        return ref.digest

    async def get(self, digest: str, size: int, folder: str = PACKAGES) -> bytes:
        async with S3BlobStore(self.settings, run_id=folder) as store:
            return bytes(await store.get(BlobRef(digest=digest, size=size, codec="zip")))

    def put_sync(self, data: bytes, folder: str = PACKAGES) -> str:
        return _run(self.put(data, folder))

    async def archive(self, run_id: str, data: bytes) -> tuple[str, str]:
        """Store a run's log under ``<prefix>/logs/<run_id>/<sha256>``; returns (digest, its URL)."""
        async with S3BlobStore(self.settings, run_id=f"logs/{run_id}") as store:
            ref = await store.put(data, codec="text")
            return ref.digest, store.url_for(ref.digest)

    def archive_sync(self, run_id: str, data: bytes) -> tuple[str, str]:
        return _run(self.archive(run_id, data))

    def get_sync(self, digest: str, size: int, folder: str = PACKAGES) -> bytes:
        return _run(self.get(digest, size, folder))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a loop of its own: the API calls the store from worker threads."""
    return asyncio.run(coro)
