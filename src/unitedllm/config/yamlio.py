"""Reading config YAML: files and ``--set`` values, with errors that name the file and line.

PyYAML implements YAML 1.1, whose float syntax needs a dot (``3.0e-4``), so a learning
rate written ``1e-4`` would arrive as the string ``"1e-4"``. This loader also reads the
YAML 1.2 forms (``1e-4``, ``5E3``) as floats. Duplicate keys, which PyYAML resolves
silently in favour of the last one, are reported. Everything else is ``yaml.safe_load``,
which is what FedML uses, so a FedML file means the same thing here.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from unitedllm.errors import ConfigError, ConfigProblem

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "parse_yaml_text",
    "parse_yaml_value",
    "read_yaml_file",
]

_FLOAT_WITHOUT_DOT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")

#: A config is a few KiB of text; anything this big is the wrong file (a dataset, a device).
MAX_CONFIG_BYTES = 1024 * 1024
#: Sections nest two or three deep; 3,000 nested brackets would only exhaust the parser's stack.
MAX_DEPTH = 64
#: No config number needs more digits than this (the widest bound is 2**32 - 1).
MAX_INT_DIGITS = 40
# Characters YAML does not allow in a stream: C0 and C1 controls except tab, LF, CR and NEL, DEL,
# surrogates, U+FFFE/U+FFFF (PyYAML's own list, checked here so the error names line and column).
_CONTROL = yaml.reader.Reader.NON_PRINTABLE


class _TooDeep(yaml.MarkedYAMLError):
    """Raised while composing a node nested deeper than :data:`MAX_DEPTH`."""


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float, records duplicate keys and bounds depth and integer size."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int, int]] = []
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _TooDeep(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(node.value)
        digits = sum(ch.isdigit() for ch in text)
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                problem=f"an integer of {digits} digits is too large for any config key",
                problem_mark=node.start_mark,
            )
        return super().construct_yaml_int(node)

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
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


def _control_character(text: str, source: str) -> None:
    """Refuse NUL and other control characters (YAML forbids most; none belongs in a config)."""
    found = _CONTROL.search(text)
    if found is None:
        return
    line = text.count("\n", 0, found.start()) + 1
    column = found.start() - (text.rfind("\n", 0, found.start()) + 1) + 1
    raise ConfigError(
        ConfigProblem(
            "",
            f"control character U+{ord(found.group()):04X} at line {line}, column {column}; "
            "a config is plain text",
            source,
        ),
        source=source,
    )


def _load(text: str, source: str) -> Any:
    _control_character(text, source)
    try:
        loader = _ConfigLoader(text)
    except yaml.YAMLError as exc:  # the reader's own checks (a BOM in the middle, say)
        what = " ".join(str(exc).split())
        raise ConfigError(ConfigProblem("", f"YAML error: {what}", source), source=source) from None
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = exc.problem or exc.context or "malformed YAML"
        kind = (
            "YAML error"
            if isinstance(exc, (_TooDeep, yaml.constructor.ConstructorError))
            else "YAML syntax error"
        )
        raise ConfigError(ConfigProblem("", f"{kind}{where}: {what}", source), source=source) from None
    except yaml.YAMLError as exc:
        text = " ".join(str(exc).split())
        raise ConfigError(ConfigProblem("", f"YAML syntax error: {text}", source), source=source) from None
    except (RecursionError, ValueError, OverflowError) as exc:  # the parser's own limits, as a last guard
        raise ConfigError(
            ConfigProblem("", f"cannot read the YAML: {type(exc).__name__}: {exc}", source), source=source
        ) from None
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


def _read_text(file: Path, source: str) -> str:
    """The file's text; a device, FIFO or socket (which could block or never end) or a huge file is refused."""
    # O_NONBLOCK: opening a FIFO with no writer must not hang; fstat then says what it is.
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(source)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                ConfigProblem(
                    "", "not a regular file (a device, pipe or socket); a config is a YAML text file", source
                ),
                source=source,
            )
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            ConfigProblem("", f"over {MAX_CONFIG_BYTES // 1024} KiB; a config is a small text file", source),
            source=source,
        )
    return data.decode("utf-8")


def read_yaml_file(path: str | Path) -> Any:
    """The parsed contents of a YAML file; a missing or unreadable file is a ConfigError naming it."""
    source = str(path)
    file = Path(path)
    try:
        text = _read_text(file, source)
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


def parse_yaml_text(text: str, *, source: str) -> Any:
    """The parsed contents of config text already in memory (what :func:`read_yaml_file` does after reading)."""
    return _load(text, source)


def parse_yaml_value(text: str, *, source: str) -> Any:
    """One override value parsed the way the config file would parse it (``3``, ``[1, 2]``, ``null``)."""
    return _load(text, source)
