"""What the learning bench reports: per-run results, the machine and settings, and the table."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path
from typing import Any, TextIO


def final_per_category(run_dir: Path) -> dict[str, float]:
    """The aggregator's per-category losses of its last evaluation, from the run's metrics.jsonl."""
    last: dict[str, float] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return last
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("event") == "eval" and record.get("rank") == 0 and record.get("model") == "global":
            last = {k: float(v) for k, v in (record.get("per_category") or {}).items() if v is not None}
    return last


def finite(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (JSON has no NaN; a diverged run shows as null)."""
    return value if value is not None and math.isfinite(value) else None


def worst_rise(losses: list[float | None]) -> float | None:
    """The largest round-over-round increase of the eval loss (negative: it fell every round)."""
    known = [x for x in losses if x is not None]
    if len(losses) != len(known):
        return None  # a diverged round: the run failed, no finite answer
    rises = [b - a for a, b in zip(known, known[1:], strict=False)]
    return max(rises) if rises else None


# The hyper-parameters each rule reads (anything else in server_optimizer_args it ignores).
def machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.is_available(),
    }


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict[str, Any], out: TextIO) -> None:
    """The comparison as a fixed-width table: eval loss after each round and at the end."""
    methods = report["methods"]
    rounds = max((len(m["rounds"]) for m in methods), default=0)
    central = next((m["final_eval_loss"] for m in methods if m["name"] == "centralized"), None)
    head = (
        ["method", "steps x batch"]
        + [f"r{r}" for r in range(rounds)]
        + ["final loss", "ppl", "vs central", "worst rise", "seconds"]
    )
    rows = [
        ["initial (random init)", "0"]
        + ["" for _ in range(rounds)]
        + [fmt(report["initial_eval_loss"]), fmt(math.exp(report["initial_eval_loss"]), ".0f"), "", "", ""]
    ]
    for m in methods:
        losses = [fmt(r["eval_loss"]) for r in m["rounds"]] + [""] * (rounds - len(m["rounds"]))
        diff = None if central is None or m["final_eval_loss"] is None else m["final_eval_loss"] - central
        rows.append(
            [
                m["name"],
                f"{m['optimizer_steps']} x {m['batch']}",
                *losses,
                fmt(m["final_eval_loss"]),
                fmt(m["final_perplexity"], ".1f"),
                fmt(diff, "+.3f") if m["name"] != "centralized" else "",
                fmt(m.get("worst_rise"), "+.3f"),
                fmt(m["seconds"], ".0f"),
            ]
        )
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *rows]:
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells), file=out)
    for m in methods:
        if "error" in m:
            print(f"{m['name']} failed: {m['error']}", file=out)
    s = report["settings"]
    print(
        f"eval: {s['eval_examples_scored']} held-out examples, response-token loss; "
        f"{s['clients']} clients, R={s['rounds']} rounds x K={s['local_steps']} steps, B={s['batch_size']}, "
        f"seq {s['max_seq_length']}, lr {s['learning_rate']}",
        file=out,
    )


def settings_of(args: argparse.Namespace, base: Any, data: Path, scored: int) -> dict[str, Any]:
    return {
        "config": str(args.config),
        "data_dir": str(data),
        "model": f"{base.model_args.model_name_or_path} (GPT-NeoX from config.json, random init), Pythia tokenizer",
        "peft_type": base.model_args.peft_type,
        "clients": base.train_args.client_num_in_total,
        "partition": base.data_args.partition,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "learning_rate": base.train_args.learning_rate,
        "seed": base.train_args.seed,
        "client_optimizer": base.train_args.client_optimizer,
        "lr_scheduler": base.train_args.lr_scheduler_type,
        "warmup_ratio": base.train_args.warmup_ratio,
        "eval_examples": args.eval_examples,
        "eval_examples_scored": scored,
        "overrides": args.sets,
    }
