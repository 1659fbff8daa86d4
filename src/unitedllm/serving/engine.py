"""The engine interface the HTTP layer talks to: generate text for one choice of one request.

An engine owns the model(s) and the :class:`~unitedllm.serving.adapters.ModelRegistry` of names it
answers to. The HTTP layer never sees tensors or tokenizers; it gets :class:`Chunk` objects.
Engines: :mod:`unitedllm.serving.hf_engine` (transformers + PEFT, dynamic batching, CPU or GPU) and
:mod:`unitedllm.serving.vllm_engine` (vLLM with multi-LoRA, where installed).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from unitedllm.serving.adapters import ModelEntry, ModelRegistry

__all__ = ["BatchObserver", "Chunk", "Engine", "Generation", "SamplingParams"]

BatchObserver = Callable[[int, int, float], None]
"""Called after each batch with (rows, generated tokens, seconds)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one choice is generated (already validated by the HTTP layer)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Chunk:
    """New text of one choice; the last chunk has a ``finish_reason`` and the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""


class Generation:
    """One choice being generated: iterate its chunks; :meth:`cancel` stops it (idempotent).

    Whoever holds one must iterate it to the end or cancel it, or its row keeps generating.
    """

    def __init__(self, inbox: asyncio.Queue[Chunk | BaseException], cancel: Callable[[], None]):
        self._inbox = inbox
        self._cancel = cancel
        self._done = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    def cancel(self) -> None:
        self._done = True
        self._cancel()


class Engine(ABC):
    """Generates text for the names in its registry; an async context manager (start/stop)."""

    name = "engine"

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.observer: BatchObserver | None = None
        self.on_cancelled: Callable[[], None] | None = None  # a request stopped because its client left

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abstractmethod
    async def start(self) -> None:
        """Load the base model and the registry's default adapter."""

    @abstractmethod
    async def close(self) -> None:
        """Stop generating and free the model; closing twice is harmless."""

    @abstractmethod
    async def generate(self, entry: ModelEntry, prompt: str, params: SamplingParams) -> Generation:
        """Check and queue one choice (errors such as a full queue are raised here), then stream it."""

    @abstractmethod
    async def load(self, entry: ModelEntry) -> None:
        """Load and check ``entry``'s adapter (raises :class:`AdapterRefused`); idempotent."""

    def queue_depth(self) -> int:
        """Requests waiting for the model."""
        return 0
