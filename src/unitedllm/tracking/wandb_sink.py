"""Weights & Biases tracker: one W&B run per process, grouped by the UnitedLLM run id."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from unitedllm.errors import MissingDependency
from unitedllm.tracking.errors import TrackingError
from unitedllm.tracking.scalars import Scalar, rank_prefix
from unitedllm.tracking.sink import TrackerSink, flat_key

__all__ = ["WandbSink"]


class WandbSink(TrackerSink):
    """Logs scalars to a W&B run; round metrics on the ``round`` axis, system metrics on ``system/sample``."""

    name = "wandb"

    def __init__(
        self,
        *,
        project: str,
        run_id: str,
        rank: int,
        directory: Path,
        entity: str | None = None,
        name: str | None = None,
        mode: str = "online",
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        try:
            wandb = importlib.import_module("wandb")
        except ImportError as exc:
            raise MissingDependency("wandb", "tracking", "tracking_args.enable_wandb") from exc
        directory.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        # WANDB_MODE in the environment (CI, an air-gapped host) wins over the config's wandb_mode.
        if not os.environ.get("WANDB_MODE"):
            kwargs["mode"] = mode
        try:
            self.run = wandb.init(
                project=project,
                entity=entity,
                name=name or f"{run_id}-{rank_prefix(rank)}",
                group=run_id,
                job_type=rank_prefix(rank),
                dir=str(directory),
                config=config or {},
                reinit="create_new",
                **kwargs,
            )
        except Exception as exc:  # wandb raises its own error classes (UsageError, CommError...)
            raise TrackingError(
                f"tracking_args.enable_wandb: could not start a W&B run in project {project!r} "
                f"({type(exc).__name__}: {exc}); log in with `wandb login` or set tracking_args.wandb_mode: offline"
            ) from exc
        self.run.define_metric("round")
        self.run.define_metric("system/sample")
        self.run.define_metric("system/*", step_metric="system/sample")
        self.run.define_metric("*", step_metric="round")

    def write(self, scalars: list[Scalar]) -> None:
        data: dict[str, float] = {}
        for s in scalars:
            data["system/sample" if s.tag.startswith("system/") else "round"] = s.step
            data[flat_key(s)] = s.value
        self.run.log(data)

    def finish(self, *, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
