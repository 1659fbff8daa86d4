"""Streaming rounds for rules that need only the weighted mean of the client deltas.

Each update is folded into an :class:`~unitedllm.optimizers.exact_sum.ExactSum` per
tensor as it arrives and can then be dropped, so memory is ~8 bytes per parameter (plus
optimizer state) whatever the number of clients, and the mean is the same bytes whatever
the arrival order. inf/NaN values are found while folding (no extra pass over the
update); such an update is taken back out of every tensor and refused.

When every update is at hand at once (:meth:`MeanRuleOptimizer.step`) and the rule's step
is just a scaled mean (FedAvg), :class:`OnePassMeanRound` reads each update once and never
writes the sum to memory (:func:`~unitedllm.optimizers.exact_sum.mean_step_one_pass`);
the bytes are the same as streaming's.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from unitedllm.errors import RoundError, UpdateRejected
from unitedllm.optimizers import _native
from unitedllm.optimizers._memory import empty_like
from unitedllm.optimizers.base import (
    ClientUpdate,
    HoldingRound,
    RoundAccumulator,
    ServerOptimizer,
    Tensors,
    log,
)
from unitedllm.optimizers.builtin import MeanParams
from unitedllm.optimizers.exact_sum import ExactSum, NonFiniteInputs, mean_step_one_pass

__all__ = [
    "MeanRuleOptimizer",
    "OnePassMeanRound",
    "RoundSummary",
    "StreamingMeanRound",
    "apply_step",
    "scaled",
    "state_dtype",
]

Pick = Callable[[ClientUpdate], torch.Tensor]


def _delta(name: str, update: ClientUpdate) -> torch.Tensor:
    return update.delta[name]


def _extra(name: str, update: ClientUpdate) -> torch.Tensor:
    return update.extras[name]


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
    return {n: _plus(w, step[n]) for n, w in weights.items()}


def _plus(w: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    k = _native.kernels()
    if (
        k is not None
        and w.dtype == torch.float32
        and step.dtype == torch.float64
        and w.device.type == step.device.type == "cpu"
        and w.shape == step.shape
        and w.is_contiguous()
        and step.is_contiguous()
    ):
        # The same two roundings in one pass, without float64 temporaries of the model's size.
        out = empty_like(w)
        ptrs, numel = (w.data_ptr(), step.data_ptr(), out.data_ptr()), w.numel()
        _native.run_parallel(lambda _t, nxt: k.apply_f32(*ptrs, numel, _native.CHUNK, nxt), 0, numel)
        return out
    return (w.to(torch.float64) + step).to(w.dtype)


def scaled(step: Mapping[str, torch.Tensor], lr: float) -> Mapping[str, torch.Tensor]:
    """``lr · step``; the step itself when lr is 1 (no copy, and no rounding from a no-op multiply)."""
    return step if lr == 1.0 else {n: d * lr for n, d in step.items()}


class MeanRuleOptimizer(ServerOptimizer):
    """Base of the rules that turn the weighted mean delta into a step (streaming)."""

    params: MeanParams

    def client_weight(self, update: ClientUpdate) -> int:
        """An update's weight in the mean: its sample count, or 1 with ``sample_weighted: false``."""
        return update.num_samples if self.params.sample_weighted else 1

    def extras_weight(self, update: ClientUpdate) -> int:
        """An update's weight in the mean of its ``extras`` (the same as in the mean delta unless a rule says)."""
        return self.client_weight(update)

    def begin_round(
        self, weights: Mapping[str, torch.Tensor], state: Tensors, *, round_idx: int | None = None
    ) -> RoundAccumulator:
        return StreamingMeanRound(self, weights, state, round_idx=round_idx)

    def step(
        self,
        weights: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        state: Tensors,
        *,
        round_idx: int | None = None,
    ) -> tuple[Tensors, Tensors]:
        """All of a round's updates at once; a plain scaled-mean rule reads each of them once."""
        if self.plain_step_scale() is None or self.required_extras(weights):
            return super().step(weights, updates, state, round_idx=round_idx)
        acc = OnePassMeanRound(self, weights, state, round_idx=round_idx)
        acc.add_many(sorted(updates, key=lambda u: u.rank))
        return acc.finish()

    def plain_step_scale(self) -> float | None:
        """For a rule whose step is only ``scale · mean delta`` (no state, no extras): the scale.

        The round then adds the scaled mean to the weights in the pass that rounds the sum
        (:meth:`ExactSum.plus_mean`): the same bytes as :meth:`apply`, without the float64
        mean in memory. None (the default) always calls :meth:`apply`.
        """
        return None

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
    checks_finite = True

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
        self._extras_total = 0

    def _accept(self, updates: Sequence[ClientUpdate]) -> Mapping[int, UpdateRejected]:
        ws = [self.optimizer.client_weight(u) for u in updates]
        xws = [self.optimizer.extras_weight(u) for u in updates] if self._extras else ws
        live = list(range(len(updates)))
        refused: dict[int, UpdateRejected] = {}
        folded: list[tuple[ExactSum, Pick, list[int]]] = []
        for sums, name, shape, pick in self._tensors():
            weights = ws if sums is self._sums else xws
            acc = sums.get(name) or sums.setdefault(name, ExactSum(shape))
            found = acc.add([pick(updates[i]) for i in live], [weights[i] for i in live], check_finite=True)
            bad = [live[b] for b in found]
            if bad:  # take these updates back out of the tensors already folded: no trace left
                for prev, prev_pick, prev_weights in folded:
                    prev.add([prev_pick(updates[i]) for i in bad], [-prev_weights[i] for i in bad])
                refused.update((updates[i].rank, self._why(updates[i])) for i in bad)
                live = [i for i in live if i not in bad]
            folded.append((acc, pick, weights))
        self._total += sum(ws[i] for i in live)
        self._extras_total += sum(xws[i] for i in live)
        return refused

    def _tensors(self) -> Iterator[tuple[dict[str, ExactSum], str, torch.Size, Pick]]:
        """Each summed tensor: where its accumulator lives, name, shape, and how to pick it from an update."""
        for name, w in self.weights.items():
            yield self._sums, name, w.shape, functools.partial(_delta, name)
        for name, ref in self._extras.items():
            yield self._extra_sums, name, ref.shape, functools.partial(_extra, name)

    def _why(self, update: ClientUpdate) -> UpdateRejected:
        return _nonfinite_reason(self, update)

    def _finish(self) -> tuple[Tensors, Tensors]:
        total = self._total
        scale = self.optimizer.plain_step_scale()
        if scale is not None and not self._extras:
            return {n: self._plus_scaled_mean(n, w, scale) for n, w in self.weights.items()}, self.state
        mean = {n: self._sums.pop(n).result(consume=True, divide_by=total) for n in self.weights}
        extras = {
            n: self._extra_sums.pop(n).result(consume=True, divide_by=self._extras_total)
            for n in self._extras
        }
        summary = RoundSummary(tuple(sorted(self.accepted)), self._total, extras)
        return self.optimizer.apply(self.weights, mean, self.state, summary)

    def _plus_scaled_mean(self, name: str, w: torch.Tensor, scale: float) -> torch.Tensor:
        return _plus_mean_of(self._sums.pop(name), w, self._total, scale)


