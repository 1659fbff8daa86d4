"""comm_args.global_codec: the clients' copy of the global model travels as an encoded change.

The aggregator's model stays exact; the copy the clients train from tracks it (the aggregator keeps
what encoding lost), fewer bytes travel, a client that missed a round gets the whole copy, and a
resumed run ends on the uninterrupted bytes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from unitedllm.config import load_config
from unitedllm.config.types import Config
from unitedllm.errors import ConfigError
from unitedllm.runner import run_async
from unitedllm.training.base import EvalResult, FitResult, LocalTrainer, StepEvent

WIDTH = 4096  # big enough that a blob's bytes are its values, not its header
ROUNDS = 5
#: How far (max abs) the copy a client trains from may be from the exact global model, as a
#: fraction of the largest weight: one int8 step of a round's change (1/127 of its block's largest
#: entry, far below the weights' size), bf16/fp16 rounding of the change.
TOLERANCE = {"int8": 1e-2, "bf16": 4e-3, "fp16": 1e-3}


class WideTrainer(LocalTrainer):
    """Least squares on ``WIDTH`` features; remembers the global model it was given each round."""

    def __init__(self, rank: int):
        gen = torch.Generator().manual_seed(100 + rank)
        self.x = torch.randn(64, WIDTH, generator=gen)
        self.y = self.x @ (torch.randn(WIDTH, generator=gen) * 0.1)
        self.received: dict[int, torch.Tensor] = {}

    def initial_weights(self) -> dict[str, torch.Tensor]:
        return {"w": torch.randn(WIDTH, generator=torch.Generator().manual_seed(0)) * 0.1}

    def base_fingerprint(self) -> str:
        return "wide"

    def fit(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        round_idx: int,
        max_steps: int,
        on_step: Callable[[StepEvent], None] | None = None,
        correction: object = None,
    ) -> FitResult:
        self.received[round_idx] = weights["w"].clone()
        w = weights["w"].clone()
        for _ in range(max(1, max_steps)):
            w -= 2e-5 * (self.x.T @ (self.x @ w - self.y))
        return FitResult({"w": w}, len(self.y), {"train_loss": float(((self.x @ w - self.y) ** 2).mean())})

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalResult:
        return EvalResult({"eval_loss": float(((self.x @ weights["w"] - self.y) ** 2).mean())}, len(self.y))

    def save_model(self, weights: Mapping[str, torch.Tensor], directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))


def make_config(tmp_path: Path, codec: str, *, per_round: int = 3) -> Config:
    return msgspec.convert(
        {
            "train_args": {
                "comm_round": ROUNDS,
                "client_num_in_total": 3,
                "client_num_per_round": per_round,
                "local_max_steps": 3,
                "output_dir": str(tmp_path / "{run_id}"),
            },
            "validation_args": {"save_frequency": 1},
            "comm_args": {
                "round_timeout_s": 30,
                "join_timeout_s": 30,
                "global_codec": codec,
                "global_codec_block_size": 64,
            },
        },
        Config,
    )


def run(cfg: Config, run_id: str, **kwargs: Any) -> tuple[Any, dict[int, WideTrainer]]:
    trainers: dict[int, WideTrainer] = {}

    def make(_cfg: Config, rank: int) -> WideTrainer:
        trainers[rank] = WideTrainer(rank)
        return trainers[rank]

    return asyncio.run(run_async(cfg, run_id=run_id, trainer_factory=make, **kwargs)), trainers


def events(path: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def exact_global(output_dir: Path, round_idx: int) -> torch.Tensor:
    """The aggregator's exact model after ``round_idx`` (saved every round)."""
    return load_file(str(output_dir / "node_0" / f"round_{round_idx}_after_agg" / "model.safetensors"))["w"]


@pytest.mark.parametrize("codec", ["int8", "bf16", "fp16"])
def test_clients_train_from_a_copy_that_tracks_the_exact_global_model(tmp_path: Path, codec: str) -> None:
    result, trainers = run(make_config(tmp_path, codec), codec)
    assert [r.aggregated for r in result.rounds] == [[1, 2, 3]] * ROUNDS
    start = WideTrainer(0).initial_weights()["w"]
    errors = []
    for r in range(ROUNDS):
        copies = [trainers[rank].received[r] for rank in (1, 2, 3)]
        assert all(torch.equal(c, copies[0]) for c in copies)  # every client holds the same copy
        exact = start if r == 0 else exact_global(result.output_dir, r - 1)
        error = float((copies[0] - exact).abs().max())
        assert error <= TOLERANCE[codec] * float(exact.abs().max()), (r, error)
        errors.append(error)
    assert errors[0] == 0.0  # round 0 sends the exact initial weights
    assert max(errors) > 0.0  # later rounds an encoded change: lossy, bounded, not drifting


