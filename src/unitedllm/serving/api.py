"""The OpenAI-compatible HTTP API (FastAPI): models, completions, chat completions, health, metrics.

Every error leaves as OpenAI's error shape with its status: a bad request 400, a missing or wrong
API key 401, an unknown model or route 404, a full queue 429, a timeout 503, an engine failure 500.
Streams are server-sent events (sse-starlette) ending in ``data: [DONE]``; a client that
disconnects, streaming or not, cancels its generation.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from unitedllm.serving.adapters import ModelEntry
from unitedllm.serving.completions import (
    Completion,
    error_payload,
    start_choices,
    stream_events,
    whole_response,
)
from unitedllm.serving.engine import Engine, SamplingParams
from unitedllm.serving.errors import ServingError, Unauthorized
from unitedllm.serving.metrics import MetricsMiddleware, ServingMetrics
from unitedllm.serving.schemas import DEFAULT_MAX_TOKENS, ChatCompletionRequest, CompletionRequest, new_id
from unitedllm.serving.template import TemplateError, render_chat

__all__ = ["create_app"]

log = logging.getLogger(__name__)

ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"})


def create_app(
    engine: Engine,
    *,
    api_keys: Sequence[str] = (),
    own_engine: bool = True,
) -> FastAPI:
    """The app serving ``engine``; with ``own_engine`` its lifespan starts and closes the engine."""
    metrics = ServingMetrics(queue_depth=engine.queue_depth)
    engine.observer = metrics.observe_batch
    engine.on_cancelled = metrics.cancelled.inc

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not own_engine:
            yield
            return
        async with engine:
            _show_global(engine, metrics)
            yield

    app = FastAPI(title="UnitedLLM", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=ROUTES)
    _add_error_handlers(app)
    auth = _auth(api_keys)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "engine": engine.name,
            "queue_depth": engine.queue_depth(),
            "global": engine.registry.alias_target("global"),
        }

    @app.get("/metrics", dependencies=[Depends(auth)])
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        _show_global(engine, metrics)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [_model_card(name, entry) for name, entry in engine.registry.listing()],
        }

    @app.get("/v1/models/{name:path}", dependencies=[Depends(auth)])
    async def model(name: str) -> dict[str, Any]:
        return _model_card(name, engine.registry.resolve(name))

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _refuse(body.logprobs is not None, "logprobs is not supported", "logprobs")
        _refuse(body.suffix is not None, "suffix is not supported", "suffix")
        _refuse(body.best_of not in (None, 1), "best_of is not supported", "best_of")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        _refuse(not prompts, "prompt must not be an empty list", "prompt")
        _refuse(body.echo and body.stream and body.n > 1, "echo with stream needs n = 1", "echo")
        completion = Completion(
            kind="text_completion",
            model=body.model,
            entry=engine.registry.resolve(body.model),
            prompts=prompts,
            n=body.n,
            params=_sampling(body, body.max_tokens),
            include_usage=body.include_usage(),
            echo=body.echo,
        )
        return await _respond(engine, completion, body.stream, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _refuse(bool(body.logprobs), "logprobs is not supported", "logprobs")
        _refuse(bool(body.tools), "tools are not supported", "tools")
        try:
            prompt = render_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        except TemplateError as exc:
            raise ServingError(f"messages: {exc}", param="messages") from None
        completion = Completion(
            kind="chat.completion",
            model=body.model,
            entry=engine.registry.resolve(body.model),
            prompts=[prompt],
            n=body.n,
            params=_sampling(body, body.token_limit()),
            include_usage=body.include_usage(),
            id=new_id("chatcmpl"),
        )
        return await _respond(engine, completion, body.stream, request)

    return app


def _show_global(engine: Engine, metrics: ServingMetrics) -> None:
    entry = engine.registry.get("global")
    metrics.global_round.set(entry.round if entry is not None and entry.round is not None else -1)


def _refuse(condition: bool, message: str, param: str) -> None:
    if condition:
        raise ServingError(message, param=param)


def _sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> SamplingParams:
    stop = body.stop_strings()
    _refuse(len(stop) > 4, "stop takes at most 4 sequences", "stop")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
    )


def _model_card(name: str, entry: ModelEntry) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": entry.created, "owned_by": "unitedllm"}
    card["root"] = entry.name
    card["round"] = entry.round
    card["rank"] = entry.rank
    card["sha256"] = entry.digest
    return card


async def _respond(engine: Engine, completion: Completion, stream: bool, request: Request) -> Response:
    generations = await start_choices(engine, completion)
    if stream:
        return EventSourceResponse(stream_events(completion, generations), sep="\n", ping=15)
    work = asyncio.create_task(whole_response(completion, generations), name="complete")
    gone = asyncio.create_task(_disconnected(request), name="watch-disconnect")
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # the client went away: its generations stop at the next token
            for generation in generations:
                generation.cancel()
    if work not in done:
        return Response(status_code=499)
    return JSONResponse(work.result())


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the request body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _auth(keys: Sequence[str]) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
        if not any(secrets.compare_digest(token.strip(), key) for key in keys):
            raise Unauthorized("the API key is not valid for this server")

    return check


def _error(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        return JSONResponse(error_payload(exc), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            message = (
                f"the request body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}"
            )
            return _error(400, message, "invalid_request_error", None, "invalid_json")
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else str(first.get("msg", exc))
        return _error(400, message, "invalid_request_error", param, "invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")
