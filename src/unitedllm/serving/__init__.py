"""Use a trained model: export it as a Hugging Face folder, or serve it behind an OpenAI-compatible API.

``unitedllm export`` writes a run's global (or a client's) model with its tokenizer, prompt template
and a provenance card; ``unitedllm serve`` answers ``/v1/completions`` and ``/v1/chat/completions``
for every adapter of a run on one base model in memory, and can follow a live run round by round.
Heavy libraries load only when a command runs.
"""

from __future__ import annotations

from unitedllm.serving.errors import (
    AdapterRefused,
    GenerationTimeout,
    ModelNotFound,
    Overloaded,
    ServingError,
)

__all__ = ["AdapterRefused", "GenerationTimeout", "ModelNotFound", "Overloaded", "ServingError"]
