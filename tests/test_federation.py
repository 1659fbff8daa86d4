"""The round loop over the in-process backend, with a plain-PyTorch trainer (fast)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from linear_trainer import LinearTrainer
from safetensors.torch import load_file

from unitedllm.aggregator import Aggregator
from unitedllm.comm.local import LocalHub, LocalTransport
from unitedllm.config.types import Config
from unitedllm.errors import RoundError
from unitedllm.protocol.messages import BlobRef, Update
from unitedllm.protocol.signing import seal
from unitedllm.rounds import RoundPlan, sample_clients
from unitedllm.runner import run_async


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "train_args": {
            "comm_round": 3,
            "client_num_in_total": 3,
            "client_num_per_round": 3,
            "local_max_steps": 4,
            "output_dir": str(tmp_path / "{run_id}"),
        },
        "comm_args": {"round_timeout_s": 30, "join_timeout_s": 30},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return msgspec.convert(raw, Config)


def run_linear(
    cfg: Config, run_id: str = "r1", trainer_kwargs: dict[int, dict[str, Any]] | None = None
) -> tuple[Any, dict[int, LinearTrainer]]:
    trainer_kwargs = trainer_kwargs or {}
    trainers: dict[int, LinearTrainer] = {}

    def make(_cfg: Config, rank: int) -> LinearTrainer:
        trainers[rank] = LinearTrainer(rank, **trainer_kwargs.get(rank, {}))
        return trainers[rank]

    result = asyncio.run(run_async(cfg, run_id=run_id, trainer_factory=make))
    return result, trainers


def events(output_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_global_model_is_sample_weighted_mean_of_last_round(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    result, trainers = run_linear(cfg)
    last = cfg.train_args.comm_round - 1
    client_models = {r: dict(t.fits)[last] for r, t in trainers.items() if r > 0}
    counts = {r: trainers[r].n for r in client_models}
    total = sum(counts.values())
    for name, value in result.weights.items():
        expected = sum(client_models[r][name].double().numpy() * counts[r] / total for r in client_models)
        np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=1e-6)


def test_loss_falls_and_rounds_are_recorded(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, validation_args={"is_aggregator_test": True})
    result, _ = run_linear(cfg)
    losses = [r.train_loss for r in result.rounds]
    assert len(losses) == 3 and losses[-1] < losses[0]
    rounds = events(result.output_dir, "round")
    assert [e["round"] for e in rounds] == [0, 1, 2]
    assert all(e["aggregated"] == [1, 2, 3] for e in rounds)


def test_same_seed_gives_identical_final_bytes(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    a, _ = run_linear(cfg, run_id="a")
    b, _ = run_linear(cfg, run_id="b")
    assert (a.final_dir / "model.safetensors").read_bytes() == (
        b.final_dir / "model.safetensors"
    ).read_bytes()


def test_client_sampling_is_seeded_and_reproducible() -> None:
    rounds = [sample_clients(r, total=10, per_round=3, seed=7) for r in range(5)]
    assert rounds == [sample_clients(r, total=10, per_round=3, seed=7) for r in range(5)]
    assert all(len(set(s)) == 3 and all(1 <= x <= 10 for x in s) for s in rounds)
    assert len({tuple(s) for s in rounds}) > 1, "different rounds should sample different clients"
    assert rounds != [sample_clients(r, total=10, per_round=3, seed=8) for r in range(5)]


def test_only_sampled_clients_train(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, train_args={"client_num_in_total": 4, "client_num_per_round": 2})
    result, trainers = run_linear(cfg)
    for summary in result.rounds:
        expected = sample_clients(summary.round_idx, total=4, per_round=2, seed=0)
        assert summary.aggregated == expected
        trained = sorted(r for r, t in trainers.items() if r > 0 and summary.round_idx in dict(t.fits))
        assert trained == expected


def test_poisoned_update_is_refused_and_round_continues(tmp_path: Path) -> None:
    def nan_weights(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.full_like(v, float("nan")) for k, v in w.items()}

    cfg = make_config(tmp_path, comm_args={"min_updates_per_round": 2})
    result, _ = run_linear(cfg, trainer_kwargs={2: {"poison": nan_weights}})
    assert all(r.aggregated == [1, 3] for r in result.rounds)
    assert all("non-finite" in r.rejected[2] for r in result.rounds)
    assert all(torch.isfinite(v).all() for v in result.weights.values())
    assert len(events(result.output_dir, "rejected")) == 3


def test_round_without_quorum_fails_clearly_instead_of_hanging(tmp_path: Path) -> None:
    def nan_weights(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.full_like(v, float("nan")) for k, v in w.items()}

    cfg = make_config(tmp_path)
    with pytest.raises(RoundError, match=r"round 0: only 2 valid update\(s\) of the 3 needed"):
        run_linear(cfg, trainer_kwargs={3: {"poison": nan_weights}})


def test_forged_foreign_and_unknown_sender_messages_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Frames injected into the aggregator's mailbox never count; the run still finishes correctly.

    (A replayed frame, captured off the wire, is in test_refusals.py.)
    """
    cfg = make_config(tmp_path)
    clean, _ = run_linear(cfg, run_id="clean")

    hubs: list[tuple[LocalHub, asyncio.AbstractEventLoop]] = []
    original_init = LocalHub.__init__

    def capture(self: LocalHub, **kwargs: Any) -> None:
        original_init(self, **kwargs)
        hubs.append((self, asyncio.get_running_loop()))

    bogus = Update(
        run_id="attacked",
        round=0,
        sender=1,
        seq=0,
        num_samples=10**6,
        delta_ref=BlobRef(digest="0" * 64, size=1),
    )
    LocalHub.__init__ = capture  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="unitedllm")
    try:
        trainers: dict[int, LinearTrainer] = {}

        def make(_cfg: Config, rank: int) -> LinearTrainer:
            trainers[rank] = LinearTrainer(rank)
            if rank == 0:  # hub exists by now: inject before any round starts
                hub, loop = hubs[-1]
                hub.deliver(0, seal(bogus, b"not the run secret"))  # forged HMAC
                # Correctly signed by rank 1's own link, but for another run.
                foreign = LocalTransport(hub, rank=1).send(
                    0, msgspec.structs.replace(bogus, run_id="other-run")
                )
                asyncio.run_coroutine_threadsafe(foreign, loop).result(timeout=60)
                hub.deliver(0, seal(msgspec.structs.replace(bogus, sender=9), hub.secret))  # not in run
            return trainers[rank]

        attacked = asyncio.run(run_async(cfg, run_id="attacked", trainer_factory=make))
    finally:
        LocalHub.__init__ = original_init  # type: ignore[method-assign]
    for name in clean.weights:
        assert torch.equal(clean.weights[name], attacked.weights[name])
    dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped message")]
    assert len(dropped) == 3, dropped
    assert "HMAC" in dropped[0] and "'other-run'" in dropped[1] and "rank 9" in dropped[2], dropped


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("no", set()),
        ("after_aggregation", {(0, "global"), (1, "global"), (2, "global")}),
        ("before_aggregation", {(0, "local"), (1, "local"), (2, "local")}),
        (
            "both",
            {(0, "global"), (1, "global"), (2, "global"), (0, "local"), (1, "local"), (2, "local")},
        ),
    ],
)
def test_client_evaluations_follow_test_on_clients(tmp_path: Path, mode: str, expected: set[Any]) -> None:
    cfg = make_config(tmp_path, validation_args={"test_on_clients": mode, "test_on_client_ranks": [1, 3]})
    result, trainers = run_linear(cfg)
    evals = events(result.output_dir, "eval")
    for rank in (1, 3):
        got = [(e["round"], e["model"]) for e in evals if e["rank"] == rank]
        assert len(got) == len(set(got)) and set(got) == expected
    assert not [e for e in evals if e["rank"] == 2]
    assert trainers[2].evals == 0


