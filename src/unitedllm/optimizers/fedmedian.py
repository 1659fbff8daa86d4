"""FedMedian: the coordinate-wise median of the client deltas, robust to a minority of bad clients.

Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018 (coordinate-wise median). Clients count equally,
whatever their sample counts; with an even number of clients the median is the mean of
the two middle values. The step is ``server_learning_rate`` (default 1) x the median.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from unitedllm.optimizers.base import ClientUpdate, Tensors
from unitedllm.optimizers.buffered import RobustOptimizer, coordinatewise

__all__ = ["FedMedian", "median_of_sorted"]


def median_of_sorted(block: torch.Tensor) -> torch.Tensor:
    """Median along dim 0 of values already sorted along dim 0."""
    n = block.shape[0]
    if n % 2:
        return block[n // 2]
    return (block[n // 2 - 1] + block[n // 2]) / 2


class FedMedian(RobustOptimizer):
    """Coordinate-wise median of the deltas."""

    name = "FedMedian"

    def combine(self, weights: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> Tensors:
        return {n: coordinatewise([u.delta[n] for u in updates], median_of_sorted) for n in weights}
