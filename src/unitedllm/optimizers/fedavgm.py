"""FedAvgM: FedAvg with server momentum.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019. With the weighted mean delta Δ̄:

    v ← β v + Δ̄                      (heavy ball; β = server_momentum, default 0.9)
    w ← w + η v                       (η = server_learning_rate, default 1)

With ``nesterov: true`` the step is η (Δ̄ + β v) instead. State: ``momentum/<name>``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from unitedllm.optimizers.base import Tensors
from unitedllm.optimizers.builtin import MomentumParams
from unitedllm.optimizers.mean import MeanRuleOptimizer, RoundSummary, apply_step, state_dtype

__all__ = ["FedAvgM", "momentum_step"]


def momentum_step(
    weights: Mapping[str, torch.Tensor],
    pseudo_grad: Mapping[str, torch.Tensor],
    state: Tensors,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
) -> tuple[Tensors, Tensors]:
    """SGD with momentum ascending along ``pseudo_grad`` (the mean delta); shared with DiLoCo."""
    steps: dict[str, torch.Tensor] = {}
    new_state = dict(state)
    for name, w in weights.items():
        key = f"momentum/{name}"
        d = pseudo_grad[name]
        prev = state.get(key)
        v = d.clone() if prev is None else prev.to(torch.float64, copy=True).mul_(momentum).add_(d)
        step = d + momentum * v if nesterov else v
        steps[name] = step * lr  # not in place: v is the new state
        new_state[key] = v.to(state_dtype(w))
    return apply_step(weights, steps), new_state


class FedAvgM(MeanRuleOptimizer):
    """Weighted mean delta fed to server-side SGD with momentum."""

    name = "FedAvgM"
    params: MomentumParams

    def init_state(self, weights: Mapping[str, torch.Tensor]) -> Tensors:
        return {f"momentum/{n}": torch.zeros(w.shape, dtype=state_dtype(w)) for n, w in weights.items()}

    def apply(
        self,
        weights: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        state: Tensors,
        summary: RoundSummary,
    ) -> tuple[Tensors, Tensors]:
        return momentum_step(
            weights,
            mean_delta,
            state,
            lr=self.params.server_learning_rate,
            momentum=self.params.server_momentum,
            nesterov=self.params.nesterov,
        )
