"""Tensor payloads: named tensors <-> safetensors bytes, and sha256 addressing.

No pickle anywhere: safetensors holds only names, dtypes, shapes and raw bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from unitedllm.errors import IntegrityError, ProtocolError
from unitedllm.protocol.messages import BlobRef

if TYPE_CHECKING:
    import torch

__all__ = ["decode_tensors", "digest_of", "encode_tensors", "ref_for", "verify"]

CODEC = "safetensors"


def digest_of(data: bytes | memoryview) -> str:
    """The sha256 hex digest that addresses ``data``."""
    return hashlib.sha256(data).hexdigest()


def ref_for(data: bytes, codec: str = CODEC) -> BlobRef:
    """A :class:`BlobRef` for ``data``."""
    return BlobRef(digest=digest_of(data), size=len(data), codec=codec)


def verify(ref: BlobRef, data: bytes, *, where: str = "") -> None:
    """Raise :class:`IntegrityError` unless ``data`` is exactly the blob ``ref`` names."""
    if len(data) != ref.size:
        raise IntegrityError(ref.digest, f"<{len(data)} bytes, expected {ref.size}>", where=where)
    actual = digest_of(data)
    if actual != ref.digest:
        raise IntegrityError(ref.digest, actual, where=where)


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Named tensors as safetensors bytes (contiguous CPU copies; names sorted for stable bytes)."""
    from safetensors.torch import save

    ordered = {name: tensors[name].detach().to("cpu").contiguous() for name in sorted(tensors)}
    return save(ordered)


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Named tensors from safetensors bytes; malformed bytes raise :class:`ProtocolError`."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError / ValueError
        raise ProtocolError(f"payload is not valid safetensors: {exc}") from exc
