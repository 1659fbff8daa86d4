"""The run's metrics log: one JSON object per line in ``<output_dir>/metrics.jsonl``.

Every event carries ``event`` (``train``, ``eval``, ``round``, ``rejected``...), ``round``,
``rank`` and a wall-clock ``time``; the rest depends on the event. The events are the tagged
union of :mod:`unitedllm.tracking.events`: each line is checked against its Struct before it is
written, and readers decode it with :func:`~unitedllm.tracking.events.decode_event`. The file is appended to and flushed per line, so a run in
progress can be read at any time and a resumed run continues the same file.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import msgspec

from unitedllm.config.redaction import known_secrets, scrub
from unitedllm.tracking.events import EVENT_TYPES

__all__ = ["MetricsLog", "read_metrics"]

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Any]], None]


def _clean(value: Any, secrets: frozenset[str]) -> Any:
    # JSON has no NaN/Infinity; write them as null (at any depth) so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):  # an error message may quote a credential; the log never does
        return scrub(value, secrets) if secrets else value
    if isinstance(value, dict):
        return {k: _clean(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, secrets) for v in value]
    return value


class MetricsLog:
    """Appends metric events to a JSONL file and forwards them to listeners (progress, trackers)."""

    def __init__(self, path: Path | None, *, listeners: list[Listener] | None = None):
        self.path = path
        self.listeners: list[Listener] = list(listeners or [])
        self._lock = threading.Lock()
        self._file: Any = None

    def __enter__(self) -> Self:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def log(self, event: str, *, round_idx: int | None, rank: int, **fields: Any) -> dict[str, Any]:
        """Record one event and return it as written."""
        record: dict[str, Any] = {
            "event": event,
            "round": round_idx,
            "rank": rank,
            "time": round(time.time(), 3),
        }
        secrets = frozenset(known_secrets())
        record.update({k: _clean(v, secrets) for k, v in fields.items()})
        _check(record)
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps(record, sort_keys=False) + "\n")
                self._file.flush()
        for listener in self.listeners:
            listener(record)
        return record


def _check(record: dict[str, Any]) -> None:
    """Warn (once per event) when a record is not what :mod:`unitedllm.tracking.events` declares.

    It is still written: a metrics line must never stop a run, and readers skip what they cannot read.
    """
    event = record["event"]
    cls = EVENT_TYPES.get(event)
    try:
        if cls is None:
            raise ValueError("it is not declared in unitedllm.tracking.events")
        msgspec.convert(record, cls)
    except (ValueError, msgspec.ValidationError) as exc:
        if event not in _warned:
            _warned.add(event)
            log.warning("metrics event %r does not match its declared type: %s", event, exc)


_warned: set[str] = set()


def read_metrics(path: Path) -> Iterator[dict[str, Any]]:
    """The events of a metrics file; a torn last line (run still writing) is skipped."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
