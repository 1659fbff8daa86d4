"""Hugging Face Trainer callbacks: each local step reported as a :class:`StepEvent`, a client algorithm's correction applied."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from unitedllm.training.base import StepEvent

if TYPE_CHECKING:
    import torch

    from unitedllm.optimizers.client_hook import LocalCorrection

__all__ = ["CorrectionCallback", "StepReporter"]


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


class CorrectionCallback(TrainerCallback):
    """Applies a :class:`LocalCorrection` in a Hugging Face ``Trainer``, after clipping, before each step.

    ``on_pre_optimizer_step`` runs after the Trainer's gradient clipping: ``max_grad_norm`` clips the
    data-loss gradient only, and the correction is added unclipped, as the local objective prescribes.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], correction: LocalCorrection):
        self.params = params
        self.correction = correction

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs["optimizer"]
        self.correction.apply(self.params, float(optimizer.param_groups[0]["lr"]))
