"""The OpenAI-compatible API of ``unitedllm serve`` on a trained run, driven by the official client and raw HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from serving_support import Server

QUESTION = "Translate house into Glossa."
PROMPTS = [f"{word} {n}" for n, word in enumerate(["apple", "river", "stone", "cloud"] * 4)]


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def greedy_text(server: Server, model: str, prompt: str, max_tokens: int = 12) -> str:
    done = client(server).completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return done.choices[0].text


def test_models_lists_rounds_clients_and_named_adapters(run_server: Server) -> None:
    models = {m.id: m for m in client(run_server).models.list()}
    assert {"global", "global@0", "global@1", "rank-1", "rank-3@0", "base", "client2"} <= set(models)
    assert models["global"].model_extra is not None
    assert models["global"].model_extra["root"] == "global@1"
    assert len(models["global"].model_extra["sha256"]) == 64  # the adapter it serves, checked at load


def test_greedy_chat_is_deterministic_and_streams_the_same_text(run_server: Server) -> None:
    api = client(run_server)
    messages = [{"role": "user", "content": QUESTION}]
    first = api.chat.completions.create(model="client2", messages=messages, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    second = api.chat.completions.create(model="client2", messages=messages, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    assert first.choices[0].message.content
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.role == "assistant"
    assert first.usage is not None and first.usage.prompt_tokens > 10
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    stream = api.chat.completions.create(
        model="client2",
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == first.choices[0].message.content
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == first.usage.completion_tokens
    )


def greedy_answer(server: Server, model: str, question: str = QUESTION) -> str:
    done = client(server).chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0
    )
    return done.choices[0].message.content or ""


def test_two_adapters_in_one_server_answer_differently(run_server: Server) -> None:
    models = ("base", "client2", "rank-1")
    texts = {name: greedy_answer(run_server, name) for name in models}
    assert len(set(texts.values())) == len(models), texts
    assert greedy_answer(run_server, "base") == texts["base"]  # switching back and forth changes nothing
    # An alias and the entry it names are the same model.
    assert greedy_answer(run_server, "global") == greedy_answer(run_server, "global@1")


def test_completion_stream_is_sse_ending_in_done(run_server: Server) -> None:
    body = {"model": "base", "prompt": "stone", "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{run_server.base_url}/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [block for block in raw.split("\n\n") if block.strip() and not block.startswith(":")]
    assert all(block.startswith("data: ") and "\n" not in block for block in events), raw
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(block.removeprefix("data: ")) for block in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_text(run_server, "base", "stone", 10)


def test_sampling_with_a_seed_is_reproducible_and_n_gives_n_choices(run_server: Server) -> None:
    api = client(run_server)

    def sample() -> list[str]:
        done = api.completions.create(
            model="base", prompt="cloud", max_tokens=8, temperature=1.0, seed=7, n=3
        )
        return [c.text for c in sorted(done.choices, key=lambda c: c.index)]

    first = sample()
    assert len(first) == 3
    assert sample() == first
    assert len(set(first)) > 1  # one seed, three different choices


def test_max_tokens_and_stop_end_the_text(run_server: Server) -> None:
    api = client(run_server)
    long = api.completions.create(model="base", prompt="river", max_tokens=6, temperature=0)
    assert long.choices[0].finish_reason == "length"
    assert long.usage is not None and long.usage.completion_tokens == 6
    text = long.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    cut = api.completions.create(model="base", prompt="river", max_tokens=6, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    # Streamed, no part of the stop string reaches the client either.
    chunks = list(
        api.completions.create(
            model="base", prompt="river", max_tokens=6, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


BAD_REQUESTS = [
    ("completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ("completions", {"model": "base", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ("completions", {"model": "base", "prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"model": "base", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": "base", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("completions", {"model": "base", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("completions", {"model": "base"}, 400, "prompt"),
    ("chat/completions", {"model": "base", "messages": []}, 400, "messages"),
    (
        "chat/completions",
        {"model": "base", "messages": [{"role": "assistant", "content": "hi"}]},
        400,
        "messages",
    ),
    ("chat/completions", {"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    (
        "chat/completions",
        {"model": "global@9", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model",
    ),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_the_openai_error_shape(
    run_server: Server, route: str, body: dict[str, object], status: int, param: str | None
) -> None:
    response = httpx.post(f"{run_server.base_url}/{route}", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def test_the_openai_client_raises_its_own_errors(run_server: Server) -> None:
    api = client(run_server)
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        api.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], temperature=9)


def test_malformed_json_and_unknown_routes(run_server: Server) -> None:
    bad = httpx.post(
        f"{run_server.base_url}/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    missing = httpx.get(f"{run_server.url}/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_sixteen_concurrent_streams_all_finish_with_the_right_text(run_server: Server) -> None:
    expected = [greedy_text(run_server, "base", prompt, 12) for prompt in PROMPTS]
    api = openai.AsyncOpenAI(base_url=run_server.base_url, api_key="unused", max_retries=0, timeout=300)

    async def stream(prompt: str) -> str:
        chunks = await api.completions.create(
            model="base", prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def all_streams() -> list[str]:
        try:
            return await asyncio.gather(*(stream(p) for p in PROMPTS))
        finally:
            await api.close()

    batches_before = run_server.metric("unitedllm_batch_size_count")
    rows_before = run_server.metric("unitedllm_batch_size_sum")
    assert asyncio.run(all_streams()) == expected
    batches = run_server.metric("unitedllm_batch_size_count") - batches_before
    rows = run_server.metric("unitedllm_batch_size_sum") - rows_before
    assert rows == len(PROMPTS)
    assert batches < rows  # some requests were decoded together


# 16 choices of 250 tokens: seconds of work on a CPU, so hanging up always comes first.
LONG = {"model": "base", "prompt": "x", "max_tokens": 250, "temperature": 0.0, "n": 16}
LONG_TOKENS = 16 * 250


def test_a_streaming_client_that_disconnects_stops_its_generation(run_server: Server) -> None:
    cancelled = run_server.metric("unitedllm_cancelled_requests_total")
    tokens = run_server.metric("unitedllm_generated_tokens_total")
    with httpx.stream(
        "POST", f"{run_server.base_url}/completions", json={**LONG, "stream": True}, timeout=60
    ) as r:
        next(line for line in r.iter_lines() if line.startswith("data: {"))  # generating: now hang up
    _wait_for(lambda: run_server.metric("unitedllm_cancelled_requests_total") > cancelled)
    _wait_for(lambda: httpx.get(f"{run_server.url}/health").json()["queue_depth"] == 0)
    assert run_server.metric("unitedllm_generated_tokens_total") - tokens < LONG_TOKENS


def test_a_waiting_client_that_disconnects_stops_its_generation(run_server: Server) -> None:
    cancelled = run_server.metric("unitedllm_cancelled_requests_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{run_server.base_url}/completions", json=LONG, timeout=httpx.Timeout(60, read=0.5))
    _wait_for(lambda: run_server.metric("unitedllm_cancelled_requests_total") > cancelled)


def _wait_for(condition: object, timeout: float = 60.0) -> None:
    import time

    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail("the condition did not hold within the deadline")


def test_health_and_metrics(run_server: Server) -> None:
    health = httpx.get(f"{run_server.url}/health").json()
    assert health["status"] == "ok" and health["global"] == "global@1"
    text = httpx.get(f"{run_server.url}/metrics").text
    for name in (
        "unitedllm_requests_total",
        "unitedllm_request_latency_seconds_bucket",
        "unitedllm_tokens_per_second",
        "unitedllm_queue_depth",
        "unitedllm_global_round 1.0",
    ):
        assert name in text
