"""Round bookkeeping: which clients a round samples, and when rounds test, save and aggregate.

All of it follows FedML's UnitedLLM semantics:
- a round is a *test round* when ``round % frequency_of_the_test == 0`` or it is the last;
- ``test_on_clients: after_aggregation`` has the test clients evaluate the aggregated model of
  each test round (they do it when the next round, or the final ``Finish``, delivers it);
  ``before_aggregation`` has them evaluate their own model right after local training;
- ``save_frequency`` null or negative saves at every test round, 0 never saves intermediate
  rounds (FedML divides by zero there), k saves every k-th round; the last round is always saved.
An empty ``test_on_client_ranks`` means every client tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from unitedllm.config.types import Config

__all__ = ["RoundPlan", "RoundSummary", "RunResult", "sample_clients", "weighted_mean"]


def sample_clients(round_idx: int, *, total: int, per_round: int, seed: int) -> list[int]:
    """The ranks (1..total) that train in ``round_idx``: seeded by (seed, round), sorted."""
    if per_round >= total:
        return list(range(1, total + 1))
    rng = np.random.default_rng([seed, round_idx])
    chosen = rng.choice(total, size=per_round, replace=False) + 1
    return sorted(int(r) for r in chosen)


@dataclass(frozen=True)
class RoundPlan:
    """When a run's rounds test and save, and how many updates a round needs."""

    comm_round: int
    test_frequency: int
    test_on_clients: str
    test_ranks: frozenset[int]
    save_frequency: int | None
    min_updates: int | None

    @classmethod
    def from_config(cls, cfg: Config) -> RoundPlan:
        v = cfg.validation_args
        total = cfg.train_args.client_num_in_total
        ranks = (
            frozenset(v.test_on_client_ranks) if v.test_on_client_ranks else frozenset(range(1, total + 1))
        )
        return cls(
            comm_round=cfg.train_args.comm_round,
            test_frequency=v.frequency_of_the_test,
            test_on_clients=v.test_on_clients,
            test_ranks=ranks,
            save_frequency=v.save_frequency,
            min_updates=cfg.comm_args.min_updates_per_round,
        )

    def is_test_round(self, round_idx: int) -> bool:
        return round_idx % self.test_frequency == 0 or round_idx == self.comm_round - 1

    def clients_evaluate_global(self, round_idx: int, rank: int | None = None) -> bool:
        """Whether clients evaluate the global model they receive at the start of ``round_idx``.

        That model is the aggregate of round ``round_idx - 1``; ``round_idx == comm_round`` is the final model.
        """
        if rank is not None and rank not in self.test_ranks:
            return False
        return (
            self.test_on_clients in ("after_aggregation", "both")
            and round_idx >= 1
            and self.is_test_round(round_idx - 1)
        )

    def clients_evaluate_local(self, round_idx: int, rank: int | None = None) -> bool:
        """Whether clients evaluate their own model after local training in ``round_idx``."""
        if rank is not None and rank not in self.test_ranks:
            return False
        return self.test_on_clients in ("before_aggregation", "both") and self.is_test_round(round_idx)

    def should_save(self, round_idx: int) -> bool:
        """Whether the aggregate of ``round_idx`` is saved as ``round_<r>_after_agg``."""
        if round_idx == self.comm_round - 1:
            return True
        if self.save_frequency is None or self.save_frequency < 0:
            return self.is_test_round(round_idx)
        if self.save_frequency == 0:
            return False
        return round_idx % self.save_frequency == 0

    def quorum(self, selected: int) -> int:
        """Updates a round needs before it may aggregate without every selected client."""
        return selected if self.min_updates is None else min(self.min_updates, selected)


@dataclass
class RoundSummary:
    """What happened in one round, as shown in the per-round table."""

    round_idx: int
    selected: list[int]
    aggregated: list[int]
    train_loss: float | None = None
    eval_loss: float | None = None
    seconds: float = 0.0
    rejected: dict[int, str] = field(default_factory=dict)
    aggregation_seconds: float = 0.0
    #: The aggregator's seconds per phase of the round (:data:`unitedllm.phases.AGGREGATOR_PHASES`).
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class RunResult:
    """The outcome of a run: the final global weights and where everything was written."""

    run_id: str
    output_dir: Path
    weights: dict[str, torch.Tensor]
    rounds: list[RoundSummary]

    @property
    def final_dir(self) -> Path:
        from unitedllm.run_layout import RunLayout

        return RunLayout(self.output_dir).final()


def weighted_mean(pairs: list[tuple[float, int]]) -> float | None:
    """The mean of ``pairs`` (value, weight) weighted by their weights; ``None`` when there is no weight."""
    total = sum(n for _, n in pairs)
    if not pairs or total <= 0:
        return None
    return sum(v * n for v, n in pairs) / total
