"""Errors of experiment tracking and run reports (both derive from :class:`UnitedLLMError`)."""

from __future__ import annotations

from unitedllm.errors import UnitedLLMError

__all__ = ["RunNotFound", "TrackingError"]


class TrackingError(UnitedLLMError):
    """A tracker (TensorBoard, Weights & Biases, MLflow) could not be started."""


class RunNotFound(UnitedLLMError):
    """A run directory has no ``metrics.jsonl`` to report on."""

    def __init__(self, run_dir: str, reason: str):
        self.run_dir = run_dir
        super().__init__(f"no UnitedLLM run to report on at {run_dir}: {reason}")
