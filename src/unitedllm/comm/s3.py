"""Tensor payloads in an S3 bucket (the blob half of ``comm_args.backend: MQTT_S3``).

Objects are content-addressed: key ``<prefix>/<run_id>/<sha256>``. A put of a large blob whose digest
is already there is skipped only once the stored bytes were read back and match the digest (anyone
with the S3 login can plant an object at a predictable key; a mismatch is uploaded again); a small
one (up to 4 MiB) is simply uploaded again, which costs less than reading it back; large payloads go up as parallel multipart uploads and come down as
parallel ranged reads; every download is checked against its digest before anyone decodes it.

Every operation is retried: botocore's ``standard`` retry mode takes care of single failed requests,
and each whole operation (all of which are idempotent here) is retried with exponential backoff by
``tenacity`` while the endpoint is unreachable or answers 5xx, for up to ``retry_window_s``, so a
short S3 outage costs time, not the run. Refusals (403, 404) and digest mismatches are not retried.

The stores of one process that log in alike (same endpoint, key, region) share one botocore client
and its connection pool (:mod:`unitedllm.comm.s3_clients`): a botocore client costs ~10 MiB and its own
connections, so hundreds of simulated clients in one process would otherwise cost gigabytes and
thousands of sockets. Blobs up to the multipart threshold are read with one GET (no HEAD first).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from unitedllm.comm.base import BlobStore
from unitedllm.comm.s3_clients import SharedClient, boto_config, shared_clients
from unitedllm.comm.settings import S3Settings
from unitedllm.errors import BlobNotFound, CommError, IntegrityError
from unitedllm.protocol.messages import BlobRef
from unitedllm.protocol.payload import CODEC

__all__ = ["S3BlobStore", "boto_config"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_MIN_PART = 5 * MiB  # S3's smallest allowed multipart part
_MAX_PARTS = 10_000
# Hashing a few MB blocks the loop for milliseconds; above this, hash in a worker thread.
_THREAD_HASH_BYTES = 4 * MiB
# Up to this size a put uploads without first checking for the same blob: reading it back to verify
# costs as much as sending it, and one request less per update matters with hundreds of clients.
_CHECK_BEFORE_PUT_BYTES = 4 * MiB
_DENIED = {"403", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken"}
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_RETRYABLE = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}
_DELETE_BATCH = 1000  # S3's most keys per DeleteObjects request
T = TypeVar("T")


def _transient(exc: BaseException) -> bool:
    """Whether a failed S3 operation may succeed when tried again (unreachable, timed out, 5xx)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, IntegrityError) or not isinstance(exc, CommError):
        return False
    cause = exc.__cause__
    if isinstance(cause, ClientError):
        return _code(cause) in _RETRYABLE
    return isinstance(cause, BotoCoreError | OSError | TimeoutError)


