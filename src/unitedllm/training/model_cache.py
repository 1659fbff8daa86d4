"""Share one tokenizer and one model object between the trainers of an embedded (single-process) run.

An embedded run has N clients and the aggregator in one process; building N+1 copies of
the same base model would multiply memory for nothing. Trainers built with the same
:class:`ModelCache` get the same :class:`SharedModel` and take turns on it under its lock:
each one loads its own trainable weights before it trains or evaluates, and keeps its own
optimizer state and data.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = ["ModelCache", "SharedModel"]

T = TypeVar("T")


@dataclass
class SharedModel:
    """A model built once, the trainable weights it was built with, and the lock trainers take turns by."""

    model: Any
    initial_weights: dict[str, torch.Tensor]
    # Taken when the model is built: saving a model later rewrites parts of its config (dtype).
    fingerprint: str = ""
    lock: threading.RLock = field(default_factory=threading.RLock)
    base_dir: Path | None = None  # where save_base() wrote the base model, if it did


class ModelCache:
    """Builds each keyed object (tokenizer, model) once per process and hands out the same one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._items: dict[str, Any] = {}

    def get_or_create(self, key: str, factory: Callable[[], T]) -> T:
        """The object cached under ``key``, built by ``factory`` on first use (once, even under races)."""
        with self._lock:
            if key in self._items:
                return self._items[key]  # type: ignore[no-any-return]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key]  # type: ignore[no-any-return]
            value = factory()
            with self._lock:
                self._items[key] = value
            return value

    def clear(self) -> None:
        """Drop every cached object (frees the models once no trainer holds them)."""
        with self._lock:
            self._items.clear()
            self._key_locks.clear()
