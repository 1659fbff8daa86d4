"""Follow a live run: load each new global round as it is saved and move ``global`` to it.

For a LOCAL run folder the aggregator writes ``node_0/round_<r>_after_agg`` (and ``final``) by an
atomic rename, so a folder that appears is complete, with the sha256 of its files recorded inside
(``SHA256SUMS``, written before the rename): a round whose bytes differ from the record, or that has
no record, is refused. The follower looks for new ones every
``interval`` seconds (a directory listing; no file-watching library is installed), loads each
through the engine, which checks its digest, shapes and values, and only then points ``global``
at it. Requests resolve ``global`` when they arrive, so a stream never changes adapter midway;
older rounds stay addressable as ``global@<r>``; a refused adapter is logged, counted and
skipped, and the previous one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from unitedllm.serving.adapters import GLOBAL, ModelEntry
from unitedllm.serving.engine import Engine
from unitedllm.serving.errors import AdapterRefused
from unitedllm.serving.layout import RunFolder

__all__ = ["RunFollower"]

log = logging.getLogger(__name__)


class RunFollower:
    """Moves ``global`` to each new round of a run folder; an async context manager running in the background."""

    def __init__(
        self,
        engine: Engine,
        run: RunFolder,
        *,
        interval: float = 0.5,
        on_refused: Callable[[str, str], None] | None = None,
    ):
        self.engine = engine
        self.run = run
        self.interval = interval
        self.on_refused = on_refused
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunFollower:
        self._task = asyncio.create_task(self._follow(), name="follow-run")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)

    async def check(self) -> None:
        """Take in what the run saved since the last check."""
        registry = self.engine.registry
        rounds = await asyncio.to_thread(self.run.global_rounds)
        for round_idx, path in rounds.items():
            name = f"{GLOBAL}@{round_idx}"
            if registry.get(name) is not None or name in registry.refused:
                continue
            try:
                digest = await asyncio.to_thread(self.run.recorded_digest, path, required=True)
                entry = ModelEntry(name, path, round=round_idx, rank=0, digest=digest)
                await self.engine.load(entry)
            except AdapterRefused as exc:
                registry.refused[name] = exc.reason
                log.warning("round %d not served: %s", round_idx, exc)
                if self.on_refused is not None:
                    self.on_refused(name, exc.reason)
                continue
            registry.add(entry)
            current = registry.get(GLOBAL)
            if current is None or current.round is None or round_idx > current.round:
                registry.alias(GLOBAL, name)
                log.info("global is now round %d (%s)", round_idx, path)
        for rank in await asyncio.to_thread(self.run.client_ranks):
            local = await asyncio.to_thread(self.run.rounds, rank=rank, stage="before_agg")
            for round_idx, path in local.items():
                name = f"rank-{rank}@{round_idx}"
                if registry.get(name) is None:
                    registry.add(ModelEntry(name, path, round=round_idx, rank=rank))  # loaded when asked for
            if local:
                registry.alias(f"rank-{rank}", f"rank-{rank}@{max(local)}")
