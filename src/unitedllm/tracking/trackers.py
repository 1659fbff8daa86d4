"""Opens the trackers a config asks for (TensorBoard, W&B, MLflow) as ``MetricsLog`` listeners."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unitedllm.config.types import Config
    from unitedllm.run_layout import RunLayout

__all__ = ["open_trackers"]

Listener = Callable[[dict[str, Any]], None]


def _flat_params(cfg: Config) -> dict[str, Any]:
    """``section.key -> value`` of the config with every secret masked (trackers may send it off the machine)."""
    from unitedllm.config.redaction import redacted_config

    out: dict[str, Any] = {}
    for section, values in redacted_config(cfg).items():
        if isinstance(values, dict):
            for key, value in values.items():
                out[f"{section}.{key}"] = value
    return out


@contextmanager
def open_trackers(cfg: Config, *, rank: int, run_id: str, layout: RunLayout) -> Iterator[list[Listener]]:
    """The listeners for ``cfg.tracking_args``; each tracker is finished (marked failed on error) on exit.

    Their files go where ``layout`` puts rank ``rank``'s (:meth:`~unitedllm.run_layout.RunLayout.tensorboard`,
    :meth:`~unitedllm.run_layout.RunLayout.tracker_dir`).

    ``metrics.jsonl`` is not among them: :class:`~unitedllm.tracking.metrics.MetricsLog` always writes it.
    With ``wandb_only_server`` (the default) only the aggregator (rank 0) logs to W&B.
    """
    args = cfg.tracking_args
    listeners: list[Listener] = []
    with ExitStack() as stack:
        if args.enable_tensorboard:
            from unitedllm.tracking.tensorboard import TensorBoardSink

            listeners.append(
                stack.enter_context(
                    TensorBoardSink(layout.tensorboard(rank), params=_flat_params(cfg), rank=rank)
                )
            )
        if args.enable_wandb and (rank == 0 or not args.wandb_only_server):
            from unitedllm.tracking.wandb_sink import WandbSink

            listeners.append(
                stack.enter_context(
                    WandbSink(
                        project=args.wandb_project,
                        entity=args.wandb_entity,
                        name=args.wandb_name,
                        mode=args.wandb_mode,
                        run_id=run_id,
                        rank=rank,
                        directory=layout.tracker_dir(rank),
                        config=_flat_params(cfg),
                    )
                )
            )
        if args.mlflow_tracking_uri:
            from unitedllm.tracking.mlflow_sink import MlflowSink

            listeners.append(
                stack.enter_context(
                    MlflowSink(
                        tracking_uri=args.mlflow_tracking_uri,
                        experiment=args.mlflow_experiment,
                        run_id=run_id,
                        rank=rank,
                        params=_flat_params(cfg),
                    )
                )
            )
        yield listeners
