"""The aggregator's refusals (docs/protocol.md), driven over the wire by hand-made clients.

A real aggregator runs over the in-process backend; ranks 1..3 are hand-made clients that
answer with correctly signed updates, some of which the protocol says must be refused: an
update for the wrong round, one from a client not selected this round, a second one in the
same round, a replayed frame and an out-of-range sample count. Each would move the global
model far (its delta is 100) if it counted, so the tests check the model a user gets back,
the ``rejected`` events in ``metrics.jsonl`` and the log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec
import pytest
import torch
from linear_trainer import LinearTrainer

from unitedllm.aggregator import Aggregator, RunResult
from unitedllm.comm.base import Presence
from unitedllm.comm.local import LocalHub, LocalTransport, MemoryBlobStore
from unitedllm.config.types import Config
from unitedllm.errors import UpdateRejected
from unitedllm.optimizers.exact_sum import MAX_WEIGHT
from unitedllm.optimizers.validation import validate_num_samples
from unitedllm.protocol.messages import Finish, Hello, Message, RoundStart, Update
from unitedllm.protocol.payload import decode_tensors, encode_tensors
from unitedllm.rounds import sample_clients

SAMPLES = 4
BOGUS = 100.0  # a refused delta that counted would move every weight by tens
LIMIT_S = 120  # only a hung aggregator takes this long

M = TypeVar("M", bound=Message)
Weights = dict[str, torch.Tensor]


def legit(rank: int, weights: Mapping[str, torch.Tensor]) -> Weights:
    """Rank ``rank``'s honest delta: 0.25 * rank everywhere (means of these are exact in binary)."""
    return {name: torch.full_like(t, 0.25 * rank) for name, t in weights.items()}


def constant(value: float, weights: Mapping[str, torch.Tensor]) -> Weights:
    return {name: torch.full_like(t, value) for name, t in weights.items()}


def plus_mean(weights: Mapping[str, torch.Tensor], ranks: list[int]) -> Weights:
    """FedAvg of the honest deltas of ``ranks`` (equal sample counts) applied to ``weights``."""
    step = sum(0.25 * r for r in ranks) / len(ranks)
    return {name: t + step for name, t in weights.items()}


