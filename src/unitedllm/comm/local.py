"""The in-process backend (``comm_args.backend: LOCAL``): queues and a dict, same checks as the network.

Frames are sealed and opened exactly as on MQTT, so the signing and replay rules are
exercised by every embedded run.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Mapping

from unitedllm.comm.base import BlobStore, Incoming, Presence, Transport
from unitedllm.errors import BlobNotFound, CommError
from unitedllm.protocol.messages import BlobRef, Message
from unitedllm.protocol.payload import CODEC, digest_of, ref_for, verify
from unitedllm.protocol.signing import MessageGuard, RankKeys, seal

__all__ = ["LocalHub", "LocalTransport", "MemoryBlobStore"]


class LocalHub:
    """The shared medium of one in-process run: a mailbox per rank, the blob dict, each rank's key.

    With ``keys`` (client rank -> key) each client's transport holds only its own key and the
    aggregator's all of them, as over MQTT; with only ``secret`` every link shares that key.
    """

    def __init__(
        self,
        *,
        run_id: str,
        ranks: set[int],
        secret: bytes | None = None,
        keys: Mapping[int, bytes] | None = None,
    ):
        self.run_id = run_id
        self.secret = secret if secret is not None else secrets.token_bytes(32)
        self.keys = dict(keys) if keys is not None else None
        self.ranks = ranks
        self.mailboxes: dict[int, asyncio.Queue[bytes | Presence]] = {r: asyncio.Queue() for r in ranks}
        self.blobs: dict[str, bytes] = {}
        self.online: set[int] = set()

    def announce(self, rank: int, online: bool) -> None:
        (self.online.add if online else self.online.discard)(rank)
        for other, box in self.mailboxes.items():
            if other != rank:
                box.put_nowait(Presence(rank, online))

    def keys_of(self, rank: int) -> RankKeys:
        """The keys rank ``rank`` holds: all of them for the aggregator, its own for a client."""
        if self.keys is None:
            return RankKeys(shared=self.secret)
        if rank == 0:
            return RankKeys(self.keys)
        return RankKeys({rank: self.keys[rank]})

    def deliver(self, to: int, frame: bytes) -> None:
        """Queue a raw frame for rank ``to`` (tests use this to inject forged frames)."""
        try:
            self.mailboxes[to].put_nowait(frame)
        except KeyError:
            raise CommError(f"no rank {to} in this run (ranks: {sorted(self.ranks)})") from None


class LocalTransport(Transport):
    """One rank's end of a :class:`LocalHub`."""

    def __init__(self, hub: LocalHub, *, rank: int):
        super().__init__(rank=rank, run_id=hub.run_id)
        self.hub = hub
        self.keys = hub.keys_of(rank)
        # The aggregator hears every client; a client hears only the aggregator (as over MQTT).
        senders = hub.ranks - {rank} if rank == 0 else {0}
        self.guard = MessageGuard(run_id=hub.run_id, keys=self.keys, receiver=rank, valid_senders=senders)

    async def _open(self) -> None:
        self.hub.announce(self.rank, True)

    async def _close(self) -> None:
        self.hub.announce(self.rank, False)

    async def _send(self, to: int, message: Message) -> None:
        key = self.keys.link(self.rank, to)
        if key is None:
            raise CommError(f"rank {self.rank} holds no key to talk to rank {to}")
        self.hub.deliver(to, seal(message, key))

    async def incoming(self) -> AsyncIterator[Incoming]:
        box = self.hub.mailboxes[self.rank]
        while True:
            item = await box.get()
            if isinstance(item, Presence):
                yield item
                continue
            message = self.guard.admit(item)
            if message is not None:
                yield message


class MemoryBlobStore(BlobStore):
    """Blobs in the hub's dict, verified on the way out like S3 ones."""

    def __init__(self, hub: LocalHub):
        self.hub = hub

    async def put(self, data: bytes, *, codec: str = CODEC) -> BlobRef:
        ref = ref_for(data, codec)
        self.hub.blobs[ref.digest] = data
        return ref

    async def get(self, ref: BlobRef) -> bytes:
        try:
            data = self.hub.blobs[ref.digest]
        except KeyError:
            raise BlobNotFound(f"blob {ref.digest} not found in the in-process store") from None
        verify(ref, data, where="in-process store")
        return data

    async def exists(self, ref: BlobRef) -> bool:
        data = self.hub.blobs.get(ref.digest)
        return data is not None and len(data) == ref.size and digest_of(data) == ref.digest

    async def delete(self, ref: BlobRef) -> None:
        self.hub.blobs.pop(ref.digest, None)
