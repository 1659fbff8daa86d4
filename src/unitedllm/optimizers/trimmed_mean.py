"""Trimmed mean: per coordinate, drop the k largest and k smallest client values, average the rest.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018 (coordinate-wise trimmed mean). k = ⌊β N⌋ with
β = ``trim_ratio`` (default 0.1); clients count equally. The step is
``server_learning_rate`` (default 1) x the trimmed mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from unitedllm.optimizers.base import ClientUpdate, Tensors
from unitedllm.optimizers.buffered import RobustOptimizer, coordinatewise
from unitedllm.optimizers.builtin import TrimmedMeanParams

__all__ = ["TrimmedMean"]


class TrimmedMean(RobustOptimizer):
    """Coordinate-wise β-trimmed mean of the deltas."""

    name = "TrimmedMean"
    params: TrimmedMeanParams

    def combine(self, weights: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> Tensors:
        n = len(updates)
        k = math.floor(self.params.trim_ratio * n)

        def trimmed(block: torch.Tensor) -> torch.Tensor:
            return block[k : n - k].mean(dim=0)

        return {name: coordinatewise([u.delta[name] for u in updates], trimmed) for name in weights}
