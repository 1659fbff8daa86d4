"""The server optimizer interface: pure functions of (global weights, client updates, state).

A server optimizer does no I/O and no client sampling. It receives the global weights,
the round's client updates (deltas: local weights minus the global weights they started
from) and its own state, and returns the new global weights and the new state. State is
a flat dict of tensors keyed ``"<slot>/<parameter name>"`` so it can be checkpointed with
safetensors next to the model, and a resumed run continues exactly.

Two ways to drive one:

* ``step(weights, updates, state)``: every update of the round at once (convenience).
* streaming: ``acc = opt.begin_round(weights, state)``, then ``acc.add(update)`` as each
  update arrives, in any order, then ``acc.finish()``. Rules that need only the weighted
  mean (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, DiLoCo, SCAFFOLD) fold each update
  into an exact accumulator and keep ~16 bytes per parameter whatever the number of
  clients; robust rules (median, trimmed mean, Krum) must see all updates and buffer them.
  Either way the result is byte-identical whatever the arrival order.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from unitedllm.errors import RoundError, UpdateRejected
from unitedllm.optimizers.algorithms import Algorithm, RuleParams, algorithm, available, register_algorithm

if TYPE_CHECKING:
    import torch

__all__ = [
    "ClientUpdate",
    "HoldingRound",
    "RoundAccumulator",
    "ServerOptimizer",
    "Tensors",
    "algorithm",
    "available",
    "create",
    "register",
]

log = logging.getLogger("unitedllm.optimizers")

Tensors = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round.

    ``extras`` carries algorithm-specific tensors sent with the update, e.g. SCAFFOLD's
    control-variate deltas under ``"control/<parameter name>"``.
    """

    rank: int
    delta: Mapping[str, torch.Tensor]
    num_samples: int
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)


class RoundAccumulator(abc.ABC):
    """One round of aggregation: ``add`` updates in any order, then ``finish`` once."""

    #: ``_accept`` itself refuses updates holding inf/NaN, found while folding them in (no
    #: separate pass over each update); otherwise they are checked before ``_accept``.
    checks_finite: ClassVar[bool] = False

    def __init__(
        self,
        optimizer: ServerOptimizer,
        weights: Mapping[str, torch.Tensor],
        state: Tensors,
        *,
        round_idx: int | None = None,
    ):
        self.optimizer = optimizer
        self.weights = weights
        self.state = state
        self.round_idx = round_idx
        self.accepted: list[int] = []
        self._finished = False

    def add(self, update: ClientUpdate) -> None:
        """Check ``update`` and count it; raises UpdateRejected (and logs why) leaving the round untouched."""
        self.add_many([update], raise_on_reject=True)

    def add_many(
        self, updates: Iterable[ClientUpdate], *, raise_on_reject: bool = False
    ) -> list[UpdateRejected]:
        """Add several updates in one pass (faster); rejected ones are logged and returned, not counted."""
        if self._finished:
            raise RoundError("this round was already finished; begin a new one")
        good: list[ClientUpdate] = []
        rejected: list[UpdateRejected] = []
        seen = set(self.accepted)
        for u in updates:
            try:
                if u.rank in seen:
                    raise UpdateRejected(
                        "a second update from the same rank", rank=u.rank, round_idx=self.round_idx
                    )
                self.optimizer.check_update(
                    self.weights, u, round_idx=self.round_idx, finite=not self.checks_finite
                )
            except UpdateRejected as exc:
                log.warning("%s", exc)
                if raise_on_reject:
                    raise
                rejected.append(exc)
                continue
            seen.add(u.rank)
            good.append(u)
        refused = self._accept(good) if good else {}
        for u in good:
            if u.rank in refused:
                log.warning("%s", refused[u.rank])
                rejected.append(refused[u.rank])
            else:
                self.accepted.append(u.rank)
        if rejected and raise_on_reject:
            raise rejected[0]
        return rejected

    def finish(self) -> tuple[Tensors, Tensors]:
        """New global weights and new state; RoundError when no update was accepted."""
        if self._finished:
            raise RoundError("this round was already finished")
        if not self.accepted:
            raise RoundError(f"no valid client update to aggregate in round {self.round_idx}")
        self._finished = True
        return self._finish()

    @abc.abstractmethod
    def _accept(self, updates: Sequence[ClientUpdate]) -> Mapping[int, UpdateRejected]:
        """Fold already-checked updates in; those refused while folding (by rank) leave no trace."""

    @abc.abstractmethod
    def _finish(self) -> tuple[Tensors, Tensors]:
        """Compute the round's result from what was accepted."""


