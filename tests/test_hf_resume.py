"""Exact resume of Hugging Face clients: AdamW moments and the warm-up/linear schedule survive a restart.

A tiny GPT-NeoX with LoRA runs three rounds uninterrupted, and again with every process
(aggregator and clients) gone after round 1 and started anew with ``resume``. The restarted
clients read their optimizer and schedule state from ``node_<rank>/trainer_state/``; the final
adapter is the uninterrupted one, byte for byte. Without that state the bytes differ, which
the test shows too, so it cannot pass by accident.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import msgspec
import pytest
from test_hf_federation import tiny_config

from unitedllm.aggregator import RoundSummary
from unitedllm.config.types import Config
from unitedllm.runner import run_async
from unitedllm.training.hf import HFLocalTrainer
from unitedllm.training.model_cache import ModelCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADAPTER = Path("node_0") / "final" / "adapter_model.safetensors"


class Crash(Exception):
    """Stands in for every process of the run dying after a round."""


def resume_config(tmp_path: Path) -> Config:
    cfg = tiny_config(tmp_path)
    train = msgspec.structs.replace(
        cfg.train_args,
        comm_round=3,
        local_max_steps=4,
        client_optimizer="adamw_torch",
        warmup_steps=3,  # the schedule is mid-warm-up when round 1 ends
        lr_scheduler_type="linear",
    )
    validation = msgspec.structs.replace(cfg.validation_args, is_aggregator_test=False)
    return msgspec.structs.replace(cfg, train_args=train, validation_args=validation)


def run(cfg: Config, run_id: str, *, resume: bool = False, crash_after: int | None = None) -> Path:
    """A run with fresh trainers (as in newly started processes); returns its output dir."""
    cache = ModelCache()

    def crash(summary: RoundSummary) -> None:
        if summary.round_idx == crash_after:
            raise Crash

    result = asyncio.run(
        run_async(
            cfg,
            run_id=run_id,
            resume=resume,
            on_round=crash if crash_after is not None else None,
            trainer_factory=lambda c, rank: HFLocalTrainer(c, rank, model_cache=cache),
        )
    )
    return result.output_dir


def resumed_after(output_dir: Path) -> list[int]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [e["round"] for e in map(json.loads, lines) if e["event"] == "resume"]


def test_restarted_hf_clients_finish_with_the_uninterrupted_bytes(tmp_path: Path) -> None:
    cfg = resume_config(tmp_path)
    whole = run(cfg, "whole")

    with pytest.raises(Crash):
        run(cfg, "restarted", crash_after=1)
    crashed = tmp_path / "restarted"
    assert sorted(p.name for p in (crashed / "node_1" / "trainer_state").iterdir()), "no state was kept"
    blank = tmp_path / "without-state"
    shutil.copytree(crashed, blank)
    for rank in (1, 2):
        shutil.rmtree(blank / f"node_{rank}" / "trainer_state")

    resumed = run(cfg, "restarted", resume=True)
    assert (resumed / ADAPTER).read_bytes() == (whole / ADAPTER).read_bytes()

    forgetful = run(cfg, "without-state", resume=True)
    for out in (resumed, forgetful):
        assert resumed_after(out) == [1], f"{out.name} did not resume after round 1"
    assert (forgetful / ADAPTER).read_bytes() != (whole / ADAPTER).read_bytes(), (
        "a resume without the clients' optimizer and schedule state gave the same bytes: "
        "this test could not tell a lost state from a kept one"
    )
