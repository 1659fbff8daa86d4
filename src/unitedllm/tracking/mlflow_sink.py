"""MLflow tracker: one MLflow run per process in ``tracking_args.mlflow_experiment``."""

from __future__ import annotations

import importlib
import os
import re
import time
from typing import Any

from unitedllm.errors import MissingDependency
from unitedllm.tracking.errors import TrackingError
from unitedllm.tracking.scalars import Scalar, rank_prefix
from unitedllm.tracking.sink import TrackerSink, flat_key

__all__ = ["MlflowSink"]

_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


class MlflowSink(TrackerSink):
    """Logs each event's scalars in one ``log_batch`` call; step = round (sample for system metrics)."""

    name = "mlflow"

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        run_id: str,
        rank: int,
        params: dict[str, Any] | None = None,
    ):
        super().__init__()
        try:
            tracking = importlib.import_module("mlflow.tracking")
            entities = importlib.import_module("mlflow.entities")
        except ImportError as exc:
            raise MissingDependency("mlflow", "tracking", "tracking_args.mlflow_tracking_uri") from exc
        if tracking_uri.startswith("file:"):
            # MLflow 3 refuses file stores unless opted in; a file:// URI in the config is that opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._metric_class = entities.Metric
        self._status = entities.RunStatus
        try:
            self.client = tracking.MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found is not None else self.client.create_experiment(experiment)
            )
            run = self.client.create_run(
                experiment_id,
                run_name=f"{run_id}-{rank_prefix(rank)}",
                tags={"unitedllm.run_id": run_id, "unitedllm.rank": str(rank)},
            )
        except Exception as exc:  # MlflowException, or the store's own I/O and driver errors
            raise TrackingError(
                f"tracking_args.mlflow_tracking_uri: could not start an MLflow run at {tracking_uri!r} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        self.mlflow_run_id: str = run.info.run_id
        for key, value in sorted((params or {}).items())[:100]:
            self.client.log_param(self.mlflow_run_id, key, str(value)[:500])

    def write(self, scalars: list[Scalar]) -> None:
        now_ms = int(time.time() * 1000)
        metrics = [
            self._metric_class(
                key=_BAD_KEY_CHARS.sub("_", flat_key(s)),
                value=s.value,
                timestamp=int(s.wall_time * 1000) if s.wall_time is not None else now_ms,
                step=s.step,
            )
            for s in scalars
        ]
        self.client.log_batch(self.mlflow_run_id, metrics=metrics)

    def finish(self, *, failed: bool) -> None:
        status = "FAILED" if failed else "FINISHED"
        self.client.set_terminated(self.mlflow_run_id, status=status)