def test_an_encoded_global_model_sends_fewer_bytes(tmp_path: Path) -> None:
    sizes: dict[str, list[float]] = {}
    for codec in ("none", "bf16", "int8"):
        result, _ = run(make_config(tmp_path / codec, codec), codec)
        sizes[codec] = [e["global_bytes"] for e in events(result.output_dir / "metrics.jsonl", "round_start")]
        own = events(result.output_dir / "node_1" / "metrics.jsonl", "train")
        received = {e["round"]: e["bytes_received"] for e in own}
        assert [received[r] for r in range(ROUNDS)] == sizes[codec]  # what the client fetched
    dense = sizes["none"][0]
    assert sizes["none"] == [dense] * ROUNDS
    assert sizes["bf16"][0] == sizes["int8"][0] == dense  # round 0: the exact initial weights
    assert all(s < dense * 0.51 for s in sizes["bf16"][1:]), sizes
    assert all(s < dense * 0.28 for s in sizes["int8"][1:]), sizes  # int8 + a scale per 64


def test_a_client_that_missed_a_round_gets_the_whole_copy(tmp_path: Path) -> None:
    result, trainers = run(make_config(tmp_path, "int8", per_round=2), "partial")
    change = {
        e["round"]: e["global_bytes"] for e in events(result.output_dir / "metrics.jsonl", "round_start")
    }
    trained: dict[int, set[int]] = {}
    received: dict[tuple[int, int], float] = {}
    for rank in (1, 2, 3):
        for e in events(result.output_dir / f"node_{rank}" / "metrics.jsonl", "train"):
            trained.setdefault(e["round"], set()).add(rank)
            received[(e["round"], rank)] = e["bytes_received"]
    missed = [(r, k) for r in range(1, ROUNDS) for k in trained[r] if k not in trained[r - 1]]
    kept = [(r, k) for r in range(1, ROUNDS) for k in trained[r] if k in trained[r - 1]]
    assert missed and kept, trained  # the sampling left someone out and took them back
    for r, k in kept:  # it held the last copy: the change alone
        assert received[(r, k)] == change[r]
    dense = change[0]  # round 0 sends the whole copy: there is nothing to change yet
    assert all(change[r] < dense * 0.3 for r in range(1, ROUNDS)), change
    for r, k in missed:  # it did not: the whole copy, and not the change it could not use
        assert received[(r, k)] == dense
    for r in range(ROUNDS):  # whatever each fetched, the clients of a round train from the same copy
        copies = [trainers[k].received[r] for k in sorted(trained[r])]
        assert all(torch.equal(c, copies[0]) for c in copies), r


class Crash(Exception):
    """The aggregator's process dying after a round."""


def test_resume_after_a_crash_gives_the_uninterrupted_bytes(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "int8")
    uninterrupted, _ = run(cfg, "whole")

    def crash_after_round_1(summary: Any) -> None:
        if summary.round_idx == 1:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, "crashed", on_round=crash_after_round_1)
    resumed, _ = run(cfg, "crashed", resume=True)  # new client objects: they hold no copy
    assert [r.round_idx for r in resumed.rounds] == [2, 3, 4]
    whole = (uninterrupted.final_dir / "model.safetensors").read_bytes()
    assert (resumed.final_dir / "model.safetensors").read_bytes() == whole


@pytest.mark.parametrize(
    ("comm", "needle"),
    [
        (
            {"global_codec": "zip"},
            "comm_args.global_codec: unknown global codec 'zip'; choose one of none, bf16",
        ),
        ({"global_codec": "topk"}, "comm_args.global_codec: unknown global codec 'topk'"),
        ({"global_codec_block_size": 4}, "comm_args.global_codec_block_size"),
    ],
)
def test_bad_global_codec_settings_are_one_line_config_errors(
    tmp_path: Path, comm: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"train_args": {"output_dir": str(tmp_path)}, "comm_args": comm})
    assert needle in str(info.value)


def test_scaffold_control_variates_travel_beside_the_global_models_change(tmp_path: Path) -> None:
    from linear_trainer import CorrectingLinearTrainer

    final, control = {}, 0.0
    for codec in ("none", "int8"):
        raw = msgspec.to_builtins(make_config(tmp_path / codec, codec))
        raw["train_args"]["server_optimizer"] = "SCAFFOLD"
        raw["comm_args"]["global_codec_block_size"] = 8  # the linear model's 8 weights: one block
        cfg = msgspec.convert(raw, Config)
        result = asyncio.run(
            run_async(cfg, run_id=codec, trainer_factory=lambda _c, rank: CorrectingLinearTrainer(rank))
        )
        assert [r.aggregated for r in result.rounds] == [[1, 2, 3]] * ROUNDS
        final[codec] = result.weights["linear.weight"]
        starts = events(result.output_dir / "metrics.jsonl", "round_start")
        own = events(result.output_dir / "node_1" / "metrics.jsonl", "train")
        for e in own[1:]:  # the global model (its change) and the control variates, each once
            if codec == "none":
                control = e["bytes_received"] - starts[e["round"]]["global_bytes"]
            assert control > 0 and e["bytes_received"] == starts[e["round"]]["global_bytes"] + control
    assert float((final["int8"] - final["none"]).abs().max()) <= 0.05 * float(final["none"].abs().max())
