"""One silo's process group: who this rank is, and the few collectives the silo's ranks share.

The training engine (DDP or DeepSpeed) uses the default process group. Commands and weights
travel on a separate gloo group with a long timeout, so follower ranks may wait for the next
round as long as the federation needs (a round can last hours), while a dead peer still ends
the wait at once (its sockets close).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from unitedllm.errors import ConfigError, ConfigProblem

if TYPE_CHECKING:
    import torch

__all__ = ["Engine", "SiloContext", "close_silo", "open_silo"]

Engine = Literal["torch", "deepspeed"]

# Followers wait on the control group between rounds; a dead leader ends the wait through its closed sockets.
CONTROL_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class SiloContext:
    """This process's place in its silo and the silo's control group."""

    engine: Engine
    rank: int
    world_size: int
    local_rank: int
    deepspeed_config: str | None
    control: Any  # the gloo ProcessGroup for commands and weights

    @property
    def is_leader(self) -> bool:
        """Silo rank 0: the only rank that talks to the aggregator and writes files."""
        return self.rank == 0

    def broadcast_object(self, obj: Any = None) -> Any:
        """``obj`` from the leader, on every rank (the leader passes it, followers pass nothing)."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def broadcast_tensors(self, tensors: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The leader's named CPU tensors on every rank: layout as one object, then each tensor."""
        import torch
        import torch.distributed as dist

        layout = None
        if tensors is not None:
            layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        layout = self.broadcast_object(layout)
        out: dict[str, torch.Tensor] = {}
        for name, dtype, shape in layout:
            if self.is_leader:
                assert tensors is not None
                t = tensors[name].detach().to("cpu").contiguous()
            else:
                t = torch.empty(shape, dtype=dtype)
            dist.broadcast(t, src=0, group=self.control)
            out[name] = t
        return out

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on the leader; None on followers."""
        import torch.distributed as dist

        box: list[Any] | None = [None] * self.world_size if self.is_leader else None
        dist.gather_object(obj, box, dst=0, group=self.control)
        return box

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank."""
        import torch.distributed as dist

        box: list[Any] = [None] * self.world_size
        dist.all_gather_object(box, obj, group=self.control)
        return box

    def scatter_objects(self, objs: list[Any] | None) -> Any:
        """The leader's ``objs[r]`` on rank r."""
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.scatter_object_list(box, objs if self.is_leader else None, src=0, group=self.control)
        return box[0]


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.isdigit():
        raise ConfigError(
            ConfigProblem(
                "environment_args.launcher",
                f"a silo worker needs {name} from torchrun or the DeepSpeed launcher; start it with "
                "'unitedllm client' rather than directly",
            )
        )
    return int(value)


def open_silo(engine: Engine, *, deepspeed_config: str | None = None) -> SiloContext:
    """Join the silo's process group (started by torchrun or the DeepSpeed launcher) and open its control group."""
    import torch
    import torch.distributed as dist

    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not dist.is_initialized():
        if engine == "deepspeed":
            import deepspeed

            deepspeed.init_distributed()
        else:
            cuda = torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != ""
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return SiloContext(
        engine=engine,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        deepspeed_config=deepspeed_config,
        control=control,
    )


def close_silo() -> None:
    """Leave the process group (closing twice is harmless)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
