"""The client's journal: trainer-state snapshots a restarted client can load, and the last sent update."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from unitedllm.client_journal import ClientJournal
from unitedllm.protocol.messages import BlobRef, RoundStart, TrainSpec, Update


class StateTrainer:
    """Only the state half of a LocalTrainer."""

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state or {}
        self.loads = 0

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)
        self.loads += 1


def start(round_idx: int, digest: str = "a" * 64) -> RoundStart:
    return RoundStart(run_id="r", round=round_idx, sender=0, global_ref=BlobRef(digest, 10),
                      spec=TrainSpec(local_max_steps=5, local_num_train_epochs=1))


def test_a_restarted_client_loads_the_state_saved_after_the_last_round(tmp_path: Path) -> None:
    before = StateTrainer({"step": torch.tensor(7), "lr": 0.1})
    ClientJournal(tmp_path).save_state(before, 3)  # right after training round 2
    again = StateTrainer()
    ClientJournal(tmp_path).align(again, 3)  # a new process
    assert again.loads == 1 and torch.equal(again.state["step"], torch.tensor(7)) and again.state["lr"] == 0.1


def test_the_same_process_does_not_reload_what_it_just_saved(tmp_path: Path) -> None:
    trainer = StateTrainer({"step": torch.tensor(1)})
    journal = ClientJournal(tmp_path)
    journal.save_state(trainer, 1)
    journal.align(trainer, 1)
    assert trainer.loads == 0
    journal.forget_held_state()
    journal.align(trainer, 1)
    assert trainer.loads == 1


def test_deepspeed_optimizer_state_loads_in_a_new_process(tmp_path: Path) -> None:
    loss_scaler = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler", reason="DeepSpeed is not installed")
    ClientJournal(tmp_path).save_state(StateTrainer({"scaler": loss_scaler.LossScaler(128.0)}), 2)
    again = StateTrainer()
    ClientJournal(tmp_path).align(again, 2)
    assert again.state["scaler"].cur_scale == 128.0


def test_the_last_update_answers_only_the_same_question(tmp_path: Path) -> None:
    journal = ClientJournal(tmp_path)
    update = Update(run_id="r", round=4, sender=2, seq=9, delta_ref=BlobRef("b" * 64, 5), num_samples=3,
                    metrics={"train_loss": 1.5}, extras={"control": BlobRef("c" * 64, 6)})
    journal.record(start(4), update)
    assert ClientJournal(tmp_path).answer(start(4)) == update
    assert journal.answer(start(5)) is None
    assert journal.answer(start(4, digest="d" * 64)) is None  # another global model: train again
    journal.sent.write_text("{not json")
    assert journal.answer(start(4)) is None
