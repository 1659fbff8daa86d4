"""The shared update of Reddi et al.'s adaptive server optimizers (FedAdagrad, FedAdam, FedYogi).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2. With the round's
mean delta Δ (sample-weighted here unless ``sample_weighted: false``; the paper averages
uniformly):

    m ← β1 m + (1 − β1) Δ
    v ← (rule-specific, see each subclass)
    w ← w + η m / (√v + τ)

with m₀ = 0 and v₀ = τ² (the paper requires v₋₁ ≥ τ²), no bias correction. State:
``m/<name>`` and ``v/<name>``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch

from unitedllm.optimizers.base import Tensors
from unitedllm.optimizers.builtin import AdagradParams
from unitedllm.optimizers.mean import MeanRuleOptimizer, RoundSummary, apply_step, state_dtype

__all__ = ["AdaptiveOptimizer"]


class AdaptiveOptimizer(MeanRuleOptimizer):
    """FedOpt with a per-coordinate second-moment rule supplied by the subclass."""

    params: AdagradParams

    def init_state(self, weights: Mapping[str, torch.Tensor]) -> Tensors:
        tau = self.params.tau
        state: Tensors = {}
        for n, w in weights.items():
            state[f"m/{n}"] = torch.zeros(w.shape, dtype=state_dtype(w))
            state[f"v/{n}"] = torch.full(w.shape, tau * tau, dtype=state_dtype(w))
        return state

    @abc.abstractmethod
    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """New v from the previous v and Δ² (float64; may work in place on ``v``)."""

    def apply(
        self,
        weights: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        state: Tensors,
        summary: RoundSummary,
    ) -> tuple[Tensors, Tensors]:
        lr = self.params.server_learning_rate
        beta1 = self.params.beta1
        tau = self.params.tau
        new_state = dict(state)
        steps: dict[str, torch.Tensor] = {}
        for name, w in weights.items():
            d = mean_delta[name]
            prev_m = state.get(f"m/{name}")
            prev_v = state.get(f"v/{name}")
            m = torch.zeros_like(d) if prev_m is None else prev_m.to(torch.float64, copy=True)
            v = torch.full_like(d, tau * tau) if prev_v is None else prev_v.to(torch.float64, copy=True)
            m.mul_(beta1).add_(d, alpha=1.0 - beta1)
            v = self.second_moment(v, d * d)
            steps[name] = m * lr / (v.sqrt() + tau)
            new_state[f"m/{name}"] = m.to(state_dtype(w))
            new_state[f"v/{name}"] = v.to(state_dtype(w))
        return apply_step(weights, steps), new_state
