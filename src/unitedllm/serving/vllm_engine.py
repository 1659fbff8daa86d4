"""The vLLM engine: the same API served through vLLM's async engine with multi-LoRA, where vLLM is installed.

vLLM is not a dependency of UnitedLLM (it needs a CUDA GPU); without it, ``--engine vllm`` stops
with one line saying so. Adapters are passed as ``LoRARequest``s, so vLLM keeps one base in GPU
memory and batches requests for different adapters together.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import uuid
from typing import Any

from unitedllm.errors import ConfigError, ConfigProblem
from unitedllm.serving.adapters import ModelEntry, ModelRegistry
from unitedllm.serving.engine import Chunk, Engine, Generation, SamplingParams
from unitedllm.serving.errors import GenerationFailed

__all__ = ["VLLMEngine", "require_vllm"]


def require_vllm() -> None:
    """A usage error naming what to do when vLLM is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            ConfigProblem(
                "--engine",
                "vllm: the 'vllm' package is not installed here (it needs a CUDA GPU; pip install vllm), "
                "use --engine transformers",
            )
        )


class VLLMEngine(Engine):
    """Serves a registry's models through ``vllm.AsyncLLMEngine`` with LoRA adapters."""

    name = "vllm"

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_batch: int = 16,
        timeout_s: float = 300.0,
        max_lora_rank: int = 64,
    ):
        require_vllm()
        super().__init__(registry)
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.max_lora_rank = max_lora_rank
        self._engine: Any = None
        self._lora_ids: dict[str, int] = {}
        self._next_id = itertools.count(1)

    async def start(self) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(
            model=self.registry.base,
            enable_lora=True,
            max_lora_rank=self.max_lora_rank,
            max_loras=8,
            max_num_seqs=self.max_batch,
            enforce_eager=True,
        )
        self._engine = AsyncLLMEngine.from_engine_args(args)

    async def close(self) -> None:
        if self._engine is not None:
            with contextlib.suppress(Exception):
                self._engine.shutdown_background_loop()
            self._engine = None

    async def load(self, entry: ModelEntry) -> None:
        if entry.path is not None and entry.name not in self._lora_ids:
            self._lora_ids[entry.name] = next(self._next_id)

    async def generate(self, entry: ModelEntry, prompt: str, params: SamplingParams) -> Generation:
        from vllm import SamplingParams as VSampling
        from vllm.lora.request import LoRARequest

        await self.load(entry)
        lora = None
        if entry.path is not None:
            lora = LoRARequest(entry.name, self._lora_ids[entry.name], str(entry.path))
        sampling = VSampling(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop),
            seed=params.seed,
        )
        request_id = uuid.uuid4().hex
        inbox: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        stream = self._engine.generate(prompt, sampling, request_id, lora_request=lora)

        async def pump() -> None:
            sent = 0
            try:
                async for output in stream:
                    done = output.outputs[0]
                    text = done.text
                    inbox.put_nowait(
                        Chunk(
                            text=text[sent:],
                            finish_reason=done.finish_reason if output.finished else None,
                            prompt_tokens=len(output.prompt_token_ids or ()),
                            completion_tokens=len(done.token_ids),
                            model=entry.name,
                        )
                    )
                    sent = len(text)
            except Exception as exc:  # handed to the request, which answers with the error shape
                inbox.put_nowait(GenerationFailed(f"vLLM failed: {type(exc).__name__}: {exc}"))

        task = asyncio.create_task(pump(), name=f"vllm-{request_id}")

        def cancel() -> None:
            task.cancel()
            if self._engine is not None:
                asyncio.ensure_future(self._engine.abort(request_id))

        return Generation(inbox, cancel)
