"""FedAvg: the sample-count-weighted mean of client models.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017. With deltas Δ_k = w_k − w and weights n_k / Σn, the new global is
w + Σ (n_k / Σn) Δ_k, accumulated in float64 in rank order so the result does not depend
on arrival order, then cast back to each tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from unitedllm.errors import RoundError
from unitedllm.optimizers.base import ClientUpdate, ServerOptimizer, Tensors, register

__all__ = ["FedAvg", "weighted_mean_delta"]


def weighted_mean_delta(
    weights: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
) -> dict[str, torch.Tensor]:
    """Σ (n_k / Σn) Δ_k per tensor, in float64, summed in rank order."""
    if not updates:
        raise RoundError("no client updates to aggregate")
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise RoundError("client updates carry no samples (num_samples sum to 0)")
    ordered = sorted(updates, key=lambda u: u.rank)
    mean: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        acc = torch.zeros(w.shape, dtype=torch.float64)
        for u in ordered:
            acc.add_(u.delta[name].to(torch.float64), alpha=u.num_samples / total)
        mean[name] = acc
    return mean


@register
class FedAvg(ServerOptimizer):
    """Sample-weighted averaging of client updates (server learning rate 1)."""

    name = "FedAvg"

    def step(
        self, weights: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], state: Tensors
    ) -> tuple[Tensors, Tensors]:
        mean = weighted_mean_delta(weights, updates)
        new = {n: (w.to(torch.float64) + mean[n]).to(w.dtype) for n, w in weights.items()}
        return new, state
