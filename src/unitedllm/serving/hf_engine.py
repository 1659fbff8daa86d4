"""The transformers engine: one base model in memory, PEFT adapters switched per batch, continuous batching.

A worker thread owns the model. It takes a batch of queued jobs that use the same adapter
(:class:`~unitedllm.serving.batching.BatchQueue`) and decodes them together token by token with a
KV cache (:class:`~unitedllm.serving.continuous.DecodingBatch`). Between tokens, rows whose client
went away, whose deadline passed or which finished leave, and queued jobs for the same adapter join
(prefilled, then stacked into the cache), so a short request arriving during a long generation
starts at once and finishes first. The batch ends when no row is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import threading
import time
from pathlib import Path
from typing import Any

from unitedllm.serving.adapters import ModelEntry, ModelRegistry
from unitedllm.serving.batching import BatchQueue, Job
from unitedllm.serving.engine import BatchObserver, Chunk, Engine, Generation, SamplingParams
from unitedllm.serving.errors import AdapterRefused, GenerationFailed, ServingError
from unitedllm.serving.layout import ADAPTER_WEIGHTS, is_hub_id, is_model_dir

__all__ = ["TransformersEngine"]

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    """Serves a registry's models with transformers + PEFT on the CPU (or one GPU)."""

    name = "transformers"

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        timeout_s: float = 300.0,
        device: str | None = None,
        observer: BatchObserver | None = None,
    ):
        super().__init__(registry)
        self.queue = BatchQueue(max_batch=max_batch, max_queue=max_queue, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.observer = observer
        self._device = device
        self._model: Any = None  # the base, wrapped as a PeftModel once an adapter is loaded
        self._peft: Any = None
        self._tokenizer: Any = None
        self._max_positions: int | None = None
        self._loaded: dict[str, str] = {}  # entry name -> PEFT adapter name
        # Tensor shapes of the first checkpoint loaded from the run: every round must match them.
        # Named adapters may differ (another rank, other targets); PEFT checks they fit the base.
        self._run_shapes: dict[str, tuple[int, ...]] = {}
        self._closing = threading.Event()
        self._model_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self._loads_waiting = 0  # adapter loads waiting for the model: batches stop taking newcomers
        self._waiting_lock = threading.Lock()
        self._cache_kw = "past_key_values"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load_base)
        await self.load(self.registry.default())
        self._worker = threading.Thread(target=self._work, name="unitedllm-generate", daemon=True)
        self._worker.start()

    async def close(self) -> None:
        self._closing.set()  # the running batch stops at its next token
        self.queue.close()
        if self._worker is not None:
            await asyncio.to_thread(self._worker.join)
            self._worker = None

    def queue_depth(self) -> int:
        return len(self.queue)

    def _load_base(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = self.registry.base
        if not is_hub_id(base) and not is_model_dir(Path(base)):
            raise ServingError(f"{base} holds no model yet (no config.json with weights)")
        device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        default = self.registry.default().path
        tokenizer_dir = (
            str(default) if default is not None and (default / "tokenizer_config.json").is_file() else base
        )
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        except (OSError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ServingError(f"cannot load the base model from {base}: {first_line}") from exc
        model = model.to(device)
        model.eval()
        self._model = model
        self._device = device
        self._max_positions = getattr(model.config, "max_position_embeddings", None)
        # transformers 5 names the KV cache ``cache`` (``past_key_values`` before, deprecated since).
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )

    # -- adapters ----------------------------------------------------------------------------

    async def load(self, entry: ModelEntry) -> None:
        if entry.path is None or entry.name in self._loaded:
            return
        await asyncio.to_thread(self._load_adapter, entry)

    def _load_adapter(self, entry: ModelEntry) -> None:
        # A running batch stops taking newcomers while a load waits, so the load waits for it only.
        with self._waiting_lock:
            self._loads_waiting += 1
        with self._model_lock:
            with self._waiting_lock:
                self._loads_waiting -= 1
            self._load_adapter_locked(entry)

    def _load_adapter_locked(self, entry: ModelEntry) -> None:
        assert entry.path is not None
        if entry.name in self._loaded:
            return
        digest = self._check(entry)
        adapter = f"adapter_{len(self._loaded)}"
        try:
            if self._peft is None:
                from peft import PeftModel

                self._peft = PeftModel.from_pretrained(self._model, str(entry.path), adapter_name=adapter)
                self._peft.eval()
            else:
                self._peft.load_adapter(str(entry.path), adapter_name=adapter)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise AdapterRefused(str(entry.path), f"it does not fit the base model: {exc}") from exc
        if _digest(entry.path / ADAPTER_WEIGHTS) != digest:
            self._peft.delete_adapter(adapter)
            raise AdapterRefused(str(entry.path), "its weights changed while loading")
        entry.digest = digest
        self._loaded[entry.name] = adapter
        log.info("loaded %s from %s (sha256 %s)", entry.name, entry.path, digest[:12])

    def _check(self, entry: ModelEntry) -> str:
        """Digest, shapes and finiteness of an adapter's tensors, before the model sees them."""
        import torch
        from safetensors.torch import load as load_safetensors

        assert entry.path is not None
        where = str(entry.path)
        try:
            data = (entry.path / ADAPTER_WEIGHTS).read_bytes()
        except OSError as exc:
            raise AdapterRefused(where, f"cannot read {ADAPTER_WEIGHTS}: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()
        if entry.digest is not None and entry.digest != digest:
            raise AdapterRefused(
                where,
                f"{ADAPTER_WEIGHTS} has sha256 {digest}, not the recorded {entry.digest} (changed since written)",
            )
        try:
            tensors = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
            raise AdapterRefused(where, f"{ADAPTER_WEIGHTS} is damaged: {exc}") from exc
        if entry.round is not None:
            self._check_shapes(where, {name: tuple(t.shape) for name, t in tensors.items()})
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise AdapterRefused(where, f"{name} holds NaN or infinite values")
        if entry.round is not None and not self._run_shapes:
            self._run_shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        return digest

    def _check_shapes(self, where: str, shapes: dict[str, tuple[int, ...]]) -> None:
        if not self._run_shapes:
            return
        if set(shapes) != set(self._run_shapes):
            raise AdapterRefused(where, "its tensor names differ from the run's other checkpoints")
        wrong = [n for n, s in shapes.items() if s != self._run_shapes[n]]
        if wrong:
            raise AdapterRefused(
                where, f"{wrong[0]} has shape {shapes[wrong[0]]}, not {self._run_shapes[wrong[0]]}"
            )

    # -- requests ----------------------------------------------------------------------------

    async def generate(self, entry: ModelEntry, prompt: str, params: SamplingParams) -> Generation:
        await self.load(entry)
        ids = list(self._tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            ids = [self._tokenizer.bos_token_id if self._tokenizer.bos_token_id is not None else 0]
        if self._max_positions is not None and len(ids) + params.max_tokens > self._max_positions:
            raise ServingError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self._max_positions} tokens",
                param="max_tokens",
            )
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

        def emit(item: Chunk | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        job = Job(
            adapter=self._loaded.get(entry.name) if entry.path is not None else None,
            prompt_ids=ids,
            params=params,
            emit=emit,
            deadline=time.monotonic() + self.timeout_s,
            model=entry.name,
        )
        self.queue.submit(job)
        # A client that goes away cancels: its row stops at the next token.
        return Generation(inbox, job.cancelled.set)

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        while (jobs := self.queue.next_batch()) is not None:
            started = time.perf_counter()
            served = list(jobs)
            try:
                with self._model_lock:
                    tokens = self._run(served)
            except Exception as exc:  # the server must outlive one bad batch; the clients get the reason
                log.exception("generation failed")
                for job in served:
                    job.emit(GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}"))
                continue
            if self.observer is not None:
                self.observer(len(served), tokens, time.perf_counter() - started)

    def _run(self, served: list[Job]) -> int:
        """Decode ``served`` (one adapter) until every row is done, taking in newcomers as it goes.

        Jobs for the same adapter that reach the head of the queue join at the next token (up to
        ``max_batch`` rows); a job for another adapter at the head stops the joining, so it waits
        for this batch only. ``served`` grows by the jobs that joined. Returns the tokens generated.
        """
        import torch

        from unitedllm.serving.continuous import DecodingBatch

        adapter = served[0].adapter
        switch: Any = contextlib.nullcontext()
        if self._peft is not None:
            if adapter is None:
                switch = self._peft.disable_adapter()
            else:
                self._peft.set_adapter(adapter)
        model = self._peft if self._peft is not None else self._model
        batch = DecodingBatch(
            model,
            tokenizer=self._tokenizer,
            device=str(self._device),
            cache_kw=self._cache_kw,
            timeout_s=self.timeout_s,
            closing=self._closing,
            on_cancelled=self.on_cancelled,
        )
        with torch.inference_mode(), switch:
            batch.admit(served)
            while batch.rows:
                batch.step()
                room = self.queue.max_batch - len(batch.rows)
                if batch.rows and room > 0 and batch.can_join and not self._loads_waiting:
                    joining = self.queue.joining(adapter, room)
                    if joining:
                        served.extend(joining)
                        batch.admit(joining)
        return batch.generated


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
