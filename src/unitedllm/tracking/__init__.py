"""Metrics: the JSONL log every run writes, optional trackers, system metrics and run reports.

The aggregator (and each client process) writes ``metrics.jsonl`` through :class:`MetricsLog`;
:func:`open_trackers` adds TensorBoard / W&B / MLflow listeners as the config asks, and
:func:`system_metrics` samples CPU/RAM/GPU use into the same log. Heavy imports (torch,
wandb, mlflow) happen only when a tracker is opened.
"""

from unitedllm.tracking.metrics import MetricsLog, read_metrics
from unitedllm.tracking.system import SystemSampler, system_metrics
from unitedllm.tracking.trackers import open_trackers

__all__ = ["MetricsLog", "SystemSampler", "open_trackers", "read_metrics", "system_metrics"]
