"""Local training as one process of a silo: DDP, or DeepSpeed ZeRO (docs/silos.md).

The :class:`~unitedllm.training.execution.Execution` a silo's trainer is built with. Under DDP
each process trains on its share of every batch with whole, all-reduced gradients, and scores a
share of the test split; under ZeRO the parameters, gradients and optimizer state are sharded,
whole tensors are gathered where they are needed (:func:`~unitedllm.silo.zero.gathered`), and
DeepSpeed's optimizer is carried from round to round by :class:`~unitedllm.silo.zero.ZeroRounds`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from unitedllm.silo.deepspeed_config import mixed_precision
from unitedllm.silo.evaluation import silo_response_losses
from unitedllm.silo.zero import ZeroRounds, gathered
from unitedllm.training.execution import Execution, MakeOptimizer, MakeScheduler, OptimizerRounds

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

    from unitedllm.silo.distributed import SiloContext

__all__ = ["SiloExecution", "ZeroExecution", "execution_for"]


class SiloExecution(Execution):
    """One process of a DDP silo: silo rank 0 leads; every process keeps its own copy of the optimizer."""

    def __init__(self, ctx: SiloContext):
        self.ctx = ctx
        self.rank = ctx.rank
        self.world_size = ctx.world_size
        self.local_rank = ctx.local_rank
        self.deepspeed_config = ctx.deepspeed_config

    def response_losses(
        self, model: Any, dataset: Dataset, *, batch_size: int, pad_token_id: int
    ) -> dict[str, tuple[float, int]]:
        return silo_response_losses(
            self.ctx, model, dataset, batch_size=batch_size, pad_token_id=pad_token_id
        )


class ZeroExecution(SiloExecution):
    """One process of a DeepSpeed silo: sharded parameters gathered when needed, ZeRO's optimizer across rounds."""

    @property
    def whole_gradients(self) -> bool:
        return False  # ZeRO keeps gradients in its own partitioned buffers

    def gathered(
        self, params: Iterable[torch.nn.Parameter], *, modify: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        return gathered(params, modify=modify)

    def mixed_precision(self, *, bf16: bool, fp16: bool) -> tuple[bool, bool]:
        assert self.deepspeed_config is not None
        return mixed_precision(self.deepspeed_config, bf16=bf16, fp16=fp16)

    def optimizer_rounds(
        self, make_optimizer: MakeOptimizer, make_scheduler: MakeScheduler
    ) -> OptimizerRounds:
        return ZeroRounds(make_optimizer, make_scheduler)


def execution_for(ctx: SiloContext) -> SiloExecution:
    """The execution of this silo's processes: ZeRO under a DeepSpeed config, DDP otherwise."""
    return ZeroExecution(ctx) if ctx.deepspeed_config is not None else SiloExecution(ctx)
