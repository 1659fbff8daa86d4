"""Serving throughput: ``unitedllm serve`` at 1, 4 and 16 concurrent requests vs sequential ``generate``.

    python bench/serving.py --out result.json                  # makes a one-round quickstart run first
    python bench/serving.py --run .logs/UnitedLLM/RUN --model global --requests 32 --max-tokens 48

The same prompts go (a) one by one through ``transformers``' ``model.generate`` (greedy, the base with
the same adapter, in this process) and (b) through a real ``unitedllm serve`` process over HTTP with
``c`` clients at once. Both use ``--threads`` torch threads. Reported per mode: generated tokens/s,
p50/p95 request latency, and the ratio of tokens/s to sequential ``generate``. Prints one JSON
document; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_run(folder: Path) -> Path:
    out = folder / "run"
    command = [sys.executable, "-m", "unitedllm", "run", str(ROOT / "examples" / "quickstart.yaml"), "-q"]
    command += ["--set", "train_args.comm_round=1", "--set", f"train_args.output_dir={out}"]
    command += ["--set", f"data_args.cache_dir={folder / 'cache'}", "--run-id", "bench-serving"]
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return out


def prompts(count: int) -> list[str]:
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "grape", "chair", "storm"]
    return [" ".join(words[(i + k) % len(words)] for k in range(1 + i % 5)) for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(latencies: list[float], tokens: int, seconds: float) -> dict[str, float]:
    return {
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 2),
        "p50_latency_s": round(percentile(latencies, 0.5), 4),
        "p95_latency_s": round(percentile(latencies, 0.95), 4),
    }


def sequential_generate(
    run: Path, model_name: str, texts: list[str], max_tokens: int, threads: int
) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unitedllm.serving.adapters import open_target

    torch.set_num_threads(threads)
    registry = open_target(run, [])
    entry = registry.resolve(model_name)
    tokenizer = AutoTokenizer.from_pretrained(str(registry.base_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(registry.base_dir), dtype=torch.float32)
    if entry.path is not None:
        model = PeftModel.from_pretrained(model, str(entry.path))
    model.eval()
    latencies, tokens = [], 0
    started = time.perf_counter()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        latencies.append(time.perf_counter() - t0)
        tokens += int(out.shape[1] - ids["input_ids"].shape[1])
    return summary(latencies, tokens, time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def concurrent(
    base_url: str, model: str, texts: list[str], max_tokens: int, clients: int
) -> dict[str, Any]:
    import openai

    api = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(clients)
    latencies: list[float] = []
    tokens = 0

    async def one(text: str) -> None:
        nonlocal tokens
        async with gate:
            t0 = time.perf_counter()
            done = await api.completions.create(
                model=model, prompt=text, max_tokens=max_tokens, temperature=0
            )
            latencies.append(time.perf_counter() - t0)
            tokens += done.usage.completion_tokens if done.usage else 0

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(t) for t in texts))
    finally:
        await api.close()
    return summary(latencies, tokens, time.perf_counter() - started)


def serve_and_measure(
    run: Path, model: str, texts: list[str], max_tokens: int, threads: int, levels: list[int]
) -> dict[str, Any]:
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [
        sys.executable,
        "-m",
        "unitedllm",
        "serve",
        str(run),
        "--port",
        str(port),
        "--threads",
        str(threads),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"the server did not start: {server.stderr.read().decode() if server.stderr else ''}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        base_url = f"http://127.0.0.1:{port}/v1"
        asyncio.run(concurrent(base_url, model, texts[:4], max_tokens, 4))  # warm-up
        results = {}
        for clients in levels:
            log(f"serve: {clients} concurrent")
            results[str(clients)] = asyncio.run(concurrent(base_url, model, texts, max_tokens, clients))
        return results
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="A run folder (default: a fresh one-round quickstart run).")
    parser.add_argument("--model", default="base", help="Model name to ask for (default: base).")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    texts = prompts(args.requests)
    with tempfile.TemporaryDirectory() as scratch:
        run = args.run or make_run(Path(scratch))
        log("sequential generate")
        baseline = sequential_generate(run, args.model, texts, args.max_tokens, args.threads)
        served = serve_and_measure(run, args.model, texts, args.max_tokens, args.threads, levels)
    for row in served.values():
        row["vs_sequential_generate"] = round(row["tokens_per_s"] / baseline["tokens_per_s"], 3)
    result = {
        "bench": "serving",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            "model": args.model,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "threads": args.threads,
            "decoding": "greedy",
        },
        "sequential_generate": baseline,
        "serve": served,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
