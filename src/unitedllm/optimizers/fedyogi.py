"""FedYogi: adaptive server optimizer with the Yogi second-moment rule.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2 (FedYogi):

    v ← v − (1 − β2) Δ² sign(v − Δ²)

on top of the shared update in :mod:`unitedllm.optimizers.adaptive` (defaults: η = 1e-2,
β1 = 0.9, β2 = 0.99, τ = 1e-3).
"""

from __future__ import annotations

import torch

from unitedllm.optimizers.adaptive import AdaptiveOptimizer
from unitedllm.optimizers.builtin import AdamParams

__all__ = ["FedYogi"]


class FedYogi(AdaptiveOptimizer):
    """Server-side Yogi on the round's mean delta."""

    name = "FedYogi"
    params: AdamParams

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        beta2 = self.params.beta2
        return v.sub_((1.0 - beta2) * d2 * torch.sign(v - d2))
