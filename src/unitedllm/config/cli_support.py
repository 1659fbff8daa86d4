"""Helpers the ``unitedllm`` and ``unitedllm-build`` command lines share for configs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unitedllm.config.overrides import parse_assignment
from unitedllm.errors import ConfigError, ConfigProblem

__all__ = ["format_problems", "parse_set_options"]


def parse_set_options(values: Sequence[str]) -> dict[str, Any]:
    """Repeated ``--set KEY=VALUE`` options as an overrides mapping (values read as YAML; last one wins).

    Malformed options raise one ConfigError naming each bad ``--set``.
    """
    result: dict[str, Any] = {}
    problems: list[ConfigProblem] = []
    for text in values:
        try:
            key, value = parse_assignment(text)
        except ConfigError as exc:
            problems += [ConfigProblem(p.path, f"--set: {p.message}", "--set") for p in exc.problems]
            continue
        result[key] = value
    if problems:
        raise ConfigError(problems, source="--set")
    return result


def format_problems(err: ConfigError) -> str:
    """One ``path: message`` line per problem, ready to print instead of a traceback."""
    lines = []
    for problem in err.problems:
        where = problem.path or problem.source or "config"
        lines.append(f"{where}: {problem.message}")
    return "\n".join(lines)
