"""Loading a run config: YAML file or mapping, plus overrides, into a checked :class:`Config`.

The pipeline is read → apply overrides → check every key of every section → build the
typed sections → cross-field checks → expand ``{run_id}``. All problems found along the
way are raised together as one :class:`~unitedllm.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from unitedllm.config.checks import cross_field_problems
from unitedllm.config.overrides import OVERRIDE_SOURCE, apply_overrides
from unitedllm.config.paths import resolve_config_paths
from unitedllm.config.redaction import remember_config
from unitedllm.config.types import Config
from unitedllm.config.validation import (
    check_struct,
    field_hints,
    normalise_sections,
    raw_problems,
    render_value,
)
from unitedllm.config.yamlio import MAX_DEPTH, read_yaml_file
from unitedllm.errors import ConfigError, ConfigProblem

__all__ = [
    "build_config",
    "check_run_id",
    "config_digest",
    "dump_config",
    "expand_run_id",
    "load_config",
    "resolve_local_paths",
]

# run_id becomes part of directory names, MQTT topics and S3 keys: keep it to safe characters.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _with_source(problem: ConfigProblem, source: str | None, overridden: set[str]) -> ConfigProblem:
    """Attribute a problem to the override that set its key, else to the config source."""
    if problem.source is not None:
        return problem
    for key in overridden:
        if problem.path == key or problem.path.startswith((key + ".", key + "[")):
            return ConfigProblem(problem.path, problem.message, OVERRIDE_SOURCE)
    return ConfigProblem(problem.path, problem.message, source)


def build_config(
    raw: Any,
    *,
    source: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> tuple[Config | None, list[ConfigProblem]]:
    """The config built from raw YAML data, or ``None``, and every problem found (does not raise)."""
    if raw is None:  # an empty file, or one with only comments: every section at its defaults
        raw = {}
    if not isinstance(raw, Mapping):
        names = ", ".join(field_hints(Config))
        return None, [
            ConfigProblem("", f"a config is a mapping of sections ({names}), got {render_value(raw)}", source)
        ]
    early = raw_problems(raw, max_depth=MAX_DEPTH)
    if early:
        return None, [_with_source(p, source, set()) for p in early]
    data: dict[str, Any] = copy.deepcopy(dict(raw))
    overridden, problems = apply_overrides(data, overrides)
    if overridden and (late := raw_problems(data, max_depth=MAX_DEPTH)):
        return None, [_with_source(p, source, overridden) for p in late]
    data = normalise_sections(data)

    sections: dict[str, Any] = {}
    bad_sections: set[str] = set()
    for problem in check_struct(data, Config, "", None):
        problems.append(problem)
        bad_sections.add(problem.path.split(".")[0].split("[")[0])
    hints = field_hints(Config)
    for name, value in data.items():
        if name in hints and name not in bad_sections:
            try:
                sections[name] = msgspec.convert(value, hints[name])
            except msgspec.ValidationError as exc:  # key-by-key checks passed; report what msgspec saw
                problems.append(ConfigProblem(name, str(exc)))
                bad_sections.add(name)
    cfg = Config(**sections)
    problems.extend(cross_field_problems(cfg, skip_sections=bad_sections))
    problems = [_with_source(p, source, overridden) for p in problems]
    return (None if problems else cfg), problems


def check_run_id(run_id: str, *, where: str = "run_id") -> None:
    """Refuse a run id that is unsafe in paths, MQTT topics and S3 keys (``where``: the option that gave it)."""
    if not _RUN_ID.match(run_id) or run_id in (".", ".."):
        raise ConfigError(
            ConfigProblem(
                where,
                f"{render_value(run_id)} is not a usable run id; use 1-128 letters, digits, '_', '.', '-' "
                "starting with a letter or digit",
                where,
            )
        )


def expand_run_id(cfg: Config, run_id: str) -> Config:
    """``cfg`` with ``{run_id}`` in ``train_args.output_dir`` replaced; a run id unsafe in paths is refused."""
    check_run_id(run_id)
    train = msgspec.structs.replace(
        cfg.train_args, output_dir=cfg.train_args.output_dir.replace("{run_id}", run_id)
    )
    return msgspec.structs.replace(cfg, train_args=train)


def load_config(
    source: str | Path | Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    run_id: str | None = None,
) -> Config:
    """A checked run config from a YAML file (or an already parsed mapping), with overrides applied.

    ``overrides`` is ``{"train_args.comm_round": 3}`` or CLI-style ``["train_args.comm_round=3"]``
    (values read as YAML). With ``run_id``, ``{run_id}`` in ``train_args.output_dir`` is
    replaced; without it the placeholder stays. Any problem raises ConfigError listing all.
    """
    if isinstance(source, Mapping):
        name, raw = None, source
    else:
        name = str(source)
        raw = read_yaml_file(source)
    cfg, problems = build_config(raw, source=name, overrides=overrides)
    if problems or cfg is None:
        raise ConfigError(problems, source=name)
    remember_config(cfg)  # its secrets are masked in every log and tracker of this process from now on
    if name is not None:
        cfg = resolve_local_paths(cfg, Path(name).resolve().parent)
    return expand_run_id(cfg, run_id) if run_id is not None else cfg


def resolve_local_paths(cfg: Config, config_dir: Path) -> Config:
    """``cfg`` with relative local paths that exist next to the config made absolute (:mod:`.paths`)."""
    return resolve_config_paths(cfg, config_dir)


def dump_config(cfg: Config) -> dict[str, Any]:
    """``cfg`` as plain dicts, lists and scalars: ready for ``yaml.safe_dump``, and loads back equal."""
    out = msgspec.to_builtins(cfg)
    assert isinstance(out, dict)
    return out


def config_digest(cfg: Config) -> str:
    """The sha256 hex digest of ``cfg``'s values: equal configs have equal digests, whatever the key order."""
    return hashlib.sha256(msgspec.json.encode(msgspec.to_builtins(cfg), order="sorted")).hexdigest()
