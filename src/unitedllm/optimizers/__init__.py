"""Server optimizers: the interface, the registry and the built-in rules."""

from unitedllm.optimizers.base import ClientUpdate, ServerOptimizer, available, create, register

__all__ = ["ClientUpdate", "ServerOptimizer", "available", "create", "register"]
