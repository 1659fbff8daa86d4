"""The committed JSON Schemas: current with the types, and the same bytes whatever msgspec generated them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec

from unitedllm.schemas import COMMITTED, committed_dir, normalise, render, stale_schemas, write_all


class _FlushDoc(msgspec.Struct):
    """A section of the config.

    A key left unset takes its default.
    """

    value: int = 1


class _IndentedDoc(msgspec.Struct):
    """A section of the config.

    A key left unset takes its default.
    """

    value: int = 1


def _description(struct: type) -> str:
    schema = json.loads(render(msgspec.json.schema(struct)))
    definition = next(iter(schema["$defs"].values()))
    return str(definition["description"])


def test_a_docstring_indented_two_ways_gives_one_description() -> None:
    assert (
        _description(_FlushDoc)
        == _description(_IndentedDoc)
        == ("A section of the config.\n\nA key left unset takes its default.")
    )


def test_normalise_cleans_descriptions_at_every_depth_and_nothing_else() -> None:
    raw = {
        "description": "Top.\n\n    Body.\n",
        "properties": {"x": {"description": "  X.\n      More.", "default": "  kept  "}},
        "anyOf": [{"description": "\n   Y."}],
    }
    assert normalise(raw) == {
        "description": "Top.\n\nBody.",
        "properties": {"x": {"description": "X.\nMore.", "default": "  kept  "}},
        "anyOf": [{"description": "Y."}],
    }


def test_render_sorts_keys_so_generator_order_does_not_matter() -> None:
    assert render({"b": 1, "a": {"d": 2, "c": 3}}) == render({"a": {"c": 3, "d": 2}, "b": 1})


def test_every_committed_schema_is_current_with_the_types() -> None:
    assert stale_schemas() == [], "regenerate them: python -m unitedllm.schemas"
    assert sorted(p.name for p in committed_dir().glob("*.schema.json")) == sorted(COMMITTED)


def test_check_names_a_stale_schema_and_exits_1(tmp_path: Path) -> None:
    write_all(tmp_path)
    stale = tmp_path / "unitedllm-config.schema.json"
    stale.write_text(stale.read_text().replace('"description": "', '"description": "  ', 1))
    done = subprocess.run(
        [sys.executable, "-m", "unitedllm.schemas", "--check", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{stale} is out of date with the types; run: python -m unitedllm.schemas"
    ]
    write_all(tmp_path)
    assert stale_schemas(tmp_path) == []


def test_the_command_writes_what_check_then_accepts(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "unitedllm.schemas", "--dir", str(tmp_path)]
    assert subprocess.run([*command, "--check"], capture_output=True).returncode == 1  # none there yet
    subprocess.run(command, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(COMMITTED)
    assert subprocess.run([*command, "--check"], capture_output=True).returncode == 0
