"""Start one role of a run from a config file: the aggregator for rank 0, a client otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unitedllm.config.types import Config
    from unitedllm.tracking.metrics import MetricsLog

__all__ = ["launch", "serve_client", "serve_in_process", "serve_server", "tracked"]


async def serve_server(
    cfg: Any, *, run_id: str, resume: bool = False, metrics: Any = None, trainer: Any = None
) -> Any:
    """Run the aggregator of ``run_id`` until the run ends (``trainer``: a silo's leader); returns the RunResult."""
    from unitedllm.aggregator import Aggregator

    async with Aggregator(cfg, run_id=run_id, resume=resume, metrics=metrics, trainer=trainer) as aggregator:
        return await aggregator.run()


async def serve_client(cfg: Any, *, rank: int, run_id: str, metrics: Any = None, trainer: Any = None) -> str:
    """Run client ``rank`` of ``run_id`` until the aggregator finishes it (``trainer``: a silo's leader)."""
    from unitedllm.client import Client

    async with Client(cfg, rank=rank, run_id=run_id, metrics=metrics, trainer=trainer) as client:
        return await client.run()


@contextmanager
def tracked(
    cfg: Config, *, run_id: str, rank: int = 0, listeners: Sequence[Callable[[dict[str, Any]], None]] = ()
) -> Iterator[MetricsLog]:
    """One process's metrics log with the configured trackers and the system sampler attached.

    The aggregator (rank 0) writes ``<output_dir>/metrics.jsonl``; a client ``node_<rank>/metrics.jsonl``.
    In a silo only silo rank 0 opens it (the leader's system samples cover its whole node).
    """
    from unitedllm.role import run_output_dir
    from unitedllm.run_layout import RunLayout
    from unitedllm.tracking import MetricsLog, open_trackers, system_metrics

    layout = RunLayout(run_output_dir(cfg, run_id))
    with (
        open_trackers(cfg, rank=rank, run_id=run_id, layout=layout) as trackers,
        MetricsLog(layout.metrics(rank), listeners=[*listeners, *trackers]) as metrics,
        system_metrics(metrics, rank=rank, enabled=cfg.tracking_args.log_system_metrics),
    ):
        yield metrics


def serve_in_process(
    cfg: Config, *, rank: int, run_id: str, resume: bool = False, trainer: Any = None
) -> str:
    """Blocking: serve rank ``rank`` in this process with its trackers; returns how it ended, in words."""
    with tracked(cfg, run_id=run_id, rank=rank) as metrics:
        if rank == 0:
            result = asyncio.run(
                serve_server(cfg, run_id=run_id, resume=resume, metrics=metrics, trainer=trainer)
            )
            return f"{len(result.rounds)} rounds"
        return asyncio.run(serve_client(cfg, rank=rank, run_id=run_id, metrics=metrics, trainer=trainer))


def launch(
    config: str | Path,
    *,
    rank: int,
    run_id: str,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    resume: bool = False,
    verbose: bool = False,
) -> str:
    """Blocking: load ``config`` and run rank 0 (aggregator) or rank N (client) of ``run_id``; returns how it ended.

    Both go through :func:`unitedllm.silo.serve_silo`: a client's node bootstrap runs first, and
    ``environment_args.launcher`` may start a client, or an aggregator that evaluates, as a silo
    of several processes (docs/silos.md). ``resume`` continues the aggregator's run.
    """
    from unitedllm.silo import serve_silo

    def run_here(cfg: Config) -> str:
        return serve_in_process(cfg, rank=rank, run_id=run_id, resume=resume)

    return serve_silo(
        config,
        rank=rank,
        run_id=run_id,
        overrides=overrides,
        resume=resume,
        verbose=verbose,
        run_here=run_here,
    )
