"""Dense codecs: ``none`` (the tensor as it is) and the 16-bit casts ``bf16`` / ``fp16``.

The casts halve an fp32 update. They keep no error feedback: the rounding error of a 16-bit cast is
relative (about 2^-8 for bf16, 2^-11 for fp16), far below what federated averaging tolerates.
fp16 overflows above 65,504: such a value is refused at encoding rather than sent as infinity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from unitedllm.comm.codecs.base import TensorSpec, UpdateCodec, register
from unitedllm.errors import UpdateRejected

if TYPE_CHECKING:
    import torch

__all__ = ["BF16", "FP16", "NoCodec"]


def _dense(parts: Mapping[str, torch.Tensor], spec: TensorSpec) -> torch.Tensor:
    import torch

    data = parts["v"]
    if data.numel() != spec.numel:
        raise ValueError(f"{data.numel()} values for a tensor of {spec.numel}")
    return data.to(torch.float32).reshape(-1)


@register
class NoCodec(UpdateCodec):
    """The update as trained, in float32 (the default; what UnitedLLM sent before codecs)."""

    name: ClassVar[str] = "none"

    def encode_tensor(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"v": value.contiguous()}

    def decode_tensor(self, parts: Mapping[str, torch.Tensor], spec: TensorSpec) -> torch.Tensor:
        return _dense(parts, spec)


@register
class BF16(UpdateCodec):
    """bfloat16: half the bytes, fp32's range."""

    name: ClassVar[str] = "bf16"

    def encode_tensor(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        return {"v": value.to(torch.bfloat16).contiguous()}

    def decode_tensor(self, parts: Mapping[str, torch.Tensor], spec: TensorSpec) -> torch.Tensor:
        return _dense(parts, spec)


@register
class FP16(UpdateCodec):
    """float16: half the bytes, finer than bf16 for the small values updates are made of."""

    name: ClassVar[str] = "fp16"

    def encode_tensor(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        if value.numel() and float(value.abs().max()) > torch.finfo(torch.float16).max:
            raise UpdateRejected("fp16 codec: a value beyond float16's range (65504); use bf16 or none")
        return {"v": value.to(torch.float16).contiguous()}

    def decode_tensor(self, parts: Mapping[str, torch.Tensor], spec: TensorSpec) -> torch.Tensor:
        return _dense(parts, spec)
