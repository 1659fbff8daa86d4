"""The config's JSON Schema, generated from the types, and validating files against it.

The schema is never written by hand: ``msgspec.json.schema`` derives it from
:mod:`unitedllm.config.types`, and the committed copy is kept current with
``python -m unitedllm.schemas`` (every committed schema; ``--check`` exits 1 when one is stale, CI
runs it), which renders it through :func:`unitedllm.schemas.render` so that the bytes do not depend
on the msgspec version. ``python -m unitedllm.config.schema`` writes or checks this one file.
"""

from __future__ import annotations

import argparse
import sys
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
    "committed_schema_path",
    "config_schema",
    "schema_text",
    "validate_file",
    "write_schema",
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


def schema_text() -> str:
    """The schema as it is committed (normalised by :func:`unitedllm.schemas.render`)."""
    from unitedllm.schemas import render

    return render(config_schema())


def committed_schema_path() -> Path:
    """Where the committed schema lives in a source checkout (``schemas/`` beside ``src/``)."""
    return Path(__file__).resolve().parents[3] / "schemas" / "unitedllm-config.schema.json"


def write_schema(path: str | Path) -> Path:
    """Write the schema to ``path`` (folders created) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(schema_text(), encoding="utf-8")
    return out


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unitedllm.config.schema [--check] [--output PATH]``."""
    parser = argparse.ArgumentParser(
        prog="python -m unitedllm.config.schema", description="Write (or --check) the config JSON Schema."
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema is out of date")
    parser.add_argument(
        "--output", type=Path, default=committed_schema_path(), help="schema file (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current != schema_text():
            what = "is missing" if current is None else "is out of date with unitedllm.config.types"
            print(f"{args.output} {what}; run: python -m unitedllm.config.schema", file=sys.stderr)
            return 1
        print(f"{args.output} is current")
        return 0
    print(f"wrote {write_schema(args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
