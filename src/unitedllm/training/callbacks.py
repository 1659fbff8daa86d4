"""Report each local optimizer step to the caller (progress bars, tracking) as a :class:`StepEvent`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from unitedllm.training.base import StepEvent

__all__ = ["StepReporter"]


class StepReporter(TrainerCallback):
    """Turns the Trainer's per-step log (``logging_steps=1``) into ``on_step(StepEvent)`` calls."""

    def __init__(self, rank: int, round_idx: int, max_steps: int, on_step: Callable[[StepEvent], None]):
        self.rank = rank
        self.round_idx = round_idx
        self.max_steps = max_steps
        self.on_step = on_step

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if not logs or "loss" not in logs:
            return  # the end-of-training summary log has train_loss, not loss
        lr = logs.get("learning_rate")
        self.on_step(
            StepEvent(
                rank=self.rank,
                round_idx=self.round_idx,
                step=int(state.global_step),
                max_steps=self.max_steps,
                loss=float(logs["loss"]),
                learning_rate=None if lr is None else float(lr),
            )
        )
