"""One redaction of secrets, used wherever a config or a message leaves the process.

A config value is a secret when its type carries :data:`~unitedllm.config.types.SECRET`
(``comm_args.run_secret``, ``comm_args.mqtt.password``, ``comm_args.s3.secret_access_key``, and
any key added later with that marker): no list of names to keep in step with the types.
Trackers (MLflow params, the W&B config, TensorBoard), logs, reports and packages see
:func:`redacted_config` instead of the config, and any text they write goes through
:func:`scrub`, which masks every secret value this process knows of: those of each config
loaded here (:func:`remember_config`), secrets from the environment (``UNITEDLLM_*`` variables
named like a password, secret, token or key) and values given to :func:`remember_secret`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import msgspec

from unitedllm.config.types import Config

__all__ = [
    "MASK",
    "SecretFilter",
    "install_record_scrubber",
    "install_secret_filter",
    "is_secret_hint",
    "known_secrets",
    "redact_mapping",
    "redacted_config",
    "remember_config",
    "remember_secret",
    "scrub",
    "secret_paths",
]

#: What a secret value is replaced by.
MASK = "********"
# Values shorter than this are not masked inside free text (they would mask ordinary words);
# a config field marked secret is masked whatever its length.
_MIN_SCRUB_LEN = 4
_ENV_SECRET_NAME = re.compile(r"^UNITEDLLM_\w*(SECRET|PASSWORD|PASSWD|TOKEN|KEY)\w*$")
_ENV_NOT_SECRET = re.compile(r"_KEY_ID$|_PATH$|_FILE$")

_remembered: set[str] = set()
_lock = threading.Lock()


def _is_secret_meta(meta: object) -> bool:
    return isinstance(meta, msgspec.Meta) and bool((meta.extra or {}).get("secret"))


def is_secret_hint(hint: Any) -> bool:
    """Whether a type hint (possibly ``| None`` or nested ``Annotated``) carries the secret marker."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *metas = typing.get_args(hint)
        return any(_is_secret_meta(m) for m in metas) or is_secret_hint(base)
    if origin in (typing.Union, types.UnionType):
        return any(is_secret_hint(arg) for arg in typing.get_args(hint))
    return False


def _container_item(hint: Any) -> Any | None:
    """The item type of a ``list[...]`` / ``dict[..., V]`` hint (through Annotated and ``| None``)."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _container_item(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if (item := _container_item(arg)) is not None:
                return item
        return None
    if origin is list:
        return typing.get_args(hint)[0]
    if origin is dict:
        return typing.get_args(hint)[1]
    return None


def _struct_of(hint: Any) -> type[msgspec.Struct] | None:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _struct_of(typing.get_args(hint)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if (found := _struct_of(arg)) is not None:
                return found
        return None
    return hint if isinstance(hint, type) and issubclass(hint, msgspec.Struct) else None


@functools.cache
def secret_paths(cls: type[msgspec.Struct] = Config) -> tuple[tuple[str, ...], ...]:
    """The YAML paths of every secret field under ``cls`` (``"*"`` stands for any key or index)."""
    found: list[tuple[str, ...]] = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for name in cls.__struct_fields__:
        hint = hints[name]
        if is_secret_hint(hint):
            found.append((name,))
            continue
        if (struct := _struct_of(hint)) is not None:
            found.extend((name, *sub) for sub in secret_paths(struct))
            continue
        item = _container_item(hint)
        if item is not None and is_secret_hint(item):
            found.append((name, "*"))
        elif item is not None and (struct := _struct_of(item)) is not None:
            found.extend((name, "*", *sub) for sub in secret_paths(struct))
    return tuple(found)


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[Any, Any]]:
    """Each (container, key) that ``path`` names inside ``node``."""
    if not path:
        return
    head, rest = path[0], path[1:]
    if isinstance(node, Mapping):
        keys: Iterable[Any] = list(node) if head == "*" else ([head] if head in node else [])
    elif isinstance(node, list) and head == "*":
        keys = range(len(node))
    else:
        return
    for key in keys:
        if rest:
            yield from _walk(node[key], rest)
        else:
            yield node, key


def _is_set(value: Any) -> bool:
    return value not in (None, "", {}, [])


def redact_mapping(data: Any, cls: type[msgspec.Struct] = Config) -> Any:
    """A deep copy of raw config data (a parsed YAML mapping) with every set secret value masked."""
    import copy

    out = copy.deepcopy(data)
    for path in secret_paths(cls):
        for container, key in _walk(out, path):
            if _is_set(container[key]):
                container[key] = MASK
    return out


def _secret_values_of(data: Any, cls: type[msgspec.Struct] = Config) -> set[str]:
    values: set[str] = set()
    for path in secret_paths(cls):
        for container, key in _walk(data, path):
            value = container[key]
            if isinstance(value, str) and value:
                values.add(value)
            elif isinstance(value, Mapping | list):
                items = value.values() if isinstance(value, Mapping) else value
                values.update(v for v in items if isinstance(v, str) and v)
    return values


def redacted_config(cfg: Config) -> dict[str, Any]:
    """``cfg`` as plain data with every secret masked: what trackers, reports and logs may see."""
    data = msgspec.to_builtins(cfg)
    assert isinstance(data, dict)
    redacted: dict[str, Any] = redact_mapping(data)
    return redacted


def remember_config(cfg: Config | Mapping[str, Any]) -> None:
    """Add the secret values of a loaded config to those :func:`scrub` masks in this process.

    Also starts scrubbing every log record of the process (:func:`install_record_scrubber`), so
    secrets that come from the environment are masked too, whatever the config holds.
    """
    data = msgspec.to_builtins(cfg) if isinstance(cfg, Config) else cfg
    for value in _secret_values_of(data):
        remember_secret(value)
    install_record_scrubber()


def remember_secret(value: str | bytes | None) -> None:
    """Mask ``value`` wherever :func:`scrub` runs in this process (a key read from a file, say).

    From the first remembered secret on, every log record of the process is scrubbed as it is
    made (:func:`install_record_scrubber`), whichever handler writes it.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value:
        with _lock:
            _remembered.add(value)
        install_record_scrubber()


