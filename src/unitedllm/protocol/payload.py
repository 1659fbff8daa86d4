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


def decode_tensors(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """Named tensors from safetensors bytes; malformed bytes raise :class:`ProtocolError`.

    A ``bytearray`` (what the S3 store returns) is decoded without a copy: the tensors are views
    on it, so a multi-GB update needs its size in memory once, not twice.
    """
    if isinstance(data, bytearray):
        return _views(data)
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError / ValueError
        raise ProtocolError(f"payload is not valid safetensors: {exc}") from exc


_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


def _views(data: bytearray) -> dict[str, torch.Tensor]:
    """Parse the safetensors layout (8-byte header length, JSON header, raw bytes) into views on ``data``."""
    import json
    import math

    import torch

    def bad(why: str) -> ProtocolError:
        return ProtocolError(f"payload is not valid safetensors: {why}")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes is too short for a header")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(_MAX_HEADER, len(data) - 8):
        raise bad(f"header length {header_len} does not fit in {len(data)} bytes")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    base = 8 + header_len
    body = len(data) - base
    out: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = getattr(torch, _DTYPES[entry["dtype"]])
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"tensor {name!r} has a malformed entry ({exc!r})") from None
        count = math.prod(shape)
        itemsize = dtype.itemsize
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= body or end - begin != count * itemsize:
            raise bad(f"tensor {name!r}: offsets {begin}-{end} do not hold shape {shape} of {entry['dtype']}")
        spans.append((begin, end))
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (base + begin) % itemsize:  # not aligned for its dtype (our encoder never writes this): copy
            chunk = bytearray(data[base + begin : base + end])
            out[name] = torch.frombuffer(chunk, dtype=dtype, count=count).view(shape)
        else:
            out[name] = torch.frombuffer(data, dtype=dtype, count=count, offset=base + begin).view(shape)
    spans.sort()
    if any(a_end > b_begin for (_, a_end), (b_begin, _) in zip(spans, spans[1:], strict=False)):
        raise bad("tensors overlap")
    return out
