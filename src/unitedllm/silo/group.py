"""The ranks of one silo acting as one rank of the run: the leader fans every trainer call out to its followers.

Silo rank 0 runs the :class:`~unitedllm.client.Client` (or the
:class:`~unitedllm.aggregator.Aggregator`) with a :class:`SiloLeader` as its trainer. Each call that needs every rank (training, evaluation, saving under ZeRO-3, optimizer
state) is first announced on the control group with its arguments and the global weights;
the followers, parked in :func:`follow`, make the same call on their own trainer, so the
engine's collectives (DDP all-reduce, ZeRO gathers) line up. The Client or Aggregator never knows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from unitedllm.errors import TrainingError
from unitedllm.training.base import EvalResult, FitResult, LocalTrainer, StepEvent

if TYPE_CHECKING:
    import torch

    from unitedllm.optimizers.client_hook import LocalCorrection
    from unitedllm.silo.distributed import SiloContext

__all__ = ["SiloLeader", "check_same_model", "follow", "leader_for"]

log = logging.getLogger(__name__)

STOP = "stop"
ABORT = "abort"


def check_same_model(trainer: LocalTrainer, ctx: SiloContext) -> None:
    """Every rank must have built the same base model (same config, tokenizer, seed): compare fingerprints."""
    prints = ctx.all_gather_objects(trainer.base_fingerprint())
    if len(set(prints)) > 1:
        odd = [r for r, p in enumerate(prints) if p != prints[0]]
        raise TrainingError(
            f"silo ranks {odd} built a different base model than silo rank 0 (fingerprints differ); every rank "
            "must see the same config, model files and tokenizer"
        )


class SiloLeader(LocalTrainer):
    """Silo rank 0's trainer: runs each call on every rank of the silo and answers with rank 0's result."""

    applies_corrections: ClassVar[bool] = True

    def __init__(self, inner: LocalTrainer, ctx: SiloContext):
        self.inner = inner
        self.ctx = ctx
        self._closed = False

    def _announce(self, command: str, **kwargs: Any) -> None:
        self.ctx.broadcast_object((command, kwargs))

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """As built on rank 0 (every rank built the same, see :func:`check_same_model`)."""
        return self.inner.initial_weights()

    def base_fingerprint(self) -> str:
        """Rank 0's fingerprint (equal on every rank)."""
        return self.inner.base_fingerprint()

    def fit(
        self,
        weights: Mapping[str, torch.Tensor],
        *,
        round_idx: int,
        max_steps: int,
        on_step: Callable[[StepEvent], None] | None = None,
        correction: LocalCorrection | None = None,
    ) -> FitResult:
        """Every rank trains on its share of each batch; rank 0 returns the (gathered) new weights."""
        self._announce("fit", round_idx=round_idx, max_steps=max_steps, correction=correction)
        self.ctx.broadcast_tensors(weights)
        return self.inner.fit(
            weights, round_idx=round_idx, max_steps=max_steps, on_step=on_step, correction=correction
        )

    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> EvalResult:
        """Every rank takes part (a share of the test split, or all of it under ZeRO-3)."""
        self._announce("evaluate")
        self.ctx.broadcast_tensors(weights)
        return self.inner.evaluate(weights)

    def save_model(self, weights: Mapping[str, torch.Tensor], directory: Path) -> None:
        """Every rank loads the weights (ZeRO-3 gathers them); only rank 0 writes."""
        self._announce("save_model", directory=str(directory))
        self.ctx.broadcast_tensors(weights)
        self.inner.save_model(weights, directory)

    def save_base(self, directory: Path, *, adopt: bool = True) -> bool:
        """Every rank takes part (ZeRO-3 gathers the base); only rank 0 writes (see ``HFLocalTrainer.save_base``)."""
        self._announce("save_base", directory=str(directory), adopt=adopt)
        return self.inner.save_base(directory, adopt=adopt)

    def state_dict(self) -> dict[str, Any]:
        """Every rank's optimizer state (ZeRO keeps a shard per rank), in silo rank order."""
        self._announce("state_dict")
        states = self.ctx.gather_objects(self.inner.state_dict())
        assert states is not None
        if not any(states):
            return {}
        return {"silo_world_size": self.ctx.world_size, "ranks": states}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Give each rank back its own optimizer state; a state saved by a silo of another size is refused."""
        ranks = state.get("ranks")
        size = state.get("silo_world_size")
        if not isinstance(ranks, list) or size != self.ctx.world_size:
            raise TrainingError(
                f"the saved trainer state is from a silo of {size} processes, this silo has {self.ctx.world_size};"
                " start the client with the same nproc_per_node/nnodes as before, or a fresh output_dir"
            )
        self._announce("load_state_dict")
        self.inner.load_state_dict(self.ctx.scatter_objects(ranks))

    def close(self, *, failed: bool = False) -> None:
        """Release the followers: they exit 0 after a finished run, 1 after a failure (closing twice is harmless)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._announce(ABORT if failed else STOP)
        except RuntimeError as exc:  # a follower is gone already; the launcher ends the rest
            log.debug("silo: could not reach the followers: %s", exc)
        self.inner.close()


class _ZeroLeader(SiloLeader):
    # Gradient corrections need whole .grad tensors, which ZeRO keeps in its own partitioned buffers.
    applies_corrections: ClassVar[bool] = False


def leader_for(inner: LocalTrainer, ctx: SiloContext) -> SiloLeader:
    """The leader trainer for this silo's engine (under DDP every rank sees whole, all-reduced gradients)."""
    if ctx.engine == "deepspeed" or not (inner.applies_corrections or inner.client_algorithms):
        return _ZeroLeader(inner, ctx)
    return SiloLeader(inner, ctx)


def follow(trainer: LocalTrainer, ctx: SiloContext) -> bool:
    """A follower's life: make each call the leader announces; True when the run finished, False on abort."""
    while True:
        command, kwargs = ctx.broadcast_object()
        log.debug("silo rank %d: %s", ctx.rank, command)
        if command in (STOP, ABORT):
            trainer.close()
            return bool(command == STOP)
        if command == "fit":
            weights = ctx.broadcast_tensors()
            trainer.fit(weights, **kwargs)
        elif command == "evaluate":
            trainer.evaluate(ctx.broadcast_tensors())
        elif command == "save_model":
            trainer.save_model(ctx.broadcast_tensors(), Path(kwargs["directory"]))
        elif command == "save_base":
            trainer.save_base(Path(kwargs["directory"]), adopt=kwargs["adopt"])
        elif command == "state_dict":
            ctx.gather_objects(trainer.state_dict())
        elif command == "load_state_dict":
            trainer.load_state_dict(ctx.scatter_objects(None))
        else:
            raise TrainingError(f"silo rank {ctx.rank}: unknown command {command!r} from silo rank 0")
