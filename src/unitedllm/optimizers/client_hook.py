"""The client half of a federated algorithm: what local training adds to its plain steps.

An algorithm that changes local training (FedProx's proximal term, SCAFFOLD's control variates)
registers a :class:`ClientHook` beside its server rule. Each round the hook turns the round
start (global weights, the extras the server rule sent) into a :class:`LocalCorrection` that
the trainer applies to every optimizer step's gradients, and afterwards into the extras sent
back with the update. :class:`ClientAlgorithm` is what a client holds: the run's hook, or
none, and the checks that both sides and the trainer agree.

A trainer applies a correction by calling ``correction.apply(params, learning_rate)`` once per
optimizer step, after gradient accumulation (and clipping) and before the step, and says so
with ``LocalTrainer.applies_corrections``. A run whose algorithm needs a correction stops with
a config error on a trainer that does not apply them, instead of silently training FedAvg.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from unitedllm.errors import ConfigError, ConfigProblem, ProtocolError, TrainingError
from unitedllm.optimizers.algorithms import RuleParams, algorithm

if TYPE_CHECKING:
    from unitedllm.config.types import Config

__all__ = ["ClientAlgorithm", "ClientHook", "LocalCorrection", "Tensors"]

Tensors = dict[str, torch.Tensor]


class LocalCorrection(abc.ABC):
    """A change to every optimizer step's gradients during one local round; counts the steps it saw."""

    def __init__(self) -> None:
        self.steps = 0
        self.learning_rate_sum = 0.0

    def apply(self, params: Mapping[str, torch.Tensor], learning_rate: float) -> None:
        """Add this step's correction to each ``param.grad``: once per optimizer step, just before it."""
        with torch.no_grad():
            for name, p in params.items():
                correction = self._correction(name, p)
                if p.grad is None:
                    p.grad = correction.clone()
                else:
                    p.grad.add_(correction)
        self.steps += 1
        self.learning_rate_sum += float(learning_rate)

    @abc.abstractmethod
    def _correction(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """What to add to ``param``'s gradient now (same shape, dtype and device as ``param``)."""

    @staticmethod
    def _lookup(tensors: dict[str, torch.Tensor], name: str, param: torch.Tensor, what: str) -> torch.Tensor:
        """``tensors[name]`` on ``param``'s device and dtype (converted once, then cached)."""
        try:
            t = tensors[name]
        except KeyError:
            raise TrainingError(f"{what} has no tensor for the trained parameter {name!r}") from None
        if t.device != param.device or t.dtype != param.dtype:
            t = tensors[name] = t.to(device=param.device, dtype=param.dtype)
        return t


class ClientHook(abc.ABC):
    """What one client adds to local training round after round for one algorithm.

    ``folder`` is the client's own place for what must survive a restart (SCAFFOLD's c_i).
    """

    #: Round-start extras groups this hook reads (any other group means the two sides' configs differ).
    reads_extras: ClassVar[frozenset[str]] = frozenset()
    #: Extras groups it sends with each update (what its server rule's ``required_extras`` checks).
    sends_extras: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: RuleParams, folder: Path):
        self.params = params
        self.folder = Path(folder)

    @property
    def active(self) -> bool:
        """Whether local training changes at all with these parameters (FedProx with μ = 0 does not)."""
        return True

    def describe(self) -> str:
        """How errors name this algorithm and its setting (``FedProx (proximal_mu 0.5)``)."""
        return type(self).__name__

    @abc.abstractmethod
    def begin_round(
        self,
        round_idx: int,
        weights: Mapping[str, torch.Tensor],
        extras: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> LocalCorrection:
        """The correction for this round's local training."""

    def finish_round(
        self, round_idx: int, correction: LocalCorrection, weights: Mapping[str, torch.Tensor]
    ) -> dict[str, Tensors]:
        """Groups of tensors to send with the update, keyed like ``Update.extras`` (none by default)."""
        return {}


class ClientAlgorithm:
    """A client's side of the run's algorithm: its hook, or plain local training."""

    def __init__(self, cfg: Config, folder: Path):
        self.optimizer_name = cfg.server_optimizer_name
        self.optimizer_key = (
            "train_args.server_optimizer"
            if cfg.train_args.server_optimizer
            else "train_args.federated_optimizer"
        )
        alg = algorithm(self.optimizer_name, path=self.optimizer_key)
        hook_cls = alg.hook_class()
        hook = (
            None
            if hook_cls is None
            else hook_cls(alg.parameters(cfg.train_args.server_optimizer_args), folder)
        )
        self.hook: ClientHook | None = hook if hook is not None and hook.active else None

    @property
    def name(self) -> str | None:
        """The algorithm whose correction local training applies, or None for plain training."""
        return None if self.hook is None else self.optimizer_name

    def check(self, trainer: Any) -> None:
        """ConfigError unless ``trainer`` applies this run's correction (a custom trainer may not)."""
        if (
            self.hook is None
            or trainer.applies_corrections
            or self.optimizer_name in trainer.client_algorithms
        ):
            return
        raise ConfigError(
            ConfigProblem(
                self.optimizer_key,
                f"{self.hook.describe()} changes the clients' local training, but the local trainer "
                f"{type(trainer).__name__} does not apply it (its applies_corrections is false); use the "
                "Hugging Face trainer, set applies_corrections = True on the trainer and call "
                "correction.apply() before each optimizer step, or choose another server optimizer",
            )
        )

    def begin_round(
        self,
        round_idx: int,
        weights: Mapping[str, torch.Tensor],
        extras: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> LocalCorrection | None:
        """The correction for this round's local training (None: plain training)."""
        reads = self.hook.reads_extras if self.hook is not None else frozenset()
        for group in extras:
            if group not in reads:
                raise ProtocolError(
                    f"round {round_idx}: the aggregator sends {group!r} extras, which this client's algorithm "
                    f"{self.optimizer_name} ({self.optimizer_key}) does not read; give both sides the same config"
                )
        return None if self.hook is None else self.hook.begin_round(round_idx, weights, extras)

    def finish_round(
        self,
        round_idx: int,
        correction: LocalCorrection | None,
        weights: Mapping[str, torch.Tensor],
    ) -> dict[str, Tensors]:
        """Groups of tensors to send with the update (SCAFFOLD: ``control`` = Δc_i)."""
        if self.hook is None or correction is None:
            return {}
        return self.hook.finish_round(round_idx, correction, weights)
