"""Federated algorithms: the registry, the server-optimizer interface and the built-in rules.

Built in (:mod:`unitedllm.optimizers.builtin`): FedAvg, FedProx, SCAFFOLD, FedAvgM, DiLoCo,
FedAdam, FedYogi, FedAdagrad, and the robust FedMedian, TrimmedMean, Krum, MultiKrum. Importing
this package does not import torch; a rule loads (with torch) when it is created.
"""

from unitedllm.optimizers import builtin as _builtin  # noqa: F401 - registers the built-in algorithms
from unitedllm.optimizers.algorithms import Algorithm, RuleParams, algorithm, available, register_algorithm
from unitedllm.optimizers.base import (
    ClientUpdate,
    RoundAccumulator,
    ServerOptimizer,
    create,
    register,
)

__all__ = [
    "Algorithm",
    "ClientUpdate",
    "RoundAccumulator",
    "RuleParams",
    "ServerOptimizer",
    "algorithm",
    "available",
    "create",
    "register",
    "register_algorithm",
]
