"""A client's local round on a GPU: UnitedLLM's trainer beside a plain Hugging Face ``Trainer`` + PEFT run.

For each model size (pythia-410m- and pythia-1.4b-shaped GPT-NeoX, random init, LoRA on the
attention and MLP projections, bf16 weights with bf16 mixed precision, sequences of exactly
``--seq`` tokens) the script times, in the same process and on the same card:

* **unitedllm**: ``HFLocalTrainer.fit`` (``unitedllm.training.hf``) of client 1 of a config
  built through ``unitedllm.load_config``: one local round of ``--steps`` optimizer steps, from
  loading the global weights to returning the new ones (what a client does each round);
* **hf**: a plain ``transformers.Trainer`` over a ``peft.get_peft_model`` model with the same
  shapes, LoRA settings, batch, precision, optimizer and steps, tokenized the plain way
  (``DataCollatorForLanguageModeling``); a new ``Trainer`` per trial, timed from its
  construction to the end of ``train()``.

After one warm-up round each, ``--trials`` timed rounds alternate between the two (the first
of each pair swaps every trial). Reported per size and side: tokens/s (median and best over
trials), peak GPU memory allocated during a round (``torch.cuda.max_memory_allocated``, with
what was resident when the round began: both models stay on the card), the last training
loss; and ``ratio`` = unitedllm tokens/s ÷ hf tokens/s (median; target ≥ 0.97). Model FLOPs
utilisation: ``6 · N · tokens/s ÷ peak`` with N the base model's parameters (embedding and
output head included; attention's own FLOPs not counted) and the card's dense bf16 peak,
found from its name (H100 SXM/PCIe/NVL, H200; ``--peak-tflops`` for others; stated in the JSON).

Shapes: pythia-410m from ``/work/shared/data/pythia/pythia-410m/config.json`` when present,
else the published ones (same numbers); pythia-1.4b always the published ones (the Pythia
paper and model card: 24 layers, hidden 2048, 16 heads, MLP 8192, vocab 50304). The tokenizer
is a word-level one the script builds (its ids fit the 50304-row embedding, which keeps the
real vocabulary shape), over random words, so every example fills its sequence.

    python bench/gpu_throughput.py --out gpu_throughput.json          # a GPU, both sizes, ~5 min on an H100
    python bench/gpu_throughput.py --sizes pythia-410m --steps 20 --trials 2
    python bench/gpu_throughput.py --tiny                             # tiny shapes on the CPU: checks the script

Prints one JSON document on stdout (or to ``--out``) and a table on stderr (stdout with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "pythia"
TARGET_RATIO = 0.97
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.0
LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
LORA = {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "targets": LORA_TARGETS}
# What every Pythia config.json shares (shared/data/pythia/README.md lists them).
PYTHIA_COMMON: dict[str, Any] = {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "vocab_size": 50304,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "use_cache": True,
}
# Published shapes (Pythia paper, table 1, and the EleutherAI model cards), used where no config file is at hand.
PUBLISHED: dict[str, dict[str, int]] = {
    "pythia-410m": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
    "pythia-1.4b": {
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 8192,
    },
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "vocab_size": 2048,
    "max_position_embeddings": 256,
}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's H100 / H200 datasheets, in TFLOP/s.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4))
WORDS = 1500  # the tokenizer's vocabulary of made-up words


class UsageError(Exception):
    """A bad flag: printed as one line, exit 2."""


# ---- inputs -----------------------------------------------------------------------------------------------


def model_shape(name: str) -> tuple[dict[str, Any], str]:
    """The GPT-NeoX config of ``name`` and where its numbers came from."""
    if name == "tiny":
        return {**PYTHIA_COMMON, **TINY}, "tiny test shape"
    found = DATA_DIR / name / "config.json"
    if found.is_file():
        return json.loads(found.read_text()), str(found)
    return {**PYTHIA_COMMON, **PUBLISHED[name]}, "published Pythia shape (hard-coded)"


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))


def write_inputs(workdir: Path, *, seq: int, examples: int) -> tuple[Path, Path]:
    """A word-level tokenizer dir and a JSONL of instruction records, each longer than ``seq`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tok_dir = workdir / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    rng = random.Random(0)
    data = workdir / "client_1.jsonl"
    with data.open("w") as fh:
        for _ in range(examples):
            record = {
                "instruction": _words(rng, 16),
                "context": "",
                "response": _words(rng, seq + 64),
                "category": "x",
            }
            fh.write(json.dumps(record) + "\n")
    return tok_dir, data


def unitedllm_config(
    workdir: Path, model_dir: Path, tok_dir: Path, data: Path, args: argparse.Namespace
) -> Any:
    """The run config of the measured client, through the public ``unitedllm.load_config``."""
    import unitedllm

    gpu = not args.tiny
    return unitedllm.load_config(
        {
            "common_args": {"random_seed": 0},
            "data_args": {
                "client_dataset_path": [str(data)],
                "test_dataset_size": 2,
                "max_seq_length": args.seq,
                "remove_long_seq": False,
                "truncate_long_seq": True,
                "cache_dir": str(workdir / "cache"),
            },
            "model_args": {
                "model_name_or_path": str(model_dir),
                "tokenizer_name_or_path": str(tok_dir),
                "load_pretrained": False,
                "peft_type": "lora",
                "lora_r": LORA_R,
                "lora_alpha": LORA_ALPHA,
                "lora_dropout": LORA_DROPOUT,
                "lora_target_modules": LORA_TARGETS,
            },
            "train_args": {
                "client_num_in_total": 1,
                "client_num_per_round": 1,
                "comm_round": 1000,
                "per_device_train_batch_size": args.batch,
                "learning_rate": 1e-4,
                "lr_scheduler_type": "constant",
                "warmup_steps": 0,
                "local_max_steps": args.steps,
                "model_dtype": "bf16",
                "bf16": True,
                "use_cpu": not gpu,
                "output_dir": str(workdir / "out"),
            },
            "device_args": {"using_gpu": gpu},
            "comm_args": {"backend": "LOCAL"},
            "tracking_args": {"log_system_metrics": False},
        }
    )


# ---- the two sides ----------------------------------------------------------------------------------------


class Side:
    """One way of running a local round: ``round(steps)`` trains and returns the last training loss."""

    name: str

    def round(self, steps: int, index: int) -> float:
        raise NotImplementedError


class UnitedLLMSide(Side):
    """Client 1's ``HFLocalTrainer``: every call is one federated round from the same global weights."""

    name = "unitedllm"

    def __init__(self, cfg: Any, *, seq: int):
        from unitedllm.training.hf import HFLocalTrainer

        self.trainer = HFLocalTrainer(cfg, 1)
        lengths = {len(ids) for ids in self.trainer.train_dataset["input_ids"]}  # type: ignore[index]
        if lengths != {seq}:
            raise RuntimeError(
                f"every training example should have {seq} tokens, found lengths {sorted(lengths)}"
            )
        self.weights = self.trainer.initial_weights()
        self.model = self.trainer.model

    def round(self, steps: int, index: int) -> float:
        result = self.trainer.fit(self.weights, round_idx=index, max_steps=steps)
        return float(result.metrics["train_loss"])


class HFSide(Side):
    """A plain ``transformers.Trainer`` + PEFT run, as a user would write it; a new ``Trainer`` per round."""

    name = "hf"

    def __init__(
        self, shape: dict[str, Any], tok_dir: Path, data: Path, workdir: Path, args: argparse.Namespace
    ):
        import torch
        from datasets import Dataset
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import (
            AutoModelForCausalLM,
            DataCollatorForLanguageModeling,
            GPTNeoXConfig,
            PreTrainedTokenizerFast,
        )

        self.args = args
        self.workdir = workdir
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
        config = GPTNeoXConfig(**{k: v for k, v in shape.items() if k not in ("architectures", "model_type")})
        config.pad_token_id = tokenizer.pad_token_id
        device = "cpu" if args.tiny else "cuda"
        with torch.device(device):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")  # type: ignore[no-untyped-call]
        model = model.to(torch.bfloat16)
        lora = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=LORA_DROPOUT,
            target_modules=LORA_TARGETS,
        )
        self.model = get_peft_model(model, lora)
        records = [json.loads(line) for line in data.read_text().splitlines()]
        texts = [f"### Instruction:\n{r['instruction']}\n\n### Response:\n{r['response']}" for r in records]
        encoded = tokenizer(texts, truncation=True, max_length=args.seq)
        self.dataset = Dataset.from_dict({"input_ids": encoded["input_ids"]})
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def round(self, steps: int, index: int) -> float:
        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(
            output_dir=str(self.workdir / "hf"),
            max_steps=steps,
            per_device_train_batch_size=self.args.batch,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            bf16=True,
            use_cpu=self.args.tiny,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=index,
        )
        trainer = Trainer(
            model=self.model, args=args, train_dataset=self.dataset, data_collator=self.collator
        )
        output = trainer.train()
        return float(output.training_loss)


# ---- measuring --------------------------------------------------------------------------------------------


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_round(side: Side, steps: int, index: int) -> dict[str, Any]:
    """One round of ``side``: seconds, loss and (on a GPU) peak memory."""
    import torch

    cuda = torch.cuda.is_available()
    _sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    started = time.perf_counter()
    loss = side.round(steps, index)
    _sync()
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {"seconds": seconds, "loss": loss}
    if cuda:
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["resident_gb"] = resident / 1e9
    return out


def peak_flops(device_name: str, override_tflops: float | None) -> tuple[float | None, str]:
    """The card's dense bf16 peak in FLOP/s, and where the number came from."""
    if override_tflops is not None:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12, f"{key} dense bf16 datasheet peak, {tflops:g} TFLOP/s"
    return None, f"no known bf16 peak for {device_name!r} (pass --peak-tflops)"


def _summary(rounds: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    rates = [tokens / r["seconds"] for r in rounds]
    out: dict[str, Any] = {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_best": max(rates),
        "seconds": [round(r["seconds"], 4) for r in rounds],
        "last_loss": rounds[-1]["loss"],
    }
    if "peak_gb" in rounds[0]:
        out["peak_gb"] = max(r["peak_gb"] for r in rounds)
        out["resident_gb"] = statistics.median(r["resident_gb"] for r in rounds)
    return out


def measure_size(
    name: str, args: argparse.Namespace, peak: float | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """Build both sides for model ``name``, warm them up, then time alternating rounds."""
    import torch

    shape, source = model_shape(name)
    workdir = Path(tempfile.mkdtemp(prefix=f"unitedllm-gpu-bench-{name}-"))
    try:
        model_dir = workdir / "model"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(shape, indent=2))
        examples = max(4 * args.batch, 16)
        tok_dir, data = write_inputs(workdir, seq=args.seq, examples=examples)
        log(f"{name}: building both models ({source})")
        ours = UnitedLLMSide(unitedllm_config(workdir, model_dir, tok_dir, data, args), seq=args.seq)
        theirs = HFSide(shape, tok_dir, data, workdir, args)
        params = sum(p.numel() for n, p in ours.model.named_parameters() if "lora_" not in n)
        trainable = sum(p.numel() for p in ours.model.parameters() if p.requires_grad)
        theirs_params = sum(p.numel() for n, p in theirs.model.named_parameters() if "lora_" not in n)
        if (params, trainable) != (
            theirs_params,
            sum(p.numel() for p in theirs.model.parameters() if p.requires_grad),
        ):
            raise RuntimeError(f"{name}: the two sides built different models")
        log(f"{name}: {params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable (LoRA r={LORA_R})")
        sides: list[Side] = [ours, theirs]
        for side in sides:
            timed_round(side, args.warmup_steps, 0)
        rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
        for trial in range(args.trials):
            for side in sides if trial % 2 == 0 else reversed(sides):
                rounds[side.name].append(timed_round(side, args.steps, trial + 1))
                log(
                    f"{name}: trial {trial + 1}/{args.trials} {side.name}: {rounds[side.name][-1]['seconds']:.2f}s"
                )
        tokens = args.steps * args.batch * args.seq
        result: dict[str, Any] = {
            "model": name,
            "shape_source": source,
            "shape": {
                k: shape[k]
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "intermediate_size",
                    "vocab_size",
                )
            },
            "params": params,
            "trainable_params": trainable,
            "tokens_per_round": tokens,
        }
        for side_name, side_rounds in rounds.items():
            summary = _summary(side_rounds, tokens)
            summary["mfu"] = 6 * params * summary["tokens_per_s"] / peak if peak else None
            result[side_name] = summary
        result["ratio"] = result["unitedllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
        result["ratio_best"] = result["unitedllm"]["tokens_per_s_best"] / result["hf"]["tokens_per_s_best"]
        result["meets_target"] = result["ratio"] >= TARGET_RATIO
        ours.trainer.close()
        del ours, theirs, sides
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---- output -----------------------------------------------------------------------------------------------


def table(doc: dict[str, Any]) -> str:
    """The results as a fixed-width text table."""
    head = f"{'model':<12} {'side':<10} {'tokens/s':>10} {'best':>10} {'peak GB':>8} {'MFU':>6} {'loss':>7}"
    lines = [f"device: {doc['device']}  ({doc['peak_source']})", head, "-" * len(head)]
    for r in doc["results"]:
        for side in ("unitedllm", "hf"):
            s = r[side]
            peak = f"{s['peak_gb']:.1f}" if "peak_gb" in s else "-"
            mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
            lines.append(
                f"{r['model']:<12} {side:<10} {s['tokens_per_s']:>10.0f} {s['tokens_per_s_best']:>10.0f} "
                f"{peak:>8} {mfu:>6} {s['last_loss']:>7.3f}"
            )
        verdict = "meets" if r["meets_target"] else "BELOW"
        lines.append(
            f"{r['model']:<12} ratio {r['ratio']:.3f} (best {r['ratio_best']:.3f}; {verdict} {TARGET_RATIO})"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_throughput.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes", default="pythia-410m,pythia-1.4b", help="comma-separated: pythia-410m, pythia-1.4b"
    )
    parser.add_argument("--seq", type=int, default=1024, help="tokens per example (default 1024)")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per timed round (default 30)")
    parser.add_argument(
        "--warmup-steps", type=int, default=5, help="steps of the untimed first round (default 5)"
    )
    parser.add_argument("--trials", type=int, default=3, help="timed rounds per side (default 3)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not known"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes on the CPU, few steps: checks the script"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the JSON here (the table goes to stdout)"
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.seq, args.batch = "tiny", min(args.seq, 64), min(args.batch, 2)
        args.steps, args.warmup_steps, args.trials = min(args.steps, 3), 1, min(args.trials, 2)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    allowed = ["tiny"] if args.tiny else list(PUBLISHED)
    bad = [s for s in sizes if s not in allowed]
    if bad or not sizes:
        raise UsageError(f"--sizes: {', '.join(bad) or 'nothing'} not among {', '.join(allowed)}")
    for flag in ("seq", "batch", "steps", "warmup_steps", "trials"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')}: {getattr(args, flag)} must be at least 1")
    args.size_list = sizes
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print(
            "error: no CUDA device: this benchmark needs a GPU (--tiny checks the script on the CPU)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for noisy in ("transformers", "datasets", "peft", "unitedllm"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu"
    peak, peak_source = (
        peak_flops(device, args.peak_tflops) if device != "cpu" else (None, "no MFU on the CPU")
    )
    results = [measure_size(name, args, peak, log) for name in args.size_list]
    import peft
    import transformers

    doc = {
        "bench": "gpu_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "peak_bf16_flops": peak,
        "peak_source": peak_source,
        "mfu_formula": "6 * N * tokens_per_s / peak_bf16_flops; N = base model parameters (embedding and output "
        "head included), attention FLOPs not counted",
        "target_ratio": TARGET_RATIO,
        "settings": {
            "seq": args.seq,
            "batch": args.batch,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "trials": args.trials,
            "lora": LORA,
            "precision": "bf16 weights, bf16 mixed precision",
            "tiny": args.tiny,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "cuda": torch.version.cuda,
        },
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    out: TextIO = sys.stdout if args.out else sys.stderr
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    print(table(doc), file=out)
    finite = all(math.isfinite(r["ratio"]) for r in results)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
