"""Metrics: the JSONL log every run writes, optional trackers, and reports."""

from unitedllm.tracking.metrics import MetricsLog, read_metrics

__all__ = ["MetricsLog", "read_metrics"]
