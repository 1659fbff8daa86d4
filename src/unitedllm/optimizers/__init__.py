"""Server optimizers: the interface, the registry and the built-in rules.

Built in: FedAvg (and FedProx, which aggregates like it), FedAvgM, FedAdam, FedYogi,
FedAdagrad, DiLoCo, SCAFFOLD, and the robust FedMedian, TrimmedMean, Krum, MultiKrum.
"""

from unitedllm.optimizers.base import (
    ClientUpdate,
    RoundAccumulator,
    ServerOptimizer,
    available,
    create,
    register,
)

__all__ = ["ClientUpdate", "RoundAccumulator", "ServerOptimizer", "available", "create", "register"]
