"""The names a server answers to, and the adapter folder behind each one.

Names: ``base`` (no adapter); for a run folder ``global`` (the newest global round), ``global@<r>``,
``rank-<k>`` (client k's newest local model) and ``rank-<k>@<r>``; for an exported folder its own
name and ``global``; and every ``--adapter NAME=PATH``. Aliases (``global``, ``rank-<k>``) resolve
to a concrete entry when a request arrives, so a request keeps its adapter even if ``global`` moves.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from unitedllm.errors import ConfigError, ConfigProblem
from unitedllm.serving.errors import AdapterRefused, ModelNotFound
from unitedllm.serving.layout import RunFolder, adapter_base, is_adapter_dir, is_model_dir

__all__ = ["BASE", "GLOBAL", "ModelEntry", "ModelRegistry", "open_target"]

log = logging.getLogger(__name__)

BASE = "base"
GLOBAL = "global"


@dataclass
class ModelEntry:
    """One servable model: the base alone (``path`` None) or the base with one adapter folder."""

    name: str
    path: Path | None
    round: int | None = None
    rank: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    digest: str | None = None


class ModelRegistry:
    """Names → entries, plus moving aliases; safe to read from the event loop and worker threads."""

    def __init__(self, base: str, *, run: RunFolder | None = None):
        self.base = base  # a local folder or a hub id (RunFolder.base_model)
        self.run = run
        self._entries: dict[str, ModelEntry] = {BASE: ModelEntry(BASE, None)}
        self._aliases: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, entry: ModelEntry) -> None:
        with self._lock:
            self._entries[entry.name] = entry

    def alias(self, name: str, target: str) -> None:
        """Point ``name`` at an existing entry (e.g. ``global`` → ``global@3``)."""
        with self._lock:
            self._aliases[name] = target

    def alias_target(self, name: str) -> str | None:
        with self._lock:
            return self._aliases.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._aliases) + sorted(self._entries)

    def get(self, name: str) -> ModelEntry | None:
        with self._lock:
            return self._entries.get(self._aliases.get(name, name))

    def resolve(self, name: str) -> ModelEntry:
        """The entry a request's ``model`` names, or :class:`ModelNotFound`."""
        entry = self.get(name)
        if entry is None:
            raise ModelNotFound(name, self.names())
        return entry

    def default(self) -> ModelEntry:
        """What a server loads first: ``global`` when there is one, else the first adapter, else the base."""
        entry = self.get(GLOBAL)
        if entry is not None:
            return entry
        with self._lock:
            adapters = [e for e in self._entries.values() if e.path is not None]
        return adapters[0] if adapters else self.resolve(BASE)

    def listing(self) -> list[tuple[str, ModelEntry]]:
        """Every name with the entry it means now."""
        with self._lock:
            rows = [(a, self._entries[t]) for a, t in sorted(self._aliases.items()) if t in self._entries]
            return rows + sorted(self._entries.items())

    def add_run_round(self, round_idx: int, path: Path, *, digest: str | None = None) -> ModelEntry:
        entry = ModelEntry(f"{GLOBAL}@{round_idx}", path, round=round_idx, rank=0, digest=digest)
        self.add(entry)
        return entry


def _parse_adapter(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ConfigError(ConfigProblem("--adapter", f"{spec!r} is not NAME=PATH"))
    folder = Path(path).expanduser()
    if not is_adapter_dir(folder):
        raise ConfigError(
            ConfigProblem("--adapter", f"{name}={path}: no PEFT adapter there (no adapter_config.json)")
        )
    if name in (BASE, GLOBAL) or name.startswith((f"{GLOBAL}@", "rank-")):
        raise ConfigError(ConfigProblem("--adapter", f"{name!r} is a reserved model name"))
    return name, folder


def _add_run(registry: ModelRegistry, run: RunFolder) -> None:
    rounds: dict[int, Path] = {}
    for round_idx, path in run.global_rounds().items():
        try:  # a run written before digests were recorded is served unchecked
            digest = run.recorded_digest(path, required=False)
        except AdapterRefused as exc:
            registry.refused[f"{GLOBAL}@{round_idx}"] = exc.reason
            log.warning("round %d not served: %s", round_idx, exc)
            continue
        registry.add_run_round(round_idx, path, digest=digest)
        rounds[round_idx] = path
    if rounds:
        registry.alias(GLOBAL, f"{GLOBAL}@{max(rounds)}")
    for rank in run.client_ranks():
        local = run.rounds(rank=rank, stage="before_agg")
        for round_idx, path in local.items():
            registry.add(ModelEntry(f"rank-{rank}@{round_idx}", path, round=round_idx, rank=rank))
        if local:
            registry.alias(f"rank-{rank}", f"rank-{rank}@{max(local)}")


def open_target(target: Path, adapters: list[str]) -> ModelRegistry:
    """The registry for ``unitedllm serve TARGET --adapter ...``: a run folder, an exported folder or a base."""
    named = [_parse_adapter(spec) for spec in adapters]
    if not target.exists():
        raise ConfigError(ConfigProblem("TARGET", f"{target} does not exist"))
    registry: ModelRegistry
    if RunFolder.looks_like(target):
        run = RunFolder(target)
        registry = ModelRegistry(run.base_model(), run=run)
        _add_run(registry, run)
    elif is_adapter_dir(target):
        base = adapter_base(target)
        if base is None:
            raise ConfigError(
                ConfigProblem(
                    "TARGET", f"{target}: the adapter's base model (base_model_name_or_path) is not here"
                )
            )
        registry = ModelRegistry(base)
        registry.add(ModelEntry(target.resolve().name, target))
        registry.alias(GLOBAL, target.resolve().name)
    elif is_model_dir(target):
        registry = ModelRegistry(str(target.resolve()))
        registry.alias(target.resolve().name, BASE)
        if (target / "unitedllm_export.json").is_file():
            registry.alias(GLOBAL, BASE)  # a merged export is the global model itself
    else:
        raise ConfigError(
            ConfigProblem("TARGET", f"{target} is neither a run folder, an exported model nor a model folder")
        )
    for name, folder in named:
        registry.add(ModelEntry(name, folder))
    return registry
