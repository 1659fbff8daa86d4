"""Evaluation by every rank of a silo: each scores a share of the test split, rank 0 adds the sums up."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unitedllm.silo.zero import is_partitioned
from unitedllm.training.evaluation import response_losses

if TYPE_CHECKING:
    from datasets import Dataset

    from unitedllm.silo.distributed import SiloContext

__all__ = ["silo_response_losses"]


def silo_response_losses(
    ctx: SiloContext, model: Any, dataset: Dataset, *, batch_size: int, pad_token_id: int
) -> dict[str, tuple[float, int]]:
    """``response_losses`` of the whole split, computed by all ranks together (same result on every rank).

    With ZeRO-3 every forward pass is a collective, so every rank scores the whole split (the
    same batches in the same order); otherwise rank r scores the r-th contiguous share.
    """
    if is_partitioned(model.parameters()):
        return response_losses(model, dataset, batch_size=batch_size, pad_token_id=pad_token_id)
    share = dataset.shard(num_shards=ctx.world_size, index=ctx.rank, contiguous=True)
    mine = (
        response_losses(model, share, batch_size=batch_size, pad_token_id=pad_token_id) if len(share) else {}
    )
    total: dict[str, tuple[float, int]] = {}
    for part in ctx.all_gather_objects(mine):
        for category, (s, n) in part.items():
            s0, n0 = total.get(category, (0.0, 0))
            total[category] = (s0 + s, n0 + n)
    return total
