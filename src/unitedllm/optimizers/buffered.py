"""Rounds for robust rules, which must see every update at once (median, trimmed mean, Krum).

These rules are not streaming: the round keeps each accepted update (memory grows with
the number of clients) and combines them in rank order at the end, so the result does
not depend on arrival order. Coordinate-wise rules work on slices of the flattened
tensors to bound the float64 working set.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence

import torch

from unitedllm.optimizers.base import ClientUpdate, HoldingRound, RoundAccumulator, ServerOptimizer, Tensors
from unitedllm.optimizers.builtin import RobustParams
from unitedllm.optimizers.mean import apply_step

__all__ = ["BufferedRound", "RobustOptimizer", "coordinatewise"]

# Elements per slice for coordinate-wise rules: N clients x 1M float64 = 8 MB per client.
_SLICE = 1 << 20


def coordinatewise(
    tensors: Sequence[torch.Tensor], reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``reduce`` (sorted (N, k) float64 -> (k,)) to the stacked clients, slice by slice."""
    shape = tensors[0].shape
    flat = [t.reshape(-1) for t in tensors]
    out = torch.empty(shape.numel(), dtype=torch.float64)
    for start in range(0, out.numel(), _SLICE):
        stop = min(start + _SLICE, out.numel())
        block = torch.stack([f[start:stop].to(torch.float64) for f in flat])
        out[start:stop] = reduce(block.sort(dim=0).values)
    return out.view(shape)


class RobustOptimizer(ServerOptimizer):
    """Base of rules that combine all updates at once; the step is ``server_learning_rate`` x the result."""

    params: RobustParams

    def begin_round(
        self, weights: Mapping[str, torch.Tensor], state: Tensors, *, round_idx: int | None = None
    ) -> RoundAccumulator:
        return BufferedRound(self, weights, state, round_idx=round_idx)

    @abc.abstractmethod
    def combine(self, weights: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> Tensors:
        """The robust aggregate delta (float64) of ``updates`` (sorted by rank)."""

    def apply(
        self, weights: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], state: Tensors
    ) -> tuple[Tensors, Tensors]:
        lr = self.params.server_learning_rate
        agg = self.combine(weights, updates)
        return apply_step(weights, {n: d.mul_(lr) if lr != 1.0 else d for n, d in agg.items()}), state


class BufferedRound(HoldingRound):
    """Keeps every accepted update until ``finish``, then hands them to the rule in rank order."""

    optimizer: RobustOptimizer

    def _finish(self) -> tuple[Tensors, Tensors]:
        ordered = sorted(self._updates, key=lambda u: u.rank)
        self._updates = []
        return self.optimizer.apply(self.weights, ordered, self.state)
