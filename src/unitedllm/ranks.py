"""The ranks of a run: 0 is the aggregator, 1..``client_num_in_total`` are the clients.

Every place that takes a rank from a user (``--rank``, a trainer's rank, a data split's client)
checks it here, so each refusal reads the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unitedllm.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    from unitedllm.config.types import Config

__all__ = ["AGGREGATOR_RANK", "check_rank", "client_rank_problem"]

AGGREGATOR_RANK = 0


def client_rank_problem(rank: int, total: int) -> str | None:
    """Why ``rank`` is not a client of a run with ``total`` clients, in words; None when it is one."""
    if 1 <= rank <= total:
        return None
    return f"rank {rank} is not a client rank; clients are ranks 1..{total} (0 is the aggregator)"


def check_rank(cfg: Config, rank: int, *, where: str, aggregator: bool = False) -> None:
    """Raise a ConfigError at ``where`` unless ``rank`` is a client of the run (or, with ``aggregator``, 0)."""
    if aggregator and rank == AGGREGATOR_RANK:
        return
    problem = client_rank_problem(rank, cfg.train_args.client_num_in_total)
    if problem is not None:
        raise ConfigError(ConfigProblem(where, problem))
