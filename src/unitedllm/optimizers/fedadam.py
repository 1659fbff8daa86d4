"""FedAdam: adaptive server optimizer with the Adam second-moment rule.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2 (FedAdam):

    v ← β2 v + (1 − β2) Δ²

on top of the shared update in :mod:`unitedllm.optimizers.adaptive` (defaults: η = 1e-2,
β1 = 0.9, β2 = 0.99, τ = 1e-3).
"""

from __future__ import annotations

import torch

from unitedllm.optimizers.adaptive import AdaptiveOptimizer
from unitedllm.optimizers.builtin import AdamParams

__all__ = ["FedAdam"]


class FedAdam(AdaptiveOptimizer):
    """Server-side Adam on the round's mean delta."""

    name = "FedAdam"
    params: AdamParams

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        beta2 = self.params.beta2
        return v.mul_(beta2).add_(d2, alpha=1.0 - beta2)
