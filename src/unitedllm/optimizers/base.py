"""The server optimizer interface: pure functions of (global weights, client updates, state).

A server optimizer does no I/O and no client sampling. It receives the global weights,
the round's client updates (deltas: local weights minus the global weights they started
from) and its own state, and returns the new global weights and the new state. State is
a flat dict of tensors so it can be checkpointed with safetensors next to the model.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from unitedllm.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    import torch

    from unitedllm.config.types import ServerOptimizerArgs

__all__ = ["ClientUpdate", "ServerOptimizer", "Tensors", "available", "create", "register"]

Tensors = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round."""

    rank: int
    delta: Mapping[str, "torch.Tensor"]
    num_samples: int


class ServerOptimizer(abc.ABC):
    """Turns a round's client updates into the next global weights."""

    name: ClassVar[str]

    def __init__(self, args: ServerOptimizerArgs):
        self.args = args

    def init_state(self, weights: Mapping[str, "torch.Tensor"]) -> Tensors:
        """The optimizer state before the first round (empty for stateless rules)."""
        return {}

    @abc.abstractmethod
    def step(
        self, weights: Mapping[str, "torch.Tensor"], updates: Sequence[ClientUpdate], state: Tensors
    ) -> tuple[Tensors, Tensors]:
        """New global weights and new state. ``updates`` arrive sorted by rank."""


_REGISTRY: dict[str, type[ServerOptimizer]] = {}


def register(cls: type[ServerOptimizer]) -> type[ServerOptimizer]:
    """Class decorator adding a server optimizer under ``cls.name`` (case-insensitive)."""
    key = cls.name.lower()
    if key in _REGISTRY:
        raise ValueError(f"server optimizer {cls.name!r} is already registered")
    _REGISTRY[key] = cls
    return cls


def _load_builtins() -> None:
    from unitedllm.optimizers import fedavg  # noqa: F401


def available() -> list[str]:
    """Names of every registered server optimizer."""
    _load_builtins()
    return sorted(cls.name for cls in _REGISTRY.values())


def create(name: str, args: ServerOptimizerArgs, *, path: str = "train_args.server_optimizer") -> ServerOptimizer:
    """The server optimizer called ``name``; an unknown name is a ConfigError listing the choices."""
    _load_builtins()
    try:
        return _REGISTRY[name.lower()](args)
    except KeyError:
        raise ConfigError(
            ConfigProblem(path, f"unknown server optimizer {name!r}; choose one of {', '.join(available())}")
        ) from None
