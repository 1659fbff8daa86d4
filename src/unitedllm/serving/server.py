"""Run ``unitedllm serve``: open the target, start the engine, serve HTTP with uvicorn until stopped.

A TARGET that is a config file is an MQTT_S3 run to follow (``--follow --run-id``): its announced
global models are mirrored into a local run folder (:mod:`.network_follow`), which is then served
and followed like a LOCAL run's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from unitedllm.errors import ConfigError, ConfigProblem
from unitedllm.serving.engine import Engine

if TYPE_CHECKING:
    from unitedllm.serving.network_follow import RunMirror

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
    run_id: str | None = None  # an MQTT_S3 run to follow (TARGET is then its config file)
    cache_dir: Path | None = None  # where a followed MQTT_S3 run's models are kept


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


def _stop_when_failed(task: asyncio.Task[None], server: object) -> None:
    """A follow that cannot go on (the broker refused the login) stops the server with its reason."""
    if task.cancelled() or task.exception() is None:
        return
    log.error("following the run stopped: %s", task.exception())
    server.should_exit = True  # type: ignore[attr-defined]


def serve(options: ServeOptions) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    with _listen(options.host, options.port) as listener:
        if options.target.is_file():
            asyncio.run(_serve_network_run(options, listener))
            return
        engine = open_engine(options)
        asyncio.run(_serve(engine, options, listener))


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any model loads: a taken or forbidden port is one line at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise ConfigError(ConfigProblem("--host", f"{host}:{port}: {reason}")) from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as exc:
        listener.close()
        raise ConfigError(
            ConfigProblem("--port", f"cannot listen on {host}:{port}: {exc.strerror}")
        ) from None
    return listener


async def _serve_network_run(options: ServeOptions, listener: socket.socket) -> None:
    """Follow the MQTT_S3 run whose config is ``options.target``: mirror its models, serve the mirror."""
    from unitedllm.serving.network_follow import RunMirror, default_cache, load_run_config

    if not options.follow or not options.run_id:
        missing = "--follow" if not options.follow else "--run-id"
        raise ConfigError(
            ConfigProblem(
                missing,
                f"{options.target} is a file: a run's config is served by following the run "
                "(--follow --run-id ID); otherwise give a run folder, an exported model or a model folder",
            )
        )
    cfg = await asyncio.to_thread(load_run_config, options.target, options.run_id)
    cache = options.cache_dir or default_cache(options.run_id)
    async with RunMirror(cfg, run_id=options.run_id, cache=cache) as mirror:
        local = replace(options, target=cache)
        engine = await asyncio.to_thread(open_engine, local)
        await _serve(engine, local, listener, mirror)


async def _serve(
    engine: Engine, options: ServeOptions, listener: socket.socket, mirror: RunMirror | None = None
) -> None:
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
        mirroring: asyncio.Task[None] | None = None
        if mirror is not None:
            mirror.on_refused = lambda *_: app.state.metrics.refused.inc()
            mirroring = asyncio.create_task(mirror.run(), name="mirror-run")
            mirroring.add_done_callback(lambda task: _stop_when_failed(task, server))
        async with follower:
            names = ", ".join(engine.registry.names())
            log.info(
                "serving %s on http://%s:%d/v1 (models: %s)",
                options.target,
                options.host,
                options.port,
                names,
            )
            try:
                await server.serve(sockets=[listener])
            finally:
                if mirroring is not None:
                    mirroring.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await mirroring
