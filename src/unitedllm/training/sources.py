"""Find each rank's instruction records: read files / the hub / the synthetic set, hold out tests, partition.

Records are Dolly-format dicts (``instruction``, ``context``, ``response``, ``category``).
Where they come from, in order of precedence:

* ``data_args.dataset == "unitedllm-synthetic"``: generated offline (:mod:`.synthetic`);
* ``data_args.client_dataset_path``: one file per client (``{rank}`` is expanded);
* ``data_args.dataset_path``: one file (a held-out test set of ``test_dataset_size`` is cut
  off, the rest split across clients) or two files (first = train, second = test, as FedML);
* ``data_args.dataset_name``: a hub dataset via ``datasets.load_dataset``.

A shared pool is split across clients by ``data_args.partition``: ``category`` gives each
client whole categories (non-IID, like ``databricks-dolly-15k-niid``), ``iid`` deals records
out evenly. Every split is deterministic in ``common_args.random_seed``, so all ranks agree.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitedllm.errors import ConfigError, ConfigProblem
from unitedllm.ranks import check_rank
from unitedllm.training.synthetic import DATASET_NAME, generate_records

if TYPE_CHECKING:
    from unitedllm.config.types import Config

__all__ = [
    "cache_root",
    "Record",
    "client_records",
    "partition",
    "read_records",
    "server_test_records",
    "training_records",
]


def cache_root(cfg: Config) -> Path:
    """Where UnitedLLM caches tokenizers and tokenized datasets: ``data_args.cache_dir`` or ~/.cache."""
    if cfg.data_args.cache_dir:
        return Path(cfg.data_args.cache_dir).expanduser()
    return Path(os.environ.get("UNITEDLLM_CACHE", "~/.cache/unitedllm")).expanduser()


Record = dict[str, str]
_TEXT_FIELDS = ("instruction", "context", "response", "category")


def _check_record(raw: Any, where: str) -> Record:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected a JSON object with 'instruction' and 'response', got {type(raw).__name__}"
        )
    for key in ("instruction", "response"):
        if not isinstance(raw.get(key), str):
            raise ConfigError(f"{where}: field {key!r} must be a string, got {raw.get(key)!r:.60}")
    record: Record = {}
    for key in _TEXT_FIELDS:
        value = raw.get(key)
        record[key] = "" if value is None else str(value)
    return record


def read_records(path: str | Path, *, config_path: str) -> list[Record]:
    """Dolly-format records from a ``.jsonl`` file (one object a line) or a ``.json`` list."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(ConfigProblem(config_path, f"data file not found: {str(file)!r}"))
    text = file.read_text(encoding="utf-8")
    records: list[Record] = []
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                ConfigProblem(config_path, f"{file}:{exc.lineno}: not valid JSON: {exc.msg}")
            ) from exc
        for i, item in enumerate(items):
            records.append(_check_record(item, f"{config_path}: {file} item {i}"))
        return records
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                ConfigProblem(config_path, f"{file}:{lineno}: not valid JSON: {exc.msg}")
            ) from exc
        records.append(_check_record(item, f"{config_path}: {file}:{lineno}"))
    if not records:
        raise ConfigError(ConfigProblem(config_path, f"data file is empty: {str(file)!r}"))
    return records


def _shuffled(records: list[Record], seed: int, salt: str) -> list[Record]:
    out = list(records)
    random.Random(f"{salt}:{seed}").shuffle(out)
    return out


def _hold_out(
    records: list[Record], size: int, cfg: Config, source: str
) -> tuple[list[Record], list[Record]]:
    if size >= len(records):
        raise ConfigError(
            ConfigProblem(
                "data_args.test_dataset_size",
                f"{size} leaves no training data: {source} has only {len(records)} records",
            )
        )
    records = _shuffled(records, cfg.common_args.random_seed, "hold-out")
    return records[size:], records[:size]


def _hub_pool(cfg: Config) -> tuple[list[Record], list[Record]]:
    from datasets import load_dataset  # real hub path; tests never reach it

    name = cfg.data_args.dataset_name
    try:
        loaded = load_dataset(name, cache_dir=cfg.data_args.cache_dir)
    except Exception as exc:  # datasets raises many unrelated types for "not found / offline"
        raise ConfigError(
            ConfigProblem("data_args.dataset_name", f"cannot load dataset {name!r}: {exc}")
        ) from exc
    train = [_check_record(r, f"{name} train[{i}]") for i, r in enumerate(loaded["train"])]
    if "test" in loaded:
        return train, [_check_record(r, f"{name} test[{i}]") for i, r in enumerate(loaded["test"])]
    return _hold_out(train, cfg.data_args.test_dataset_size, cfg, f"dataset {name!r}")


