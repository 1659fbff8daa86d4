"""Run ``unitedllm serve``: open the target, start the engine, serve HTTP with uvicorn until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from unitedllm.errors import ConfigError, ConfigProblem
from unitedllm.serving.engine import Engine

__all__ = ["ServeOptions", "open_engine", "serve"]

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """What ``unitedllm serve`` was asked to do."""

    target: Path
    adapters: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    engine: str = "transformers"
    follow: bool = False
    max_batch: int = 16
    max_queue: int = 256
    timeout_s: float = 300.0
    threads: int | None = None


def open_engine(options: ServeOptions) -> Engine:
    """The engine for ``options`` (not started)."""
    from unitedllm.serving.adapters import open_target

    if options.engine == "vllm":
        from unitedllm.serving.vllm_engine import require_vllm

        require_vllm()  # before anything loads: one line saying what to do
    registry = open_target(options.target, options.adapters)
    if options.follow and registry.run is None:
        raise ConfigError(
            ConfigProblem("--follow", f"{options.target} is not a run folder (it has no node_0/)")
        )
    if options.engine == "vllm":
        from unitedllm.serving.vllm_engine import VLLMEngine

        return VLLMEngine(registry, max_batch=options.max_batch, timeout_s=options.timeout_s)
    from unitedllm.serving.hf_engine import TransformersEngine

    return TransformersEngine(
        registry, max_batch=options.max_batch, max_queue=options.max_queue, timeout_s=options.timeout_s
    )


def serve(options: ServeOptions) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    engine = open_engine(options)
    asyncio.run(_serve(engine, options))


async def _serve(engine: Engine, options: ServeOptions) -> None:
    import uvicorn

    from unitedllm.serving.api import create_app
    from unitedllm.serving.follow import RunFollower

    app = create_app(engine, api_keys=options.api_keys, own_engine=False)
    # Open streams get a few seconds on Ctrl-C / SIGTERM; then the engine stops their generations.
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    async with engine:
        follower: contextlib.AbstractAsyncContextManager[object] = contextlib.nullcontext()
        if options.follow and engine.registry.run is not None:
            follower = RunFollower(
                engine, engine.registry.run, on_refused=lambda *_: app.state.metrics.refused.inc()
            )
        async with follower:
            names = ", ".join(engine.registry.names())
            log.info(
                "serving %s on http://%s:%d/v1 (models: %s)",
                options.target,
                options.host,
                options.port,
                names,
            )
            await server.serve()
