"""Learning at equal compute on Dolly-15k: FedAvg, FedAdam and DiLoCo beside centralized training.

Every run trains the same pythia-14m-shaped GPT-NeoX (built from the shared ``config.json``
with the same random weights), with the Pythia tokenizer, on Dolly-15k, and is scored on the
same held-out set (``--eval-examples`` records of every category, cut before partitioning):
the aggregator's token-averaged loss on the response tokens after each round.

* **Federated** (one run per ``--optimizers`` entry): ``examples/dolly_pythia14m.yaml``
  through ``unitedllm.load_config`` + ``unitedllm.run``; N = 8 clients holding one Dolly
  category each, R rounds of K local AdamW steps at batch B, then the server optimizer.
* **Centralized**: the same config, code and trainer with *one* client that holds the union of
  the clients' training data (the whole pool minus the held-out set).

Equal compute means the same number of training examples through the model, N·R·K·B.
``--centralized steps`` (default) gives the one client N·R·K optimizer steps at batch B,
the same total number of optimizer steps as all clients together, in R rounds of N·K
steps so that its evaluations fall at the same compute as the federated ones. ``batch``
gives it R·K steps at batch N·B instead: as many sequential steps as one client takes, and
the very same learning-rate schedule. Everything else is shared: model, tokenizer, sequence
length, learning rate, warmup fraction and linear decay over each trainer's own steps. The
model is trained in full (``peft_type: none``): LoRA adapters on a randomly initialised base
learn little. The inner optimizer's state stays with each client across rounds (as in
DiLoCo). There is no pass/fail threshold.

    python bench/learning.py                                 # ~10-15 min on 2 CPU cores
    python bench/learning.py --rounds 20 --local-steps 50 --max-seq-length 512 --eval-examples 1000
    python bench/learning.py --optimizers FedAvg,DiLoCo --server-lr DiLoCo=0.5 --out learning.json
    python bench/learning.py --optimizers 'FedAvg,DiLoCo[server_momentum=0.5]' --seed 7 --rounds 6 --local-steps 10

Prints one JSON document on stdout (or to ``--out``) and a table on stderr (stdout with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by path (learning_grid.py, the tests): find the sibling modules
    sys.path.insert(0, str(HERE))

from learning_report import (  # noqa: E402
    final_per_category,
    finite,
    fmt,
    machine,
    print_table,
    settings_of,
    worst_rise,
)
from learning_setup import (  # noqa: E402
    DATA_FILES,
    REPO,
    Method,
    UsageError,
    base_overrides,
    config_of,
    methods_of,
    optimizers,
    parse_args,
    server_lrs,
    user_overrides,
    variant,
)

DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
__all__ = ["main", "print_table", "run", "worst_rise", "UsageError"]


def _data_dir(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The data folder and, when the default one is incomplete, why the benchmark is skipped."""
    explicit = args.data_dir is not None
    root = (args.data_dir or DEFAULT_DATA_DIR).expanduser().resolve()
    missing = [str(root / rel) for rel in DATA_FILES.values() if not (root / rel).is_file()]
    if not missing:
        return root, None
    reason = f"the shared data is not there: missing {', '.join(missing)}"
    if explicit:
        raise UsageError(f"--data-dir {args.data_dir}: {reason}")
    return root, f"{reason} (give its location with --data-dir)"


