"""Krum and Multi-Krum: keep the updates closest to their neighbours, drop outliers.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017. With n updates of which at most
f = ``num_byzantine`` are bad, each update's score is the sum of squared distances to
its n − f − 2 nearest other updates; Krum takes the best-scored update, Multi-Krum
(``multi_krum_m`` = m) the plain mean of the m best. Ties go to the lower rank. The
guarantee needs n > 2f + 2; with fewer updates the neighbourhood shrinks to at least one
(logged). The step is ``server_learning_rate`` (default 1) x the result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from unitedllm.optimizers.base import ClientUpdate, Tensors
from unitedllm.optimizers.buffered import RobustOptimizer
from unitedllm.optimizers.builtin import KrumParams
from unitedllm.optimizers.exact_sum import ExactSum

__all__ = ["Krum", "krum_scores", "pairwise_sq_distances"]

log = logging.getLogger("unitedllm.optimizers")

_SLICE = 1 << 22


def pairwise_sq_distances(
    weights: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
) -> torch.Tensor:
    """(n, n) float64 matrix of squared L2 distances between the updates' deltas."""
    n = len(updates)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for name in weights:
        flat = [u.delta[name].reshape(-1) for u in updates]
        for start in range(0, flat[0].numel(), _SLICE):
            block = [f[start : start + _SLICE].to(torch.float64) for f in flat]
            for i in range(n):
                for j in range(i + 1, n):
                    dist[i, j] += (block[i] - block[j]).square().sum()
    return dist + dist.T


def krum_scores(dist: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Each update's sum of squared distances to its n − f − 2 nearest others (at least one)."""
    n = dist.shape[0]
    closest = max(1, n - num_byzantine - 2)
    if n - num_byzantine - 2 < 1 and n > 1:
        log.warning(
            "Krum with %d updates and num_byzantine=%d: needs n > 2f + 2; using 1 neighbour", n, num_byzantine
        )
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    others = dist[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    return others.sort(dim=1).values[:, : min(closest, n - 1)].sum(dim=1)


class Krum(RobustOptimizer):
    """Krum (m = 1) or Multi-Krum (m = ``multi_krum_m``)."""

    name = "Krum"
    params: KrumParams

    def selected_count(self, n: int) -> int:
        """How many best-scored updates to average: ``multi_krum_m`` (default 1), at most n."""
        return max(1, min(self.params.multi_krum_m or 1, n))

    def combine(self, weights: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> Tensors:
        scores = krum_scores(pairwise_sq_distances(weights, updates), self.params.num_byzantine)
        m = self.selected_count(len(updates))
        # Stable sort on the score keeps rank order among ties (updates arrive sorted by rank).
        chosen = sorted(range(len(updates)), key=lambda i: (float(scores[i]), i))[:m]
        log.info("Krum kept ranks %s", [updates[i].rank for i in sorted(chosen)])
        out: Tensors = {}
        for name, w in weights.items():
            acc = ExactSum(w.shape)
            acc.add([updates[i].delta[name] for i in chosen], [1] * m)
            out[name] = acc.result().div_(m)
        return out


class MultiKrum(Krum):
    """Multi-Krum: averages ``multi_krum_m`` best-scored updates (default n − f)."""

    name = "MultiKrum"

    def selected_count(self, n: int) -> int:
        m = self.params.multi_krum_m or n - self.params.num_byzantine
        return max(1, min(m, n))
