"""Start one role of a run from a config file: the aggregator for rank 0, a client otherwise."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unitedllm.config.types import Config
    from unitedllm.tracking.metrics import MetricsLog

__all__ = ["launch", "serve_client", "serve_in_process", "serve_server", "tracked"]

log = logging.getLogger(__name__)


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

    A client's node runs its bootstrap first. ``environment_args.launcher`` then decides the
    process layout (:func:`unitedllm.silo.plan_for`): the role is served in this process, or
    :func:`unitedllm.silo.start_silo` starts it as a silo of several processes under torchrun or
    DeepSpeed, each running :mod:`unitedllm.silo.worker` (docs/silos.md). ``resume`` continues
    the aggregator's run.
    """
    from unitedllm.config import load_config
    from unitedllm.ranks import check_rank
    from unitedllm.silo.launcher import local_gpu_count, plan_for, role_name, start_silo

    cfg = load_config(config, overrides=overrides, run_id=run_id)
    check_rank(cfg, rank, where="--rank", aggregator=True)
    if rank != 0 and cfg.environment_args.bootstrap:
        _bootstrap(cfg.environment_args.bootstrap, config=Path(config).resolve(), rank=rank, run_id=run_id)
    gpus = local_gpu_count(cfg)
    plan = plan_for(cfg, rank=rank, gpus=gpus)
    log.info("%s: launcher %s (%s)", role_name(rank), plan.launcher, plan.reason)
    if plan.launcher == "python":
        return serve_in_process(cfg, rank=rank, run_id=run_id, resume=resume)
    return start_silo(
        cfg,
        plan,
        config=config,
        rank=rank,
        run_id=run_id,
        gpus=gpus,
        overrides=overrides,
        verbose=verbose,
        resume=resume,
    )


def _bootstrap(script: str, *, config: Path, rank: int, run_id: str) -> None:
    """Run a client's ``environment_args.bootstrap`` (found next to ``config`` first) on this node."""
    from unitedllm.node_processes import bootstrapped_by_package, run_node_bootstrap
    from unitedllm.silo.launcher import resolve_config_path

    if bootstrapped_by_package():
        log.info("bootstrap: already run by 'unitedllm package run'")
        return
    path = resolve_config_path(script, config_dir=config.parent, key="environment_args.bootstrap")
    run_node_bootstrap(path, config=config, rank=rank, run_id=run_id)
