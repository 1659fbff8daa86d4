"""Checking raw config data against the typed sections, one key at a time.

msgspec stops at the first problem in a Struct, so a config with three mistakes would
need three edit-and-retry cycles. Here every key of every section is converted on its
own, so all type, range, enum and unknown-key problems are reported together, each
with its YAML path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import msgspec

from unitedllm.config.types import Config
from unitedllm.errors import ConfigProblem

__all__ = [
    "check_struct",
    "describe_type",
    "field_hints",
    "is_section",
    "normalise_sections",
    "raw_problems",
    "render_value",
    "unknown_key_hint",
    "unknown_key_problem",
    "value_problem",
]

_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_PATH_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def is_section(hint: Any) -> bool:
    """Whether a type hint is a nested config section (a Struct) rather than a value."""
    return isinstance(hint, type) and issubclass(hint, msgspec.Struct)


@functools.cache
def field_hints(cls: type[msgspec.Struct]) -> dict[str, Any]:
    """The type hint of each field of a section, keeping ``Annotated`` limits."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {name: hints[name] for name in cls.__struct_fields__}


def normalise_sections(data: Any, cls: type[msgspec.Struct] = Config) -> Any:
    """``data`` with empty sections (``train_args:`` with every key commented out) read as ``{}``."""
    if not isinstance(data, Mapping):
        return data
    hints = field_hints(cls)
    out: dict[Any, Any] = {}
    for key, value in data.items():
        hint = hints.get(key) if isinstance(key, str) else None
        if hint is not None and is_section(hint):
            out[key] = {} if value is None else normalise_sections(value, hint)
        else:
            out[key] = value
    return out


