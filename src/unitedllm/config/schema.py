"""The config's JSON Schema, generated from the types, and validating files against it.

The schema is never written by hand: ``msgspec.json.schema`` derives it from
:mod:`unitedllm.config.types`, and the committed copy is kept current with
``python -m unitedllm.schemas`` (every committed schema; ``--check`` exits 1 when one is stale, CI
runs it), which renders it through :func:`unitedllm.schemas.render` so that the bytes do not depend
on the msgspec version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from unitedllm.config.loader import build_config
from unitedllm.config.types import Config
from unitedllm.config.validation import normalise_sections
from unitedllm.config.yamlio import read_yaml_file
from unitedllm.errors import ConfigError, ConfigProblem

__all__ = [
    "SCHEMA_ID",
    "config_schema",
    "validate_file",
]

SCHEMA_ID = "urn:unitedllm:schema:config"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a UnitedLLM config file."""
    from unitedllm.optimizers import algorithms  # torch-free: names and parameter Structs only

    generated = msgspec.json.schema(Config)
    # Each rule's own parameters, chosen by the rule's name (a choice keyed by a sibling field).
    generated["$defs"]["TrainArgs"]["allOf"] = algorithms.schema_choice()
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": SCHEMA_ID,
        "title": "UnitedLLM run config",
        "description": "fedml_config.yaml sections and keys as UnitedLLM reads them. "
        "Generated from unitedllm.config.types; do not edit by hand.",
        **generated,
    }


def _yaml_path(parts: Sequence[str | int]) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _schema_problems(data: Any, source: str) -> list[ConfigProblem]:
    import jsonschema  # only `validate` needs it; keep `import unitedllm` light

    validator = jsonschema.Draft202012Validator(config_schema())
    problems = []
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        problems.append(ConfigProblem(_yaml_path(list(error.absolute_path)), error.message, source))
    return problems


def validate_file(
    path: str | Path, *, overrides: Mapping[str, Any] | Sequence[str] | None = None
) -> list[ConfigProblem]:
    """Every problem in a config file: JSON Schema checks and the typed loader's checks (empty when valid).

    Where both find a problem at the same YAML path, the loader's wording (which names the bad
    value and what is allowed) is kept; the schema adds anything the loader did not flag.
    """
    source = str(path)
    try:
        raw = read_yaml_file(path)
    except ConfigError as exc:
        return exc.problems
    _, problems = build_config(raw, source=source, overrides=overrides)
    if overrides or not isinstance(raw, Mapping):
        return problems  # the schema describes the file; with overrides the loader's view is the truth
    flagged = {p.path for p in problems}
    for problem in _schema_problems(normalise_sections(raw or {}), source):
        covered = any(
            problem.path == f
            or problem.path.startswith((f + ".", f + "["))
            or f.startswith(problem.path + ".")
            for f in flagged
        )
        if not covered:
            problems.append(problem)
    return problems
