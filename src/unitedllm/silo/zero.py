"""DeepSpeed ZeRO inside a silo: whole tensors when they are needed, and the optimizer kept across rounds.

Under ZeRO-3 every rank holds only a shard of each parameter. Loading the global weights,
reading the trained ones and saving a model need the whole tensors:
:func:`gathered` collects them on every rank for the duration of a ``with`` block (a
collective: every rank of the silo must enter it). It does nothing for ordinary tensors,
so the same code serves a plain process, DDP and ZeRO-2.

Hugging Face's ``Trainer`` starts a new DeepSpeed engine, optimizer and schedule on every
``train()`` call. A federated client trains once per round and must continue where the last
round stopped (as the single-process client does), so :class:`ZeroRounds` hands each
round's engine the previous round's ZeRO optimizer state (moments and step count; the master
weights come from the freshly loaded global model) and a schedule advanced to where it was.

That state is kept as plain data (tensors, numbers, strings, lists, dicts), so the client's
journal loads it with ``torch.load(weights_only=True)``: DeepSpeed's loss scaler object becomes
a dict of its numbers, and what only describes the engine's layout (its ZeRO stage, parameter
slice map and ZeRO-3 master weights) is left out and taken from the next round's fresh engine.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from unitedllm.training.execution import MakeOptimizer, MakeScheduler, OptimizerRounds

if TYPE_CHECKING:
    import torch

__all__ = ["ZeroRounds", "gathered", "is_partitioned", "loss_scaler_state", "restore_loss_scaler"]

log = logging.getLogger(__name__)

# Keys of a ZeRO optimizer state that describe the engine rather than training progress:
# ZeRO-3's fp32 master weights (the fresh engine has them from the new global model), the stage
# and the parameter slice map (both DeepSpeed objects, fixed by the config and the model).
_FROM_FRESH_ENGINE = ("fp32_flat_groups", "zero_stage", "param_slice_mappings")
_LOSS_SCALER = "loss_scaler"
_SCALER_KIND = "kind"


def is_partitioned(params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether any of ``params`` is a ZeRO-3 shard."""
    return any(hasattr(p, "ds_id") for p in params)


@contextmanager
def gathered(params: Iterable[torch.nn.Parameter], *, modify: bool = False) -> Iterator[None]:
    """Whole ZeRO-3 parameters inside the block (changes made on rank 0 are kept with ``modify``)."""
    shards = [p for p in params if hasattr(p, "ds_id")]
    if not shards:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(shards, modifier_rank=0 if modify else None):
        yield


def _cpu_copy(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_cpu_copy(v) for v in obj)
    return obj


def loss_scaler_state(scaler: Any) -> dict[str, Any]:
    """A DeepSpeed loss scaler as plain data: its class name and its number, string and flag attributes."""
    plain = {k: v for k, v in vars(scaler).items() if type(v) in (bool, int, float, str, type(None))}
    return {_SCALER_KIND: type(scaler).__name__, **plain}


def restore_loss_scaler(scaler: Any, state: dict[str, Any]) -> None:
    """Put what :func:`loss_scaler_state` kept back into ``scaler``, a fresh engine's scaler of the same kind."""
    attrs = dict(state)
    kind = attrs.pop(_SCALER_KIND, None)
    if kind != type(scaler).__name__:
        # The DeepSpeed config changed (fp16 dynamic vs static scaling): the new engine's scaler rules.
        log.warning("not restoring a saved %s into this engine's %s", kind, type(scaler).__name__)
        return
    vars(scaler).update(attrs)


def _plain_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    plain = {k: v for k, v in state.items() if k not in _FROM_FRESH_ENGINE}
    if _LOSS_SCALER in plain:
        plain[_LOSS_SCALER] = loss_scaler_state(plain[_LOSS_SCALER])
    return plain


