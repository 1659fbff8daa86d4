"""The update-codec interface: how a client's update (or the global weights) is shrunk for the wire.

A codec turns named dense tensors into named *wire tensors* (a safetensors payload like any other
blob) and back. Lossy codecs may keep **error feedback**: what encoding lost this round (the
residual) is added to the next round's update before it is encoded, so nothing is lost for good,
only delayed (Seide et al. 2014; Karimireddy et al., "Error Feedback Fixes SignSGD", 2019). The
residual is the client's state, saved with its trainer state so a resumed client sends the same
bytes.

Decoding is checked against a reference (the global weights the update is relative to): every name,
shape and dtype must match, so a malformed or hostile payload is refused, never guessed at.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from unitedllm.errors import ConfigError, ConfigProblem, ProtocolError

if TYPE_CHECKING:
    import torch

__all__ = ["Encoded", "TensorSpec", "UpdateCodec", "available", "codec_for", "register"]

SEP = "::"  # wire names are "<tensor name>::<part>"; parameter names never contain it


@dataclass(frozen=True)
class TensorSpec:
    """What a decoded tensor must be: its shape and dtype (taken from the reference weights)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


@dataclass
class Encoded:
    """One encoding: the wire tensors, and the residual to carry into the next round (error feedback)."""

    wire: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor] = field(default_factory=dict)


class UpdateCodec(abc.ABC):
    """Encode named dense tensors for the wire and decode them back (one file per codec, registered)."""

    name: ClassVar[str]
    #: Whether :meth:`encode` returns a residual to feed back (lossy codecs that keep error feedback).
    error_feedback: ClassVar[bool] = False

    def encode(
        self, tensors: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None = None
    ) -> Encoded:
        """Wire tensors for ``tensors`` (+ ``residual`` when the codec feeds errors back)."""
        import torch

        wire: dict[str, torch.Tensor] = {}
        new_residual: dict[str, torch.Tensor] = {}
        for name in sorted(tensors):
            if SEP in name:
                raise ProtocolError(f"tensor name {name!r} contains {SEP!r}, which codecs reserve")
            value = tensors[name].detach().to("cpu", torch.float32)
            if self.error_feedback and residual is not None and name in residual:
                value = value + residual[name].to(torch.float32)
            parts = self.encode_tensor(value)
            for part, data in parts.items():
                wire[f"{name}{SEP}{part}"] = data
            if self.error_feedback:
                sent = self.decode_tensor(parts, TensorSpec(tuple(value.shape), torch.float32))
                new_residual[name] = value - sent.reshape(value.shape)
        return Encoded(wire=wire, residual=new_residual)

    def decode(
        self, wire: Mapping[str, torch.Tensor], like: Mapping[str, TensorSpec], *, where: str = ""
    ) -> dict[str, torch.Tensor]:
        """Dense tensors shaped and typed like ``like``; anything else in ``wire`` is a :class:`ProtocolError`."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for wire_name, data in wire.items():
            name, sep, part = wire_name.rpartition(SEP)
            if not sep or name not in like:
                raise ProtocolError(f"{where}{self.name} payload has an unexpected tensor {wire_name!r}")
            grouped.setdefault(name, {})[part] = data
        missing = sorted(set(like) - set(grouped))
        if missing:
            raise ProtocolError(
                f"{where}{self.name} payload lacks {len(missing)} tensor(s), e.g. {missing[0]!r}"
            )
        decoded = {}
        for name in sorted(like):
            spec = like[name]
            try:
                dense = self.decode_tensor(grouped[name], spec)
            except (KeyError, RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise ProtocolError(f"{where}{self.name} payload for {name!r} is malformed: {exc}") from exc
            decoded[name] = dense.reshape(spec.shape).to(spec.dtype)
        return decoded

    @abc.abstractmethod
    def encode_tensor(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """The wire parts of one float32 tensor."""

    @abc.abstractmethod
    def decode_tensor(self, parts: Mapping[str, torch.Tensor], spec: TensorSpec) -> torch.Tensor:
        """One float32 tensor of ``spec.numel`` elements from its wire parts (checked; reshaped by the caller)."""


_REGISTRY: dict[str, type[UpdateCodec]] = {}


def register(cls: type[UpdateCodec]) -> type[UpdateCodec]:
    """Class decorator: make a codec available under ``cls.name`` (names are unique)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"update codec {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """The registered codec names, sorted."""
    return sorted(_REGISTRY)


def codec_for(name: str, *, where: str = "comm_args.update_codec", **params: float | int) -> UpdateCodec:
    """The codec called ``name`` with its parameters; an unknown name is a :class:`ConfigError`."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            ConfigProblem(where, f"unknown codec {name!r}; choose one of {', '.join(available())}")
        ) from None
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(ConfigProblem(where, f"{name}: {exc}")) from None