_scrubber_installed = False


def install_record_scrubber() -> None:
    """Scrub every log record this process makes, before any handler (or Python's last-resort one) sees it.

    A handler filter only covers the handlers it is put on; an entry point that never configures
    logging still prints warnings through Python's last-resort handler. Installed once, chaining
    the record factory already in place.
    """
    global _scrubber_installed
    with _lock:
        if _scrubber_installed:
            return
        _scrubber_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _scrub_record(record)
        return record

    logging.setLogRecordFactory(factory)


_TRACEBACKS = logging.Formatter()


def _scrub_record(record: logging.LogRecord) -> None:
    """Mask secrets in the message, the traceback and the stack a record carries.

    A handler's formatter renders ``exc_info`` into ``exc_text`` only after the filters ran, and
    an exception's text often holds what was refused (a token, a signed URL): the traceback is
    rendered here, masked, and the formatter then uses it as it is.
    """
    if record.exc_info and not record.exc_text:
        record.exc_text = _TRACEBACKS.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a malformed record: leave it to the handler to report
        return
    cleaned = scrub(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None


@functools.lru_cache(maxsize=8192)
def _is_secret_env_name(name: str) -> bool:
    """Whether an environment variable of this name holds a secret (cached: every log record asks)."""
    return bool(_ENV_SECRET_NAME.match(name)) and not _ENV_NOT_SECRET.search(name)


def _environment_secrets(environ: Mapping[str, str]) -> set[str]:
    return {value for name, value in environ.items() if value and _is_secret_env_name(name)}


@functools.lru_cache(maxsize=16)
def _longest_first(values: frozenset[str]) -> tuple[str, ...]:
    """The secrets worth masking in free text, longest first (so one that contains another is masked whole)."""
    return tuple(sorted((v for v in values if len(v) >= _MIN_SCRUB_LEN), key=len, reverse=True))


_process_env_cache: tuple[dict[Any, Any], frozenset[str]] | None = None


def _process_environment_secrets() -> frozenset[str]:
    """The secrets in ``os.environ``, found again only when the environment changed.

    Every log record and metrics line asks; decoding and matching every variable each time cost
    milliseconds with one key variable per client rank. Comparing the raw environment with a copy
    of it costs microseconds.
    """
    global _process_env_cache
    raw = getattr(os.environ, "_data", None)  # CPython's encoded environment; elsewhere: no cache
    cached = _process_env_cache
    if isinstance(raw, dict) and cached is not None and cached[0] == raw:
        return cached[1]
    found = frozenset(_environment_secrets(os.environ))
    if isinstance(raw, dict):
        _process_env_cache = (dict(raw), found)
    return found


def known_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Every secret value this process knows of: remembered ones and those in the environment."""
    with _lock:
        found = set(_remembered)
    return found | (_process_environment_secrets() if environ is None else _environment_secrets(environ))


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every known secret value (or each of ``secrets``) replaced by :data:`MASK`."""
    values = frozenset(known_secrets() if secrets is None else secrets)
    for value in _longest_first(values):
        if value in text:
            text = text.replace(value, MASK)
    return text


class SecretFilter(logging.Filter):
    """A logging filter that masks every known secret in a record's message before any handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_record(record)
        return True


def install_secret_filter(logger: logging.Logger | None = None) -> None:
    """Put a :class:`SecretFilter` on every handler of ``logger`` (the root logger by default), once each."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(SecretFilter())
