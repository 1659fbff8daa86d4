"""Applying overrides (``train_args.comm_round=3``) to raw config data before it is typed.

Paths are checked against the config types, not against the file, so a key the file
leaves out can still be overridden, and a misspelt path is an error with a hint instead
of a silently ignored setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from unitedllm.config.types import Config
from unitedllm.config.validation import describe_type, field_hints, is_section, unknown_key_problem
from unitedllm.config.yamlio import parse_yaml_value
from unitedllm.errors import ConfigError, ConfigProblem

__all__ = ["OVERRIDE_SOURCE", "apply_overrides", "parse_assignment"]

OVERRIDE_SOURCE = "overrides"


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"train_args.comm_round=3"`` as ``("train_args.comm_round", 3)``; bad syntax is a ConfigError."""
    source = f"override {text!r}"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(c.isspace() for c in key):
        raise ConfigError(
            ConfigProblem("", f"override {text!r} is not KEY=VALUE (e.g. train_args.comm_round=3)", source),
            source=source,
        )
    try:
        value = parse_yaml_value(raw, source=source)
    except ConfigError as exc:
        raise ConfigError(
            [
                ConfigProblem(key, f"cannot read the value of {text!r}: {p.message}", source)
                for p in exc.problems
            ],
            source=source,
        ) from None
    return key, value


def _normalise(
    overrides: Mapping[str, Any] | Sequence[str], problems: list[ConfigProblem]
) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):  # a lone "k=v" would otherwise be read letter by letter
        overrides = [overrides]
    pairs = []
    for text in overrides:
        try:
            pairs.append(parse_assignment(text))
        except ConfigError as exc:
            problems.extend(exc.problems)
    return pairs


def _merge(target: dict[str, Any], value: Mapping[str, Any]) -> None:
    for k, v in value.items():
        if isinstance(v, Mapping) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v


def _set(raw: dict[str, Any], key: str, value: Any) -> ConfigProblem | None:
    """Put ``value`` at dotted ``key`` in ``raw``; a path the types do not have is a problem."""
    steps = key.split(".")
    node: dict[str, Any] = raw
    cls: type[msgspec.Struct] | None = Config
    path = ""
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if not step:
            return ConfigProblem(key, f"override path {key!r} has an empty part", OVERRIDE_SOURCE)
        hint: Any = None
        if cls is not None:
            hint = field_hints(cls).get(step)
            if hint is None:
                problem = unknown_key_problem(path, step, cls, OVERRIDE_SOURCE)
                return ConfigProblem(
                    problem.path, f"{problem.message} (in override {key!r})", OVERRIDE_SOURCE
                )
        if last:
            if is_section(hint) and isinstance(value, Mapping) and isinstance(node.get(step), dict):
                _merge(node[step], value)
            else:
                node[step] = value
            return None
        free_form = cls is None or describe_type(hint) in ("a mapping", "a mapping or null")
        if not (is_section(hint) or free_form):
            return ConfigProblem(
                f"{path}.{step}" if path else step,
                f"override {key!r}: {path}.{step} is a single value ({describe_type(hint)}), not a section",
                OVERRIDE_SOURCE,
            )
        child = node.get(step)
        if not isinstance(child, dict):
            child = node[step] = {}
        node = child
        cls = hint if is_section(hint) else None
        path = f"{path}.{step}" if path else step
    return None


def apply_overrides(
    raw: dict[str, Any], overrides: Mapping[str, Any] | Sequence[str] | None
) -> tuple[set[str], list[ConfigProblem]]:
    """Apply ``overrides`` to ``raw`` in place; the dotted paths set, and the problems found."""
    problems: list[ConfigProblem] = []
    done: set[str] = set()
    if not overrides:
        return done, problems
    for key, value in _normalise(overrides, problems):
        problem = _set(raw, key, value)
        if problem is None:
            done.add(key)
        else:
            problems.append(problem)
    return done, problems
