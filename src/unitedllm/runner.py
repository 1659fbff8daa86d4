"""Run a whole federation in one process: the aggregator and every client as asyncio tasks.

With ``comm_args.backend: LOCAL`` they talk through an in-process hub; with ``MQTT_S3``
each role opens its own broker and S3 connections exactly as separate processes would.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from unitedllm.aggregator import Aggregator, RoundSummary, RunResult
from unitedllm.client import Client
from unitedllm.comm.local import LocalHub
from unitedllm.role import SERVER_RANK

if TYPE_CHECKING:
    from unitedllm.config.types import Config
    from unitedllm.tracking.metrics import MetricsLog
    from unitedllm.training.base import LocalTrainer, StepEvent

__all__ = ["TrainerFactory", "new_run_id", "run", "run_async"]

TrainerFactory = Callable[["Config", int], "LocalTrainer"]


def new_run_id() -> str:
    """A fresh run id (hex UUID4), as FedML's docs recommend."""
    return uuid.uuid4().hex


def _default_trainer_factory() -> TrainerFactory:
    from unitedllm.training.hf import HFLocalTrainer
    from unitedllm.training.model_cache import ModelCache

    cache = ModelCache()

    def make(cfg: Config, rank: int) -> LocalTrainer:
        return HFLocalTrainer(cfg, rank, model_cache=cache)

    return make


async def run_async(
    cfg: Config,
    *,
    run_id: str | None = None,
    trainer_factory: TrainerFactory | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    on_round: Callable[[RoundSummary], None] | None = None,
    metrics: MetricsLog | None = None,
    resume: bool = False,
) -> RunResult:
    """Run the aggregator and all ``client_num_in_total`` clients in this event loop."""
    run_id = run_id or new_run_id()
    total = cfg.train_args.client_num_in_total
    hub = None
    if cfg.comm_args.backend == "LOCAL":
        # One key per client, as the platform issues them over MQTT: no client can speak as another.
        keys = {rank: secrets.token_bytes(32) for rank in range(1, total + 1)}
        hub = LocalHub(run_id=run_id, ranks=set(range(total + 1)), keys=keys)
    make = (
        trainer_factory if trainer_factory is not None else await asyncio.to_thread(_default_trainer_factory)
    )
    trainers = {rank: await asyncio.to_thread(make, cfg, rank) for rank in range(total + 1)}
    async with AsyncExitStack() as stack:
        aggregator = await stack.enter_async_context(
            Aggregator(
                cfg,
                run_id=run_id,
                trainer=trainers[SERVER_RANK],
                hub=hub,
                metrics=metrics,
                on_round=on_round,
                resume=resume,
            )
        )
        clients = [
            await stack.enter_async_context(
                Client(cfg, rank=rank, run_id=run_id, trainer=trainers[rank], hub=hub, on_step=on_step)
            )
            for rank in range(1, total + 1)
        ]
        try:
            async with asyncio.TaskGroup() as group:
                result_task = group.create_task(aggregator.run(), name="aggregator")
                for client in clients:
                    group.create_task(client.run(), name=f"client-{client.rank}")
        except BaseExceptionGroup as group_error:
            # Callers expect the run's own error (a RoundError, a TrainingError), not a group of them.
            raise _first_error(group_error) from group_error
        return result_task.result()


def _first_error(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def run(
    cfg: Config,
    *,
    run_id: str | None = None,
    trainer_factory: TrainerFactory | None = None,
    resume: bool = False,
) -> RunResult:
    """Blocking :func:`run_async` for scripts and notebooks without an event loop."""
    return asyncio.run(run_async(cfg, run_id=run_id, trainer_factory=trainer_factory, resume=resume))
