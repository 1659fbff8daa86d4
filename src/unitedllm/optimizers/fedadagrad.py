"""FedAdagrad: adaptive server optimizer with the Adagrad second-moment rule.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2 (FedAdagrad):

    v ← v + Δ²

on top of the shared update in :mod:`unitedllm.optimizers.adaptive` (defaults: η = 1e-2,
β1 = 0.9, τ = 1e-3; β2 is unused).
"""

from __future__ import annotations

import torch

from unitedllm.optimizers.adaptive import AdaptiveOptimizer

__all__ = ["FedAdagrad"]


class FedAdagrad(AdaptiveOptimizer):
    """Server-side Adagrad on the round's mean delta."""

    name = "FedAdagrad"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v.add_(d2)
