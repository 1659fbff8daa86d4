"""Property-based fuzz of config loading: whatever the text or mapping, the only error is a ConfigError.

Inputs are YAML text (random, and real configs with mutated values or characters) and config
mappings built from the real section and key names with hostile values (huge and negative
integers, NaN and infinities, control characters, deep nesting, wrong types). Each case must
either load or raise :class:`ConfigError`; the per-case deadline only catches hangs. The default
run tries a few thousand cases; ``nox -s slow`` runs 100,000 (about 25 minutes on 2 cores).
"""

from __future__ import annotations

import math
import typing
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitedllm.config import Config, load_config
from unitedllm.config.validation import field_hints
from unitedllm.config.yamlio import parse_yaml_text
from unitedllm.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEEDS = [p.read_text(encoding="utf-8") for p in sorted(EXAMPLES.glob("*.yaml"))]


def _keys() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for section, hint in field_hints(Config).items():
        out[section] = (
            list(field_hints(hint)) if isinstance(hint, type) and issubclass(hint, msgspec.Struct) else []
        )
    return out


KEYS = _keys()

hostile_ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64, -(2**63) - 1, 10**40, 10**400]),
)
hostile_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
)
hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x20), max_size=8),
    st.sampled_from(
        ["", "null", "{run_id}", "{rank}", "../../etc/passwd", "MQTT_S3", "lora", "\x00", "é" * 50]
    ),
)
scalars = st.one_of(st.none(), st.booleans(), hostile_ints, hostile_floats, hostile_text)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(hostile_text, hostile_ints), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def config_mappings(draw: st.DrawFn) -> dict[Any, Any]:
    """A mapping of mostly real sections and keys with hostile values, sometimes unknown or odd keys."""
    data: dict[Any, Any] = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.one_of(st.sampled_from(sorted(KEYS)), hostile_text))
        if draw(st.integers(0, 9)) == 0:
            data[section] = draw(values)
            continue
        body: dict[Any, Any] = {}
        names = KEYS.get(section) or ["x"]
        for _ in range(draw(st.integers(0, 5))):
            key = draw(st.one_of(st.sampled_from(names), hostile_text, hostile_ints))
            body[key] = draw(values)
        data[section] = body
    return data


def _mutate(text: str, data: st.DataObject) -> str:
    """A real config with a few characters inserted, deleted or replaced."""
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, max(len(chars) - 1, 0)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        new = data.draw(
            st.sampled_from(list("[]{}:,-'\"#&*!|>%@`\t\n \\0x9e") + ["\x00", "\x01", "\x7f", "é"])
        )
        if op == "insert":
            chars.insert(at, new)
        elif chars and op == "delete":
            del chars[at]
        elif chars:
            chars[at] = new
    return "".join(chars)


def _load_text(text: str) -> None:
    try:
        raw = parse_yaml_text(text, source="fuzz.yaml")
        load_config(raw if isinstance(raw, dict) else {"common_args": raw})
    except ConfigError:
        pass


def _load_mapping(data: dict[Any, Any]) -> None:
    try:
        load_config(data)
    except ConfigError:
        pass


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=timedelta(seconds=10),  # a hang detector, not a speed test
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        derandomize=True,
        database=None,
    )


def _check_text(data: st.DataObject) -> None:
    choice = data.draw(st.integers(0, 2))
    if choice == 0:
        text = data.draw(st.text(max_size=200))
    elif choice == 1:
        text = _mutate(data.draw(st.sampled_from(SEEDS)), data)
    else:
        try:
            text = yaml.safe_dump(data.draw(config_mappings()), allow_unicode=True)
        except (yaml.YAMLError, ValueError, OverflowError):
            return
    _load_text(text)


@given(st.data())
@_settings(1000)
def test_yaml_text_loads_or_is_a_config_error(data: st.DataObject) -> None:
    _check_text(data)


@given(config_mappings())
@_settings(1000)
def test_config_mapping_loads_or_is_a_config_error(data: dict[Any, Any]) -> None:
    _load_mapping(data)


@pytest.mark.slow
@given(st.data())
@_settings(50_000)
def test_yaml_text_fuzz_long(data: st.DataObject) -> None:
    _check_text(data)


@pytest.mark.slow
@given(config_mappings())
@_settings(50_000)
def test_config_mapping_fuzz_long(data: dict[Any, Any]) -> None:
    _load_mapping(data)


def test_hostile_values_in_every_key_are_config_errors() -> None:
    """Every key of every section, given each hostile value in turn: loads or a ConfigError, nothing else."""
    hostile: list[Any] = [
        10**5000,
        -(2**64),
        math.nan,
        math.inf,
        "\x00",
        [[[]]],
        {"a": {"b": None}},
        "",
        True,
    ]
    for section, names in KEYS.items():
        for name in names:
            for value in hostile:
                _load_mapping({section: {name: value}})
    assert typing.get_type_hints(Config)  # the walk above covered real sections
