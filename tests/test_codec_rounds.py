"""Update codecs in the round loop: what travels, what the aggregator folds, resume, and refused combinations."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from linear_trainer import CorrectingLinearTrainer, LinearTrainer

from unitedllm.comm.codecs import codec_for
from unitedllm.comm.codecs.wire import UpdateEncoding, decode_update
from unitedllm.config import load_config
from unitedllm.config.types import Config
from unitedllm.errors import ConfigError, ProtocolError, UpdateRejected
from unitedllm.runner import run_async

ROUNDS = 4


def make_config(tmp_path: Path, codec: str = "int8", optimizer: str = "FedAvg", **comm: Any) -> Config:
    raw = {
        "train_args": {
            "comm_round": ROUNDS,
            "client_num_in_total": 3,
            "client_num_per_round": 3,
            "local_max_steps": 4,
            "server_optimizer": optimizer,
            "output_dir": str(tmp_path / "{run_id}"),
        },
        # A block of 4 gives the 8-value linear model two int8 blocks per weight, so rounding shows.
        "comm_args": {
            "round_timeout_s": 30,
            "join_timeout_s": 30,
            "update_codec": codec,
            "update_codec_block_size": 8,
            **comm,
        },
    }
    return msgspec.convert(raw, Config)


class Paced(LinearTrainer):
    """A client that trains after ``delay`` seconds, so the updates arrive in an order the test picks."""

    def __init__(self, rank: int, delay: float = 0.0):
        super().__init__(rank)
        self.delay = delay

    def fit(self, weights: Any, *, round_idx: int, max_steps: int, on_step: Any = None) -> Any:
        time.sleep(self.delay)
        return super().fit(weights, round_idx=round_idx, max_steps=max_steps, on_step=on_step)


def run(cfg: Config, run_id: str, delays: dict[int, float] | None = None, **kwargs: Any) -> Any:
    delays = delays or {}
    return asyncio.run(
        run_async(
            cfg, run_id=run_id, trainer_factory=lambda _c, rank: Paced(rank, delays.get(rank, 0.0)), **kwargs
        )
    )


def events(path: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def final_bytes(result: Any) -> bytes:
    return bytes((result.final_dir / "model.safetensors").read_bytes())


def test_int8_updates_travel_as_int8_and_every_update_event_carries_its_size(tmp_path: Path) -> None:
    result = run(make_config(tmp_path, "int8"), "int8")
    out = result.output_dir
    assert [r.aggregated for r in result.rounds] == [[1, 2, 3]] * ROUNDS
    for rank in (1, 2, 3):
        sent = json.loads((out / f"node_{rank}" / "sent" / "last_update.json").read_text())
        assert sent["update"]["delta_ref"]["codec"] == "int8+safetensors"
        own = events(out / f"node_{rank}" / "metrics.jsonl", "train")
        assert len(own) == ROUNDS and all(e["update_bytes"] > 0 for e in own)
        seen = [e for e in events(out / "metrics.jsonl", "train") if e["rank"] == rank]
        assert [e["update_bytes"] for e in seen] == [e["update_bytes"] for e in own]
        # The error-feedback residual is kept with the trainer state, for the rounds to come.
        assert (
            out / f"node_{rank}" / "trainer_state" / f"codec_residual_before_round_{ROUNDS}.safetensors"
        ).is_file()
    starts = events(out / "metrics.jsonl", "round_start")
    assert len(starts) == ROUNDS and all(e["global_bytes"] > 0 for e in starts)


def test_int8_global_model_is_close_to_the_uncompressed_one(tmp_path: Path) -> None:
    dense = run(make_config(tmp_path, "none"), "none")
    int8 = run(make_config(tmp_path, "int8"), "int8")
    for name, value in dense.weights.items():
        assert not torch.equal(int8.weights[name], value) or name == "linear.bias"
        torch.testing.assert_close(int8.weights[name], value, rtol=0, atol=0.05)


def test_the_default_codec_sends_the_same_bytes_as_before(tmp_path: Path) -> None:
    result = run(make_config(tmp_path, "none"), "none")
    sent = json.loads((result.output_dir / "node_1" / "sent" / "last_update.json").read_text())
    assert sent["update"]["delta_ref"]["codec"] == "safetensors"
    assert not list((result.output_dir / "node_1" / "trainer_state").glob("codec_residual_*"))


@pytest.mark.parametrize("codec", ["int8", "topk"])
def test_arrival_order_changes_no_byte_of_the_result(tmp_path: Path, codec: str) -> None:
    cfg = make_config(tmp_path, codec, update_codec_topk_fraction=0.25)
    first = run(cfg, "first", {1: 0.3})  # client 1 answers last
    last = run(cfg, "last", {3: 0.3})  # client 3 answers last
    assert final_bytes(first) == final_bytes(last)


class Crash(Exception):
    """Stands in for the aggregator dying between rounds."""


def test_int8_resume_after_a_crash_gives_the_uninterrupted_bytes(tmp_path: Path) -> None:
    """Restarted clients take their error-feedback residual from disk, so they send the same bytes."""
    cfg = make_config(tmp_path, "int8")
    uninterrupted = run(cfg, "whole")

    def crash_after_round_1(summary: Any) -> None:
        if summary.round_idx == 1:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, "crashed", on_round=crash_after_round_1)
    resumed = run(cfg, "crashed", resume=True)  # new client objects: nothing carried in memory
    assert [r.round_idx for r in resumed.rounds] == [2, 3]
    assert final_bytes(resumed) == final_bytes(uninterrupted)


def test_scaffold_extras_travel_dense_beside_an_int8_delta(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "int8", optimizer="SCAFFOLD")
    result = asyncio.run(
        run_async(cfg, run_id="scaffold", trainer_factory=lambda _c, rank: CorrectingLinearTrainer(rank))
    )
    assert [r.aggregated for r in result.rounds] == [[1, 2, 3]] * ROUNDS
    sent = json.loads((result.output_dir / "node_1" / "sent" / "last_update.json").read_text())
    assert sent["update"]["delta_ref"]["codec"] == "int8+safetensors"
    assert sent["update"]["extras"]["control"]["codec"] == "safetensors"


@pytest.mark.parametrize("rule", ["FedMedian", "TrimmedMean", "Krum"])
def test_robust_rules_take_int8_updates(tmp_path: Path, rule: str) -> None:
    result = run(make_config(tmp_path, "int8", optimizer=rule), rule)
    assert len(result.rounds) == ROUNDS and all(r.aggregated for r in result.rounds)


def base_config(tmp_path: Path, **comm: Any) -> dict[str, Any]:
    return {"train_args": {"output_dir": str(tmp_path)}, "comm_args": comm}


@pytest.mark.parametrize("rule", ["FedMedian", "TrimmedMean", "Krum", "MultiKrum"])
def test_topk_with_a_robust_rule_is_refused_naming_both(tmp_path: Path, rule: str) -> None:
    raw = base_config(tmp_path, update_codec="topk")
    raw["train_args"]["server_optimizer"] = rule
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert "comm_args.update_codec" in str(info.value)
    assert "topk" in str(info.value) and rule in str(info.value)


@pytest.mark.parametrize(
    ("comm", "needle"),
    [
        ({"update_codec": "zip"}, "unknown codec 'zip'"),
        ({"global_codec": "topk"}, "comm_args.global_codec"),
        ({"update_codec_block_size": 4}, "comm_args.update_codec_block_size"),
        ({"update_codec_topk_fraction": 0}, "comm_args.update_codec_topk_fraction"),
    ],
)
def test_bad_codec_settings_are_config_errors(tmp_path: Path, comm: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(base_config(tmp_path, **comm))


def test_an_update_in_another_codec_is_refused(tmp_path: Path) -> None:
    like = {"w": torch.zeros(16)}
    data, _ = UpdateEncoding(codec_for("topk", fraction=0.5)).encode({"w": torch.ones(16)})
    with pytest.raises(ProtocolError, match="'topk\\+safetensors'; this run takes 'int8\\+safetensors'"):
        decode_update("topk+safetensors", data, like, codec_for("int8"), where="client 1: ")


@pytest.mark.services
@pytest.mark.timeout(300)
def test_int8_over_mqtt_s3_gives_the_local_bytes(
    tmp_path: Path, mqtt_settings: Any, s3_settings: Any, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services import service_env

    for key, value in service_env(mqtt_settings, s3_settings).items():
        monkeypatch.setenv(key, value)
    local = run(make_config(tmp_path / "local", "int8"), "local")
    cfg = make_config(tmp_path / "mqtt", "int8")
    comm = msgspec.structs.replace(cfg.comm_args, backend="MQTT_S3", run_secret="codec-test")
    remote = run(msgspec.structs.replace(cfg, comm_args=comm), run_id)
    assert final_bytes(remote) == final_bytes(local)
    sent = json.loads((remote.output_dir / "node_2" / "sent" / "last_update.json").read_text())
    assert sent["update"]["delta_ref"]["codec"] == "int8+safetensors"


def test_the_next_update_is_fetched_while_the_current_one_folds_two_at_most() -> None:
    from unitedllm.protocol.messages import BlobRef, Update
    from unitedllm.round_collection import RoundFold

    log: list[str] = []
    held: set[int] = set()  # fetched and not yet folded
    most = 0

    async def fetch(_fold: RoundFold, message: Update) -> int:
        nonlocal most
        log.append(f"fetch {message.sender}")
        await asyncio.sleep(0.01)
        held.add(message.sender)
        most = max(most, len(held))
        return message.sender

    async def fold_one(fold: RoundFold, message: Update) -> None:
        got = await fold.fetched(message)
        log.append(f"fold {got}")
        await asyncio.sleep(0.05)  # the next fetch runs meanwhile
        held.discard(got)
        log.append(f"folded {got}")
        fold.accepted.append(got)

    def update(rank: int) -> Update:
        ref = BlobRef(digest=f"{rank:064x}", size=1)
        return Update(run_id="r", round=0, sender=rank, delta_ref=ref, num_samples=1)

    async def main() -> list[int]:
        large = {"w": torch.empty(RoundFold.prefetch_bytes // 4, device="meta")}  # two do not fit together
        fold = RoundFold(large, None, fold_one, fetch)

        async def collect() -> list[Update]:
            for rank in (1, 2, 3, 4):
                fold.submit(update(rank))
            return []

        await fold.alongside(collect())
        await fold.drained()
        return fold.accepted

    assert asyncio.run(main()) == [1, 2, 3, 4]
    for rank in (1, 2, 3):
        assert log.index(f"fetch {rank + 1}") < log.index(f"folded {rank}"), log
    assert most == 2, log


def _update(rank: int, round_idx: int, digest: int) -> Any:
    from unitedllm.protocol.messages import BlobRef, Update

    ref = BlobRef(digest=f"{digest:064x}", size=1)
    return Update(run_id="r", round=round_idx, sender=rank, delta_ref=ref, num_samples=1)


def test_a_late_copy_of_the_last_rounds_update_is_not_a_rejection() -> None:
    """A client answering a resumed aggregator's repeated start sends its update twice; the copy may arrive late."""
    from unitedllm.protocol.messages import RoundStart, TrainSpec, Update
    from unitedllm.round_collection import OpenRound, collect_updates

    rejected: list[tuple[int, str]] = []

    async def main() -> list[Update]:
        inbox: asyncio.Queue[Update] = asyncio.Queue()
        start = RoundStart(
            run_id="r",
            round=3,
            sender=0,
            global_ref=_update(1, 3, 9).delta_ref,
            spec=TrainSpec(local_max_steps=1, local_num_train_epochs=1.0),
        )
        taken = {1: _update(1, 2, 1), 2: _update(2, 2, 2)}
        round_ = OpenRound(3, {1: start, 2: start}, previous=taken)
        for update in (_update(1, 2, 1), _update(2, 2, 7), _update(1, 3, 3), _update(2, 3, 4)):
            inbox.put_nowait(update)
        return await collect_updates(
            round_,
            inbox=inbox,
            presence_changed=asyncio.Event(),
            online={1, 2},
            quorum=2,
            timeout_s=5,
            on_arrival=lambda _u: None,
            reject=lambda rank, _r, reason: rejected.append((rank, reason)),
        )

    assert [u.round for u in asyncio.run(main())] == [3, 3]
    assert rejected == [(2, "update for round 2 arrived in round 3")]  # a different update still is


def test_an_update_beyond_fp16_range_stops_the_run_with_the_reason(tmp_path: Path) -> None:
    from unitedllm.errors import RoundError

    def huge(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.full_like(v, 1e6) for k, v in w.items()}

    cfg = make_config(tmp_path, "fp16", round_timeout_s=600)
    trainers = {rank: LinearTrainer(rank, poison=huge if rank == 2 else None) for rank in (0, 1, 2, 3)}
    with pytest.raises((RoundError, UpdateRejected)) as info:
        asyncio.run(run_async(cfg, run_id="fp16", trainer_factory=lambda _c, rank: trainers[rank]))
    assert "fp16" in str(info.value) or "float16" in str(info.value)
    errors = events(tmp_path / "fp16" / "metrics.jsonl", "client_error")
    assert [e["rank"] for e in errors] == [2] and "float16" in errors[0]["message"]