class OnePassMeanRound(HoldingRound):
    """A plain scaled-mean round (FedAvg) whose updates are all at hand: folded at ``finish``, in one pass.

    ``add`` only checks and keeps the updates (the caller holds them anyway); ``finish``
    reads each once per tensor and writes the new weights, never the sum. An update found
    holding inf/NaN is refused then (logged, left out of :attr:`accepted`) and the tensors
    are computed again without it.
    """

    optimizer: MeanRuleOptimizer
    checks_finite = True

    def _finish(self) -> tuple[Tensors, Tensors]:
        scale = self.optimizer.plain_step_scale()
        assert scale is not None
        live = list(self._updates)
        while True:
            try:
                return {n: self._tensor(n, w, live, scale) for n, w in self.weights.items()}, self.state
            except NonFiniteInputs as exc:
                bad = [live[i] for i in exc.positions]
            for update in bad:
                log.warning("%s", _nonfinite_reason(self, update))
                self.accepted.remove(update.rank)
            refused = {u.rank for u in bad}  # ranks are unique in a round
            live = [u for u in live if u.rank not in refused]
            if not live:
                raise RoundError(f"no valid client update to aggregate in round {self.round_idx}")

    def _tensor(self, name: str, w: torch.Tensor, live: list[ClientUpdate], scale: float) -> torch.Tensor:
        """``w + scale · mean delta`` for one tensor; NonFiniteInputs names updates holding inf/NaN."""
        xs = [u.delta[name] for u in live]
        ws = [self.optimizer.client_weight(u) for u in live]
        total = sum(ws)
        out = mean_step_one_pass(xs, ws, w, divide_by=total, scale=scale)
        if out is not None:
            return out.view(w.shape)
        acc = ExactSum(w.shape)  # a case the one-pass kernel does not take: the streaming way
        bad = acc.add(xs, ws, check_finite=True)
        if bad:
            raise NonFiniteInputs(bad)
        return _plus_mean_of(acc, w, total, scale)


def _plus_mean_of(acc: ExactSum, w: torch.Tensor, total: int, scale: float) -> torch.Tensor:
    """``w + scale · (sum / total)`` from a finished sum: fused where the kernel can, else composed."""
    fused = acc.plus_mean(w, divide_by=total, scale=scale)
    if fused is not None:
        return fused
    mean = acc.result(consume=True, divide_by=total)
    return _plus(w, mean if scale == 1.0 else mean * scale)


def _nonfinite_reason(round_: RoundAccumulator, update: ClientUpdate) -> UpdateRejected:
    """The full check's reason for an update found holding inf/NaN (it names the tensor and the count)."""
    try:
        round_.optimizer.check_update(round_.weights, update, round_idx=round_.round_idx)
    except UpdateRejected as exc:
        return exc
    return UpdateRejected("non-finite values (inf or NaN)", rank=update.rank, round_idx=round_.round_idx)
