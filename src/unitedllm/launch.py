"""Start one role of a run from a config file: the aggregator for rank 0, a client otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["launch", "serve_client", "serve_server"]


async def serve_server(cfg: Any, *, run_id: str, resume: bool = False, metrics: Any = None) -> Any:
    """Run the aggregator of ``run_id`` until the run ends; returns the RunResult."""
    from unitedllm.aggregator import Aggregator

    async with Aggregator(cfg, run_id=run_id, resume=resume, metrics=metrics) as aggregator:
        return await aggregator.run()


async def serve_client(cfg: Any, *, rank: int, run_id: str, metrics: Any = None, trainer: Any = None) -> str:
    """Run client ``rank`` of ``run_id`` until the aggregator finishes it (``trainer``: a silo's leader)."""
    from unitedllm.client import Client

    async with Client(cfg, rank=rank, run_id=run_id, metrics=metrics, trainer=trainer) as client:
        return await client.run()


def launch(
    config: str | Path,
    *,
    rank: int,
    run_id: str,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> Any:
    """Blocking: load ``config`` and run rank 0 (aggregator) or rank N (client) of ``run_id``.

    A client goes through :func:`unitedllm.silo.serve_silo`: its node's bootstrap runs first, and
    ``environment_args.launcher`` may start it as a silo of several processes (docs/silos.md).
    """
    if rank != 0:
        from unitedllm.silo import serve_silo

        return serve_silo(config, rank=rank, run_id=run_id, overrides=overrides)
    from unitedllm.config import load_config

    cfg = load_config(config, overrides=overrides, run_id=run_id)
    return asyncio.run(serve_server(cfg, run_id=run_id))
