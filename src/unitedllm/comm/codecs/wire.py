"""A run's update codec on the wire: which codec a config names, and an update blob's bytes both ways.

A blob's :attr:`BlobRef.codec <unitedllm.protocol.messages.BlobRef.codec>` says how to read it:
``safetensors`` is the dense update as trained (codec ``none``, the bytes UnitedLLM always sent);
``<codec>+safetensors`` (``int8+safetensors``, ``topk+safetensors``, ...) is a safetensors file of
that codec's wire tensors, decoded against the global weights' names, shapes and dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from unitedllm.comm.codecs.base import Encoded, TensorSpec, UpdateCodec, codec_for
from unitedllm.errors import ProtocolError
from unitedllm.protocol.payload import CODEC as DENSE
from unitedllm.protocol.payload import decode_tensors, encode_tensors

if TYPE_CHECKING:
    import torch

    from unitedllm.config.types import Config

__all__ = ["DENSE", "UpdateEncoding", "blob_codec", "decode_update", "run_codec"]


def run_codec(cfg: Config) -> UpdateCodec | None:
    """The codec ``comm_args.update_codec`` names, with its parameters; ``None`` for ``none`` (dense)."""
    c = cfg.comm_args
    if c.update_codec == "none":
        return None
    if c.update_codec == "int8":
        return codec_for("int8", block_size=c.update_codec_block_size)
    if c.update_codec == "topk":
        return codec_for("topk", fraction=c.update_codec_topk_fraction)
    return codec_for(c.update_codec)


def blob_codec(codec: UpdateCodec | None) -> str:
    """What a blob encoded with ``codec`` records as its codec (``safetensors`` for dense)."""
    return DENSE if codec is None else f"{codec.name}+{DENSE}"


class UpdateEncoding:
    """Encodes a client's deltas with the run's codec, returning the bytes and the residual to keep."""

    def __init__(self, codec: UpdateCodec | None):
        self.codec = codec
        self.name = blob_codec(codec)

    @property
    def keeps_residual(self) -> bool:
        return self.codec is not None and self.codec.error_feedback

    def encode(
        self, delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[bytes, dict[str, torch.Tensor]]:
        """The blob's bytes for ``delta`` (+ ``residual`` fed back) and the new residual (empty when none)."""
        if self.codec is None:
            return encode_tensors(delta), {}
        encoded: Encoded = self.codec.encode(delta, residual)
        return encode_tensors(encoded.wire), encoded.residual


def decode_update(
    codec_name: str,
    data: bytes | bytearray,
    like: Mapping[str, torch.Tensor],
    codec: UpdateCodec | None,
    *,
    where: str = "",
) -> dict[str, torch.Tensor]:
    """Dense tensors from an update blob recorded as ``codec_name``, shaped and typed like ``like``.

    A dense blob (``safetensors``) is returned as it is (the round's checks look at it as before); a
    codec blob must use the run's codec (``codec``), whose parameters decode it.
    """
    tensors = decode_tensors(data)
    if codec_name == DENSE:
        return tensors
    if codec is None or codec_name != blob_codec(codec):
        expected = blob_codec(codec)
        raise ProtocolError(f"{where}update is encoded as {codec_name!r}; this run takes {expected!r}")
    specs = {name: TensorSpec.of(tensor) for name, tensor in like.items()}
    return codec.decode(tensors, specs, where=where)
