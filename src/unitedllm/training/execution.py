"""How one rank's local training is executed: in one process, or as one process of a silo.

A trainer is given its :class:`Execution` once, when it is built, and asks it everything that
depends on the process layout: whether this process leads (writes files, answers the
aggregator), how many processes share each batch, which device it evaluates on, how whole
parameters are gathered, how a test split's losses are summed, and who keeps the optimizer
and learning-rate schedule from one round to the next (:class:`OptimizerRounds`). The default
here is one process; DDP and DeepSpeed ZeRO across a silo's processes live in
:mod:`unitedllm.silo.execution`, so training code never branches on them.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

__all__ = ["Execution", "KeptOptimizer", "MakeOptimizer", "MakeScheduler", "OptimizerRounds"]

#: Builds the local torch optimizer for ``model`` from the round's Hugging Face ``TrainingArguments``.
MakeOptimizer = Callable[[Any, Any], "torch.optim.Optimizer"]
#: Builds the whole run's learning-rate schedule for an optimizer, given the steps of one round.
MakeScheduler = Callable[[Any, int], Any]


class OptimizerRounds(abc.ABC):
    """One rank's local optimizer and schedule across rounds: each round continues where the last one ended."""

    @abc.abstractmethod
    def begin_round(self, model: Any, args: Any, steps: int, *, round_idx: int = 0) -> None:
        """Get ready for round ``round_idx``, of ``steps`` optimizer steps with these training arguments.

        The schedule spans the whole run (``steps`` per round times ``comm_round``) and a round starts
        at the run's own point in it, ``round_idx * steps``: a client left out of some rounds does not
        fall behind the others (:func:`advance_schedule`).
        """

    @abc.abstractmethod
    def trainer(self, **kwargs: Any) -> Any:
        """The round's Hugging Face ``Trainer``, stepping this optimizer and schedule."""

    def finish_round(self, trainer: Any) -> None:  # noqa: B027 - nothing to keep by default
        """Keep what the next round continues from (called after ``train()``)."""

    def reset_moments(self) -> None:
        """Start the round's optimizer moments from zero (``train_args.local_optimizer_state: reset``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps its optimizer state across rounds")

    @abc.abstractmethod
    def last_lr(self) -> float:
        """The learning rate of the last step taken."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Optimizer and schedule state as plain data (see ``LocalTrainer.state_dict``)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state (applied when the optimizer exists)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release what the optimizer holds (closing twice is harmless)."""


class KeptOptimizer(OptimizerRounds):
    """One torch optimizer and schedule built at the first round and kept for the whole run."""

    def __init__(self, make_optimizer: MakeOptimizer, make_scheduler: MakeScheduler):
        self._make_optimizer = make_optimizer
        self._make_scheduler = make_scheduler
        self._optimizer: Any = None
        self._scheduler: Any = None
        self._steps_per_round: int | None = None
        self._pending: Mapping[str, Any] | None = None

    def begin_round(self, model: Any, args: Any, steps: int, *, round_idx: int = 0) -> None:
        if self._optimizer is None:
            self._optimizer = self._make_optimizer(model, args)
            self._scheduler = self._make_scheduler(self._optimizer, steps)
            self._steps_per_round = steps
            if self._pending:
                pending, self._pending = self._pending, None
                self.load_state_dict(pending)
        advance_schedule(self._scheduler, round_idx * steps)

    def trainer(self, **kwargs: Any) -> Any:
        from transformers import Trainer

        return Trainer(**kwargs, optimizers=(self._optimizer, self._scheduler))

    def reset_moments(self) -> None:
        if self._optimizer is not None:
            self._optimizer.state.clear()  # AdamW starts each tensor again at step 0, zero moments

    def last_lr(self) -> float:
        return float(self._scheduler.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        if self._optimizer is None:
            return dict(self._pending or {})
        return {
            "optimizer": self._optimizer.state_dict(),
            "scheduler": self._scheduler.state_dict(),
            "steps_per_round": self._steps_per_round,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._optimizer is None:
            self._pending = dict(state)
            return
        self._optimizer.load_state_dict(state["optimizer"])
        self._scheduler.load_state_dict(state["scheduler"])


class Execution:
    """Local training in this one process: it leads, sees every batch, keeps its own optimizer."""

    #: This process's rank among the processes training together, and how many there are.
    rank: int = 0
    world_size: int = 1
    #: The GPU index of this process when it is one of several on a node (None: torch's current device).
    local_rank: int | None = None
    #: The DeepSpeed config file the Hugging Face ``Trainer`` runs under, if any.
    deepspeed_config: str | None = None

    @property
    def is_leader(self) -> bool:
        """Whether this process writes files and answers for the rank (the others only take part)."""
        return self.rank == 0

    @property
    def whole_gradients(self) -> bool:
        """Whether every process sees whole gradients before a step (a client hook's correction needs them)."""
        return True

    def gathered(
        self, params: Iterable[torch.nn.Parameter], *, modify: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """Whole parameters inside the block (a collective where they are sharded; nothing to do here)."""
        return contextlib.nullcontext()

    def response_losses(
        self, model: Any, dataset: Dataset, *, batch_size: int, pad_token_id: int
    ) -> dict[str, tuple[float, int]]:
        """Per-category (loss sum, token count) of ``dataset``, computed by the processes together."""
        from unitedllm.training.evaluation import response_losses

        return response_losses(model, dataset, batch_size=batch_size, pad_token_id=pad_token_id)

    def mixed_precision(self, *, bf16: bool, fp16: bool) -> tuple[bool, bool]:
        """The (bf16, fp16) the ``Trainer`` gets (an engine config may decide them instead)."""
        return bf16, fp16

    def optimizer_rounds(
        self, make_optimizer: MakeOptimizer, make_scheduler: MakeScheduler
    ) -> OptimizerRounds:
        """Who keeps the optimizer and schedule across rounds under this execution."""
        return KeptOptimizer(make_optimizer, make_scheduler)


def advance_schedule(scheduler: Any, position: int) -> None:
    """Move ``scheduler`` forward to step ``position`` of the run (never back).

    A client trains only in the rounds it is selected for; without this its schedule would count only
    its own steps and, left out of some rounds, it would end the run still warm instead of decayed.
    """
    with warnings.catch_warnings():
        # Stepping a schedule with no optimizer step in between is what this means to do.
        warnings.simplefilter("ignore", UserWarning)
        while scheduler.last_epoch < position:
            scheduler.step()
