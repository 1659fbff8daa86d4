"""Update codecs: ``none``, ``bf16``, ``fp16``, ``int8`` and ``topk`` (the last two with error feedback).

``codec_for(name, **params)`` returns a registered codec; a new codec is one file here with a
``@register`` class (see :mod:`unitedllm.comm.codecs.base` for the interface).
"""

from unitedllm.comm.codecs import dense, int8, topk  # noqa: F401  (registration)
from unitedllm.comm.codecs.base import Encoded, TensorSpec, UpdateCodec, available, codec_for, register

__all__ = ["Encoded", "TensorSpec", "UpdateCodec", "available", "codec_for", "register"]
