"""Continuous batching: a request arriving while a batch decodes joins it at the next token."""

from __future__ import annotations

import asyncio

import openai
from serving_support import Server

SHORT = "river stone"


def test_a_short_request_joins_a_long_generation_and_finishes_first_with_its_own_text(
    run_server: Server,
) -> None:
    alone = openai.OpenAI(base_url=run_server.base_url, api_key="unused", max_retries=0, timeout=120)
    expected = alone.completions.create(model="base", prompt=SHORT, max_tokens=8, temperature=0)
    api = openai.AsyncOpenAI(base_url=run_server.base_url, api_key="unused", max_retries=0, timeout=300)
    finished: list[str] = []

    async def scenario() -> tuple[str | None, str]:
        try:
            stream = await api.completions.create(
                model="base", prompt="x", max_tokens=200, temperature=0, stream=True
            )
            chunks = stream.__aiter__()
            await chunks.__anext__()  # the long generation is decoding now

            async def rest_of_long() -> str | None:
                reason = None
                async for chunk in chunks:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        reason = chunk.choices[0].finish_reason
                finished.append("long")
                return reason

            long = asyncio.create_task(rest_of_long())
            short = await api.completions.create(model="base", prompt=SHORT, max_tokens=8, temperature=0)
            finished.append("short")
            return await long, short.choices[0].text
        finally:
            await api.close()

    long_reason, short_text = asyncio.run(scenario())
    assert long_reason == "length"  # it really generated all 200 tokens
    assert finished == ["short", "long"]
    assert short_text == expected.choices[0].text  # joining a batch mid-decode changes no token
