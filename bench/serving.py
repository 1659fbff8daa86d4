"""Serving throughput: ``unitedllm serve`` at 1, 4 and 16 concurrent requests vs sequential ``generate``.

    python bench/serving.py --out result.json                  # makes a one-round quickstart run first
    python bench/serving.py --run .logs/UnitedLLM/RUN --model global --requests 32 --max-tokens 48
    python bench/serving.py --engine-only --shape pythia-160m      # the GPU row of bench/device_check.sh

The same prompts go (a) one by one through ``transformers``' ``model.generate`` (greedy, the base with
the same adapter, in this process) and (b) through a real ``unitedllm serve`` process over HTTP with
``c`` clients at once. Both use ``--threads`` torch threads. Reported per mode: generated tokens/s,
p50/p95 request latency, and the ratio of tokens/s to sequential ``generate``. Prints one JSON
document; progress goes to stderr.

``--engine-only`` needs neither a run nor the web stack (the device image has only torch,
transformers and peft): a random-init model of ``--shape`` with a random LoRA adapter and a
word-level tokenizer is built in a scratch folder, and the transformers engine is driven in this
process (no HTTP) beside sequential ``generate`` and, where vLLM is installed, vLLM's offline
``LLM.generate`` of the same prompts with the same adapter (multi-LoRA).
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
    run: Path,
    model_name: str,
    texts: list[str],
    max_tokens: int,
    threads: int,
    adapters: list[str] | None = None,
) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unitedllm.serving.adapters import open_target

    torch.set_num_threads(threads)
    registry = open_target(run, adapters or [])
    entry = registry.resolve(model_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what the engine uses
    tokenizer = AutoTokenizer.from_pretrained(registry.base)
    model: Any = AutoModelForCausalLM.from_pretrained(registry.base, dtype=dtype).to(device)
    if entry.path is not None:
        model = PeftModel.from_pretrained(model, str(entry.path))
    model.eval()
    latencies, tokens = [], 0
    started = time.perf_counter()
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
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


SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    # Published Pythia shapes (model cards): 160m and 410m.
    "pythia-160m": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "pythia-410m": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}
VOCAB = 50304


def synthetic_model(folder: Path, shape: str) -> tuple[Path, Path]:
    """A random GPT-NeoX of ``shape`` with a word-level tokenizer, and a random LoRA adapter for it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = GPTNeoXConfig(
        vocab_size=VOCAB,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    base_dir, adapter_dir = folder / "base", folder / "adapter"
    model = GPTNeoXForCausalLM(config)
    model.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules=["query_key_value", "dense"], init_lora_weights=False
    )
    adapted = get_peft_model(model, lora)
    adapted.peft_config["default"].base_model_name_or_path = str(base_dir)
    adapted.save_pretrained(str(adapter_dir))
    return base_dir, adapter_dir


def word_prompts(count: int) -> list[str]:
    return [" ".join(f"w{3 + (i * 31 + k * 7) % 5000}" for k in range(8 + i % 24)) for i in range(count)]


async def engine_levels(
    base: Path, adapter: Path, texts: list[str], max_tokens: int, levels: list[int]
) -> dict[str, Any]:
    from unitedllm.serving.adapters import open_target
    from unitedllm.serving.engine import SamplingParams
    from unitedllm.serving.hf_engine import TransformersEngine

    registry = open_target(base, [f"lora={adapter}"])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    results: dict[str, Any] = {}
    async with TransformersEngine(registry, max_batch=max(levels), max_queue=len(texts) + 1) as engine:
        entry = registry.resolve("lora")

        async def one(text: str, gate: asyncio.Semaphore, latencies: list[float]) -> int:
            async with gate:
                t0 = time.perf_counter()
                produced = 0
                async for chunk in await engine.generate(entry, text, params):
                    produced = chunk.completion_tokens
                latencies.append(time.perf_counter() - t0)
                return produced

        await asyncio.gather(*(one(t, asyncio.Semaphore(4), []) for t in texts[:4]))  # warm-up
        for clients in levels:
            log(f"engine: {clients} concurrent")
            latencies: list[float] = []
            gate = asyncio.Semaphore(clients)
            started = time.perf_counter()
            tokens = sum(await asyncio.gather(*(one(t, gate, latencies) for t in texts)))
            results[str(clients)] = summary(latencies, tokens, time.perf_counter() - started)
    return results


def vllm_offline(base: Path, adapter: Path, texts: list[str], max_tokens: int) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed"}
    from vllm import LLM
    from vllm import SamplingParams as VSampling
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=str(base), enable_lora=True, max_lora_rank=16, dtype="bfloat16", gpu_memory_utilization=0.5
    )
    lora = LoRARequest("lora", 1, str(adapter))
    sampling = VSampling(temperature=0.0, max_tokens=max_tokens)
    llm.generate(texts[:4], sampling, lora_request=lora)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(texts, sampling, lora_request=lora)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 2)}


def engine_only(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    texts = word_prompts(args.requests)
    with tempfile.TemporaryDirectory() as scratch:
        base, adapter = synthetic_model(Path(scratch), args.shape)
        log("sequential generate")
        baseline = sequential_generate(
            base, "lora", texts, args.max_tokens, args.threads, [f"lora={adapter}"]
        )
        engine = asyncio.run(engine_levels(base, adapter, texts, args.max_tokens, levels))
        log("vllm")
        vllm = vllm_offline(base, adapter, texts, args.max_tokens)
    for row in engine.values():
        row["vs_sequential_generate"] = round(row["tokens_per_s"] / baseline["tokens_per_s"], 3)
    if "tokens_per_s" in vllm:
        vllm["vs_engine_at_max_level"] = round(
            vllm["tokens_per_s"] / engine[str(max(levels))]["tokens_per_s"], 3
        )
    return {
        "bench": "serving-engine",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "settings": {
            "shape": args.shape,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "lora_r": 16,
        },
        "sequential_generate": baseline,
        "engine": engine,
        "vllm": vllm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="A run folder (default: a fresh one-round quickstart run).")
    parser.add_argument("--model", default="base", help="Model name to ask for (default: base).")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--engine-only", action="store_true", help="No run, no HTTP: a synthetic model (see above)."
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="With --engine-only.")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    if args.engine_only:
        text = json.dumps(engine_only(args, levels), indent=2)
        if args.out:
            args.out.write_text(text + "\n")
        print(text)
        return
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
