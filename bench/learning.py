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
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
DEFAULT_CONFIG = REPO / "examples" / "dolly_pythia14m.yaml"
DATA_FILES = {
    "dolly": Path("dolly/databricks-dolly-15k.jsonl"),
    "tokenizer": Path("pythia/tokenizer.json"),
    "model_config": Path("pythia/pythia-14m/config.json"),
}
# Keys the benchmark sets itself: changing them with --set would break equal compute.
CONTROLLED_KEYS = (
    "train_args.comm_round",
    "train_args.local_max_steps",
    "train_args.client_num_in_total",
    "train_args.client_num_per_round",
    "train_args.per_device_train_batch_size",
    "train_args.gradient_accumulation_steps",
    "train_args.server_optimizer",
    "train_args.federated_optimizer",
    "train_args.output_dir",
    "train_args.seed",
    "data_args.test_dataset_size",
    "data_args.max_seq_length",
)


class UsageError(Exception):
    """A bad flag or missing data the user pointed at: printed as one line, exit 2."""


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a federated run with a server optimizer, or centralized training."""

    name: str
    kind: str  # "federated" or "centralized"
    clients: int
    steps_per_round: int
    batch: int
    overrides: dict[str, Any] = field(default_factory=dict)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add = parser.add_argument
    add("--data-dir", type=Path, help=f"the shared data folder (default: {DEFAULT_DATA_DIR})")
    add(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="the federated run's config (default: %(default)s)",
    )
    add(
        "--optimizers",
        default="FedAvg,FedAdam,DiLoCo",
        help="comma-separated server optimizers, each NAME or NAME[key=value;...] with its own "
        "server_optimizer_args, e.g. 'DiLoCo[momentum_restart=true]' (default: %(default)s)",
    )
    add("--seed", type=int, help="train_args.seed of every run (default: the config's)")
    add(
        "--centralized",
        choices=("steps", "batch", "both", "none"),
        default="steps",
        help="centralized baseline at equal compute: N*R*K steps at batch B, R*K steps at batch N*B, both or none",
    )
    add("--rounds", type=int, default=4, help="federated rounds R (default: %(default)s)")
    add(
        "--local-steps",
        type=int,
        default=4,
        help="local optimizer steps per client per round K (default: %(default)s)",
    )
    add("--batch-size", type=int, default=4, help="per-step batch B (default: %(default)s)")
    add("--max-seq-length", type=int, default=256, help="tokens per example (default: %(default)s)")
    add(
        "--eval-examples",
        type=int,
        default=200,
        help="held-out records (before dropping those whose prompt fills the sequence) (default: %(default)s)",
    )
    add(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="peak local AdamW learning rate (default: %(default)s)",
    )
    add(
        "--server-lr",
        action="append",
        default=[],
        metavar="OPTIMIZER=LR",
        help="server learning rate of one optimizer (repeatable; default: the paper's value)",
    )
    add(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="sets",
        help="a config override applied to every run (repeatable, values are YAML)",
    )
    add(
        "--threads",
        type=int,
        default=1,
        help="torch threads; on a shared 2-core machine 2 threads cost more CPU and finish no sooner (default: %(default)s)",
    )
    add("--keep-runs", type=Path, help="keep each run's output folder under this directory")
    add("--out", type=Path, help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)
    for name in ("rounds", "local_steps", "batch_size", "max_seq_length", "eval_examples", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


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


def _server_lrs(args: argparse.Namespace, optimizers: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for text in args.server_lr:
        name, sep, value = text.rpartition("=")
        if not sep or name not in optimizers:
            raise UsageError(
                f"--server-lr {text!r}: expected OPTIMIZER=LR with OPTIMIZER one of {optimizers}"
            )
        try:
            out[name] = float(value)
        except ValueError:
            raise UsageError(f"--server-lr {text!r}: {value!r} is not a number") from None
        if not out[name] > 0:
            raise UsageError(f"--server-lr {text!r}: the learning rate must be > 0")
    return out


def _user_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from unitedllm.config.overrides import parse_assignment

    out: dict[str, Any] = {}
    for text in args.sets:
        key, value = parse_assignment(text)
        if key in CONTROLLED_KEYS or any(key.startswith(k + ".") for k in CONTROLLED_KEYS):
            raise UsageError(f"--set {text!r}: {key} is set by the benchmark (use its own flag, see --help)")
        out[key] = value
    return out


def _optimizers(args: argparse.Namespace) -> list[str]:
    """The --optimizers entries as given (``NAME`` or ``NAME[key=value;...]``)."""
    return [name.strip() for name in args.optimizers.split(",") if name.strip()]


def _variant(entry: str) -> tuple[str, dict[str, Any]]:
    """``NAME[key=value;...]`` as the rule's name and its server_optimizer_args (values are YAML)."""
    import yaml

    name, bracket, rest = entry.partition("[")
    if not bracket:
        return entry, {}
    if not rest.endswith("]"):
        raise UsageError(f"--optimizers {entry!r}: expected NAME[key=value;...]")
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest[:-1].split(";"))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--optimizers {entry!r}: {item!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value)
    return name.strip(), out


