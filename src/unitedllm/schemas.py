"""The JSON Schemas committed under ``schemas/``: one list, one rendering, the same bytes on every machine.

Every schema is generated from the types (``msgspec.json.schema``), never written by hand. What
the generator does with docstrings has changed between msgspec releases (0.22 kept a docstring's
indentation, 0.23 dedents it), so before a schema is written every description is normalised with
:func:`inspect.cleandoc` and keys are sorted: the committed text depends on the types alone, not on
which library versions happened to generate it.

``python -m unitedllm.schemas`` rewrites every committed schema; ``--check`` exits 1 naming each
stale or missing one (``nox -s tests`` runs it first).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COMMITTED", "committed_dir", "normalise", "render", "stale_schemas", "write_all"]

# File name under schemas/ -> "module:function" returning the schema (imported only when needed).
COMMITTED: dict[str, str] = {
    "unitedllm-config.schema.json": "unitedllm.config.schema:config_schema",
    "package-manifest.schema.json": "unitedllm.packaging.manifest:manifest_schema",
    "metrics-event.schema.json": "unitedllm.tracking.events:events_schema",
}


def normalise(schema: Any) -> Any:
    """A copy of ``schema`` whose every ``description`` is a cleaned docstring (``inspect.cleandoc``)."""
    if isinstance(schema, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else normalise(value)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [normalise(item) for item in schema]
    return schema


def render(schema: dict[str, Any]) -> str:
    """The committed text of ``schema``: normalised, keys sorted, indented, ending with a newline."""
    return json.dumps(normalise(schema), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def committed_dir() -> Path:
    """``schemas/`` beside ``src/`` in a source checkout."""
    return Path(__file__).resolve().parents[2] / "schemas"


def _generator(target: str) -> Callable[[], dict[str, Any]]:
    module, _, name = target.partition(":")
    generate: Callable[[], dict[str, Any]] = getattr(importlib.import_module(module), name)
    return generate


def stale_schemas(folder: Path | None = None) -> list[str]:
    """The committed schema files under ``folder`` that are missing or differ from the types."""
    folder = folder or committed_dir()
    stale = []
    for file_name, target in COMMITTED.items():
        path = folder / file_name
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != render(_generator(target)()):
            stale.append(file_name)
    return stale


def write_all(folder: Path | None = None) -> list[Path]:
    """Write every committed schema into ``folder`` (default ``schemas/``) and return the paths."""
    folder = folder or committed_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, target in COMMITTED.items():
        path = folder / file_name
        path.write_text(render(_generator(target)()), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unitedllm.schemas [--check] [--dir DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m unitedllm.schemas", description="Write (or --check) every committed JSON Schema."
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed schema is stale")
    parser.add_argument(
        "--dir", type=Path, default=committed_dir(), help="schema folder (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_schemas(args.dir)
        for file_name in stale:
            print(
                f"{args.dir / file_name} is out of date with the types; run: python -m unitedllm.schemas",
                file=sys.stderr,
            )
        if not stale:
            print(f"{len(COMMITTED)} schemas in {args.dir} are current")
        return 1 if stale else 0
    for path in write_all(args.dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
