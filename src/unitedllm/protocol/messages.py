"""Control messages between the aggregator (rank 0) and clients (ranks 1..N).

Messages are tagged msgspec Structs in one union, encoded as msgpack. Tensors never
ride inside them: a message carries a :class:`BlobRef` (sha256 digest, size, codec)
and the receiver fetches the bytes from the run's blob store. New fields are added
with defaults only, so older peers still decode newer messages.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

__all__ = [
    "PROTOCOL_VERSION",
    "BlobRef",
    "EvalReport",
    "Error",
    "Finish",
    "Hello",
    "Message",
    "RoundStart",
    "TrainSpec",
    "Update",
]

PROTOCOL_VERSION = 1

#: A blob's sha256 in lowercase hex: it is also the blob's key in the store, so nothing else may pass.
Digest = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
ByteCount = Annotated[int, Meta(ge=0)]
Rank = Annotated[int, Meta(ge=0)]


class BlobRef(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """Where a tensor payload lives: its sha256 (hex), size in bytes and codec."""

    digest: Digest
    size: ByteCount
    codec: str = "safetensors"


class TrainSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the aggregator asks of a client for one round."""

    local_max_steps: int
    local_num_train_epochs: Annotated[float, Meta(gt=0)]
    evaluate_global: bool = False
    evaluate_local: bool = False


class _Envelope(msgspec.Struct, kw_only=True, tag_field="kind"):
    """Fields every control message carries."""

    run_id: str
    round: int
    sender: Rank
    seq: Annotated[int, Meta(ge=0)] = 0
    version: Annotated[int, Meta(ge=1)] = PROTOCOL_VERSION


class Hello(_Envelope, tag="hello"):
    """A client announces itself (or the aggregator acknowledges it)."""

    capabilities: list[str] = msgspec.field(default_factory=list)
    base_fingerprint: str | None = None


class RoundStart(_Envelope, tag="round_start"):
    """The aggregator opens a round: fetch ``global_ref``, train per ``spec``, answer with an Update."""

    global_ref: BlobRef
    spec: TrainSpec
    # Tensor groups besides the weights, one blob each (SCAFFOLD: "control" = the server control variate).
    extras: dict[str, BlobRef] = msgspec.field(default_factory=dict)


class Update(_Envelope, tag="update"):
    """A client's update for a round: the delta from the global weights, and how much data made it."""

    delta_ref: BlobRef
    num_samples: int
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    # Tensor groups besides the delta, one blob each (SCAFFOLD: "control" = the client's Δc_i).
    extras: dict[str, BlobRef] = msgspec.field(default_factory=dict)


class EvalReport(_Envelope, tag="eval_report"):
    """A client's evaluation of a model: ``model`` is ``global`` or ``local``."""

    model: str
    metrics: dict[str, float]
    num_samples: Annotated[int, Meta(ge=0)] = 0


class Finish(_Envelope, tag="finish"):
    """The run is over; ``final_ref`` points at the final global weights (when there are any)."""

    final_ref: BlobRef | None = None
    reason: str = "completed"
    evaluate_final: bool = False


class Error(_Envelope, tag="error"):
    """A peer failed; ``message`` says why."""

    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)


Message = Hello | RoundStart | Update | EvalReport | Finish | Error