def test_frequency_of_the_test_and_save_frequency(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        train_args={"comm_round": 5},
        validation_args={"frequency_of_the_test": 2, "is_aggregator_test": True, "save_frequency": None},
    )
    result, _ = run_linear(cfg)
    assert [e["round"] for e in events(result.output_dir, "eval")] == [0, 2, 4]
    saved = sorted(p.name for p in (result.output_dir / "node_0").iterdir())
    assert saved == ["final", "init", "last", "round_0_after_agg", "round_2_after_agg", "round_4_after_agg"]


def test_clients_keep_their_own_checkpoints_and_metrics(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        train_args={"comm_round": 4},
        validation_args={"save_frequency": 2, "test_on_clients": "both", "test_on_client_ranks": [1]},
    )
    result, _ = run_linear(cfg)
    node = result.output_dir / "node_1"
    saved = sorted(p.name for p in node.iterdir() if p.is_dir())
    assert saved == [
        "final",
        "init",
        "round_0_after_agg",
        "round_0_before_agg",
        "round_2_after_agg",
        "round_2_before_agg",
        "round_3_before_agg",
        "sent",
    ]
    final = load_file(str(node / "final" / "model.safetensors"))
    assert all(torch.equal(final[k], result.weights[k]) for k in result.weights)
    # The received global model of round 0 is the aggregator's round_0_after_agg, byte for byte.
    server_r0 = (result.output_dir / "node_0" / "round_0_after_agg" / "model.safetensors").read_bytes()
    assert (node / "round_0_after_agg" / "model.safetensors").read_bytes() == server_r0
    own = [json.loads(line) for line in (node / "metrics.jsonl").read_text().splitlines()]
    assert {e["rank"] for e in own} == {1}
    assert [e["round"] for e in own if e["event"] == "train"] == [0, 1, 2, 3]
    assert all(e["loss"] is not None and e["bytes_sent"] > 0 for e in own if e["event"] == "train")
    assert sorted((e["round"], e["model"]) for e in own if e["event"] == "eval") == sorted(
        [(r, m) for r in range(4) for m in ("global", "local")]
    )
    # Ranks that do not test keep training records but no evaluations.
    other = [
        json.loads(line) for line in (result.output_dir / "node_2" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [e["round"] for e in other if e["event"] == "train"] == [0, 1, 2, 3]
    assert not [e for e in other if e["event"] == "eval"]


@pytest.mark.parametrize(("save_frequency", "rounds"), [(0, [3]), (2, [0, 2, 3]), (-1, [0, 1, 2, 3])])
def test_save_frequency(tmp_path: Path, save_frequency: int, rounds: list[int]) -> None:
    plan = RoundPlan.from_config(
        make_config(
            tmp_path, train_args={"comm_round": 4}, validation_args={"save_frequency": save_frequency}
        )
    )
    assert [r for r in range(4) if plan.should_save(r)] == rounds


def _parsed(line: str) -> dict[str, Any]:
    """A metrics line, or {} for one still being written."""
    try:
        return dict(json.loads(line))
    except ValueError:
        return {}


class WaitsForOthersToBeFolded(LinearTrainer):
    """A slow client: trains only once the aggregator has folded the other clients' updates."""

    def __init__(self, rank: int, metrics: Path, others: set[int]):
        super().__init__(rank)
        self.metrics, self.others = metrics, others
        self.saw: dict[int, bool] = {}

    def fit(self, weights: Any, *, round_idx: int, max_steps: int, on_step: Any = None) -> Any:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines = self.metrics.read_text().splitlines() if self.metrics.exists() else []
            folded = {
                e["rank"]
                for e in map(_parsed, lines)
                if e.get("event") == "train" and e.get("round") == round_idx
            }
            if self.others <= folded:
                break
            time.sleep(0.05)
        self.saw[round_idx] = self.others <= folded
        return super().fit(weights, round_idx=round_idx, max_steps=max_steps, on_step=on_step)


def test_updates_are_folded_as_they_arrive_while_others_still_train(tmp_path: Path) -> None:
    """By the time the slowest client answers, the others' updates are already aggregated."""
    cfg = make_config(tmp_path, train_args={"comm_round": 2})
    slow = WaitsForOthersToBeFolded(3, tmp_path / "r1" / "metrics.jsonl", {1, 2})

    def make(_cfg: Config, rank: int) -> LinearTrainer:
        return slow if rank == 3 else LinearTrainer(rank)

    result = asyncio.run(run_async(cfg, run_id="r1", trainer_factory=make))
    assert slow.saw == {0: True, 1: True}
    assert [r.aggregated for r in result.rounds] == [[1, 2, 3], [1, 2, 3]]
    reference, _ = run_linear(cfg, run_id="reference")
    for name, value in result.weights.items():
        assert torch.equal(value, reference.weights[name])  # arrival order changes no byte


class Blocked(LinearTrainer):
    """A client whose training waits until ``release`` is set (or a minute passes)."""

    def __init__(self, rank: int):
        super().__init__(rank)
        self.release = threading.Event()
        self.finished = False

    def fit(self, weights: Any, *, round_idx: int, max_steps: int, on_step: Any = None) -> Any:
        self.release.wait(60)
        self.finished = True
        return super().fit(weights, round_idx=round_idx, max_steps=max_steps, on_step=on_step)


def test_a_failing_fold_ends_the_round_at_once_not_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(tmp_path, comm_args={"round_timeout_s": 120})
    blocked = Blocked(3)
    fold = Aggregator._fold_update

    async def broken_fold(self: Aggregator, round_idx: int, round_fold: Any, message: Update) -> None:
        if message.sender == 1:
            raise RuntimeError("fold failed")
        await fold(self, round_idx, round_fold, message)

    finish_clients = Aggregator._finish_clients
    still_training: list[bool] = []

    async def finish_and_release(self: Aggregator, *args: Any, **kwargs: Any) -> None:
        still_training.append(not blocked.finished)  # the run is ending while client 3 still trains
        blocked.release.set()
        await finish_clients(self, *args, **kwargs)

    monkeypatch.setattr(Aggregator, "_fold_update", broken_fold)
    monkeypatch.setattr(Aggregator, "_finish_clients", finish_and_release)
    with pytest.raises(RuntimeError, match="fold failed"):
        asyncio.run(
            run_async(cfg, run_id="r1", trainer_factory=lambda _c, r: blocked if r == 3 else LinearTrainer(r))
        )
    assert still_training == [True]


class Crash(Exception):
    """Stands in for the aggregator dying between rounds."""


def test_after_a_mid_round_crash_clients_resend_instead_of_training_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(tmp_path, train_args={"comm_round": 4})
    uninterrupted, _ = run_linear(cfg, run_id="whole")

    # The blob store outlives the aggregator, as S3 does.
    blobs: dict[str, bytes] = {}
    hub_init = LocalHub.__init__

    def hub_with_lasting_blobs(self: LocalHub, *args: Any, **kwargs: Any) -> None:
        hub_init(self, *args, **kwargs)
        self.blobs = blobs

    monkeypatch.setattr(LocalHub, "__init__", hub_with_lasting_blobs)
    aggregate = Aggregator._aggregate

    async def die_in_round_2(self: Aggregator, round_idx: int, *args: Any, **kwargs: Any) -> Any:
        if round_idx == 2:
            raise Crash  # every update of round 2 arrived; none was aggregated
        return await aggregate(self, round_idx, *args, **kwargs)

    first: dict[int, LinearTrainer] = {}
    monkeypatch.setattr(Aggregator, "_aggregate", die_in_round_2)
    with pytest.raises(Crash):
        asyncio.run(
            run_async(
                cfg, run_id="crashed", trainer_factory=lambda _c, r: first.setdefault(r, LinearTrainer(r))
            )
        )
    assert all(2 in [r for r, _ in first[rank].fits] for rank in (1, 2, 3))

    monkeypatch.setattr(Aggregator, "_aggregate", aggregate)
    again: dict[int, LinearTrainer] = {}
    resumed = asyncio.run(
        run_async(
            cfg,
            run_id="crashed",
            resume=True,
            trainer_factory=lambda _c, r: again.setdefault(r, LinearTrainer(r)),
        )
    )
    for rank in (1, 2, 3):
        assert [r for r, _ in again[rank].fits] == [3], "round 2 was trained again instead of resent"
        own = (resumed.output_dir / f"node_{rank}" / "metrics.jsonl").read_text().splitlines()
        assert [e["round"] for e in map(json.loads, own) if e["event"] == "resent"] == [2]
    assert (resumed.final_dir / "model.safetensors").read_bytes() == (
        uninterrupted.final_dir / "model.safetensors"
    ).read_bytes()
    assert not events(resumed.output_dir, "rejected")


def test_clients_with_identical_updates_all_count(tmp_path: Path) -> None:
    # lr 0 (e.g. the first warm-up step): every client sends the same all-zero delta, one shared blob.
    cfg = make_config(tmp_path, train_args={"comm_round": 2})
    result, _ = run_linear(cfg, trainer_kwargs={rank: {"lr": 0.0} for rank in (1, 2, 3)})
    assert not events(result.output_dir, "rejected")
    assert [e["aggregated"] for e in events(result.output_dir, "round")] == [[1, 2, 3], [1, 2, 3]]


def test_a_round_is_on_disk_before_it_is_reported_done(tmp_path: Path) -> None:
    from unitedllm.checkpoints import load_resume_point
    from unitedllm.tracking.metrics import MetricsLog

    cfg = make_config(tmp_path, train_args={"comm_round": 3})
    out = tmp_path / "durable"
    seen: list[tuple[int, int | None]] = []

    def check(record: dict[str, Any]) -> None:
        if record["event"] == "round":  # whoever reads "round r done" may kill the run now and resume after r
            saved = load_resume_point(out)
            seen.append((record["round"], saved[0] if saved else None))

    with MetricsLog(out / "metrics.jsonl", listeners=[check]) as metrics:
        asyncio.run(
            run_async(
                cfg, run_id="durable", metrics=metrics, trainer_factory=lambda _c, rank: LinearTrainer(rank)
            )
        )
    assert seen == [(0, 0), (1, 1), (2, 2)]


def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, train_args={"comm_round": 4})
    uninterrupted, _ = run_linear(cfg, run_id="whole")

    def crash_after_round_1(summary: Any) -> None:
        if summary.round_idx == 1:
            raise Crash

    def make(_cfg: Config, rank: int) -> LinearTrainer:
        return LinearTrainer(rank)

    with pytest.raises(Crash):
        asyncio.run(run_async(cfg, run_id="crashed", trainer_factory=make, on_round=crash_after_round_1))
    resumed = asyncio.run(run_async(cfg, run_id="crashed", trainer_factory=make, resume=True))
    assert [r.round_idx for r in resumed.rounds] == [2, 3]
    assert (resumed.final_dir / "model.safetensors").read_bytes() == (
        uninterrupted.final_dir / "model.safetensors"
    ).read_bytes()
    assert [e["round"] for e in events(resumed.output_dir, "round")] == [0, 1, 2, 3]
