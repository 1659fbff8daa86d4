"""Communication backends: the Transport/BlobStore interfaces and their implementations."""

from unitedllm.comm.base import BlobStore, Incoming, Presence, Transport
from unitedllm.comm.local import LocalHub, LocalTransport, MemoryBlobStore

__all__ = ["BlobStore", "Incoming", "LocalHub", "LocalTransport", "MemoryBlobStore", "Presence", "Transport"]
