"""Wire protocol: control messages, tensor payloads, signing."""

from unitedllm.protocol.messages import (
    PROTOCOL_VERSION,
    BlobRef,
    Error,
    EvalReport,
    Finish,
    Hello,
    Message,
    RoundStart,
    TrainSpec,
    Update,
)

__all__ = [
    "PROTOCOL_VERSION",
    "BlobRef",
    "Error",
    "EvalReport",
    "Finish",
    "Hello",
    "Message",
    "RoundStart",
    "TrainSpec",
    "Update",
]
