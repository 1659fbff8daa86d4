"""Reading config YAML: files and ``--set`` values, with errors that name the file and line.

PyYAML implements YAML 1.1, whose float syntax needs a dot (``3.0e-4``), so a learning
rate written ``1e-4`` would arrive as the string ``"1e-4"``. This loader also reads the
YAML 1.2 forms (``1e-4``, ``5E3``) as floats. Duplicate keys, which PyYAML resolves
silently in favour of the last one, are reported. Everything else is ``yaml.safe_load``,
which is what FedML uses, so a FedML file means the same thing here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from unitedllm.errors import ConfigError, ConfigProblem

__all__ = ["parse_yaml_value", "read_yaml_file"]

_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float and records duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    self.duplicates.append((str(key), first_line[key], line))
                else:
                    first_line[key] = line
            except TypeError:  # unhashable key: let SafeLoader report it
                break
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITHOUT_DOT, list("-+0123456789"))


def _load(text: str, source: str) -> Any:
    loader = _ConfigLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = exc.problem or exc.context or "malformed YAML"
        raise ConfigError(
            ConfigProblem("", f"YAML syntax error{where}: {what}", source), source=source
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(ConfigProblem("", f"YAML syntax error: {exc}", source), source=source) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(
            [
                ConfigProblem(
                    "",
                    f"duplicate key '{key}' at line {line} (first at line {first}); "
                    "YAML would silently keep only the last value",
                    source,
                )
                for key, first, line in loader.duplicates
            ],
            source=source,
        )
    return data


def read_yaml_file(path: str | Path) -> Any:
    """The parsed contents of a YAML file; a missing or unreadable file is a ConfigError naming it."""
    source = str(path)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            ConfigProblem("", f"config file not found: {source}", source), source=source
        ) from None
    except IsADirectoryError:
        raise ConfigError(
            ConfigProblem("", f"{source} is a directory, not a config file", source), source=source
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            ConfigProblem("", f"{source} is not UTF-8 text (byte {exc.start})", source), source=source
        ) from None
    except OSError as exc:
        raise ConfigError(
            ConfigProblem("", f"cannot read {source}: {exc.strerror or exc}", source), source=source
        ) from None
    return _load(text, source)


def parse_yaml_value(text: str, *, source: str) -> Any:
    """One override value parsed the way the config file would parse it (``3``, ``[1, 2]``, ``null``)."""
    return _load(text, source)
