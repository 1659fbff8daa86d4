"""The ``LocalTrainer`` contract, one suite over every implementation the runtime drives.

The plain-PyTorch linear trainer (what a user plugs in), the tiny Hugging Face LoRA trainer, and
the silo leader (a one-process gloo silo here, so it runs on any machine) must all do what the
client and the aggregator call them for: the same names in and out of a round, an evaluation
with an ``eval_loss``, a saved model, a base model or an honest "no base", a state that survives
``torch.save`` / ``torch.load(weights_only=True)`` and comes back, and closing twice.
"""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from linear_trainer import LinearTrainer

from unitedllm.config.types import Config
from unitedllm.training.base import LocalTrainer

TINY_MODEL = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny-gpt-neox"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_hf_config(tmp_path: Path) -> Config:
    import msgspec

    return msgspec.convert(
        {
            "data_args": {
                "dataset": "unitedllm-synthetic",
                "dataset_name": None,
                "synthetic_num_examples": 120,
                "test_dataset_size": 16,
                "max_seq_length": 64,
                "cache_dir": str(tmp_path / "cache"),
            },
            "model_args": {
                "model_name_or_path": str(TINY_MODEL),
                "load_pretrained": False,
                "train_tokenizer_vocab_size": 512,
                "model_config_overrides": {
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                },
                "peft_type": "lora",
                "lora_r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
            },
            "train_args": {
                "client_num_in_total": 2,
                "comm_round": 2,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-3,
                "output_dir": str(tmp_path / "{run_id}"),
            },
        },
        Config,
    )


@pytest.fixture(scope="module")
def one_process_silo() -> Iterator[Any]:
    """A silo of one gloo process, as torchrun would start it, for the leader's side of the contract."""
    import os

    from unitedllm.silo.distributed import close_silo, open_silo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield open_silo("torch")
    finally:
        close_silo()
        # Hugging Face's accelerate remembers the process group it saw; later tests run without one.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _linear(tmp_path: Path, request: pytest.FixtureRequest) -> LocalTrainer:
    return LinearTrainer(1)


def _hf(tmp_path: Path, request: pytest.FixtureRequest) -> LocalTrainer:
    from unitedllm.training.hf import HFLocalTrainer

    return HFLocalTrainer(tiny_hf_config(tmp_path), 1)


def _silo_leader(tmp_path: Path, request: pytest.FixtureRequest) -> LocalTrainer:
    from unitedllm.silo.execution import execution_for
    from unitedllm.silo.group import leader_for
    from unitedllm.training.hf import HFLocalTrainer

    ctx = request.getfixturevalue("one_process_silo")
    return leader_for(HFLocalTrainer(tiny_hf_config(tmp_path), 1, execution=execution_for(ctx)), ctx)


IMPLEMENTATIONS = {"linear": _linear, "hf": _hf, "silo-leader": _silo_leader}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def trainer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalTrainer]:
    made = IMPLEMENTATIONS[request.param](tmp_path, request)
    yield made
    made.close()


def test_a_round_gives_back_the_same_tensors_it_was_given(trainer: LocalTrainer) -> None:
    start = trainer.initial_weights()
    result = trainer.fit(start, round_idx=0, max_steps=2)
    assert set(result.weights) == set(start) and result.num_samples > 0
    for name, w in start.items():
        assert result.weights[name].shape == w.shape and result.weights[name].dtype == w.dtype
    assert any(not torch.equal(result.weights[n], start[n]) for n in start), "training changed nothing"
    assert (
        isinstance(trainer.base_fingerprint(), str)
        and trainer.base_fingerprint() == trainer.base_fingerprint()
    )


def test_evaluation_reports_an_eval_loss(trainer: LocalTrainer) -> None:
    result = trainer.evaluate(trainer.initial_weights())
    assert result.metrics["eval_loss"] > 0 and result.num_samples > 0


def test_a_saved_model_and_the_base_are_written_or_honestly_not(
    trainer: LocalTrainer, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    trainer.save_model(trainer.initial_weights(), model_dir)
    assert any(model_dir.iterdir())
    base_dir = tmp_path / "base"
    wrote = trainer.save_base(base_dir)
    assert isinstance(wrote, bool)
    assert (base_dir.is_dir() and any(base_dir.iterdir())) if wrote else not base_dir.exists()


def test_the_state_survives_a_weights_only_round_trip(trainer: LocalTrainer) -> None:
    trainer.fit(trainer.initial_weights(), round_idx=0, max_steps=1)
    state = trainer.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)
    trainer.load_state_dict(restored)
    assert trainer.state_dict().keys() == state.keys()


def test_closing_twice_is_harmless(trainer: LocalTrainer) -> None:
    trainer.close()
    trainer.close()