def _shared_pool(cfg: Config) -> tuple[list[Record], list[Record]]:
    """(train, test) pools shared by all clients: synthetic, ``dataset_path`` or the hub."""
    dargs = cfg.data_args
    if dargs.dataset == DATASET_NAME:
        records = generate_records(dargs.synthetic_num_examples, seed=cfg.common_args.random_seed)
        return _hold_out(records, dargs.test_dataset_size, cfg, "the synthetic dataset")
    if dargs.dataset_path:
        paths = dargs.dataset_path
        if len(paths) == 1:
            records = read_records(paths[0], config_path="data_args.dataset_path[0]")
            return _hold_out(records, dargs.test_dataset_size, cfg, repr(paths[0]))
        if len(paths) == 2:
            return (
                read_records(paths[0], config_path="data_args.dataset_path[0]"),
                read_records(paths[1], config_path="data_args.dataset_path[1]"),
            )
        raise ConfigError(
            ConfigProblem(
                "data_args.dataset_path",
                f"expected 1 file (split) or 2 files (train, test), got {len(paths)}",
            )
        )
    if dargs.dataset_name:
        return _hub_pool(cfg)
    raise ConfigError(
        ConfigProblem(
            "data_args",
            "no data: set dataset_path, client_dataset_path, dataset_name or dataset: unitedllm-synthetic",
        )
    )


def partition(records: list[Record], *, num_clients: int, rank: int, mode: str, seed: int) -> list[Record]:
    """The share of ``records`` client ``rank`` (1..num_clients) gets under ``mode`` (category or iid)."""
    if mode == "iid":
        return _shuffled(records, seed, "iid")[rank - 1 :: num_clients]
    categories = sorted({r["category"] for r in records})
    if len(categories) >= num_clients:
        mine = {c for i, c in enumerate(categories) if i % num_clients == rank - 1}
        return [r for r in records if r["category"] in mine]
    # Fewer categories than clients: clients take categories in turn and share each one's records.
    cat = categories[(rank - 1) % len(categories)]
    sharers = [
        k for k in range(1, num_clients + 1) if (k - 1) % len(categories) == (rank - 1) % len(categories)
    ]
    return [r for r in records if r["category"] == cat][sharers.index(rank) :: len(sharers)]


def _client_file(cfg: Config, rank: int) -> tuple[str, str]:
    """(path, config path) of client ``rank``'s own data file."""
    paths = cfg.data_args.client_dataset_path
    n = cfg.train_args.client_num_in_total
    if len(paths) == 1 and "{rank}" in paths[0]:
        return paths[0].format(rank=rank), "data_args.client_dataset_path[0]"
    if len(paths) == n:
        return paths[rank - 1].format(rank=rank), f"data_args.client_dataset_path[{rank - 1}]"
    raise ConfigError(
        ConfigProblem(
            "data_args.client_dataset_path",
            f"expected one path with '{{rank}}' or one path per client ({n}), got {len(paths)}",
        )
    )


def _own_file_split(cfg: Config, rank: int) -> tuple[list[Record], list[Record]]:
    path, where = _client_file(cfg, rank)
    records = read_records(path, config_path=where)
    # A client's own file keeps a fifth at most for testing, so small silos still train.
    size = min(cfg.data_args.test_dataset_size, len(records) // 5)
    records = _shuffled(records, cfg.common_args.random_seed, f"client-{rank}")
    return records[size:], records[:size]


def _per_client_files(cfg: Config) -> bool:
    """Whether clients train on their own files (``client_dataset_path``) rather than a shared pool."""
    return bool(cfg.data_args.client_dataset_path) and cfg.data_args.dataset != DATASET_NAME


def _check_rank(cfg: Config, rank: int) -> None:
    check_rank(cfg, rank, where="train_args.client_num_in_total")


def client_records(cfg: Config, rank: int) -> tuple[list[Record], list[Record]]:
    """(train, test) records of client ``rank``."""
    _check_rank(cfg, rank)
    if _per_client_files(cfg):
        return _own_file_split(cfg, rank)
    pool = _shared_pool(cfg)
    kwargs = {
        "num_clients": cfg.train_args.client_num_in_total,
        "rank": rank,
        "mode": cfg.data_args.partition,
        "seed": cfg.common_args.random_seed,
    }
    return partition(pool[0], **kwargs), partition(pool[1], **kwargs)  # type: ignore[arg-type]


def server_test_records(cfg: Config) -> list[Record]:
    """The global held-out test set the aggregator (rank 0) evaluates on."""
    if not _per_client_files(cfg) or cfg.data_args.dataset_path:
        return _shared_pool(cfg)[1]
    # Per-client files only: the union of the clients' test splits that this machine can read.
    test: list[Record] = []
    for rank in range(1, cfg.train_args.client_num_in_total + 1):
        path, _ = _client_file(cfg, rank)
        if Path(path).expanduser().is_file():
            test += _own_file_split(cfg, rank)[1]
    return test


def training_records(cfg: Config) -> list[Record]:
    """Every client's training records (what a trained tokenizer learns from; identical on every rank)."""
    if not _per_client_files(cfg):
        return _shared_pool(cfg)[0]
    out: list[Record] = []
    for rank in range(1, cfg.train_args.client_num_in_total + 1):
        out += _own_file_split(cfg, rank)[0]
    return out