class HoldingRound(RoundAccumulator):
    """A round that keeps every accepted update until ``finish`` (for rules that need them all at once)."""

    def __init__(
        self,
        optimizer: ServerOptimizer,
        weights: Mapping[str, torch.Tensor],
        state: Tensors,
        *,
        round_idx: int | None = None,
    ):
        super().__init__(optimizer, weights, state, round_idx=round_idx)
        self._updates: list[ClientUpdate] = []

    def _accept(self, updates: Sequence[ClientUpdate]) -> Mapping[int, UpdateRejected]:
        self._updates.extend(updates)
        return {}


class ServerOptimizer(abc.ABC):
    """Turns a round's client updates into the next global weights.

    A rule is registered with its hyper-parameters and client hook as one
    :class:`~unitedllm.optimizers.algorithms.Algorithm` (the built-ins in
    :mod:`unitedllm.optimizers.builtin`, your own with :func:`register`).
    """

    name: ClassVar[str]
    #: The hyper-parameters this rule takes (used by :func:`register`; built-ins name theirs at registration).
    params_type: ClassVar[type[RuleParams]] = RuleParams
    #: What the rule adds to local training (a ClientHook class or ``"module:Class"``), used by :func:`register`.
    client_hook: ClassVar[str | type | None] = None

    def __init__(self, params: RuleParams, *, num_clients: int | None = None):
        self.params = params
        self.num_clients = num_clients

    def hparam(self, key: str) -> Any:
        """The hyper-parameter ``key`` as this rule uses it (its paper's default when the config left it unset)."""
        return getattr(self.params, key)

    def round_start_extras(self, state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Groups of named tensors every client of the next round gets beside the weights (SCAFFOLD's c)."""
        return {}

    def init_state(self, weights: Mapping[str, torch.Tensor]) -> Tensors:
        """The optimizer state before the first round (empty for stateless rules)."""
        return {}

    def required_extras(self, weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """Tensors each update must carry in ``extras`` (name -> a tensor of the right shape/dtype)."""
        return {}

    def check_update(
        self,
        weights: Mapping[str, torch.Tensor],
        update: ClientUpdate,
        *,
        round_idx: int | None = None,
        finite: bool = True,
    ) -> None:
        """Raise UpdateRejected unless ``update`` can be counted (names, shapes, dtypes, finite values).

        ``finite=False`` leaves out the inf/NaN check (a pass over every value), for rounds
        that check while folding the update in.
        """
        from unitedllm.optimizers.validation import validate_num_samples, validate_update

        validate_num_samples(update.num_samples, rank=update.rank, round_idx=round_idx)
        validate_update(weights, update.delta, rank=update.rank, round_idx=round_idx, finite=finite)
        required = self.required_extras(weights)
        if required:
            validate_update(
                required, update.extras, rank=update.rank, round_idx=round_idx, what="extras", finite=finite
            )

    @abc.abstractmethod
    def begin_round(
        self, weights: Mapping[str, torch.Tensor], state: Tensors, *, round_idx: int | None = None
    ) -> RoundAccumulator:
        """An accumulator for one round starting from ``weights`` and ``state``."""

    def step(
        self,
        weights: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        state: Tensors,
        *,
        round_idx: int | None = None,
    ) -> tuple[Tensors, Tensors]:
        """New global weights and new state from all of a round's updates.

        Invalid updates are logged and left out (they do not poison the round); RoundError
        when none is valid.
        """
        acc = self.begin_round(weights, state, round_idx=round_idx)
        acc.add_many(sorted(updates, key=lambda u: u.rank))
        return acc.finish()


def register(cls: type[ServerOptimizer]) -> type[ServerOptimizer]:
    """Class decorator registering a server rule, with its ``params_type`` and ``client_hook``, under ``cls.name``."""
    register_algorithm(Algorithm(cls.name, cls.params_type, cls, cls.client_hook))
    return cls


def create(
    name: str,
    args: Any = None,
    *,
    num_clients: int | None = None,
    path: str = "train_args.server_optimizer",
) -> ServerOptimizer:
    """The server optimizer called ``name`` with its parameters from ``args``; a ConfigError for a bad name or key.

    ``args`` is FedML's flat ``server_optimizer_args`` section, the rule's own parameter Struct, a
    mapping or None (every parameter at its paper's default). ``num_clients`` is
    ``train_args.client_num_in_total`` (SCAFFOLD scales its control variate by the participating
    fraction).
    """
    alg = algorithm(name, path=path)
    return alg.rule_class()(alg.parameters(args), num_clients=num_clients)