class ZeroRounds(OptimizerRounds):
    """One DeepSpeed client's optimizer and schedule across rounds, one HF ``Trainer`` per round.

    ``make_optimizer(model, args)`` builds the torch optimizer (DeepSpeed wraps it in ZeRO);
    ``make_scheduler(optimizer, steps)`` builds the learning-rate schedule of the whole run.
    """

    def __init__(self, make_optimizer: MakeOptimizer, make_scheduler: MakeScheduler):
        self._make_optimizer = make_optimizer
        self._make_scheduler = make_scheduler
        self._optimizer_state: dict[str, Any] | None = None
        self.steps_done = 0
        self._engine: Any = None
        self.scheduler: Any = None
        self._args: Any = None
        self._steps = 0

    def begin_round(self, model: Any, args: Any, steps: int, *, round_idx: int = 0) -> None:
        """Remember the round's arguments: the engine builds the optimizer when the round's ``Trainer`` starts.

        The round's schedule starts at the run's point in it, ``round_idx * steps`` (see
        :meth:`OptimizerRounds.begin_round`).
        """
        self._args, self._steps = args, steps
        self.steps_done = max(self.steps_done, round_idx * steps)

    def trainer(self, **kwargs: Any) -> Any:
        """A Hugging Face ``Trainer`` for this round that continues this client's optimizer and schedule."""
        from transformers import Trainer

        rounds = self

        class _RoundTrainer(Trainer):
            def create_optimizer(self, model: Any = None) -> Any:
                if self.optimizer is None:
                    # The previous round's engine still owns ZeRO-3's module hooks: retire it first.
                    rounds.release_engine()
                    self.optimizer = rounds._make_optimizer(
                        model if model is not None else self.model, rounds._args
                    )
                return self.optimizer

            def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
                if self.lr_scheduler is None:
                    optimizer = optimizer if optimizer is not None else self.optimizer
                    rounds._restore_optimizer(optimizer)
                    self.lr_scheduler = rounds._schedule(optimizer)
                    self._created_lr_scheduler = True
                return self.lr_scheduler

        return _RoundTrainer(**kwargs)

    def _schedule(self, optimizer: Any) -> Any:
        scheduler = self._make_scheduler(optimizer, self._steps)
        with warnings.catch_warnings():
            # Advancing a fresh schedule to where the last round left it, before any optimizer step.
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.steps_done):
                scheduler.step()
        self.scheduler = scheduler
        return scheduler

    def _restore_optimizer(self, optimizer: Any) -> None:
        if self._optimizer_state is None:
            return
        import torch.distributed as dist

        zero = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around the ZeRO optimizer
        fresh = zero.state_dict()
        state = {**{k: fresh[k] for k in _FROM_FRESH_ENGINE if k in fresh}, **self._optimizer_state}
        if _LOSS_SCALER in fresh:
            if _LOSS_SCALER in state:
                restore_loss_scaler(fresh[_LOSS_SCALER], state[_LOSS_SCALER])
            state[_LOSS_SCALER] = fresh[_LOSS_SCALER]
        world = dist.get_world_size() if dist.is_initialized() else 1
        zero.load_state_dict([state] * world, load_optimizer_states=True, load_from_fp32_weights=False)

    def finish_round(self, trainer: Any) -> None:
        """Keep the round's optimizer state and schedule position (call on every rank after ``train()``)."""
        self._engine = trainer.model_wrapped
        if self.steps_done == 0:
            params = [p for p in self._engine.module.parameters() if p.requires_grad]
            shards = sum(hasattr(p, "ds_id") for p in params)
            log.info(
                "DeepSpeed ZeRO stage %d: %d of %d trainable tensors partitioned across the silo",
                self._engine.zero_optimization_stage(),
                shards,
                len(params),
            )
        self._optimizer_state = _plain_optimizer_state(_cpu_copy(self._engine.optimizer.state_dict()))
        self.steps_done += int(trainer.state.global_step)

    def close(self) -> None:
        """Remove the last engine's hooks from the model (closing twice is harmless)."""
        self.release_engine()

    def release_engine(self) -> None:
        """Remove the last engine's hooks from the model (closing twice is harmless)."""
        if self._engine is not None and hasattr(self._engine, "destroy"):
            self._engine.destroy()
        self._engine = None

    def last_lr(self) -> float:
        """The learning rate of the last step taken."""
        return float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else 0.0

    def state_dict(self) -> dict[str, Any]:
        """This rank's ZeRO optimizer shard and the schedule position (plain data: see the module docstring)."""
        if self._optimizer_state is None:
            return {}
        return {"zero_optimizer": self._optimizer_state, "steps_done": self.steps_done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave; applied when the next round's engine starts."""
        self._optimizer_state = state.get("zero_optimizer")
        self.steps_done = int(state.get("steps_done", 0))