def _digest(chunks: list[bytes] | list[memoryview]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


class S3BlobStore(BlobStore):
    """Blobs of one run in an S3 bucket (created when missing), verified by sha256 on the way out."""

    def __init__(
        self,
        settings: S3Settings,
        *,
        run_id: str,
        part_size_mb: int = 64,
        max_concurrency: int = 4,
        retry_window_s: float = 120.0,
    ):
        self.settings = settings
        self.retry_window_s = retry_window_s
        self.retries = 0  # operations tried again after a transient failure
        self.run_id = run_id
        self.part_size = max(_MIN_PART, part_size_mb * MiB)
        self.threshold = settings.multipart_threshold_mb * MiB
        self.max_concurrency = max_concurrency
        self._client: Any = None
        self._shared: tuple[tuple[Any, ...], SharedClient] | None = None

    def key_for(self, digest: str) -> str:
        """The object key of a blob: ``<prefix>/<run_id>/<digest>``."""
        prefix = self.settings.prefix.strip("/")
        return f"{prefix}/{self.run_id}/{digest}" if prefix else f"{self.run_id}/{digest}"

    def url_for(self, digest: str) -> str:
        return f"s3://{self.settings.bucket}/{self.key_for(digest)}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        key, shared = await shared_clients.acquire(self.settings, 2 * self.max_concurrency)
        self._shared, self._client = (key, shared), shared.client
        bucket = self.settings.bucket
        try:
            checking = shared.buckets.get(bucket)
            if checking is None or (checking.done() and (checking.cancelled() or checking.exception())):
                checking = shared.buckets[bucket] = asyncio.ensure_future(self._retrying(self._ensure_bucket))
            await asyncio.shield(checking)
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        if self._shared is not None:
            shared, self._shared, self._client = self._shared, None, None
            await shared_clients.release(*shared)

    async def _ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        bucket = self.settings.bucket
        try:
            with self._mapped("check bucket", f"s3://{bucket}"):
                await self._client.head_bucket(Bucket=bucket)
            return
        except CommError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, ClientError) and _code(cause) in _NOT_FOUND):
                raise
        log.info("creating missing bucket s3://%s at %s", bucket, self.settings.endpoint_url)
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if self.settings.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        try:
            with self._mapped("create bucket", f"s3://{bucket}"):
                await self._client.create_bucket(**kwargs)
        except CommError as exc:
            cause = exc.__cause__
            # Another rank may have created it in the meantime.
            if not (
                isinstance(cause, ClientError)
                and _code(cause) in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
            ):
                raise

    # -- BlobStore ---------------------------------------------------------------------------

    async def put(self, data: bytes, *, codec: str = CODEC) -> BlobRef:
        self._require_open()
        digest = await self._hash([data]) if len(data) > _THREAD_HASH_BYTES else _digest([data])
        ref = BlobRef(digest=digest, size=len(data), codec=codec)
        key = self.key_for(digest)
        if ref.size > _CHECK_BEFORE_PUT_BYTES and await self._retrying(lambda: self._holds(ref)):
            return ref  # content-addressed, and the stored bytes were checked: nothing to upload

        async def upload() -> None:
            if ref.size > self.threshold:
                await self._put_multipart(key, data)
            else:
                with self._mapped("upload", self.url_for(digest)):
                    await self._client.put_object(Bucket=self.settings.bucket, Key=key, Body=data)

        await self._retrying(upload)
        return ref

    async def _holds(self, ref: BlobRef) -> bool:
        """Whether the store already has exactly ``ref``'s bytes (read back and hashed, never assumed)."""
        size = await self._size_of(self.key_for(ref.digest))
        if size is None:
            return False
        if size == ref.size:
            try:
                await self._get(ref)
                return True
            except BlobNotFound:
                return False
            except IntegrityError:
                pass
        log.warning(
            "%s holds other bytes than its digest names (%s bytes); uploading the blob again",
            self.url_for(ref.digest),
            size,
        )
        return False

    async def get(self, ref: BlobRef) -> bytearray:
        """The blob's bytes, read in parallel ranges straight into one buffer and verified.

        A ``bytearray``: :func:`~unitedllm.protocol.payload.decode_tensors` makes tensors that are
        views on it, so a blob costs its size in memory once.
        """
        self._require_open()
        return await self._retrying(lambda: self._get(ref))

    async def _get(self, ref: BlobRef) -> bytearray:
        url = self.url_for(ref.digest)
        if ref.size <= self.threshold:
            return await self._get_whole(ref)
        size = await self._size_of(self.key_for(ref.digest))
        if size is None:
            raise BlobNotFound(
                f"blob {ref.digest} not found at {url} (endpoint {self.settings.endpoint_url})"
            )
        if size != ref.size:
            raise IntegrityError(ref.digest, f"<{size} bytes, expected {ref.size}>", where=url)
        data = bytearray(size)
        try:
            await self._read_into(self.key_for(ref.digest), data)
        except CommError as exc:  # deleted between the lookup and the read (a round closing meanwhile)
            if _code(exc.__cause__) in _NOT_FOUND:
                raise BlobNotFound(f"blob {ref.digest} was deleted from {url} while being read") from exc
            raise
        view = [memoryview(data)]
        actual = await self._hash(view) if size > _THREAD_HASH_BYTES else _digest(view)
        if actual != ref.digest:
            raise IntegrityError(ref.digest, actual, where=url)
        return data

    async def _get_whole(self, ref: BlobRef) -> bytearray:
        """A blob below the multipart threshold: one GET (no HEAD first), its length and digest checked."""
        from botocore.exceptions import ClientError

        url = self.url_for(ref.digest)
        try:
            with self._mapped("download", url):
                answer = await self._client.get_object(
                    Bucket=self.settings.bucket, Key=self.key_for(ref.digest)
                )
                async with answer["Body"] as body:
                    data = bytearray(await body.read())
        except CommError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and _code(cause) in _NOT_FOUND:
                raise BlobNotFound(
                    f"blob {ref.digest} not found at {url} (endpoint {self.settings.endpoint_url})"
                ) from exc
            raise
        if len(data) != ref.size:
            raise IntegrityError(ref.digest, f"<{len(data)} bytes, expected {ref.size}>", where=url)
        view = [memoryview(data)]
        actual = await self._hash(view) if ref.size > _THREAD_HASH_BYTES else _digest(view)
        if actual != ref.digest:
            raise IntegrityError(ref.digest, actual, where=url)
        return data

    async def exists(self, ref: BlobRef) -> bool:
        """Whether the bucket holds exactly ``ref``'s bytes (read back and hashed: a planted object is not it)."""
        self._require_open()
        return await self._retrying(lambda: self._holds(ref))

    async def delete(self, ref: BlobRef) -> None:
        self._require_open()

        async def delete() -> None:
            with self._mapped("delete", self.url_for(ref.digest)):
                await self._client.delete_object(Bucket=self.settings.bucket, Key=self.key_for(ref.digest))

        await self._retrying(delete)

    async def delete_many(self, refs: Iterable[BlobRef]) -> None:
        """Forget many blobs with one DeleteObjects request per thousand (a round's updates at once)."""
        self._require_open()
        keys = sorted({self.key_for(ref.digest) for ref in refs})
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]

            async def delete(batch: list[dict[str, str]] = batch) -> None:
                with self._mapped(f"delete {len(batch)} blobs from", f"s3://{self.settings.bucket}"):
                    answer = await self._client.delete_objects(
                        Bucket=self.settings.bucket, Delete={"Objects": batch, "Quiet": True}
                    )
                failed = answer.get("Errors") or []
                if failed:
                    first = failed[0]
                    raise CommError(
                        f"S3 could not delete {len(failed)} of {len(batch)} blobs from "
                        f"s3://{self.settings.bucket}, e.g. {first.get('Key')} ({first.get('Code')})"
                    )

            await self._retrying(delete)

    # -- helpers -----------------------------------------------------------------------------

    async def _retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` (idempotent), again with backoff while it fails transiently, up to the retry window."""
        from tenacity import (
            AsyncRetrying,
            retry_if_exception,
            stop_after_delay,
            wait_exponential_jitter,
        )

        def note(state: Any) -> None:
            self.retries += 1
            log.warning(
                "S3 at %s failed (%s); trying again for up to %gs (comm_args.retry_window_s)",
                self.settings.endpoint_url,
                state.outcome.exception() if state.outcome is not None else "?",
                self.retry_window_s,
            )

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_delay(self.retry_window_s),
            wait=wait_exponential_jitter(multiplier=0.5, max=8.0),
            before_sleep=note,
            reraise=True,
        ):
            with attempt:
                return await operation()
        raise AssertionError("unreachable: tenacity either returns or reraises")

    def _require_open(self) -> None:
        if self._client is None:
            raise CommError("the S3 blob store is not open (use it as `async with S3BlobStore(...)`)")

    async def _hash(self, chunks: list[bytes] | list[memoryview]) -> str:
        # hashlib releases the GIL on large buffers, so this runs beside the event loop.
        return await asyncio.to_thread(_digest, chunks)

    async def _size_of(self, key: str) -> int | None:
        """The stored size of ``key``, or ``None`` when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            with self._mapped("look up", f"s3://{self.settings.bucket}/{key}"):
                head = await self._client.head_object(Bucket=self.settings.bucket, Key=key)
        except CommError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and _code(cause) in _NOT_FOUND:
                return None
            raise
        return int(head["ContentLength"])

    def _part_bounds(self, size: int) -> list[tuple[int, int]]:
        part = max(self.part_size, -(-size // _MAX_PARTS))
        return [(start, min(start + part, size)) for start in range(0, size, part)] or [(0, 0)]

    async def _put_multipart(self, key: str, data: bytes) -> None:
        bucket = self.settings.bucket
        url = f"s3://{bucket}/{key}"
        view = memoryview(data)
        with self._mapped("start multipart upload", url):
            upload = await self._client.create_multipart_upload(Bucket=bucket, Key=key)
        upload_id = upload["UploadId"]
        limit = asyncio.Semaphore(self.max_concurrency)

        async def upload_part(number: int, start: int, end: int) -> dict[str, Any]:
            async with limit:
                # One part's copy at a time per slot keeps memory at ~concurrency x part size.
                body = bytes(view[start:end])
                with self._mapped(f"upload part {number}", url):
                    answer = await self._client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                    )
                return {"PartNumber": number, "ETag": answer["ETag"]}

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(upload_part(n, a, b), name=f"unitedllm-s3-part-{n}")
                    for n, (a, b) in enumerate(self._part_bounds(len(data)), start=1)
                ]
            parts = [t.result() for t in tasks]
            with self._mapped("complete multipart upload", url):
                await self._client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            if isinstance(exc, BaseExceptionGroup) and all(isinstance(e, CommError) for e in exc.exceptions):
                raise exc.exceptions[0] from exc
            raise

    async def _read_into(self, key: str, data: bytearray) -> None:
        """Fill ``data`` (the object's size) with the object's bytes, in parallel ranges when it is large."""
        bucket = self.settings.bucket
        url = f"s3://{bucket}/{key}"
        size = len(data)
        target = memoryview(data)
        limit = asyncio.Semaphore(self.max_concurrency)

        async def read_range(start: int, end: int) -> None:
            whole = start == 0 and end == size and size <= self.threshold
            async with limit:
                where = "download" if whole else f"download bytes {start}-{end - 1}"
                with self._mapped(where, url):
                    extra = {} if whole else {"Range": f"bytes={start}-{end - 1}"}
                    answer = await self._client.get_object(Bucket=bucket, Key=key, **extra)
                    async with answer["Body"] as body:
                        chunk: bytes = await body.read()
                if len(chunk) != end - start:  # the object changed between HEAD and GET, or a short read
                    raise IntegrityError(
                        key.rsplit("/", 1)[-1], f"<{len(chunk)} bytes for {start}-{end - 1}>", where=url
                    )
                target[start:end] = chunk

        if size <= self.threshold:
            await read_range(0, size)
            return
        try:
            async with asyncio.TaskGroup() as tg:
                for a, b in self._part_bounds(size):
                    tg.create_task(read_range(a, b), name=f"unitedllm-s3-range-{a}")
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from group

    @contextlib.contextmanager
    def _mapped(self, what: str, url: str) -> Iterator[None]:
        """Translate botocore errors into CommError with the operation, object and a hint."""
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        s = self.settings
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            if code in _DENIED:
                raise CommError(
                    f"S3 at {s.endpoint_url} refused to {what} {url} ({code}): check the access key "
                    f"{s.access_key_id!r} and its secret (comm_args.s3.access_key_id/secret_access_key or "
                    "UNITEDLLM_S3_ACCESS_KEY_ID/UNITEDLLM_S3_SECRET_ACCESS_KEY)"
                ) from exc
            raise CommError(f"S3 could not {what} {url} ({code}): {exc}") from exc
        except EndpointConnectionError as exc:
            raise CommError(f"cannot reach the S3 endpoint {s.endpoint_url} to {what} {url}: {exc}") from exc
        except (TimeoutError, BotoCoreError, OSError) as exc:
            raise CommError(f"S3 could not {what} {url}: {exc}") from exc


def _code(exc: Any) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
