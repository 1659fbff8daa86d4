"""A 2-client x 2-round federated LoRA run of a tiny Hugging Face model, checked against the maths."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from unitedllm.config.types import Config
from unitedllm.runner import run_async
from unitedllm.training.base import FitResult
from unitedllm.training.hf import HFLocalTrainer
from unitedllm.training.model_cache import ModelCache

TINY_MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny-gpt-neox"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tmp_path: Path) -> Config:
    return msgspec.convert(
        {
            "data_args": {
                "dataset": "unitedllm-synthetic",
                "dataset_name": None,
                "synthetic_num_examples": 240,
                "test_dataset_size": 40,
                "max_seq_length": 96,
                "cache_dir": str(tmp_path / "cache"),
            },
            "model_args": {
                "model_name_or_path": str(TINY_MODEL),
                "load_pretrained": False,
                "train_tokenizer_vocab_size": 384,
                "peft_type": "lora",
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "model_config_overrides": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                },
            },
            "train_args": {
                "client_num_in_total": 2,
                "client_num_per_round": 2,
                "comm_round": 2,
                "local_max_steps": 8,
                "per_device_train_batch_size": 8,
                "learning_rate": 5e-3,
                "output_dir": str(tmp_path / "{run_id}"),
            },
            "validation_args": {"is_aggregator_test": True},
        },
        Config,
    )


class Recording(HFLocalTrainer):
    """The Hugging Face trainer, keeping what each local round produced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.results: dict[int, FitResult] = {}

    def fit(self, weights: Mapping[str, torch.Tensor], *, round_idx: int, **kwargs: Any) -> FitResult:
        result = super().fit(weights, round_idx=round_idx, **kwargs)
        self.results[round_idx] = FitResult(
            {k: v.clone() for k, v in result.weights.items()}, result.num_samples, dict(result.metrics)
        )
        return result


def federate(cfg: Config, run_id: str) -> tuple[Any, dict[int, Recording]]:
    cache = ModelCache()
    trainers: dict[int, Recording] = {}

    def make(c: Config, rank: int) -> Recording:
        trainers[rank] = Recording(c, rank, model_cache=cache)
        return trainers[rank]

    return asyncio.run(run_async(cfg, run_id=run_id, trainer_factory=make)), trainers


def test_lora_federation_matches_fedavg_and_is_reproducible(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    first, trainers = federate(cfg, "a")
    eval_losses = [r.eval_loss for r in first.rounds]
    assert eval_losses[1] is not None and eval_losses[0] is not None and eval_losses[1] < eval_losses[0]

    last = {rank: trainers[rank].results[1] for rank in (1, 2)}
    total = sum(r.num_samples for r in last.values())
    adapter = load_file(str(first.final_dir / "adapter_model.safetensors"))
    assert len(adapter) == len(first.weights)
    for name, value in first.weights.items():
        expected = sum(last[r].weights[name].double() * last[r].num_samples / total for r in last)
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)

    second, _ = federate(cfg, "b")
    assert (first.final_dir / "adapter_model.safetensors").read_bytes() == (
        second.final_dir / "adapter_model.safetensors"
    ).read_bytes()