def _methods(args: argparse.Namespace, clients: int) -> list[Method]:
    """The runs to compare: one per server optimizer, then the centralized baseline(s)."""
    optimizers = _optimizers(args)
    server_lrs = _server_lrs(args, optimizers)
    k, b = args.local_steps, args.batch_size
    methods = []
    for name in optimizers:
        rule, rule_args = _variant(name)
        overrides: dict[str, Any] = {"train_args.server_optimizer": rule}
        overrides.update({f"train_args.server_optimizer_args.{k}": v for k, v in rule_args.items()})
        if name in server_lrs:
            overrides["train_args.server_optimizer_args.server_learning_rate"] = server_lrs[name]
        methods.append(Method(name, "federated", clients, k, b, overrides))
    # One client with FedAvg at server lr 1 takes its own weights as the global model.
    central = {
        "train_args.server_optimizer": "FedAvg",
        "train_args.server_optimizer_args.server_learning_rate": 1.0,
    }
    if args.centralized in ("steps", "both"):
        methods.append(Method("centralized", "centralized", 1, clients * k, b, central))
    if args.centralized in ("batch", "both"):
        methods.append(Method(f"centralized {clients}x batch", "centralized", 1, k, clients * b, central))
    if not methods:
        raise UsageError("nothing to run: --optimizers is empty and --centralized is none")
    return methods


def _base_overrides(args: argparse.Namespace, data: Path, user: dict[str, Any]) -> dict[str, Any]:
    """What every run shares: data, model, tokenizer, sequence length, eval set, rounds, lr (+ --set)."""
    return {
        "data_args.dataset_path": [str(data / DATA_FILES["dolly"])],
        "data_args.dataset_name": None,
        "data_args.test_dataset_size": args.eval_examples,
        "data_args.max_seq_length": args.max_seq_length,
        "model_args.model_name_or_path": str(data / DATA_FILES["model_config"].parent),
        "model_args.tokenizer_name_or_path": str(data / DATA_FILES["tokenizer"].parent),
        "train_args.learning_rate": args.learning_rate,
        "train_args.comm_round": args.rounds,
        "train_args.gradient_accumulation_steps": 1,
        "validation_args.frequency_of_the_test": 1,
        "validation_args.is_aggregator_test": True,
        "validation_args.test_on_clients": "no",
        "validation_args.save_frequency": 0,
        **({"train_args.seed": args.seed} if args.seed is not None else {}),
        **user,
    }


def _config(args: argparse.Namespace, base: dict[str, Any], method: Method | None, out_dir: Path) -> Any:
    """The checked config of one method's run (``None``: the shared settings alone)."""
    import unitedllm

    overrides = {**base, "train_args.output_dir": str(out_dir)}
    if method is not None:
        overrides.update(
            {
                "train_args.client_num_in_total": method.clients,
                "train_args.client_num_per_round": method.clients,
                "train_args.local_max_steps": method.steps_per_round,
                "train_args.per_device_train_batch_size": method.batch,
                **method.overrides,
            }
        )
    return unitedllm.load_config(args.config, overrides=overrides)


def _final_per_category(run_dir: Path) -> dict[str, float]:
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


