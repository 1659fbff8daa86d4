"""Collecting one round's updates: who was asked, what arrived, and the fold that runs alongside.

:class:`OpenRound` is the aggregator's record of the round in progress: the start message each
selected client was sent (so a client that restarts mid-round can be sent it again) and the
updates accepted so far. :func:`collect_updates` waits for them until every selected client
answered, the missing ones are all offline with the quorum met, or the deadline passes.
:class:`RoundFold` folds each accepted update into the server optimizer's round while the other
clients still train, fetching the next arrived update meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unitedllm.protocol.messages import RoundStart, Update

if TYPE_CHECKING:
    import torch

__all__ = ["OpenRound", "RoundFold", "collect_updates"]

log = logging.getLogger(__name__)


@dataclass
class OpenRound:
    """The round the aggregator is collecting: the start sent to each selected rank, and the updates so far."""

    round_idx: int
    starts: dict[int, RoundStart]
    received: dict[int, Update] = field(default_factory=dict)
    resent: set[int] = field(
        default_factory=set
    )  # ranks sent the start again since they were last seen offline
    #: The round before's updates: a copy of one arriving late (a client answered a resumed
    #: aggregator's repeated start after its first answer was taken) is the same update, not a new one.
    previous: Mapping[int, Update] = field(default_factory=dict)

    def is_repeat(self, update: Update) -> bool:
        """Whether ``update`` is one already taken in the round before (sent once more)."""
        earlier = self.previous.get(update.sender)
        return earlier is not None and (earlier.round, earlier.delta_ref) == (update.round, update.delta_ref)

    @property
    def selected(self) -> list[int]:
        return sorted(self.starts)

    def waiting_for(self, rank: int) -> RoundStart | None:
        """The start message ``rank`` still owes an update for, if any."""
        return None if rank in self.received else self.starts.get(rank)

    def to_resend(self, rank: int) -> RoundStart | None:
        """The start to send ``rank`` again when it says hello: once, and again after each time it went offline."""
        start = self.waiting_for(rank)
        if start is None or rank in self.resent:
            return None
        self.resent.add(rank)
        return start


async def collect_updates(
    round_: OpenRound,
    *,
    inbox: asyncio.Queue[Update],
    presence_changed: asyncio.Event,
    online: set[int],
    quorum: int,
    timeout_s: float,
    on_arrival: Callable[[Update], None],
    reject: Callable[[int, int, str], None],
) -> list[Update]:
    """Updates of ``round_`` from its selected clients, until all answered or the deadline passed.

    ``on_arrival`` gets each accepted arrival at once (the round folds it while others train);
    ``reject(rank, round, reason)`` records refused ones.
    """
    round_idx, selected, received = round_.round_idx, round_.selected, round_.received
    chosen = set(selected)
    deadline = time.monotonic() + timeout_s
    # Whether the missing clients may all be offline: looked at only when presence changed or the
    # quorum was just met (scanning every selected client on every arrival is N x N a round).
    recheck = True
    while len(received) < len(selected):
        missing = [r for r in selected if r not in received] if recheck and len(received) >= quorum else []
        recheck = False
        if missing and not any(r in online for r in missing):
            log.warning(
                "round %d: clients %s went offline; aggregating the %d updates that arrived",
                round_idx,
                missing,
                len(received),
            )
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = [r for r in selected if r not in received]
            log.warning("round %d: deadline passed; missing updates from %s", round_idx, missing)
            break
        get = asyncio.ensure_future(inbox.get())
        changed = asyncio.ensure_future(presence_changed.wait())
        done, _ = await asyncio.wait({get, changed}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        recheck = changed in done or presence_changed.is_set()
        changed.cancel()
        presence_changed.clear()
        if get not in done:
            get.cancel()
            continue
        update = get.result()
        if round_.is_repeat(update):
            log.info(
                "round %d: client %d sent round %d's update again", round_idx, update.sender, update.round
            )
        elif update.round != round_idx:
            reject(update.sender, round_idx, f"update for round {update.round} arrived in round {round_idx}")
        elif update.sender not in chosen:
            reject(update.sender, round_idx, "client was not selected for this round")
        elif update.sender in received:
            if received[update.sender].delta_ref != update.delta_ref:
                reject(update.sender, round_idx, "second update in the same round")
            # else: the same update again (sent before this aggregator resumed, and once more after)
        else:
            received[update.sender] = update
            recheck = recheck or len(received) == quorum
            on_arrival(update)
    return [received[r] for r in sorted(received)]


class RoundFold:
    """A round's updates folded one at a time as they arrive, while the other clients still train.

    ``fold_one`` checks and folds one update into ``accumulator`` (or rejects it), recording the
    outcome here; it gets the update's tensors from :meth:`fetched`, which runs ``fetch``. When an
    update waits behind the one being folded, its fetch (download and decode) starts at once, so
    the tail of a round overlaps transfer with folding while holding at most two updates in memory:
    or, for a model so small that more decoded updates fit in ``prefetch_bytes`` together, up to
    ``prefetch_max`` of them (hundreds of clients' tiny updates are fetched many at a time instead
    of one round trip after another).
    """

    #: Fetch the next waiting update while folding the current one. Only the benches turn it off,
    #: to measure what the overlap saves (``bench/slow_link.py``).
    overlap = True
    #: Memory the updates fetched ahead may take together (each counted at the weights' size, as
    #: decoded), and the most fetched at once however small; never fewer than two.
    prefetch_bytes = 64 * 2**20
    prefetch_max = 16

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        accumulator: Any,
        fold_one: Callable[[RoundFold, Update], Awaitable[None]],
        fetch: Callable[[RoundFold, Update], Awaitable[Any]] | None = None,
    ):
        self.weights = weights
        decoded = sum(t.numel() * t.element_size() for t in weights.values())
        self.window = max(2, min(self.prefetch_max, self.prefetch_bytes // max(decoded, 1)))
        self.accumulator = accumulator
        self.accepted: list[int] = []
        self.rejected: dict[int, str] = {}
        self._fold_one = fold_one
        self._fetch = fetch
        self._pending: deque[Update | None] = deque()
        self._arrived = asyncio.Event()
        self._fetching: dict[int, asyncio.Future[Any]] = {}  # by sender: one update per client per round
        self._worker: asyncio.Task[None] | None = None

    def submit(self, message: Update) -> None:
        """Fold ``message``'s update after those submitted before it."""
        self._pending.append(message)
        self._arrived.set()

    async def fetched(self, message: Update) -> Any:
        """What ``fetch`` makes of ``message`` (already under way when it waited behind another update)."""
        self._prefetch(message)
        return await self._fetching.pop(message.sender)

    def _prefetch(self, message: Update) -> None:
        if self._fetch is None:
            raise RuntimeError("RoundFold.fetched needs the fetch callable")
        if message.sender not in self._fetching:
            self._fetching[message.sender] = asyncio.ensure_future(self._fetch(self, message))

    async def _next(self) -> Update | None:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        return self._pending.popleft()

    async def _run(self) -> None:
        try:
            while (message := await self._next()) is not None:
                if self._pending and self._fetch is not None and self.overlap:
                    self._prefetch(message)
                    # Fetched while this one folds: ``window`` updates in memory at most, this one included.
                    for following in itertools.islice(self._pending, self.window - 1):
                        if following is not None:
                            self._prefetch(following)
                await self._fold_one(self, message)
        finally:
            for task in self._fetching.values():
                task.cancel()

    async def alongside(self, collecting: Awaitable[list[Update]]) -> list[Update]:
        """Run ``collecting`` while folding what it submits; a failed fold stops both at once."""
        self._worker = asyncio.ensure_future(self._run())
        collect = asyncio.ensure_future(collecting)
        try:
            await asyncio.wait({collect, self._worker}, return_when=asyncio.FIRST_COMPLETED)
            if self._worker.done():  # it only ends by failing while collecting goes on
                self._worker.result()
            return await collect
        except BaseException:
            collect.cancel()
            self._worker.cancel()
            raise

    async def drained(self) -> None:
        """Wait until every submitted update has been folded (or rejected)."""
        assert self._worker is not None
        self._pending.append(None)
        self._arrived.set()
        await self._worker
