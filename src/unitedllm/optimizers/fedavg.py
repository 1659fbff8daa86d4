"""FedAvg: the sample-count-weighted mean of client models.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. With deltas Δ_k = w_k − w and weights n_k / Σn, the new global is
w + η Σ (n_k / Σn) Δ_k with server learning rate η = 1 (FedAvg proper; another η is
Reddi et al.'s "FedAvg with server learning rate"). The weighted sum is exact, so the
result does not depend on arrival order; the step is taken in float64 and cast back to
each tensor's dtype.

``FedProx`` (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020)
aggregates exactly like FedAvg; its proximal term lives in the clients' local loss
(:func:`unitedllm.optimizers.client_side.proximal_term`, weight ``proximal_mu``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from unitedllm.errors import RoundError
from unitedllm.optimizers.base import ClientUpdate, Tensors, register
from unitedllm.optimizers.exact_sum import ExactSum
from unitedllm.optimizers.mean import MeanRuleOptimizer, RoundSummary, apply_step, scaled

__all__ = ["FedAvg", "FedProx", "weighted_mean_delta"]


def weighted_mean_delta(
    weights: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
) -> dict[str, torch.Tensor]:
    """Σ (n_k / Σn) Δ_k per tensor in float64 (exact sum, rounded once, then divided)."""
    if not updates:
        raise RoundError("no client updates to aggregate")
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise RoundError("client updates carry no samples (num_samples sum to 0)")
    ns = [u.num_samples for u in updates]
    mean: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        acc = ExactSum(w.shape)
        acc.add([u.delta[name] for u in updates], ns)
        mean[name] = acc.result().div_(total)
    return mean


@register
class FedAvg(MeanRuleOptimizer):
    """Sample-weighted averaging of client updates (server learning rate 1)."""

    name = "FedAvg"
    defaults = {"server_learning_rate": 1.0}

    def plain_step_scale(self) -> float:
        return float(self.hparam("server_learning_rate"))

    def apply(
        self,
        weights: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        state: Tensors,
        summary: RoundSummary,
    ) -> tuple[Tensors, Tensors]:
        return apply_step(weights, scaled(mean_delta, self.plain_step_scale())), state


@register
class FedProx(FedAvg):
    """FedAvg aggregation for clients training with FedProx's proximal term."""

    name = "FedProx"