class RecordingHub(LocalHub):
    """The in-process medium, keeping every frame sent to the aggregator (to replay one later)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.to_aggregator: list[bytes] = []

    def deliver(self, to: int, frame: bytes) -> None:
        if to == 0:
            self.to_aggregator.append(frame)
        super().deliver(to, frame)


class HandMadeClient:
    """One client rank spoken by hand: says hello, reads what the aggregator sends, sends updates."""

    def __init__(self, hub: LocalHub, rank: int, fingerprint: str) -> None:
        self.hub, self.rank, self.fingerprint = hub, rank, fingerprint
        self.transport = LocalTransport(hub, rank=rank)
        self.store = MemoryBlobStore(hub)
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self.aggregator: asyncio.Future[Any] | None = None  # a failing aggregator fails the wait at once

    async def __aenter__(self) -> Self:
        await self.store.open()
        await self.transport.open()
        self._reader = asyncio.create_task(self._read(), name=f"hand-made-{self.rank}")
        hello = Hello(run_id=self.hub.run_id, round=-1, sender=self.rank, base_fingerprint=self.fingerprint)
        await self.transport.send(0, hello)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.transport.close()
        await self.store.close()

    async def _read(self) -> None:
        async for item in self.transport.incoming():
            if not isinstance(item, Presence):
                await self.inbox.put(item)

    async def next(self, kind: type[M]) -> M:
        """The next message of ``kind`` from the aggregator (others are skipped)."""
        while True:
            got = asyncio.ensure_future(self.inbox.get())
            waits: set[asyncio.Future[Any]] = {got}
            if self.aggregator is not None and not self.aggregator.done():
                waits.add(self.aggregator)  # a finished one may still have messages on the way
            await asyncio.wait(waits, timeout=LIMIT_S, return_when=asyncio.FIRST_COMPLETED)
            if not got.done() and self.aggregator is not None and self.aggregator.done():
                if self.aggregator.exception() is not None:
                    got.cancel()
                    self.aggregator.result()  # its error, not a timeout
                await asyncio.wait({got}, timeout=LIMIT_S)
            if not got.done():
                got.cancel()
                raise TimeoutError(f"rank {self.rank}: no {kind.__name__} within {LIMIT_S}s")
            if isinstance(message := got.result(), kind):
                return message

    async def weights(self, start: RoundStart) -> Weights:
        return decode_tensors(await self.store.get(start.global_ref))

    async def update(
        self, round_idx: int, delta: Mapping[str, torch.Tensor], samples: int = SAMPLES
    ) -> bytes:
        """Send an update (correctly signed); returns the frame as it went to the aggregator."""
        ref = await self.store.put(encode_tensors(delta))
        update = Update(
            run_id=self.hub.run_id, round=round_idx, sender=self.rank, delta_ref=ref, num_samples=samples
        )
        await self.transport.send(0, update)
        return self.hub.to_aggregator[-1] if isinstance(self.hub, RecordingHub) else b""


def make_config(tmp_path: Path, **comm_args: Any) -> Config:
    raw = {
        "train_args": {
            "comm_round": 2,
            "client_num_in_total": 3,
            "client_num_per_round": 2,
            "output_dir": str(tmp_path / "{run_id}"),
        },
        "comm_args": {"round_timeout_s": LIMIT_S, "join_timeout_s": LIMIT_S, **comm_args},
    }
    return msgspec.convert(raw, Config)


def rejected_events(result: RunResult) -> list[tuple[int, int, str]]:
    lines = (result.output_dir / "metrics.jsonl").read_text().splitlines()
    return [(e["round"], e["rank"], e["reason"]) for e in map(json.loads, lines) if e["event"] == "rejected"]


async def _refusals_run(tmp_path: Path, run_id: str) -> tuple[RunResult, dict[str, Any]]:
    cfg = make_config(tmp_path)
    hub = RecordingHub(run_id=run_id, ranks={0, 1, 2, 3}, secret=b"refusals-test-secret")
    fingerprint = LinearTrainer(0).base_fingerprint()
    first = sample_clients(0, total=3, per_round=2, seed=cfg.common_args.random_seed)
    second = sample_clients(1, total=3, per_round=2, seed=cfg.common_args.random_seed)
    (a, b), outsider = first, ({1, 2, 3} - set(first)).pop()
    seen: dict[str, Any] = {"first": first, "second": second, "a": a, "outsider": outsider}
    async with (
        Aggregator(cfg, run_id=run_id, trainer=LinearTrainer(0), hub=hub) as aggregator,
        AsyncExitStack() as stack,
    ):
        nodes = {r: await stack.enter_async_context(HandMadeClient(hub, r, fingerprint)) for r in (1, 2, 3)}
        running = asyncio.create_task(aggregator.run())
        for node in nodes.values():
            node.aggregator = running

        # Round 0: a's and b's honest updates are the only ones that may count.
        start_a = await nodes[a].next(RoundStart)
        w0 = await nodes[a].weights(start_a)
        await nodes[a].update(1, constant(BOGUS, w0))  # for the wrong round
        await nodes[outsider].update(0, constant(BOGUS, w0), samples=10**6)  # not selected in round 0
        honest_frame = await nodes[a].update(0, legit(a, w0))
        await nodes[a].update(0, constant(-BOGUS, w0))  # a second, different update in the same round
        start_b = await nodes[b].next(RoundStart)
        await nodes[b].update(0, legit(b, await nodes[b].weights(start_b)))

        # Round 1: a's round-0 frame, captured off the wire, arrives again before anyone answers.
        starts = {r: await nodes[r].next(RoundStart) for r in second}
        w1 = await nodes[second[0]].weights(starts[second[0]])
        hub.deliver(0, honest_frame)
        for rank in second:
            await nodes[rank].update(1, legit(rank, w1))

        result = await asyncio.wait_for(running, LIMIT_S)
        seen["finish"] = {r: (await nodes[r].next(Finish)).reason for r in (1, 2, 3)}
        seen["w0"], seen["w1"] = w0, w1
    return result, seen


def test_wrong_round_unselected_and_second_updates_are_refused_and_change_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    result, seen = asyncio.run(_refusals_run(tmp_path, "refusals"))
    a, outsider, first, second = seen["a"], seen["outsider"], seen["first"], seen["second"]
    w0, w1 = seen["w0"], seen["w1"]

    # The global model a user gets is the honest clients' FedAvg, round after round.
    expected_w1 = plus_mean(w0, first)
    assert all(torch.equal(w1[n], expected_w1[n]) for n in w0), "round 0 counted a refused update"
    expected_final = plus_mean(w1, second)
    assert all(torch.equal(result.weights[n], expected_final[n]) for n in w0), "round 1 counted a replay"
    assert [r.aggregated for r in result.rounds] == [first, second]

    assert rejected_events(result) == [
        (0, a, "update for round 1 arrived in round 0"),
        (0, outsider, "client was not selected for this round"),
        (0, a, "second update in the same round"),
    ], "the replayed frame must be dropped before the aggregator sees it (no refusal in round 1)"
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 3 and all(
        f"client {r}" in m for r, m in zip((a, outsider, a), refused, strict=True)
    )
    replays = [r.getMessage() for r in caplog.records if "replay" in r.getMessage()]
    assert replays and f"rank {a}" in replays[0], "the replayed frame was not dropped as a replay"
    assert seen["finish"] == {1: "completed", 2: "completed", 3: "completed"}


async def _one_round(tmp_path: Path, run_id: str, samples: int) -> RunResult:
    """One round of two selected hand-made clients, the second claiming ``samples`` samples."""
    cfg = make_config(tmp_path, min_updates_per_round=1)
    cfg = msgspec.structs.replace(cfg, train_args=msgspec.structs.replace(cfg.train_args, comm_round=1))
    hub = LocalHub(run_id=run_id, ranks={0, 1, 2, 3}, secret=b"refusals-test-secret")
    fingerprint = LinearTrainer(0).base_fingerprint()
    a, b = sample_clients(0, total=3, per_round=2, seed=cfg.common_args.random_seed)
    async with (
        Aggregator(cfg, run_id=run_id, trainer=LinearTrainer(0), hub=hub) as aggregator,
        AsyncExitStack() as stack,
    ):
        nodes = {r: await stack.enter_async_context(HandMadeClient(hub, r, fingerprint)) for r in (a, b)}
        running = asyncio.create_task(aggregator.run())
        for node in nodes.values():
            node.aggregator = running
        w0 = await nodes[a].weights(await nodes[a].next(RoundStart))
        await nodes[a].update(0, legit(a, w0))
        await nodes[b].next(RoundStart)
        await nodes[b].update(0, constant(BOGUS, w0), samples=samples)
        result = await asyncio.wait_for(running, LIMIT_S)
    expected = plus_mean(w0, [a])
    assert all(torch.equal(result.weights[n], expected[n]) for n in w0)
    return result


@pytest.mark.parametrize("samples", [0, MAX_WEIGHT + 1, 10**12])
def test_an_update_claiming_too_few_or_too_many_samples_is_refused(tmp_path: Path, samples: int) -> None:
    result = asyncio.run(_one_round(tmp_path, f"samples-{samples}", samples))
    (_, rank, reason), *more = rejected_events(result)
    assert not more and result.rounds[0].aggregated == [r for r in result.rounds[0].selected if r != rank]
    assert reason.endswith(f"num_samples must be an integer between 1 and {MAX_WEIGHT}, got {samples}")


def test_num_samples_bounds_and_booleans() -> None:
    validate_num_samples(1)
    validate_num_samples(MAX_WEIGHT)
    for bad in (0, -1, MAX_WEIGHT + 1, True, False, 2.0, "3", None):
        with pytest.raises(UpdateRejected, match=f"got {bad!r}"):
            validate_num_samples(bad, rank=2, round_idx=5)
