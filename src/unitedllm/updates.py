"""Checks a client update must pass before it counts in a round."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from unitedllm.errors import UpdateRejected

if TYPE_CHECKING:
    import torch

__all__ = ["check_update"]


def check_update(
    weights: Mapping[str, "torch.Tensor"],
    delta: Mapping[str, "torch.Tensor"],
    *,
    num_samples: int,
    rank: int,
    round_idx: int,
) -> None:
    """Raise :class:`UpdateRejected` unless ``delta`` fits ``weights`` exactly and is finite."""
    import torch

    def reject(reason: str) -> UpdateRejected:
        return UpdateRejected(reason, rank=rank, round_idx=round_idx)

    if num_samples <= 0:
        raise reject(f"num_samples is {num_samples}, must be > 0")
    missing = sorted(set(weights) - set(delta))
    extra = sorted(set(delta) - set(weights))
    if missing:
        raise reject(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise reject(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name, w in weights.items():
        d = delta[name]
        if tuple(d.shape) != tuple(w.shape):
            raise reject(f"tensor {name} has shape {tuple(d.shape)}, the global model has {tuple(w.shape)}")
        if not d.is_floating_point():
            raise reject(f"tensor {name} has dtype {d.dtype}, expected a floating point dtype")
        if not bool(torch.isfinite(d).all()):
            raise reject(f"tensor {name} has non-finite values (NaN or Inf)")
