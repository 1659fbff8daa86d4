"""Federated vs data-parallel training at a scale that means something: a pythia-160m-shaped model on Dolly.

One GPU simulates N clients (one Dolly category each, as in ``bench/learning.py``) training a
pythia-160m-shaped GPT-NeoX from random init, for thousands of local steps in all:

* **data-parallel**: every step takes one batch of B examples from each client (the union of N
  batches, N·B examples), R·H steps: synchronous data-parallel training over the same N shards;
* **FedAvg**, **DiLoCo**, **DiLoCo+restart**: each client takes H local AdamW steps at batch B
  from the global model (its own AdamW state kept across rounds, as DiLoCo's workers do), then
  the server applies its rule to the sample-weighted mean delta; R rounds.

Equal examples (R·H·N·B) for every method; the same init, held-out set (``--eval-examples``
records of all categories, cut before partitioning), learning rate, 10% warm-up and linear decay
over each trainer's R·H steps. The held-out loss (response tokens, like the aggregator's) is
taken after each round, and for data-parallel every H steps. Bytes communicated: federated,
each client downloads the global model and uploads its delta once a round, fp32 (2·N·4·P per
round); data-parallel, a ring all-reduce of the fp32 gradient every step (2·(N−1)·4·P in all).
The server rules are written out here on the GPU (tests/test_bench_learning_gpu.py checks them
against ``unitedllm.optimizers``), so the device image needs only torch and transformers.

    python bench/learning_gpu.py --out learning_gpu.json                  # an H100/H200: ~6 min
    python bench/learning_gpu.py --tiny --rounds 2 --local-steps 2        # checks the script on a CPU

Prints one JSON document on stdout (or to ``--out``) and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
METHODS = ("data-parallel", "FedAvg", "DiLoCo", "DiLoCo+restart")
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
IGNORE = -100
_HEAD = "Below is an instruction that describes a task{extra}. Write a response that appropriately completes the request.\n\n"


def prompt(record: dict[str, str]) -> str:
    """The prompt of ``unitedllm.training.data.format_prompt`` (kept here: the device image lacks datasets)."""
    instruction, context = record["instruction"].strip(), record.get("context", "").strip()
    if context:
        head = _HEAD.format(extra=", paired with an input that provides further context")
        return f"{head}### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"{_HEAD.format(extra='')}### Instruction:\n{instruction}\n\n### Response:\n"


def load_data(args: argparse.Namespace) -> tuple[list[list[tuple[list[int], list[int]]]], list[Any], Any]:
    """Per-client (ids, labels) lists (one category each), the held-out ones, and the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    root = args.data_dir
    tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "pythia" / "tokenizer.json"))
    tok.eos_token = "<|endoftext|>"
    records = [
        json.loads(line) for line in (root / "dolly" / "databricks-dolly-15k.jsonl").open(encoding="utf-8")
    ]
    random.Random(0).shuffle(records)
    held, pool = records[: args.eval_examples], records[args.eval_examples :]
    categories = sorted({r["category"] for r in pool})
    shards: list[list[dict[str, str]]] = [[] for _ in range(args.clients)]
    for r in pool:
        shards[categories.index(r["category"]) % args.clients].append(r)

    def encode(rs: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
        prompts = tok([prompt(r) for r in rs], add_special_tokens=False)["input_ids"]
        answers = tok([r["response"] for r in rs], add_special_tokens=False)["input_ids"]
        out = []
        for p, a in zip(prompts, answers, strict=True):
            ids = (p + a + [tok.eos_token_id])[: args.seq]
            labels = ([IGNORE] * len(p) + a + [tok.eos_token_id])[: args.seq]
            if any(x != IGNORE for x in labels):
                out.append((ids, labels))
        return out

    return [encode(s) for s in shards], encode(held), tok


def batches(examples: list[Any], batch: int, seed: int) -> Iterator[list[Any]]:
    """Endless batches of ``examples``, reshuffled every epoch."""
    rng, epoch = random.Random(seed), 0
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        epoch += 1
        for i in range(0, len(order) - batch + 1, batch):
            yield [examples[j] for j in order[i : i + batch]]


def collate(batch: list[Any], device: Any) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids.to(device), labels.to(device), mask.to(device)


def token_loss(model: Any, batch: list[Any], device: Any, dtype: Any) -> tuple[Any, int]:
    """Sum of the next-token losses over the response tokens, and their count."""
    import torch

    ids, labels, mask = collate(batch, device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((target != IGNORE).sum())


def evaluate(model: Any, held: list[Any], device: Any, dtype: Any) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), 16):
            loss, n = token_loss(model, held[i : i + 16], device, dtype)
            total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


