"""Which clients the aggregator can count on: online per their presence, and admitted by their hello.

A client is *online* while its signed presence says so and it was not refused (a client that
trains another base model is blocked until it says hello with the right one). The aggregator
waits here for enough clients to start, and each round's collection watches :attr:`changed` to
stop waiting for clients that went away.
"""

from __future__ import annotations

import asyncio
import time

from unitedllm.errors import RoundError

__all__ = ["Attendance"]


class Attendance:
    """The aggregator's view of its clients: online, refused, and greeted at least once."""

    def __init__(self) -> None:
        self.online: set[int] = set()
        self.blocked: set[int] = set()
        self.greeted: set[int] = set()
        self.changed = asyncio.Event()

    def presence(self, rank: int, online: bool) -> None:
        """A presence change of ``rank`` (a refused client stays offline until it is admitted)."""
        if online and rank not in self.blocked:
            self.online.add(rank)
        else:
            self.online.discard(rank)
        self.changed.set()

    def admit(self, rank: int) -> bool:
        """``rank`` said hello with the right base model; whether it is the first time this run."""
        self.blocked.discard(rank)
        self.online.add(rank)
        self.changed.set()
        first = rank not in self.greeted
        self.greeted.add(rank)
        return first

    def block(self, rank: int) -> None:
        """``rank`` was refused (another base model): not online until it is admitted."""
        self.blocked.add(rank)
        self.online.discard(rank)

    async def wait_for(self, count: int, *, timeout_s: float) -> None:
        """Until ``count`` clients are online; :class:`RoundError` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while len(self.online) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RoundError(
                    f"only {len(self.online)} of the {count} clients needed are online after "
                    f"{timeout_s:g}s (online: {sorted(self.online) or 'none'}); "
                    "start the clients or raise comm_args.join_timeout_s"
                )
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=remaining)
            except TimeoutError:
                continue