def _finite(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (JSON has no NaN; a diverged run shows as null)."""
    return value if value is not None and math.isfinite(value) else None


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
            "train_loss": _finite(s.train_loss),
            "eval_loss": _finite(s.eval_loss),
            "seconds": round(s.seconds, 2),
        }
        for s in result.rounds
    ]
    final = _finite(result.rounds[-1].eval_loss) if result.rounds else None
    return {
        **out,
        "rounds": rounds,
        "worst_rise": worst_rise([r["eval_loss"] for r in rounds]),
        "final_eval_loss": final,
        "final_perplexity": None if final is None else math.exp(min(final, 50.0)),
        "final_per_category": _final_per_category(result.output_dir),
        "seconds": round(seconds, 1),
    }


def worst_rise(losses: list[float | None]) -> float | None:
    """The largest round-over-round increase of the eval loss (negative: it fell every round)."""
    known = [x for x in losses if x is not None]
    if len(losses) != len(known):
        return None  # a diverged round: the run failed, no finite answer
    rises = [b - a for a, b in zip(known, known[1:], strict=False)]
    return max(rises) if rises else None


# The hyper-parameters each rule reads (anything else in server_optimizer_args it ignores).
_SERVER_HPARAMS = {
    "FedAvgM": ("server_learning_rate", "server_momentum", "nesterov", "momentum_restart", "max_step_ratio"),
    "DiLoCo": ("server_learning_rate", "server_momentum", "nesterov", "momentum_restart", "max_step_ratio"),
    "FedAdam": ("server_learning_rate", "beta1", "beta2", "tau"),
    "FedYogi": ("server_learning_rate", "beta1", "beta2", "tau"),
    "FedAdagrad": ("server_learning_rate", "beta1", "tau"),
}


def _effective_server_args(cfg: Any) -> dict[str, Any]:
    """The server optimizer's hyper-parameters this run used, paper defaults filled in."""
    from unitedllm.optimizers import create

    name = cfg.server_optimizer_name
    optimizer = create(
        name, cfg.train_args.server_optimizer_args, num_clients=cfg.train_args.client_num_in_total
    )
    return {key: optimizer.hparam(key) for key in _SERVER_HPARAMS.get(name, ("server_learning_rate",))}


def _initial_eval(cfg: Any) -> tuple[float, int]:
    """The held-out loss of the randomly initialised model every run starts from, and the examples scored."""
    from unitedllm.training.hf import HFLocalTrainer

    trainer = HFLocalTrainer(cfg, 0)
    try:
        result = trainer.evaluate(trainer.initial_weights())
        return float(result.metrics["eval_loss"]), result.num_samples
    finally:
        trainer.close()


def _machine() -> dict[str, Any]:
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


def _fmt(value: float | None, spec: str = ".3f") -> str:
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
        + [_fmt(report["initial_eval_loss"]), _fmt(math.exp(report["initial_eval_loss"]), ".0f"), "", "", ""]
    ]
    for m in methods:
        losses = [_fmt(r["eval_loss"]) for r in m["rounds"]] + [""] * (rounds - len(m["rounds"]))
        diff = None if central is None or m["final_eval_loss"] is None else m["final_eval_loss"] - central
        rows.append(
            [
                m["name"],
                f"{m['optimizer_steps']} x {m['batch']}",
                *losses,
                _fmt(m["final_eval_loss"]),
                _fmt(m["final_perplexity"], ".1f"),
                _fmt(diff, "+.3f") if m["name"] != "centralized" else "",
                _fmt(m.get("worst_rise"), "+.3f"),
                _fmt(m["seconds"], ".0f"),
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
    user = _user_overrides(args)
    _server_lrs(args, _optimizers(args))
    for entry in _optimizers(args):
        _variant(entry)  # a malformed rule variant is a usage error even when the data is absent
    data, skipped = _data_dir(args)
    if skipped:
        return {"benchmark": "learning", "skipped": skipped}
    import torch

    torch.set_num_threads(args.threads)
    malloc_tuned = _keep_freed_memory()
    scratch = Path(tempfile.mkdtemp(prefix="unitedllm-bench-learning-"))
    keep = args.keep_runs.expanduser().resolve() if args.keep_runs else None
    try:
        shared = _base_overrides(args, data, user)
        base = _config(args, shared, None, scratch / "base")
        clients = base.train_args.client_num_in_total  # the config's partition: one Dolly category each
        methods = _methods(args, clients)
        out_dirs = [(keep or scratch) / m.name.replace(" ", "_") for m in methods]
        configs = [_config(args, shared, m, d) for m, d in zip(methods, out_dirs, strict=True)]
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
                f"{method.name}: final eval loss {_fmt(results[-1]['final_eval_loss'])} in {results[-1]['seconds']:.0f} s"
            )
        return {
            "benchmark": "learning",
            "date": started.isoformat(timespec="seconds"),
            "machine": {
                **_machine(),
                "malloc_keeps_freed_memory": malloc_tuned,
                "loadavg_1m_before": load_before,
                "loadavg_1m_after": os.getloadavg()[0],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            },
            "settings": _settings(args, base, data, scored),
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


def _settings(args: argparse.Namespace, base: Any, data: Path, scored: int) -> dict[str, Any]:
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


def main(argv: list[str] | None = None) -> int:
    from unitedllm.errors import UnitedLLMError

    try:
        args = _parse_args(argv)
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
