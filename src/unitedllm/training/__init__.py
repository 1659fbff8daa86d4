"""Local training for UnitedLLM: the :class:`LocalTrainer` interface and its Hugging Face implementation.

Importing this package is light (no torch/transformers): they load on first use.
"""

from __future__ import annotations

from unitedllm.training.base import EvalResult, FitResult, LocalTrainer, StepEvent
from unitedllm.training.hf import HFLocalTrainer
from unitedllm.training.model_cache import ModelCache

__all__ = ["EvalResult", "FitResult", "HFLocalTrainer", "LocalTrainer", "ModelCache", "StepEvent"]
