"""What a silo's local training must provide: the :class:`LocalTrainer` interface.

The Hugging Face implementation (:mod:`unitedllm.training.hf`) is the default; users can
plug their own PyTorch code by implementing this class. All methods are blocking: the
Client and Aggregator call them from a worker thread, never on the event loop.

Weights exchanged here are the *trainable* tensors only (the LoRA adapter with
``peft_type: lora``, the whole model with ``peft_type: none``), keyed by stable names.

Some algorithms change local training (FedProx, SCAFFOLD): a trainer that supports them sets
:attr:`LocalTrainer.applies_corrections` and, when ``fit`` gets a ``correction``, calls
``correction.apply(trainable_params, learning_rate)`` once per optimizer step, just before
it (:mod:`unitedllm.optimizers.client_hook`). A trainer that does not is never given one,
and a run that needs one refuses to start with it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from unitedllm.optimizers.client_hook import LocalCorrection

__all__ = ["EvalResult", "FitResult", "LocalTrainer", "StepEvent"]


@dataclass(frozen=True)
class StepEvent:
    """Progress of local training, reported after each optimizer step."""

    rank: int
    round_idx: int
    step: int
    max_steps: int
    loss: float
    learning_rate: float | None = None


@dataclass
class FitResult:
    """What one local round produced."""

    weights: dict[str, torch.Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Evaluation of some weights on a test split: ``metrics`` has ``eval_loss`` and ``perplexity``."""

    metrics: dict[str, float]
    num_samples: int
    per_category: dict[str, float] = field(default_factory=dict)


class LocalTrainer(abc.ABC):
    """Trains and evaluates one rank's model on its own data."""

    #: Whether ``fit`` applies a ``correction`` (FedProx, SCAFFOLD and any algorithm with a client hook).
    applies_corrections: ClassVar[bool] = False
    #: Older form: algorithm names whose correction ``fit`` applies (kept for trainers written against it).
    client_algorithms: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def initial_weights(self) -> dict[str, torch.Tensor]:
        """The trainable tensors of the freshly built model (the round-0 global weights)."""

    @abc.abstractmethod
    def base_fingerprint(self) -> str:
        """A digest of the frozen base weights, so every rank can check it trains the same model."""

    @abc.abstractmethod
    def fit(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        round_idx: int,
        max_steps: int,
        on_step: Callable[[StepEvent], None] | None = None,
        correction: LocalCorrection | None = None,
    ) -> FitResult:
        """Load ``weights``, train locally for this round and return the new trainable weights.

        ``correction`` (only passed to trainers with :attr:`applies_corrections`)
        must be applied to the gradients once per optimizer step, just before the step.
        """

    @abc.abstractmethod
    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalResult:
        """Eval loss and perplexity of ``weights`` on this rank's test split."""

    @abc.abstractmethod
    def save_model(self, weights: Mapping[str, torch.Tensor], directory: Path) -> None:
        """Write ``weights`` as a directory ``transformers``/``peft`` can load."""

    def save_base(self, directory: Path, *, adopt: bool = True) -> bool:
        """Write the frozen base model as built (a random initialisation) to ``directory``; whether it did.

        A trainer whose model has no separate base (the default) writes nothing and returns False;
        the initial weights are then saved with :meth:`save_model`. ``adopt``: later adapters saved
        by this trainer point at this copy (False: only when no base was saved before).
        """
        return False

    def state_dict(self) -> dict[str, Any]:
        """Optimizer/schedule state to carry across rounds or checkpoints (empty by default).

        It must hold only tensors, numbers, strings, lists, tuples and dicts: the client's journal
        saves it with ``torch.save`` and reads it back with ``torch.load(weights_only=True)``, which
        refuses other classes. Convert engine objects to plain values here and back in
        :meth:`load_state_dict`.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional
        """Restore what :meth:`state_dict` returned."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release what the trainer holds (scratch files, engines); closing twice is harmless."""
