"""Streaming rounds for rules that need only the weighted mean of the client deltas.

Each update is folded into an :class:`~unitedllm.optimizers.exact_sum.ExactSum` per
tensor as it arrives and can then be dropped, so memory is ~16 bytes per parameter
(plus optimizer state) whatever the number of clients, and the mean is the same bytes
whatever the arrival order.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from unitedllm.optimizers.base import ClientUpdate, RoundAccumulator, ServerOptimizer, Tensors
from unitedllm.optimizers.exact_sum import ExactSum

__all__ = ["MeanRuleOptimizer", "RoundSummary", "StreamingMeanRound", "apply_step", "scaled", "state_dtype"]


@dataclass(frozen=True)
class RoundSummary:
    """What a mean-based rule learns about the round besides the mean delta."""

    ranks: tuple[int, ...]
    total_weight: int
    #: Weighted mean of each required ``extras`` tensor (float64), e.g. SCAFFOLD's control deltas.
    mean_extras: Mapping[str, torch.Tensor]


def state_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype optimizer state is kept in: float32, or float64 for float64 weights."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def apply_step(weights: Mapping[str, torch.Tensor], step: Mapping[str, torch.Tensor]) -> Tensors:
    """``w + step`` computed in float64 and cast back to each weight's dtype."""
    return {n: (w.to(torch.float64) + step[n]).to(w.dtype) for n, w in weights.items()}


def scaled(step: Mapping[str, torch.Tensor], lr: float) -> Mapping[str, torch.Tensor]:
    """``lr · step``; the step itself when lr is 1 (no copy, and no rounding from a no-op multiply)."""
    return step if lr == 1.0 else {n: d * lr for n, d in step.items()}


class MeanRuleOptimizer(ServerOptimizer):
    """Base of the rules that turn the weighted mean delta into a step (streaming)."""

    def client_weight(self, update: ClientUpdate) -> int:
        """An update's weight in the mean: its sample count, or 1 with ``sample_weighted: false``."""
        return update.num_samples if self.hparam("sample_weighted") else 1

    def begin_round(
        self, weights: Mapping[str, torch.Tensor], state: Tensors, *, round_idx: int | None = None
    ) -> RoundAccumulator:
        return StreamingMeanRound(self, weights, state, round_idx=round_idx)

    @abc.abstractmethod
    def apply(
        self,
        weights: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        state: Tensors,
        summary: RoundSummary,
    ) -> tuple[Tensors, Tensors]:
        """New weights and state from the round's mean delta (float64 tensors)."""


class StreamingMeanRound(RoundAccumulator):
    """Folds each update into exact per-tensor sums as it arrives."""

    optimizer: MeanRuleOptimizer

    def __init__(
        self,
        optimizer: MeanRuleOptimizer,
        weights: Mapping[str, torch.Tensor],
        state: Tensors,
        *,
        round_idx: int | None = None,
    ):
        super().__init__(optimizer, weights, state, round_idx=round_idx)
        self._extras = dict(optimizer.required_extras(weights))
        self._sums: dict[str, ExactSum] = {}
        self._extra_sums: dict[str, ExactSum] = {}
        self._total = 0

    def _accept(self, updates: Sequence[ClientUpdate]) -> None:
        ws = [self.optimizer.client_weight(u) for u in updates]
        for name, w in self.weights.items():
            acc = self._sums.get(name) or self._sums.setdefault(name, ExactSum(w.shape))
            acc.add([u.delta[name] for u in updates], ws)
        for name, ref in self._extras.items():
            acc = self._extra_sums.get(name) or self._extra_sums.setdefault(name, ExactSum(ref.shape))
            acc.add([u.extras[name] for u in updates], ws)
        self._total += sum(ws)

    def _finish(self) -> tuple[Tensors, Tensors]:
        mean = {n: self._sums.pop(n).result(consume=True).div_(self._total) for n in self.weights}
        extras = {n: self._extra_sums.pop(n).result(consume=True).div_(self._total) for n in self._extras}
        summary = RoundSummary(tuple(sorted(self.accepted)), self._total, extras)
        return self.optimizer.apply(self.weights, mean, self.state, summary)
