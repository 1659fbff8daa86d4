"""Run a completion or chat request on an engine: its choices, merged streams and response bodies.

The HTTP layer parses and checks the request; this module queues one generation per choice
(``n`` per prompt), merges their chunks as they come, and shapes them as OpenAI responses:
whole bodies, or server-sent event payloads ending in ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from unitedllm.serving.adapters import ModelEntry
from unitedllm.serving.engine import Chunk, Engine, Generation, SamplingParams
from unitedllm.serving.errors import ServingError
from unitedllm.serving.schemas import new_id, now

__all__ = ["Completion", "error_payload", "start_choices", "stream_events", "whole_response"]


@dataclass
class Completion:
    """What a request asks for once checked: kind, model, one prompt per choice group, sampling."""

    kind: str  # "text_completion" or "chat.completion"
    model: str
    entry: ModelEntry
    prompts: list[str]
    n: int
    params: SamplingParams
    include_usage: bool = False
    echo: bool = False
    id: str = field(default_factory=lambda: new_id("cmpl"))
    created: int = field(default_factory=now)

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"


async def start_choices(engine: Engine, request: Completion) -> list[Generation]:
    """Queue every choice; if one cannot be queued, cancel the others and raise."""
    started: list[Generation] = []
    try:
        for prompt in request.prompts:
            for j in range(request.n):
                params = request.params
                if params.seed is not None and j:
                    # n choices with one seed: reproducible, but not n copies of one text.
                    params = SamplingParams(
                        params.max_tokens, params.temperature, params.top_p, params.stop, params.seed + j
                    )
                started.append(await engine.generate(request.entry, prompt, params))
    except BaseException:
        for generation in started:
            generation.cancel()
        raise
    return started


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) from all generations as they arrive; leaving early cancels them all."""
    inbox: asyncio.Queue[tuple[int, Chunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for chunk in generation:
                inbox.put_nowait((index, chunk))
        except Exception as exc:  # handed to the consumer, which raises it in the request's task
            inbox.put_nowait((index, exc))
        finally:
            inbox.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, g), name=f"choice-{i}") for i, g in enumerate(generations)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for generation in generations:
            generation.cancel()
        for task in tasks:
            task.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Tally:
    """Token counts per choice; prompt tokens count once per prompt, as OpenAI reports them."""

    def __init__(self, n: int):
        self.n = n
        self.prompt: dict[int, int] = {}
        self.completion: dict[int, int] = {}

    def add(self, index: int, chunk: Chunk) -> None:
        self.completion[index] = chunk.completion_tokens
        if index % self.n == 0:
            self.prompt[index] = chunk.prompt_tokens

    def usage(self) -> dict[str, int]:
        return _usage(sum(self.prompt.values()), sum(self.completion.values()))


async def whole_response(request: Completion, generations: list[Generation]) -> dict[str, Any]:
    """The non-streaming response body once every choice has finished."""
    texts = [request.prompts[i // request.n] if request.echo else "" for i in range(len(generations))]
    reasons: list[str | None] = [None] * len(generations)
    tally = _Tally(request.n)
    async for index, chunk in _merged(generations):
        texts[index] += chunk.text
        if chunk.finish_reason is not None:
            reasons[index] = chunk.finish_reason
            tally.add(index, chunk)
    if request.chat:
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reasons[i],
            }
            for i, text in enumerate(texts)
        ]
    else:
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reasons[i]}
            for i, text in enumerate(texts)
        ]
    return {
        "id": request.id,
        "object": request.kind,
        "created": request.created,
        "model": request.model,
        "choices": choices,
        "usage": tally.usage(),
    }


def error_payload(exc: ServingError) -> dict[str, Any]:
    return {"error": {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.code}}


async def stream_events(request: Completion, generations: list[Generation]) -> AsyncIterator[dict[str, str]]:
    """Server-sent events (``{"data": ...}`` for sse-starlette): chunks, optional usage, ``[DONE]``."""
    kind = "chat.completion.chunk" if request.chat else "text_completion"
    tally = _Tally(request.n)

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, str]:
        body: dict[str, Any] = {
            "id": request.id,
            "object": kind,
            "created": request.created,
            "model": request.model,
            "choices": choices,
        }
        if request.include_usage:
            body["usage"] = usage
        return {"data": json.dumps(body)}

    def choice(index: int, text: str, finish: str | None, *, first: bool = False) -> dict[str, Any]:
        if request.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish is not None and not text:
                delta = {}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    for index in range(len(generations)):
        if request.chat:
            yield event([choice(index, "", None, first=True)])
        elif request.echo:
            yield event([choice(index, request.prompts[index // request.n], None)])
    try:
        async for index, chunk in _merged(generations):
            if chunk.finish_reason is not None:
                tally.add(index, chunk)
            yield event([choice(index, chunk.text, chunk.finish_reason)])
    except ServingError as exc:
        yield {"data": json.dumps(error_payload(exc))}
    else:
        if request.include_usage:
            yield event([], tally.usage())
    yield {"data": "[DONE]"}
