"""The aggregator's deadlines: ``comm_args.round_timeout_s`` and ``join_timeout_s`` expire.

A real aggregator and real clients (the plain-PyTorch trainer) share the in-process backend.
One client stays online but never answers; another never joins. Waits are for the event
itself (the aggregator's own "deadline passed" log line), never for a guessed time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from linear_trainer import LinearTrainer

from unitedllm.aggregator import Aggregator, RunResult
from unitedllm.client import Client
from unitedllm.comm.local import LocalHub
from unitedllm.config.types import Config
from unitedllm.errors import RoundError
from unitedllm.rounds import sample_clients
from unitedllm.runner import run_async
from unitedllm.training.base import FitResult

LIMIT_S = 120  # only a hung test waits this long
DEADLINE_S = 0.5


def make_config(tmp_path: Path, train_args: dict[str, Any], comm_args: dict[str, Any]) -> Config:
    raw = {
        "train_args": {
            "comm_round": 1,
            "client_num_in_total": 3,
            "client_num_per_round": 3,
            "local_max_steps": 2,
            "output_dir": str(tmp_path / "{run_id}"),
            **train_args,
        },
        "comm_args": {"round_timeout_s": LIMIT_S, "join_timeout_s": LIMIT_S, **comm_args},
    }
    return msgspec.convert(raw, Config)


class Silent(LinearTrainer):
    """A client that stays online but does not answer until the aggregator's deadline passed."""

    def __init__(self, rank: int) -> None:
        super().__init__(rank)
        self.release = threading.Event()
        self.answered = False

    def fit(self, weights: Any, **kwargs: Any) -> FitResult:
        if not self.release.wait(LIMIT_S):
            raise AssertionError("the aggregator never gave up waiting for this client")
        self.answered = True
        return super().fit(weights, **kwargs)


class _OnDeadline(logging.Handler):
    """Calls ``then`` the moment the aggregator logs that a round's deadline passed."""

    def __init__(self, then: Any) -> None:
        super().__init__()
        self.then = then
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deadline passed" in message:
            self.messages.append(message)
            self.then()


@contextmanager
def on_deadline(then: Any) -> Iterator[_OnDeadline]:
    handler = _OnDeadline(then)
    logger = logging.getLogger("unitedllm")  # warnings reach it from every module of the package
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def run_with_a_silent_client(cfg: Config) -> tuple[RunResult, dict[int, LinearTrainer], list[Any]]:
    """Ranks 1, 2 answer; rank 3 stays online and silent until the deadline is logged."""
    trainers: dict[int, LinearTrainer] = {}
    silent = Silent(3)
    at_deadline: list[Any] = []

    def make(_cfg: Config, rank: int) -> LinearTrainer:
        trainers[rank] = silent if rank == 3 else LinearTrainer(rank)
        return trainers[rank]

    def seen() -> None:
        at_deadline.append(silent.answered)
        silent.release.set()

    with on_deadline(seen) as handler:
        try:
            result = asyncio.run(run_async(cfg, run_id="deadline", trainer_factory=make))
        finally:
            silent.release.set()
    at_deadline.append(handler.messages)
    return result, trainers, at_deadline


def test_a_silent_client_is_left_out_when_the_round_deadline_passes(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {}, {"round_timeout_s": DEADLINE_S, "min_updates_per_round": 2})
    result, trainers, (answered_before, messages) = run_with_a_silent_client(cfg)
    assert answered_before is False, "the round closed on the deadline, not on the silent client's answer"
    assert messages == ["round 0: deadline passed; missing updates from [3]"]
    (summary,) = result.rounds
    assert summary.selected == [1, 2, 3] and summary.aggregated == [1, 2]
    # The global model is the answering clients' sample-weighted mean.
    models = {r: dict(trainers[r].fits)[0] for r in (1, 2)}
    total = trainers[1].n + trainers[2].n
    for name, value in result.weights.items():
        expected = sum(models[r][name].double().numpy() * trainers[r].n / total for r in models)
        np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=1e-6)


def test_a_deadline_without_quorum_fails_the_round_and_says_what_to_raise(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {}, {"round_timeout_s": DEADLINE_S})
    with pytest.raises(RoundError) as failed:
        run_with_a_silent_client(cfg)
    text = str(failed.value)
    assert "round 0: only 2 valid update(s) of the 3 needed" in text
    assert "comm_args.round_timeout_s" in text and "comm_args.min_updates_per_round" in text


async def run_without(
    cfg: Config, run_id: str, absent: set[int]
) -> tuple[RunResult | BaseException, list[str]]:
    """A run whose ranks in ``absent`` never start; returns its result (or error) and each client's last word."""
    total = cfg.train_args.client_num_in_total
    hub = LocalHub(run_id=run_id, ranks=set(range(total + 1)), secret=b"deadline-test-secret")
    present = [r for r in range(1, total + 1) if r not in absent]
    async with AsyncExitStack() as stack:
        aggregator = await stack.enter_async_context(
            Aggregator(cfg, run_id=run_id, trainer=LinearTrainer(0), hub=hub)
        )
        clients = [
            await stack.enter_async_context(
                Client(cfg, rank=r, run_id=run_id, trainer=LinearTrainer(r), hub=hub)
            )
            for r in present
        ]
        outcome: list[Any] = await asyncio.wait_for(
            asyncio.gather(aggregator.run(), *(c.run() for c in clients), return_exceptions=True), LIMIT_S
        )
    return outcome[0], [str(word) for word in outcome[1:]]


def test_a_client_that_never_joins_fails_the_run_at_the_join_deadline(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, {}, {"join_timeout_s": DEADLINE_S})
    outcome, last_words = asyncio.run(run_without(cfg, "never-joins", absent={3}))
    assert isinstance(outcome, RoundError)
    assert str(outcome) == (
        f"only 2 of the 3 clients needed are online after {DEADLINE_S:g}s (online: [1, 2]); "
        "start the clients or raise comm_args.join_timeout_s"
    )
    # The clients that came are told the run is over instead of waiting for a round forever.
    assert len(last_words) == 2 and all("aborted" in word for word in last_words), last_words


def test_a_selected_client_that_never_joined_does_not_hold_up_the_round(tmp_path: Path) -> None:
    """Enough clients joined to start; a selected one that never came is offline, so no deadline is waited."""
    cfg = make_config(
        tmp_path, {"client_num_per_round": 2}, {"min_updates_per_round": 1, "round_timeout_s": LIMIT_S}
    )
    selected = sample_clients(0, total=3, per_round=2, seed=cfg.common_args.random_seed)
    absent = selected[-1]
    outcome, last_words = asyncio.run(run_without(cfg, "one-missing", absent={absent}))
    assert isinstance(outcome, RunResult), outcome
    assert [(r.selected, r.aggregated) for r in outcome.rounds] == [(selected, selected[:-1])]
    assert last_words == ["completed", "completed"]
