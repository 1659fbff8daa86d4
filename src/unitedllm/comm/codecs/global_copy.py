"""The global model as the clients hold it, sent through a lossy codec (``comm_args.global_codec``).

The aggregator's global model stays exact. What the clients train from is their *copy* of it: at
round 0 the exact initial weights, and after that the copy they held plus the round's change,
``global - copy``, encoded with the codec (bf16, fp16, int8). What encoding loses stays in the
next round's ``global - copy``, so the copy tracks the exact model (error feedback, kept by the
aggregator: the copy *is* the residual's other half) and never drifts.

Each round start names the copy's dense payload as ``global_ref`` and, under
:data:`GLOBAL_DELTA` in its extras, the encoded change. A client that holds the previous copy
fetches only the change, applies it, and checks the result against ``global_ref``'s digest; a
client that does not (left out of the last round, restarted, or joining) fetches the dense copy.
Both end on the same bytes. The aggregator keeps the copy in its resume point
(:data:`STATE_PREFIX` keys beside the optimizer state), so a resumed run sends the same copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from unitedllm.comm.codecs.base import TensorSpec, UpdateCodec, codec_for
from unitedllm.protocol.payload import decode_tensors, encode_tensors

if TYPE_CHECKING:
    import torch

    from unitedllm.config.types import Config

__all__ = [
    "GLOBAL_CODECS",
    "GLOBAL_DELTA",
    "STATE_PREFIX",
    "ClientsCopy",
    "apply_change",
    "change_codec",
    "global_codec",
    "round_payload",
]

#: The codecs ``comm_args.global_codec`` takes besides ``none``.
GLOBAL_CODECS = ("bf16", "fp16", "int8")
#: The round start's extras key of the encoded change of the clients' copy.
GLOBAL_DELTA = "global_delta"
#: Prefix of the clients' copy's tensors in the aggregator's saved state.
STATE_PREFIX = "clients_copy/"


def global_codec(cfg: Config) -> UpdateCodec | None:
    """The codec ``comm_args.global_codec`` names; ``None`` for ``none`` (the exact model travels)."""
    c = cfg.comm_args
    if c.global_codec == "none":
        return None
    if c.global_codec == "int8":
        return codec_for("int8", where="comm_args.global_codec", block_size=c.global_codec_block_size)
    return codec_for(c.global_codec, where="comm_args.global_codec")


def change_codec(cfg: Config) -> str:
    """What the blob of the copy's change records as its codec (``int8+safetensors``, ...)."""
    from unitedllm.comm.codecs.wire import blob_codec

    return blob_codec(global_codec(cfg))


def round_payload(
    copy: ClientsCopy | None, exact: Mapping[str, torch.Tensor], encoded: bytes
) -> tuple[bytes | None, bytes]:
    """What a round sends: (None, the exact ``encoded`` weights) without a global codec, else the copy's."""
    return (None, encoded) if copy is None else copy.payload(exact)


def apply_change(
    copy: Mapping[str, torch.Tensor], data: bytes | bytearray, codec: UpdateCodec, *, where: str = ""
) -> dict[str, torch.Tensor]:
    """``copy`` plus the encoded change in ``data`` (added in float32, kept in each tensor's dtype)."""
    import torch

    specs = {name: TensorSpec(tuple(t.shape), torch.float32) for name, t in copy.items()}
    change = codec.decode(decode_tensors(data), specs, where=where)
    return {name: (t.to(torch.float32) + change[name]).to(t.dtype) for name, t in copy.items()}


class ClientsCopy:
    """The aggregator's record of the clients' copy of the global model, and the payloads that move it."""

    def __init__(self, codec: UpdateCodec, copy: dict[str, torch.Tensor] | None = None):
        self.codec = codec
        self.copy = copy
        self._restored = copy is not None  # the first payload is the restored copy as it is

    @classmethod
    def for_run(cls, cfg: Config, state: dict[str, torch.Tensor]) -> ClientsCopy | None:
        """The run's record of the copy (None without a global codec), restored from a resumed ``state``.

        The copy's keys are taken out of ``state`` either way, which leaves the optimizer's own.
        """
        names = [k for k in state if k.startswith(STATE_PREFIX)]
        saved = {k.removeprefix(STATE_PREFIX): state.pop(k) for k in names}
        codec = global_codec(cfg)
        return None if codec is None else cls(codec, saved or None)

    def payload(self, exact: Mapping[str, torch.Tensor]) -> tuple[bytes | None, bytes]:
        """The next round's (change, copy payload): the copy moved toward ``exact``, or as restored."""
        if self._restored and self.copy is not None:
            self._restored = False
            return None, encode_tensors(self.copy)
        return self.advance(exact)

    def advance(self, exact: Mapping[str, torch.Tensor]) -> tuple[bytes | None, bytes]:
        """Move the copy toward ``exact``: (the encoded change, or None when there was no copy yet; the new copy's payload)."""
        import torch

        if self.copy is None:
            self.copy = {name: t.detach().clone() for name, t in exact.items()}
            return None, encode_tensors(self.copy)
        change = {
            name: exact[name].detach().to(torch.float32) - held.to(torch.float32)
            for name, held in self.copy.items()
        }
        data = encode_tensors(self.codec.encode(change).wire)
        self.copy = apply_change(self.copy, data, self.codec)  # exactly what a client computes
        return data, encode_tensors(self.copy)

    def state(self) -> dict[str, torch.Tensor]:
        """The copy as saved state (empty before the first round)."""
        return {f"{STATE_PREFIX}{name}": t for name, t in (self.copy or {}).items()}
