"""The learning bench's flags and the configs of its runs: what ``bench/learning.py`` compares.

``parse_args`` reads the flags; ``methods_of`` turns them into the runs to compare (one per
server rule or rule variant, then the centralized baselines) and ``config_of`` into each run's
checked config, all sharing ``base_overrides`` (data, model, tokenizer, eval set, rounds, lr).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    if args.out is not None:
        check_writable(args.out, "--out")
    return args


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any run, a report path that could not be written at the end (hours of runs lost)."""
    parent = path.parent  # Path("x").parent is Path(".")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def server_lrs(args: argparse.Namespace, optimizers: list[str]) -> dict[str, float]:
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


def user_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from unitedllm.config.overrides import parse_assignment

    out: dict[str, Any] = {}
    for text in args.sets:
        key, value = parse_assignment(text)
        if key in CONTROLLED_KEYS or any(key.startswith(k + ".") for k in CONTROLLED_KEYS):
            raise UsageError(f"--set {text!r}: {key} is set by the benchmark (use its own flag, see --help)")
        out[key] = value
    return out


def optimizers(args: argparse.Namespace) -> list[str]:
    """The --optimizers entries as given (``NAME`` or ``NAME[key=value;...]``)."""
    return [name.strip() for name in args.optimizers.split(",") if name.strip()]


def variant(entry: str) -> tuple[str, dict[str, Any]]:
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


def methods_of(args: argparse.Namespace, clients: int) -> list[Method]:
    """The runs to compare: one per server optimizer, then the centralized baseline(s)."""
    entries = optimizers(args)
    lrs = server_lrs(args, entries)
    k, b = args.local_steps, args.batch_size
    methods = []
    for name in entries:
        rule, rule_args = variant(name)
        overrides: dict[str, Any] = {"train_args.server_optimizer": rule}
        overrides.update({f"train_args.server_optimizer_args.{k}": v for k, v in rule_args.items()})
        if name in lrs:
            overrides["train_args.server_optimizer_args.server_learning_rate"] = lrs[name]
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


def base_overrides(args: argparse.Namespace, data: Path, user: dict[str, Any]) -> dict[str, Any]:
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


def config_of(args: argparse.Namespace, base: dict[str, Any], method: Method | None, out_dir: Path) -> Any:
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