def render_value(value: Any) -> str:
    """A bad value as the user would recognise it from YAML (``"five"``, ``false``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and abs(value).bit_length() > 128:
        # repr of a 5,000-digit int raises; the size is what the user needs to hear anyway
        return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
    if isinstance(value, (int, float)):
        return repr(value)
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(x: float) -> str:
    return repr(x)


def describe_type(hint: Any) -> str:
    """What a type hint allows, in words (``int >= 1``, ``one of 'none', 'lora'``, ``str or null``)."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *metas = typing.get_args(hint)
        limits = []
        for meta in metas:
            if isinstance(meta, msgspec.Meta):
                for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                    bound = getattr(meta, attr)
                    if bound is not None:
                        limits.append(f"{sign} {_number(bound)}")
        text = describe_type(base)
        return f"{text} {' and '.join(limits)}" if limits else text
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        parts = [describe_type(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {describe_type(item)}"
    if origin is dict or hint is dict:
        return "a mapping"
    if hint is Any:
        return "any value"
    if is_section(hint):
        return "a section (a mapping of keys)"
    return getattr(hint, "__name__", str(hint))


def _choices(hint: Any) -> tuple[tuple[Any, ...], bool] | None:
    """The allowed values of a Literal hint (possibly ``| None``), and whether null is allowed."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _choices(typing.get_args(hint)[0])
    if origin is Literal:
        return typing.get_args(hint), False
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and (found := _choices(rest[0])) is not None:
            return found[0], type(None) in args
    return None


def _step_into(hint: Any, value: Any, step: str | int) -> tuple[Any, Any] | None:
    """The hint and value one step down a list index or mapping key, if the types allow it."""
    while True:
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            hint = typing.get_args(hint)[0]
        elif origin in (typing.Union, types.UnionType):
            containers = [a for a in typing.get_args(hint) if typing.get_origin(a) in (list, dict)]
            if len(containers) != 1:
                return None
            hint = containers[0]
        else:
            break
    try:
        if origin is list and isinstance(step, int):
            return typing.get_args(hint)[0], value[step]
        if origin is dict and isinstance(step, str):
            return typing.get_args(hint)[1], value[step]
    except (IndexError, KeyError, TypeError):
        return None
    return None


def value_problem(
    path: str, value: Any, hint: Any, error: msgspec.ValidationError, source: str | None
) -> ConfigProblem:
    """A msgspec validation error for one key, rewritten to name the YAML path and the bad value."""
    message = str(error)
    match = _MSGSPEC_PATH.search(message)
    sub = match.group("path") if match else ""
    for name, index in _PATH_STEP.findall(sub):
        stepped = _step_into(hint, value, int(index) if index else name)
        if stepped is None:
            # The types do not say what is inside; fall back to msgspec's own words.
            text = _MSGSPEC_PATH.sub("", message)
            return ConfigProblem(f"{path}{sub}", text[0].lower() + text[1:], source)
        hint, value = stepped
        path = f"{path}[{index}]" if index else f"{path}.{name}"
    choices = _choices(hint)
    if choices is not None:
        allowed, nullable = choices
        listed = ", ".join(repr(c) for c in allowed) + (", null" if nullable else "")
        shown = repr(value) if isinstance(value, str) else render_value(value)
        text = f"{shown} is not one of {listed}"
        if isinstance(value, bool) and any(str(c) in ("no", "yes", "on", "off") for c in allowed):
            word = {True: "yes/on", False: "no/off"}[value]
            text += f' (YAML reads an unquoted {word} as {render_value(value)}: put the word in quotes, e.g. "no")'
        return ConfigProblem(path, text, source)
    return ConfigProblem(path, f"expected {describe_type(hint)}, got {render_value(value)}", source)


def unknown_key_hint(key: str, known: list[str]) -> str:
    """``"; did you mean 'comm_round'?"`` for a misspelt key, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


@functools.cache
def _sections_with_key() -> dict[str, list[str]]:
    """For each key name, the top-level sections that have it (to spot a key in the wrong section)."""
    found: dict[str, list[str]] = {}
    for section, hint in field_hints(Config).items():
        for name in field_hints(hint):
            found.setdefault(name, []).append(section)
    return found


def unknown_key_problem(path: str, key: Any, cls: type[msgspec.Struct], source: str | None) -> ConfigProblem:
    """The problem for a key that ``cls`` does not have, with a did-you-mean hint."""
    known = list(field_hints(cls))
    where = f"{path}.{key}" if path else str(key)
    if not isinstance(key, str):
        return ConfigProblem(
            where, f"key {render_value(key)} is not a name; keys are words like {known[0]!r}", source
        )
    hint = unknown_key_hint(key, known)
    homes = _sections_with_key().get(key, [])
    if cls is Config:
        if homes:
            hint = f"; '{key}' is a key of {' and '.join(homes)}, not a section"
        elif not hint:
            hint = f"; the sections are {', '.join(known)}"
        return ConfigProblem(where, f"unknown section '{key}'{hint}", source)
    section = path.split(".")[0]
    others = [h for h in homes if h != section]
    if not hint and others:
        hint = f"; '{key}' belongs in {' or '.join(others)}"
    return ConfigProblem(where, f"unknown key '{key}' in {path}{hint}", source)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def raw_problems(data: Any, *, max_depth: int, source: str | None = None) -> list[ConfigProblem]:
    """Problems no type can catch in raw config data: nesting deeper than ``max_depth``, control characters.

    Walks without recursion, so a mapping nested thousands deep (from Python, not YAML) is refused
    rather than exhausting the stack; a NUL in a value (YAML's ``"\\0"`` escape) is refused by path.
    """
    problems: list[ConfigProblem] = []
    stack: list[tuple[str, Any, int]] = [("", data, 0)]
    while stack:
        path, value, depth = stack.pop()
        if depth > max_depth:
            problems.append(ConfigProblem(path, f"nested more than {max_depth} levels deep", source))
            continue
        if isinstance(value, str):
            found = _CONTROL.search(value)
            if found is not None:
                problems.append(
                    ConfigProblem(
                        path,
                        f"control character U+{ord(found.group()):04X} in the value; a config holds plain text",
                        source,
                    )
                )
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and _CONTROL.search(key):
                    problems.append(
                        ConfigProblem(path, f"control character in the key {render_value(key)}", source)
                    )
                    continue
                stack.append((f"{path}.{key}" if path else str(key), item, depth + 1))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value))
    return sorted(problems, key=lambda p: p.path)


def check_struct(
    data: Any, cls: type[msgspec.Struct], path: str, source: str | None
) -> Iterator[ConfigProblem]:
    """Every problem in ``data`` as the section ``cls`` at ``path``, key by key."""
    if data is None:
        return
    if not isinstance(data, Mapping):
        yield ConfigProblem(path, f"expected {describe_type(cls)}, got {render_value(data)}", source)
        return
    hints = field_hints(cls)
    for key, value in data.items():
        hint = hints.get(key) if isinstance(key, str) else None
        if hint is None:
            yield unknown_key_problem(path, key, cls, source)
            continue
        where = f"{path}.{key}" if path else key
        if is_section(hint):
            yield from check_struct(value, hint, where, source)
            continue
        try:
            msgspec.convert(value, hint)
        except msgspec.ValidationError as exc:
            yield value_problem(where, value, hint, exc, source)