def schedule(optimizer: Any, steps: int) -> Any:
    """10% linear warm-up, then linear decay to 0 over ``steps`` (the run's schedule, as UnitedLLM's)."""
    import torch

    warm = max(1, math.ceil(0.1 * steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
    )


def train_step(model: Any, opt: Any, sched: Any, batch: list[Any], device: Any, dtype: Any) -> None:
    import torch

    loss, n = token_loss(model, batch, device, dtype)
    (loss / max(n, 1)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def outer_step(
    weights: list[Any],
    mean_delta: list[Any],
    momentum: list[Any] | None,
    *,
    lr: float,
    mu: float,
    restart: bool,
) -> bool:
    """The server rule on the mean delta, in place: FedAvg (``momentum`` None) or DiLoCo's Nesterov step.

    ``unitedllm.optimizers``' FedAvg and DiLoCo (``momentum_restart``) do the same maths; returns
    whether the momentum was restarted.
    """
    import torch

    if momentum is None:
        for w, d in zip(weights, mean_delta, strict=True):
            w.add_(d, alpha=lr)
        return False
    restarted = (
        restart and sum(float(torch.sum(d * v)) for d, v in zip(mean_delta, momentum, strict=True)) < 0
    )
    for w, d, v in zip(weights, mean_delta, momentum, strict=True):
        if restarted:
            v.zero_()
        v.mul_(mu).add_(d)
        w.add_(d + mu * v, alpha=lr)
    return restarted


def run_method(
    name: str, args: argparse.Namespace, init: dict[str, Any], data: Any, env: dict[str, Any]
) -> dict[str, Any]:
    import torch

    shards, held = data
    device, dtype, model = env["device"], env["dtype"], env["model"]
    model.load_state_dict(init)
    params = [p for p in model.parameters()]
    n_params = sum(p.numel() for p in params)
    total_steps = args.rounds * args.local_steps
    started, rounds, restarts = time.perf_counter(), [], 0
    make_opt = lambda: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)  # noqa: E731
    if name == "data-parallel":
        opt = make_opt()
        sched = schedule(opt, total_steps)
        streams = [batches(s, args.batch_size, args.seed * 100 + k) for k, s in enumerate(shards)]
        for r in range(args.rounds):
            for _ in range(args.local_steps):
                train_step(model, opt, sched, [x for s in streams for x in next(s)], device, dtype)
            rounds.append(
                {
                    "round": r,
                    "eval_loss": evaluate(model, held, device, dtype),
                    "seconds": time.perf_counter() - started,
                }
            )
        sent = 2 * (args.clients - 1) * 4 * n_params * total_steps
    else:
        weights = [p.detach().clone() for p in params]
        momentum = None if name == "FedAvg" else [torch.zeros_like(w) for w in weights]
        lr, mu = (1.0, 0.0) if name == "FedAvg" else (args.outer_lr, args.outer_momentum)
        opts = [make_opt() for _ in shards]
        scheds = [schedule(o, total_steps) for o in opts]
        streams = [batches(s, args.batch_size, args.seed * 100 + k) for k, s in enumerate(shards)]
        sizes = [len(s) for s in shards]
        for r in range(args.rounds):
            mean = [torch.zeros_like(w) for w in weights]
            for k in range(len(shards)):
                with torch.no_grad():
                    for p, w in zip(params, weights, strict=True):
                        p.copy_(w)
                for _ in range(args.local_steps):
                    train_step(model, opts[k], scheds[k], next(streams[k]), device, dtype)
                with torch.no_grad():
                    for m, p, w in zip(mean, params, weights, strict=True):
                        m.add_(p.detach() - w, alpha=sizes[k] / sum(sizes))
            with torch.no_grad():
                restarts += outer_step(
                    weights, mean, momentum, lr=lr, mu=mu, restart=name.endswith("+restart")
                )
                for p, w in zip(params, weights, strict=True):
                    p.copy_(w)
            rounds.append(
                {
                    "round": r,
                    "eval_loss": evaluate(model, held, device, dtype),
                    "seconds": time.perf_counter() - started,
                }
            )
        sent = 2 * len(shards) * 4 * n_params * args.rounds
    losses = [x["eval_loss"] for x in rounds]
    return {
        "name": name,
        "rounds": rounds,
        "final_eval_loss": losses[-1],
        "worst_rise": max((b - a for a, b in zip(losses, losses[1:], strict=False)), default=None),
        "momentum_restarts": restarts,
        "sequential_steps": total_steps,
        "examples": total_steps * args.clients * args.batch_size,
        "bytes_communicated": sent,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = p.add_argument
    add("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="the shared data (default: %(default)s)")
    add(
        "--shape",
        default="pythia-160m",
        help="a folder under DATA/pythia with config.json (default: %(default)s)",
    )
    add("--tiny", action="store_true", help="a 2-layer model of hidden size 64 (checks the script on a CPU)")
    add("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    add("--clients", type=int, default=8)
    add("--rounds", type=int, default=10, help="R (default: %(default)s)")
    add("--local-steps", type=int, default=50, help="H (default: %(default)s)")
    add("--batch-size", type=int, default=8, help="B per client and step (default: %(default)s)")
    add("--seq", type=int, default=256, help="tokens per example (default: %(default)s)")
    add("--lr", type=float, default=6e-4, help="peak AdamW learning rate (default: %(default)s)")
    add("--outer-lr", type=float, default=0.7, help="DiLoCo's outer learning rate (default: %(default)s)")
    add("--outer-momentum", type=float, default=0.9, help="DiLoCo's outer momentum (default: %(default)s)")
    add("--eval-examples", type=int, default=300)
    add("--seed", type=int, default=0)
    add("--out", type=Path)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if (
        bad
        or min(args.clients, args.rounds, args.local_steps, args.batch_size, args.seq, args.eval_examples) < 1
    ):
        p.error(
            f"--methods must be of {', '.join(METHODS)} (got {', '.join(bad)}); counts must be at least 1"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    for rel in (
        "dolly/databricks-dolly-15k.jsonl",
        "pythia/tokenizer.json",
        f"pythia/{args.shape}/config.json",
    ):
        if not (args.data_dir / rel).is_file():
            print(
                f"bench/learning_gpu.py: {args.data_dir / rel} is missing (give --data-dir)", file=sys.stderr
            )
            return 2
    import torch
    from transformers import AutoConfig, GPTNeoXForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    config = AutoConfig.from_pretrained(str(args.data_dir / "pythia" / args.shape))
    for key, value in (TINY_SHAPE if args.tiny else {}).items():
        setattr(config, key, value)
    torch.manual_seed(args.seed)
    model = GPTNeoXForCausalLM(config).to(device)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shards, held, _ = load_data(args)
    env = {"device": device, "dtype": dtype, "model": model}
    initial = evaluate(model, held, device, dtype)
    results = []
    for name in args.methods:
        print(f"learning_gpu: {name} ...", file=sys.stderr, flush=True)
        results.append(run_method(name, args, init, (shards, held), env))
        print(
            f"learning_gpu: {name}: {results[-1]['final_eval_loss']:.4f} in {results[-1]['seconds']:.0f} s",
            file=sys.stderr,
        )
    doc = {
        "benchmark": "learning-gpu",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "client_examples": [len(s) for s in shards],
        "eval_examples_scored": len(held),
        "initial_eval_loss": initial,
        "methods": results,
    }
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    dp = next((m["final_eval_loss"] for m in results if m["name"] == "data-parallel"), None)
    for m in results:
        gap = "" if dp is None else f" ({m['final_eval_loss'] - dp:+.4f} vs data-parallel)"
        print(
            f"{m['name']:>15}: final {m['final_eval_loss']:.4f}{gap}, worst rise {m['worst_rise'] or 0:+.4f}, "
            f"{m['bytes_communicated'] / 2**30:.1f} GiB moved, {m['seconds']:.0f} s",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
