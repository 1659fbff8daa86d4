"""Precision and memory settings a silo uses, checked on the CPU: model_dtype, bf16/fp16, checkpointing, attention."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from unitedllm.config import load_config
from unitedllm.training.hf import HFLocalTrainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "tiny_processes.yaml"


def trainer(tmp_path: Path, *overrides: str) -> HFLocalTrainer:
    cfg = load_config(
        CONFIG, overrides=["comm_args.backend=LOCAL", f"data_args.cache_dir={tmp_path}/cache", *overrides]
    )
    return HFLocalTrainer(cfg, 1)


def first_round_loss(t: HFLocalTrainer) -> tuple[float, Any]:
    result = t.fit(t.initial_weights(), round_idx=0, max_steps=2)
    return result.metrics["train_loss"], result.weights


@pytest.fixture(scope="module")
def fp32_loss(tmp_path_factory: pytest.TempPathFactory) -> float:
    loss, _ = first_round_loss(trainer(tmp_path_factory.mktemp("fp32")))
    return loss


@pytest.mark.parametrize(("dtype", "torch_name"), [("bf16", "bfloat16"), ("fp16", "float16")])
def test_model_dtype_sets_the_frozen_base_and_trains(
    dtype: str, torch_name: str, tmp_path: Path, fp32_loss: float, one_torch_thread: None
) -> None:
    t = trainer(tmp_path, f"train_args.model_dtype={dtype}")
    frozen = {str(p.dtype) for p in t.model.parameters() if not p.requires_grad}
    assert frozen == {f"torch.{torch_name}"}
    loss, weights = first_round_loss(t)
    # PEFT keeps adapters in fp32 for stable updates; what travels is fp32.
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}
    assert loss != fp32_loss and abs(loss - fp32_loss) < 0.05


def test_bf16_mixed_precision_runs_on_the_cpu(
    tmp_path: Path, fp32_loss: float, one_torch_thread: None
) -> None:
    loss, _ = first_round_loss(trainer(tmp_path, "train_args.bf16=true"))
    assert loss != fp32_loss and abs(loss - fp32_loss) < 0.05  # autocast took effect, training still sane


def test_fp16_mixed_precision_on_the_cpu_falls_back_and_says_so(
    tmp_path: Path, fp32_loss: float, caplog: pytest.LogCaptureFixture, one_torch_thread: None
) -> None:
    with caplog.at_level(logging.WARNING, logger="unitedllm.training.hf"):
        loss, _ = first_round_loss(trainer(tmp_path, "train_args.fp16=true"))
    assert any("fp16 mixed precision needs a GPU" in r.getMessage() for r in caplog.records)
    assert loss == pytest.approx(fp32_loss, abs=1e-6)


def test_gradient_checkpointing_is_on_and_changes_no_result(
    tmp_path: Path, fp32_loss: float, one_torch_thread: None
) -> None:
    t = trainer(tmp_path, "train_args.gradient_checkpointing=true")
    assert t.model.get_base_model().is_gradient_checkpointing
    loss, _ = first_round_loss(t)
    assert loss == pytest.approx(fp32_loss, abs=1e-5)


def test_flash_attention_without_flash_attn_uses_sdpa_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with caplog.at_level(logging.INFO, logger="unitedllm.training.model"):
        t = trainer(tmp_path, "model_args.use_flash_attention=true")
        assert t.model.config._attn_implementation == "sdpa"
    assert any("flash_attn is not installed; using sdpa" in r.getMessage() for r in caplog.records)


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (bench/device_check.sh runs it on a lent device)")
def test_aggregator_evaluates_on_the_gpu_with_the_cpus_loss(tmp_path: Path) -> None:
    """The aggregator never trains, so its evaluation must move the model to the GPU itself."""
    overrides = ["comm_args.backend=LOCAL", f"data_args.cache_dir={tmp_path}/cache"]
    cpu = HFLocalTrainer(load_config(CONFIG, overrides=overrides), 0)
    gpu = HFLocalTrainer(load_config(CONFIG, overrides=[*overrides, "device_args.using_gpu=true"]), 0)
    weights = cpu.initial_weights()
    on_cpu, on_gpu = cpu.evaluate(weights), gpu.evaluate(weights)
    assert next(gpu.model.parameters()).is_cuda and not next(cpu.model.parameters()).is_cuda
    assert abs(on_cpu.metrics["eval_loss"] - on_gpu.metrics["eval_loss"]) < 1e-3
