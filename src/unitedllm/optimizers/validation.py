"""Checks a client update must pass before it counts: names, shapes, dtypes, finite values."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from unitedllm.errors import UpdateRejected
from unitedllm.optimizers.exact_sum import MAX_WEIGHT, count_nonfinite

__all__ = ["validate_num_samples", "validate_update"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validate_update(
    global_weights: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    *,
    rank: int | None = None,
    round_idx: int | None = None,
    what: str = "delta",
    finite: bool = True,
) -> None:
    """Raise UpdateRejected unless ``delta`` has exactly the global model's tensors, shapes and dtypes, all finite.

    ``finite=False`` checks everything but the values (the caller checks those itself).
    """

    def reject(reason: str) -> UpdateRejected:
        return UpdateRejected(f"{what}: {reason}", rank=rank, round_idx=round_idx)

    missing = sorted(set(global_weights) - set(delta))
    if missing:
        raise reject(f"missing tensors {_names(missing)}")
    extra = sorted(set(delta) - set(global_weights))
    if extra:
        raise reject(f"unexpected tensors {_names(extra)} (not in the global model)")
    for name, ref in global_weights.items():
        t = delta[name]
        if not isinstance(t, torch.Tensor):
            raise reject(f"{name!r} is a {type(t).__name__}, not a tensor")
        if t.shape != ref.shape:
            raise reject(f"{name!r} has shape {tuple(t.shape)}, the global model has {tuple(ref.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise reject(f"{name!r} has dtype {t.dtype}; updates must be floating point")
        if t.dtype != ref.dtype:
            raise reject(f"{name!r} has dtype {t.dtype}, the global model has {ref.dtype}")
    for name in global_weights if finite else ():
        bad = count_nonfinite(delta[name])
        if bad:
            raise reject(f"{name!r} has {bad} non-finite values (inf or NaN)")


def validate_num_samples(
    num_samples: object, *, rank: int | None = None, round_idx: int | None = None
) -> None:
    """Raise UpdateRejected unless ``num_samples`` is an integer in [1, 2**29]."""
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or not 1 <= num_samples <= MAX_WEIGHT
    ):
        raise UpdateRejected(
            f"num_samples must be an integer between 1 and {MAX_WEIGHT}, got {num_samples!r}",
            rank=rank,
            round_idx=round_idx,
        )
