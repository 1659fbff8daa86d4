"""Checks across config keys: the mistakes no single key's type can catch.

Each check names the sections it reads. When a section already failed its type checks
its checks are skipped, so a bad section yields its own problems and not a cascade of
follow-on ones computed from defaults.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from unitedllm.config.types import Config
from unitedllm.errors import ConfigProblem

__all__ = ["OUTPUT_DIR_PLACEHOLDERS", "cross_field_problems", "placeholders"]

Check = Callable[[Config], Iterable[ConfigProblem]]
_CHECKS: list[tuple[frozenset[str], Check]] = []

#: Placeholders that :func:`unitedllm.config.load_config` expands in ``train_args.output_dir``.
OUTPUT_DIR_PLACEHOLDERS: Final = frozenset({"run_id"})
#: Placeholders the data loader expands in each ``data_args.client_dataset_path`` entry.
CLIENT_PATH_PLACEHOLDERS: Final = frozenset({"rank"})

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def placeholders(text: str) -> list[str]:
    """The ``{name}`` placeholders in a path template, in order."""
    return _PLACEHOLDER.findall(text)


def _check(*sections: str) -> Callable[[Check], Check]:
    """Register a cross-field check that reads ``sections``."""

    def add(fn: Check) -> Check:
        _CHECKS.append((frozenset(sections), fn))
        return fn

    return add


def cross_field_problems(cfg: Config, *, skip_sections: Iterable[str] = ()) -> list[ConfigProblem]:
    """Every cross-field problem in ``cfg``, leaving out checks that read a section in ``skip_sections``."""
    skip = frozenset(skip_sections)
    problems: list[ConfigProblem] = []
    for sections, fn in _CHECKS:
        if not sections & skip:
            problems.extend(fn(cfg))
    return problems


@_check("train_args")
def _clients_per_round(cfg: Config) -> Iterator[ConfigProblem]:
    t = cfg.train_args
    if t.client_num_per_round > t.client_num_in_total:
        yield ConfigProblem(
            "train_args.client_num_per_round",
            f"{t.client_num_per_round} is more than client_num_in_total ({t.client_num_in_total})",
        )


@_check("train_args", "validation_args")
def _test_ranks(cfg: Config) -> Iterator[ConfigProblem]:
    total = cfg.train_args.client_num_in_total
    seen: set[int] = set()
    for i, rank in enumerate(cfg.validation_args.test_on_client_ranks):
        path = f"validation_args.test_on_client_ranks[{i}]"
        if not 1 <= rank <= total:
            yield ConfigProblem(
                path, f"rank {rank} is not a client rank; clients are ranks 1..{total} (0 is the aggregator)"
            )
        elif rank in seen:
            yield ConfigProblem(path, f"rank {rank} is listed twice")
        seen.add(rank)


@_check("train_args")
def _mixed_precision(cfg: Config) -> Iterator[ConfigProblem]:
    if cfg.train_args.fp16 and cfg.train_args.bf16:
        yield ConfigProblem("train_args.bf16", "fp16 and bf16 are both true; choose at most one")


@_check("train_args")
def _strategy_alias(cfg: Config) -> Iterator[ConfigProblem]:
    # Hugging Face renamed evaluation_strategy to eval_strategy; FedML configs use the old name.
    t = cfg.train_args
    if (
        t.eval_strategy is not None
        and t.eval_strategy != t.evaluation_strategy
        and t.evaluation_strategy != "no"
    ):
        yield ConfigProblem(
            "train_args.eval_strategy",
            f"{t.eval_strategy!r} contradicts evaluation_strategy {t.evaluation_strategy!r} "
            "(two names for one setting); set only one",
        )


@_check("train_args", "data_args")
def _client_dataset_paths(cfg: Config) -> Iterator[ConfigProblem]:
    paths = cfg.data_args.client_dataset_path
    total = cfg.train_args.client_num_in_total
    for i, path in enumerate(paths):
        unknown = [p for p in placeholders(path) if p not in CLIENT_PATH_PLACEHOLDERS]
        if unknown:
            yield ConfigProblem(
                f"data_args.client_dataset_path[{i}]",
                f"unknown placeholder {{{unknown[0]}}} in {path!r}; only {{rank}} is filled in",
            )
    if not paths or len(paths) == total:
        return
    if len(paths) == 1:
        if total > 1 and "rank" not in placeholders(paths[0]):
            yield ConfigProblem(
                "data_args.client_dataset_path",
                f"one path {paths[0]!r} without {{rank}} would give all {total} clients the same data; "
                f"put {{rank}} in it (e.g. 'data/client_{{rank}}.jsonl') or list {total} paths",
            )
        return
    yield ConfigProblem(
        "data_args.client_dataset_path",
        f"{len(paths)} paths for client_num_in_total {total}; list one path per client, "
        "or one path with {rank} in it",
    )


# model_config_overrides go to the model's config as they are; no size, layer or head count there
# needs more than 32 bits, and a bigger one would only fail (or exhaust memory) inside the model build.
_OVERRIDE_INT_LIMIT = 2**31 - 1


@_check("model_args")
def _override_numbers(cfg: Config) -> Iterator[ConfigProblem]:
    stack: list[tuple[str, object]] = [
        ("model_args.model_config_overrides", cfg.model_args.model_config_overrides)
    ]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _OVERRIDE_INT_LIMIT:
            digits = len(str(abs(value))) if abs(value).bit_length() < 1000 else "hundreds of"
            yield ConfigProblem(
                path, f"an integer of {digits} digits is too large (limit {_OVERRIDE_INT_LIMIT})"
            )


@_check("model_args")
def _lora_targets(cfg: Config) -> Iterator[ConfigProblem]:
    targets = cfg.model_args.lora_target_modules
    if cfg.model_args.peft_type == "lora" and targets is not None and not targets:
        yield ConfigProblem(
            "model_args.lora_target_modules",
            "an empty list would put LoRA on no module; leave it out (or null) for the per-model default",
        )


@_check("train_args", "comm_args")
def _quorum(cfg: Config) -> Iterator[ConfigProblem]:
    quorum = cfg.comm_args.min_updates_per_round
    per_round = cfg.train_args.client_num_per_round
    if quorum is not None and quorum > per_round:
        yield ConfigProblem(
            "comm_args.min_updates_per_round",
            f"{quorum} is more than client_num_per_round ({per_round}), so no round could ever complete",
        )


@_check("comm_args")
def _credential_pairs(cfg: Config) -> Iterator[ConfigProblem]:
    m, s = cfg.comm_args.mqtt, cfg.comm_args.s3
    if (m.tls_cert_file is None) != (m.tls_key_file is None):
        given, missing = (
            ("tls_cert_file", "tls_key_file") if m.tls_key_file is None else ("tls_key_file", "tls_cert_file")
        )
        yield ConfigProblem(
            f"comm_args.mqtt.{missing}", f"missing: a client certificate needs both, and {given} is set"
        )
    if (s.access_key_id is None) != (s.secret_access_key is None):
        given, missing = (
            ("access_key_id", "secret_access_key")
            if s.secret_access_key is None
            else ("secret_access_key", "access_key_id")
        )
        yield ConfigProblem(
            f"comm_args.s3.{missing}", f"missing: S3 credentials need both, and {given} is set"
        )


@_check("train_args")
def _local_optimizer_state(cfg: Config) -> Iterator[ConfigProblem]:
    t = cfg.train_args
    if t.local_optimizer_state == "reset" and t.deepspeed:
        yield ConfigProblem(
            "train_args.local_optimizer_state",
            "reset is not supported with train_args.deepspeed (ZeRO carries its optimizer shards); use keep",
        )


@_check("train_args")
def _output_dir(cfg: Config) -> Iterator[ConfigProblem]:
    unknown = [p for p in placeholders(cfg.train_args.output_dir) if p not in OUTPUT_DIR_PLACEHOLDERS]
    if unknown:
        yield ConfigProblem(
            "train_args.output_dir",
            f"unknown placeholder {{{unknown[0]}}} in {cfg.train_args.output_dir!r}; only {{run_id}} is filled in",
        )


@_check("train_args")
def _server_optimizer(cfg: Config) -> Iterator[ConfigProblem]:
    # The registry names each rule and its own parameters without importing torch.
    from unitedllm.errors import ConfigError
    from unitedllm.optimizers import algorithm

    key = "server_optimizer" if cfg.train_args.server_optimizer else "federated_optimizer"
    try:
        alg = algorithm(cfg.server_optimizer_name, path=f"train_args.{key}")
    except ConfigError as exc:
        yield from exc.problems
        return
    yield from alg.parameter_problems(cfg.train_args.server_optimizer_args)


#: Rules that look at every update coordinate by coordinate (or by distance): a sparse top-k update is
#: mostly zeros, so the median or trimmed mean of a coordinate drops what the clients did send.
_ROBUST_RULES: Final = frozenset({"fedmedian", "trimmedmean", "krum", "multikrum"})


@_check("comm_args", "train_args")
def _codecs(cfg: Config) -> Iterator[ConfigProblem]:
    from unitedllm.comm.codecs import codec_for
    from unitedllm.comm.codecs.global_copy import GLOBAL_CODECS
    from unitedllm.errors import ConfigError

    c = cfg.comm_args
    try:
        codec_for(c.update_codec)
    except ConfigError as exc:
        yield from exc.problems
        return
    if c.update_codec == "topk" and cfg.server_optimizer_name.lower() in _ROBUST_RULES:
        yield ConfigProblem(
            "comm_args.update_codec",
            f"topk sends sparse updates, and {cfg.server_optimizer_name} compares updates coordinate by "
            "coordinate: the combination would discard most of what clients send; use int8, bf16 or fp16",
        )
    if c.global_codec not in ("none", *GLOBAL_CODECS):
        yield ConfigProblem(
            "comm_args.global_codec",
            f"unknown global codec {c.global_codec!r}; choose one of none, {', '.join(GLOBAL_CODECS)}"
            + (
                " (topk would hold back most of each round's change from the clients)"
                if c.global_codec == "topk"
                else ""
            ),
        )
