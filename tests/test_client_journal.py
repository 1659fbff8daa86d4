"""The client's journal: trainer-state snapshots a restarted client can load, and the last sent update."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from services import require

from unitedllm.client_journal import ClientJournal
from unitedllm.errors import TrainingError
from unitedllm.protocol.messages import BlobRef, RoundStart, TrainSpec, Update

ROOT = Path(__file__).resolve().parents[1]


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
    return RoundStart(
        run_id="r",
        round=round_idx,
        sender=0,
        global_ref=BlobRef(digest, 10),
        spec=TrainSpec(local_max_steps=5, local_num_train_epochs=1),
    )


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


class EngineScaler:
    """An engine object of the kind a trainer must not put in its state as it is."""

    def __init__(self, scale: float):
        self.scale = scale


def test_a_state_holding_another_class_is_refused_when_saved(tmp_path: Path) -> None:
    journal = ClientJournal(tmp_path)
    with pytest.raises(TrainingError) as err:
        journal.save_state(StateTrainer({"step": torch.tensor(3), "scaler": EngineScaler(128.0)}), 2)
    message = str(err.value)
    assert "StateTrainer.state_dict()" in message and f"{__name__}.EngineScaler" in message, message
    assert not [*tmp_path.rglob("*.pt"), *tmp_path.rglob("*.tmp")]  # nothing a restart would trip on


@pytest.mark.parametrize("content", ["foreign class", "garbage", "empty", "truncated"])
def test_an_unreadable_snapshot_is_an_error_naming_the_file(tmp_path: Path, content: str) -> None:
    journal = ClientJournal(tmp_path)
    snapshot = journal.states / "before_round_4.pt"
    snapshot.parent.mkdir(parents=True)
    if content == "foreign class":  # e.g. written by a version whose state held engine objects
        torch.save({"scaler": EngineScaler(128.0)}, snapshot)
    elif content == "garbage":
        snapshot.write_bytes(b"not a torch file at all")
    elif content == "empty":
        snapshot.write_bytes(b"")
    else:
        torch.save({"step": torch.arange(1000)}, snapshot)
        snapshot.write_bytes(snapshot.read_bytes()[:500])
    again = StateTrainer()
    with pytest.raises(TrainingError) as err:
        journal.align(again, 4)
    message = str(err.value)
    assert str(snapshot) in message and "delete it" in message, message
    if content == "foreign class":
        assert f"{__name__}.EngineScaler" in message, message
    assert again.loads == 0


def test_a_dynamic_loss_scaler_round_trips_as_plain_data(tmp_path: Path) -> None:
    """fp16 ZeRO (GPU only) carries DeepSpeed's dynamic loss scale across rounds as numbers, not as the object."""
    if importlib.util.find_spec("deepspeed") is None:
        require("deepspeed is not installed (pip install 'unitedllm[deepspeed]'; scripts/setup.sh does)")
    import deepspeed.runtime.fp16.loss_scaler as loss_scaler

    from unitedllm.silo.zero import loss_scaler_state, restore_loss_scaler

    def scaler() -> Any:
        return loss_scaler.DynamicLossScaler(
            init_scale=2.0**16,
            scale_window=1000,
            min_scale=1.0,
            delayed_shift=2,
            consecutive_hysteresis=False,
        )

    trained = scaler()
    trained.cur_scale, trained.cur_iter, trained.last_overflow_iter, trained.cur_hysteresis = 512.0, 37, 30, 1
    ClientJournal(tmp_path).save_state(StateTrainer({"loss_scaler": loss_scaler_state(trained)}), 5)
    again = StateTrainer()
    ClientJournal(tmp_path).align(again, 5)
    fresh = scaler()  # the next engine's own scaler, from the same DeepSpeed config
    restore_loss_scaler(fresh, again.state["loss_scaler"])
    restored = (fresh.cur_scale, fresh.cur_iter, fresh.last_overflow_iter, fresh.cur_hysteresis)
    assert restored == (512.0, 37, 30, 1)
    assert fresh.dtype == torch.half  # what was not kept comes from the fresh engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _zero_restart(stage: int, folder: Path) -> dict[str, float]:
    """Runs in a child process (it starts torch.distributed): ZeRO trains, a new client resumes from disk.

    Engine A takes 2 steps, its state goes through the journal, and A takes a third step. Engine B
    starts from A's weights after 2 steps with the state loaded from disk and takes the same third
    step: its weights must match A's. A fresh optimizer would make a different third step.
    """
    import deepspeed

    from unitedllm.silo.zero import ZeroRounds, gathered

    torch.manual_seed(0)
    batches = [torch.randn(4, 8) for _ in range(3)]
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }

    def model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def engine(weights: dict[str, torch.Tensor]) -> Any:
        net = model()
        net.load_state_dict(weights)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
        return deepspeed.initialize(model=net, optimizer=optimizer, config=config)[0]

    def step(e: Any, x: torch.Tensor) -> None:
        e.backward(e(x).pow(2).mean())
        e.step()

    def weights(e: Any) -> dict[str, torch.Tensor]:
        with gathered(e.module.parameters()):
            return {k: v.detach().clone() for k, v in e.module.state_dict().items()}

    a = engine(model().state_dict())
    for x in batches[:2]:
        step(a, x)
    rounds = ZeroRounds(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), lambda o: None)
    rounds.finish_round(SimpleNamespace(model_wrapped=a, state=SimpleNamespace(global_step=2)))
    ClientJournal(folder).save_state(rounds, 1)
    after_two = weights(a)
    step(a, batches[2])
    continued = weights(a)
    rounds.release_engine()

    resumed = ZeroRounds(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2), lambda o: None)
    ClientJournal(folder).align(resumed, 1)  # a new journal: loads the snapshot from disk
    b = engine({k: v.clone() for k, v in after_two.items()})
    c = engine({k: v.clone() for k, v in after_two.items()})  # the same, without the saved state
    resumed._restore_optimizer(SimpleNamespace(optimizer=b.optimizer))  # as accelerate wraps it in Trainer
    step(b, batches[2])
    step(c, batches[2])
    ours, fresh = weights(b), weights(c)
    return {
        "worst": max(float((ours[k] - continued[k]).abs().max()) for k in continued),
        "fresh_differs": max(float((fresh[k] - continued[k]).abs().max()) for k in continued),
        "steps_done": float(resumed.steps_done),
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_optimizer_state_survives_a_client_restart(tmp_path: Path, stage: int) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        require("deepspeed is not installed (pip install 'unitedllm[deepspeed]'; scripts/setup.sh does)")
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    done = subprocess.run(
        [sys.executable, __file__, "zero-restart", str(stage), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps_done"] == 2
    assert result["worst"] < 1e-6, result
    assert result["fresh_differs"] > 1e-4, result  # else the comparison would prove nothing


def test_the_last_update_answers_only_the_same_question(tmp_path: Path) -> None:
    journal = ClientJournal(tmp_path)
    update = Update(
        run_id="r",
        round=4,
        sender=2,
        seq=9,
        delta_ref=BlobRef("b" * 64, 5),
        num_samples=3,
        metrics={"train_loss": 1.5},
        extras={"control": BlobRef("c" * 64, 6)},
    )
    journal.record(start(4), update)
    assert ClientJournal(tmp_path).answer(start(4)) == update
    assert journal.answer(start(5)) is None
    assert journal.answer(start(4, digest="d" * 64)) is None  # another global model: train again
    journal.sent.write_text("{not json")
    assert journal.answer(start(4)) is None


if __name__ == "__main__" and sys.argv[1:2] == ["zero-restart"]:
    print(json.dumps(_zero_restart(int(sys.argv[2]), Path(sys.argv[3]))))
