"""FedAvg: the sample-count-weighted mean of client models.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. With deltas Δ_k = w_k − w and weights n_k / Σn, the new global is
w + η Σ (n_k / Σn) Δ_k with server learning rate η = 1 (FedAvg proper; another η is
Reddi et al.'s "FedAvg with server learning rate"). The weighted sum is exact, so the
result does not depend on arrival order; the step is taken in float64 and cast back to
each tensor's dtype.

``FedProx`` aggregates exactly like FedAvg (:mod:`unitedllm.optimizers.fedprox`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from unitedllm.optimizers.base import Tensors
from unitedllm.optimizers.mean import MeanRuleOptimizer, RoundSummary, apply_step, scaled

__all__ = ["FedAvg"]


class FedAvg(MeanRuleOptimizer):
    """Sample-weighted averaging of client updates (server learning rate 1)."""

    name = "FedAvg"

    def plain_step_scale(self) -> float:
        return self.params.server_learning_rate

    def apply(
        self,
        weights: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        state: Tensors,
        summary: RoundSummary,
    ) -> tuple[Tensors, Tensors]:
        return apply_step(weights, scaled(mean_delta, self.plain_step_scale())), state
