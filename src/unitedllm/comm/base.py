"""The two planes a backend implements: :class:`Transport` (control messages) and :class:`BlobStore` (tensors).

Aggregator and Client code talks only to these interfaces, so the in-process LOCAL
backend and the networked MQTT_S3 backend are interchangeable. Both are async context
managers; closing twice is harmless.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Self

import msgspec

from unitedllm.protocol.messages import BlobRef, Message
from unitedllm.protocol.payload import CODEC

__all__ = ["BlobStore", "Incoming", "Presence", "Transport"]


class Presence(msgspec.Struct, frozen=True):
    """A peer came online or went away (from MQTT last-will, or a local peer closing). Never on the wire."""

    rank: int
    online: bool


Incoming = Message | Presence


class _Resource(abc.ABC):
    """Open/close lifecycle shared by transports and stores."""

    _opened = False
    _closed = False

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        if not self._opened:
            self._opened = True
            await self._open()

    async def close(self) -> None:
        if self._opened and not self._closed:
            self._closed = True
            await self._close()

    async def _open(self) -> None:  # noqa: B027 - optional hook
        """Connect; backends override."""

    async def _close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect; backends override."""


class Transport(_Resource):
    """Sends and receives signed control messages for one rank of one run."""

    def __init__(self, *, rank: int, run_id: str):
        self.rank = rank
        self.run_id = run_id
        self._last_seq = 0

    def next_seq(self) -> int:
        """The sequence number for the next outgoing message: the wall clock in ns, always rising.

        Following the clock means a restarted process never reuses old numbers, and receivers can
        refuse numbers far ahead of their own clock (a forged one must not silence this rank).
        """
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq

    async def send(self, to: int, message: Message) -> None:
        """Stamp ``message`` with the next sequence number and deliver it to rank ``to``."""
        await self._send(to, msgspec.structs.replace(message, seq=self.next_seq()))

    @abc.abstractmethod
    async def _send(self, to: int, message: Message) -> None:
        """Deliver an already-stamped message."""

    @abc.abstractmethod
    def incoming(self) -> AsyncIterator[Incoming]:
        """Messages for this rank that passed every check, and presence changes of peers."""


class BlobStore(_Resource):
    """Content-addressed storage of tensor payloads: put bytes, get them back by digest, verified."""

    @abc.abstractmethod
    async def put(self, data: bytes, *, codec: str = CODEC) -> BlobRef:
        """Store ``data`` and return its reference (sha256 digest, size, codec)."""

    @abc.abstractmethod
    async def get(self, ref: BlobRef) -> bytes | bytearray:
        """The bytes ``ref`` names; raises IntegrityError when they do not match the digest.

        A store may return a ``bytearray`` so that decoding can make views instead of copies.
        """

    async def exists(self, ref: BlobRef) -> bool:
        """Whether the store still holds exactly ``ref``'s bytes, checked against the digest."""
        from unitedllm.errors import BlobNotFound

        try:
            await self.get(ref)
        except BlobNotFound:
            return False
        return True

    async def delete(self, ref: BlobRef) -> None:  # noqa: B027 - optional
        """Forget a blob (best effort; stores may keep it)."""

    async def delete_many(self, refs: Iterable[BlobRef]) -> None:
        """Forget every blob in ``refs`` (a store may do it in one request)."""
        for ref in refs:
            await self.delete(ref)