def _run_method(cfg: Any, method: Method) -> dict[str, Any]:
    """Run one method; a run that fails (e.g. a client's loss turned NaN) is reported, not raised."""
    import unitedllm
    from unitedllm.errors import UnitedLLMError

    steps = method.clients * method.steps_per_round * cfg.train_args.comm_round
    out: dict[str, Any] = {
        "name": method.name,
        "kind": method.kind,
        "server_optimizer": cfg.server_optimizer_name,
        "server_optimizer_args": _effective_server_args(cfg),
        "clients": method.clients,
        "steps_per_client_per_round": method.steps_per_round,
        "batch": method.batch,
        "optimizer_steps": steps,
        "examples": steps * method.batch,
    }
    start = time.perf_counter()
    try:
        result = unitedllm.run(cfg)
    except UnitedLLMError as exc:
        return {**out, "error": str(exc), "rounds": [], "final_eval_loss": None, "final_perplexity": None,
                "final_per_category": {}, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    seconds = time.perf_counter() - start
    rounds = [
        {
            "round": s.round_idx,
            "train_loss": finite(s.train_loss),
            "eval_loss": finite(s.eval_loss),
            "seconds": round(s.seconds, 2),
        }
        for s in result.rounds
    ]
    final = finite(result.rounds[-1].eval_loss) if result.rounds else None
    return {
        **out,
        "rounds": rounds,
        "worst_rise": worst_rise([r["eval_loss"] for r in rounds]),
        "final_eval_loss": final,
        "final_perplexity": None if final is None else math.exp(min(final, 50.0)),
        "final_per_category": final_per_category(result.output_dir),
        "seconds": round(seconds, 1),
    }


def _effective_server_args(cfg: Any) -> dict[str, Any]:
    """The server optimizer's hyper-parameters this run used, paper defaults filled in."""
    from unitedllm.optimizers import create

    name = cfg.server_optimizer_name
    optimizer = create(
        name, cfg.train_args.server_optimizer_args, num_clients=cfg.train_args.client_num_in_total
    )
    import msgspec

    return msgspec.structs.asdict(optimizer.params)  # every hyper-parameter the rule reads


def _initial_eval(cfg: Any) -> tuple[float, int]:
    """The held-out loss of the randomly initialised model every run starts from, and the examples scored."""
    from unitedllm.training.hf import HFLocalTrainer

    trainer = HFLocalTrainer(cfg, 0)
    try:
        result = trainer.evaluate(trainer.initial_weights())
        return float(result.metrics["eval_loss"]), result.num_samples
    finally:
        trainer.close()


def _keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS; True if it agreed.

    Each step allocates and frees the logits over the 50k vocabulary (hundreds of MB); by
    default glibc hands such blocks back to the OS and every step faults them in again,
    which costs as much system time as the model's own compute on a small VM.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_arena_max = -1, -2, -3, -8
    # One arena: training is sequential (one shared model), and each worker thread's own
    # arena would otherwise keep its own copy of those blocks.
    return all(
        mallopt(key, value) == 1
        for key, value in (
            (m_arena_max, 1),
            (m_mmap_threshold, 1 << 30),
            (m_trim_threshold, 1 << 30),
            (m_top_pad, 1 << 28),
        )
    )


def _quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for noisy in ("transformers", "datasets", "peft", "accelerate", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every method and return the report (raises UsageError / UnitedLLMError on bad input)."""
    user = user_overrides(args)
    server_lrs(args, optimizers(args))
    for entry in optimizers(args):
        variant(entry)  # a malformed rule variant is a usage error even when the data is absent
    data, skipped = _data_dir(args)
    if skipped:
        return {"benchmark": "learning", "skipped": skipped}
    import torch

    torch.set_num_threads(args.threads)
    malloc_tuned = _keep_freed_memory()
    scratch = Path(tempfile.mkdtemp(prefix="unitedllm-bench-learning-"))
    keep = args.keep_runs.expanduser().resolve() if args.keep_runs else None
    try:
        shared = base_overrides(args, data, user)
        base = config_of(args, shared, None, scratch / "base")
        clients = base.train_args.client_num_in_total  # the config's partition: one Dolly category each
        methods = methods_of(args, clients)
        out_dirs = [(keep or scratch) / m.name.replace(" ", "_") for m in methods]
        configs = [config_of(args, shared, m, d) for m, d in zip(methods, out_dirs, strict=True)]
        started = datetime.now(UTC)
        load_before = os.getloadavg()[0]
        _progress(f"{len(methods)} runs; scoring the untrained model first")
        initial, scored = _initial_eval(configs[0])
        results = []
        for method, cfg, out_dir in zip(methods, configs, out_dirs, strict=True):
            _progress(f"{method.name} ...")
            results.append(_run_method(cfg, method))
            if keep is None:  # full-model checkpoints of 9 ranks: gigabytes per run
                shutil.rmtree(out_dir, ignore_errors=True)
            _progress(
                f"{method.name}: final eval loss {fmt(results[-1]['final_eval_loss'])} in {results[-1]['seconds']:.0f} s"
            )
        return {
            "benchmark": "learning",
            "date": started.isoformat(timespec="seconds"),
            "machine": {
                **machine(),
                "malloc_keeps_freed_memory": malloc_tuned,
                "loadavg_1m_before": load_before,
                "loadavg_1m_after": os.getloadavg()[0],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            },
            "settings": settings_of(args, base, data, scored),
            "equal_compute": (
                f"every method trains on N*R*K*B = {clients}*{args.rounds}*{args.local_steps}*{args.batch_size} = "
                f"{clients * args.rounds * args.local_steps * args.batch_size} examples; 'centralized' takes "
                f"N*R*K optimizer steps at batch B (the clients' total steps), 'centralized {clients}x batch' "
                f"R*K steps at batch N*B (the schedule of one client)"
            ),
            "initial_eval_loss": initial,
            "methods": results,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _progress(message: str) -> None:
    print(f"learning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from unitedllm.errors import UnitedLLMError

    try:
        args = parse_args(argv)
        _quiet_libraries()
        report = run(args)
    except (UsageError, UnitedLLMError) as exc:
        print(f"bench/learning.py: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    if "skipped" in report:
        print(f"bench/learning.py: skipped: {report['skipped']}", file=sys.stderr)
        return 0
    print_table(report, sys.stdout if args.out else sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
